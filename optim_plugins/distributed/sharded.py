"""ZeRO-1/2 style sharded optimizer state: each rank keeps and steps the state of a part of the parameters.

Every rank holds all parameters and (after DDP's all-reduce) all gradients. The parameters are
split into ``world_size`` parts of about equal *optimizer-state* bytes, by whole tensors, so
that whole-tensor math (factored moments, trust ratios, orthogonalised updates) stays exact.
A rank keeps the state of its part only, steps only its part, and the updated parameters are
then broadcast from their owners in buckets (flattened per device and dtype).

With ``stage=2`` (ZeRO-2) the model is not wrapped in DDP: :meth:`ShardedOptimizer.step` first
averages the gradients into their owners with a bucketed ``reduce_scatter_tensor`` (each rank's
part padded to the largest part) and frees the gradients of parameters other ranks own. The
reduction runs once per optimizer step, after backward: between reduction and ``zero_grad`` a
rank holds only its partition's gradients, but the peak during backward is still every gradient
(no backward hooks). Communication per step: a reduce-scatter plus the broadcast, the volume of
DDP's all-reduce alone (ZeRO-1 under DDP adds the broadcast to the all-reduce).

Checkpoints never communicate in :meth:`ShardedOptimizer.state_dict` (the HF Trainer calls it
on the saving rank alone): it returns this rank's shard plus metadata. Consolidation is the
explicit collective :meth:`ShardedOptimizer.consolidate_state_dict`; :meth:`load_state_dict`
takes a shard, a complete set of shards (list or directory) or a consolidated dict and
reshards into any world size.
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
import re
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..memory import state_tensors

META_KEY = "sharding"
FORMAT = 1
SHARD_PATTERN = "optimizer.rank{rank:05d}-of-{world_size:05d}.pt"
_SHARD_RE = re.compile(r"optimizer\.rank(\d+)-of-(\d+)\.pt$")


# ----------------------------------------------------------------------------- helpers


def _rank_and_size(process_group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


def _global_rank(process_group: Any, rank: int) -> int:
    if process_group is None or process_group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(process_group, rank)


# torch 2.13 renamed reduce_scatter_tensor (deprecated there) to reduce_scatter_single; gloo has both
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def _check_stage(stage: Any) -> None:
    if stage not in (1, 2) or isinstance(stage, bool):
        raise ValueError(f"invalid stage: {stage!r} (1: sharded optimizer state, 2: also sharded gradients)")


def _capabilities_of(optimizer: torch.optim.Optimizer, spec: Any = None) -> Any:
    if spec is not None:
        return spec.capabilities
    return getattr(type(optimizer), "capabilities", None)


def check_shardable(optimizer: torch.optim.Optimizer, spec: Any = None) -> None:
    """Raise ``ValueError`` when ``optimizer``'s state cannot be split across ranks."""
    name = spec.name if spec is not None else type(optimizer).__name__
    caps = _capabilities_of(optimizer, spec)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("optimizer LBFGS cannot be sharded: its state (history, line search) spans all parameters")
    if caps is None:
        return  # a torch.optim optimizer: per-tensor state
    if caps.shardable == "no":
        raise ValueError(
            f"optimizer {name!r} cannot be sharded (capability shardable='no'): its state couples all "
            "parameters (e.g. a global step size), so a rank cannot step a part of them alone; "
            "use it unsharded (plain DDP), or choose an optimizer with shardable 'elements' or 'tensors'"
        )
    if caps.needs_closure:
        raise ValueError(
            f"optimizer {name!r} cannot be sharded: it needs a closure that re-evaluates the model "
            "inside step (needs_closure=True), which a rank stepping a part of the parameters cannot run alone"
        )


def state_bytes(optimizer: torch.optim.Optimizer, p: Tensor, group: Mapping[str, Any]) -> int:
    """Estimated bytes of optimizer state for ``p``: asks the optimizer's ``init_state`` on a
    meta tensor when it has one (exact for factored and 8-bit states), else 2 x the parameter."""
    # _initial_state: init_state with state codecs applied (8-bit states), where the base has it
    init = getattr(optimizer, "_initial_state", None) or getattr(optimizer, "init_state", None)
    if callable(init):
        try:
            state = init(torch.empty_like(p, device="meta"), group)
            total = sum(_nbytes(v) for v in state_tensors(state))
            from ..optimizers.precision import resolve_compensation

            if resolve_compensation(group.get("compensation"), p.dtype) == "kahan":
                total += p.numel() * p.element_size()
            return int(total)
        except Exception:  # an init_state that cannot run on meta tensors: fall back to the estimate
            pass
    return 2 * p.numel() * p.element_size()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, include_scalars: bool = False) -> int:
    """Bytes held in ``optimizer.state`` (0-d tensors such as ``step`` only with ``include_scalars``)."""
    return sum(_nbytes(t) for s in optimizer.state.values() for t in state_tensors(s) if include_scalars or t.dim() > 0)


def partition(costs: Sequence[Sequence[int]], world_size: int) -> list[int]:
    """Owner rank of each parameter, greedily balanced (largest first, to the least loaded rank).

    ``costs`` holds one list of per-parameter costs per parameter group; groups are placed in
    order, carrying the loads over, so adding a group later gives the same owners as building
    with it. The heaviest and lightest rank then differ by at most one parameter's cost.
    """
    loads = [0] * world_size
    owners: list[int] = []
    for group_costs in costs:
        base = len(owners)
        owners.extend([0] * len(group_costs))
        order = sorted(range(len(group_costs)), key=lambda i: (-group_costs[i], i))
        for i in order:
            rank = min(range(world_size), key=lambda r: (loads[r], r))
            owners[base + i] = rank
            loads[rank] += group_costs[i]
    return owners


# ----------------------------------------------------------------------------- shards on disk


def shard_file_name(rank: int, world_size: int) -> str:
    return SHARD_PATTERN.format(rank=rank, world_size=world_size)


def save_sharded(optimizer: "ShardedOptimizer", directory: str | os.PathLike) -> str:
    """Save this rank's shard as ``directory/optimizer.rankRRRRR-of-WWWWW.pt`` (no communication).

    Written to a temporary name and renamed, so a rank dying mid-write leaves no truncated shard
    (the set is then incomplete, which loading reports); shards of other directories are untouched.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, shard_file_name(optimizer.rank, optimizer.world_size))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(optimizer.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def shard_files(directory: str | os.PathLike) -> list[str]:
    """The shard files of ``directory``, checked to be one complete set (``ValueError`` otherwise)."""
    path = os.fspath(directory)
    files = sorted(f for f in glob.glob(os.path.join(path, "optimizer.rank*-of-*.pt")) if _SHARD_RE.search(f))
    if not files:
        raise ValueError(f"no optimizer shard files (optimizer.rankRRRRR-of-WWWWW.pt) in {path!r}")
    found = [tuple(int(x) for x in _SHARD_RE.search(f).groups()) for f in files]
    sizes = sorted({w for _, w in found})
    if len(sizes) > 1:
        raise ValueError(f"{path!r} holds optimizer shards of several world sizes {sizes}; keep one set per directory")
    ranks = sorted(r for r, _ in found)
    if ranks != list(range(sizes[0])):
        missing = sorted(set(range(sizes[0])) - set(ranks))
        raise ValueError(
            f"{path!r} holds an incomplete set of optimizer shards of a {sizes[0]}-process run: missing ranks "
            f"{missing} (a rank died while saving?); load an earlier checkpoint"
        )
    return files


def load_shards(source: str | os.PathLike | Sequence[Any]) -> list[dict[str, Any]]:
    """The shard dicts of a directory (``optimizer.rank*-of-*.pt``), a file, or a list of files/dicts."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return [torch.load(f, map_location="cpu", weights_only=True) for f in shard_files(path)]
        return [torch.load(path, map_location="cpu", weights_only=True)]
    return [s if isinstance(s, Mapping) else load_shards(s)[0] for s in source]


def consolidate_shards(shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge a complete set of shards (one per rank of one run) into a torch-style state dict.

    Offline, no communication. Raises ``ValueError`` when ranks are missing, repeated, or
    the shards come from different runs (world size, partition or parameter shapes differ).
    A consolidated (plain) state dict is returned as is.
    """
    shards = list(shards)
    if not shards:
        raise ValueError("no optimizer shards given")
    plain = [s for s in shards if META_KEY not in s]
    if plain:
        if len(shards) == 1:
            return dict(plain[0])
        raise ValueError("got a consolidated state dict among shards: load it alone")
    metas = [s[META_KEY] for s in shards]
    world_size = metas[0]["world_size"]
    for m in metas:
        for key in ("world_size", "partitions", "param_shapes"):
            if m[key] != metas[0][key]:
                raise ValueError(f"optimizer shards come from different runs: their {key!r} differ")
    ranks = sorted(m["rank"] for m in metas)
    if ranks != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        repeated = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ValueError(
            f"incomplete set of optimizer shards of a {world_size}-process run: got ranks {ranks}"
            + (f", missing {missing}" if missing else "") + (f", repeated {repeated}" if repeated else "")
        )
    state: dict[int, Any] = {}
    for s in sorted(shards, key=lambda s: s[META_KEY]["rank"]):
        state.update(s["state"])
    first = min(shards, key=lambda s: s[META_KEY]["rank"])
    return {"state": state, "param_groups": first["param_groups"]}


def _is_complete_shard(shard: Mapping[str, Any]) -> bool:
    meta = shard[META_KEY]
    n = len(meta["param_shapes"])
    return sorted(meta["partitions"][meta["rank"]]) == list(range(n))


# ----------------------------------------------------------------------------- the optimizer


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO-1: optimizer state sharded across the ranks of ``process_group``, parameters broadcast.

    ``ShardedOptimizer(model_or_params, "adamw", lr=..., **options)`` builds the optimizer
    by name with :func:`optim_plugins.create_optimizer` (a class works too);
    ``ShardedOptimizer.wrap(optimizer)`` shards an optimizer already built (any
    ``torch.optim.Optimizer`` with per-tensor state; state it already holds for parameters
    other ranks own is dropped). ``param_groups`` are the full groups (schedulers work as
    usual); ``state`` holds this rank's part only.

    ``stage=1`` (ZeRO-1): every rank must hold the same gradients when :meth:`step` runs (DDP,
    or an all-reduce of your own). ``stage=2`` (ZeRO-2): each rank holds the gradients of its own
    batch (no DDP); :meth:`step` averages them into their owners (see :meth:`reduce_gradients`).
    Without an initialised process group it runs as a world of one.

    If a collective fails (another rank died or timed out), :meth:`step` raises ``RuntimeError``
    saying so; this rank's parameters may then be partly updated: restart from the last checkpoint.

    Args:
        process_group: the ranks to shard across (default: the whole world).
        bucket_mb: size of the flattened buckets parameters are broadcast (and, with stage 2,
            gradients reduce-scattered) in.
        stage: 1 (ZeRO-1, sharded optimizer state) or 2 (also sharded gradients).
    """

    # torch.amp.GradScaler: unscale the gradients itself and skip step() on overflow, rather than
    # hand the wrapped optimizer grad_scale/found_inf (it would set them on this wrapper, unseen by
    # the inner step, and the flag would not be agreed across ranks). Agree the flag with
    # sync_grad_scaler(scaler, opt) after scaler.unscale_(opt): needed with stage=2, where ranks hold
    # different gradients (a rank that skips alone leaves the others waiting in the reduce-scatter).
    _step_supports_amp_scaling = False

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        optimizer: str | Mapping[str, Any] | type | Callable[..., torch.optim.Optimizer] = "adamw",
        *,
        process_group: Any = None,
        bucket_mb: float = 25.0,
        stage: int = 1,
        **options: Any,
    ):
        spec = None
        _check_stage(stage)
        if isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("ShardedOptimizer(params, optimizer=...) takes a name or class; use ShardedOptimizer.wrap(optimizer)")
        if isinstance(optimizer, (str, Mapping)) or hasattr(optimizer, "options"):
            from .. import create_optimizer
            from ..config import OptimizerConfig
            from ..registry import get_optimizer_spec

            name = optimizer if isinstance(optimizer, str) else OptimizerConfig.from_dict(optimizer).name
            spec = get_optimizer_spec(name)
            if spec.capabilities.shardable == "no":  # refuse before building anything
                check_shardable(None, spec)  # type: ignore[arg-type]
            inner = create_optimizer(optimizer, params_or_model, **options)
        elif callable(optimizer):
            params = params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model
            inner = optimizer(params, **options)
        else:
            raise TypeError(f"optimizer must be a registry name, a config or an optimizer class, not {optimizer!r}")
        self._setup(inner, spec, process_group, bucket_mb, stage)

    @classmethod
    def wrap(cls, optimizer: torch.optim.Optimizer, *, process_group: Any = None, bucket_mb: float = 25.0,
             stage: int = 1) -> "ShardedOptimizer":
        """Shard an optimizer already built (its param_groups stay the full groups)."""
        if isinstance(optimizer, ShardedOptimizer):
            raise TypeError("optimizer is already a ShardedOptimizer")
        _check_stage(stage)
        self = cls.__new__(cls)
        self._setup(optimizer, None, process_group, bucket_mb, stage)
        return self

    def _setup(self, inner: torch.optim.Optimizer, spec: Any, process_group: Any, bucket_mb: float, stage: int) -> None:
        check_shardable(inner, spec)
        if bucket_mb <= 0:
            raise ValueError(f"invalid bucket_mb: {bucket_mb!r} (must be > 0)")
        self.optimizer = inner
        self.process_group = process_group
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.stage = stage
        self._grads_reduced = False
        self.rank, self.world_size = _rank_and_size(process_group)
        # what torch.optim.Optimizer.__init__ sets, without building groups of our own
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self._owners: list[int] = []
        self._costs: list[list[int]] = []
        self._repartition()
        for i, p in enumerate(self._params()):  # wrap(): drop state of parameters other ranks own
            if self._owners[i] != self.rank:
                inner.state.pop(p, None)

    # -------------------------------------------------------------- delegation

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:  # skipped_steps etc. of the wrapped optimizer
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def __repr__(self) -> str:
        return f"ShardedOptimizer(rank {self.rank} of {self.world_size}, owns {len(self.owned_indices)} of {len(self._owners)} parameters) of {self.optimizer!r}"

    # -------------------------------------------------------------- partition

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _repartition(self) -> None:
        costs = [[state_bytes(self.optimizer, p, g) for p in g["params"]] for g in self.param_groups]
        if not any(c for gc in costs for c in gc):  # stateless (plain SGD): balance the work
            costs = [[p.numel() * p.element_size() for p in g["params"]] for g in self.param_groups]
        self._costs = costs
        self._owners = partition(costs, self.world_size)
        params = self._params()
        self._shapes = [list(p.shape) for p in params]
        owned, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            owned.append([p for p, o in zip(g["params"], self._owners[start:start + n]) if o == self.rank])
            start += n
        self._owned_per_group = owned
        self._buckets = self._make_buckets(params)

    def _make_buckets(self, params: list[Tensor]) -> list[tuple[int, list[int]]]:
        buckets: list[tuple[int, list[int]]] = []
        for owner in range(self.world_size):
            by_kind: dict[tuple, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                if self._owners[i] == owner:
                    by_kind[(str(p.device), str(p.dtype))].append(i)
            for indices in by_kind.values():
                current: list[int] = []
                size = 0
                for i in indices:
                    nbytes = _nbytes(params[i])
                    if current and size + nbytes > self.bucket_bytes:
                        buckets.append((owner, current))
                        current, size = [], 0
                    current.append(i)
                    size += nbytes
                if current:
                    buckets.append((owner, current))
        return buckets

    @property
    def partitions(self) -> list[list[int]]:
        """Global parameter indices (state-dict numbering) owned by each rank."""
        return [[i for i, o in enumerate(self._owners) if o == r] for r in range(self.world_size)]

    @property
    def owned_indices(self) -> list[int]:
        return [i for i, o in enumerate(self._owners) if o == self.rank]

    def owned_params(self) -> list[Tensor]:
        return [p for ps in self._owned_per_group for p in ps]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        if "_owners" in self.__dict__:
            self._repartition()

    # -------------------------------------------------------------- step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grads_reduced = False

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """ZeRO-2 (``stage=2``): average every gradient across ranks into its owner and free the
        gradients of parameters other ranks own (collective; :meth:`step`, :meth:`clip_grad_norm_`
        and :meth:`found_inf` call it, once per step). A no-op with ``stage=1``.

        Bucketed ``reduce_scatter_tensor`` per device and dtype: round ``k`` sends the ``k``-th
        slice of every rank's part (the owned gradients, flattened and padded to the largest
        part). A parameter without a gradient on some rank counts as zero there; one without a
        gradient on every rank keeps ``grad=None``.
        """
        if self.stage != 2 or self._grads_reduced:
            return
        self._grads_reduced = True
        if self.world_size == 1:
            return
        params = self._params()
        with self._collective("the gradient reduce-scatter"):
            has = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32)
            dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self.process_group)
            kinds: dict[tuple, list[list[int]]] = defaultdict(lambda: [[] for _ in range(self.world_size)])
            for i, p in enumerate(params):
                if has[i]:
                    kinds[(p.device, p.dtype)][self._owners[i]].append(i)
            for (device, dtype), per_rank in kinds.items():
                flats = []
                for indices in per_rank:
                    parts = [(params[i].grad if params[i].grad is not None else torch.zeros_like(params[i])).reshape(-1)
                             for i in indices]
                    flats.append(torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device))
                size = max(f.numel() for f in flats)
                step = max(1, self.bucket_bytes // (torch.empty((), dtype=dtype).element_size() * self.world_size))
                mine = torch.empty(size, dtype=dtype, device=device)
                for start in range(0, size, step):
                    n = min(step, size - start)
                    send = torch.zeros(self.world_size * n, dtype=dtype, device=device)
                    for r, flat in enumerate(flats):
                        piece = flat[start:start + n]
                        send[r * n:r * n + piece.numel()] = piece
                    send.div_(self.world_size)  # average as DDP does (divide, then sum)
                    _reduce_scatter(mine[start:start + n], send, group=self.process_group)
                offset = 0
                for i in per_rank[self.rank]:
                    p = params[i]
                    reduced = mine[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
                    if p.grad is None:
                        p.grad = reduced.clone()
                    else:
                        p.grad.copy_(reduced)
        for i, p in enumerate(params):
            if self._owners[i] != self.rank:
                p.grad = None

    @contextlib.contextmanager
    def _collective(self, what: str):
        """Name the cause when a collective fails: another rank died (gloo: connection reset) or hung."""
        try:
            yield
        except RuntimeError as exc:
            if "ShardedOptimizer" in str(exc):
                raise
            raise RuntimeError(
                f"ShardedOptimizer on rank {self.rank} of {self.world_size}: {what} with the other ranks failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); another rank probably died or timed out. "
                "This rank's parameters may be partly updated: restart every rank from the last checkpoint"
            ) from exc

    def train(self) -> None:
        """For train/eval optimizers (schedule-free): switch, then broadcast the parameters
        from their owners (a collective: call it on every rank). A no-op for other optimizers."""
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
            self._broadcast_params()

    def eval(self) -> None:
        """See :meth:`train`."""
        if callable(getattr(self.optimizer, "eval", None)):
            self.optimizer.eval()
            self._broadcast_params()

    def _all_reduce_max(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        flags = torch.tensor(values, dtype=torch.float64)
        with self._collective("an all_reduce of step flags"):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        return flags.tolist()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step this rank's parameters, then broadcast every updated parameter from its owner.

        A closure is evaluated once here (on every rank). The non-finite-gradient policy of the
        wrapped optimizer (``nonfinite="skip"``/``"raise"``) is agreed across ranks. If the step
        fails on any rank, every rank raises (no rank is left waiting in the broadcast).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        self._grads_reduced = False  # the next backward brings new gradients
        policy = self.optimizer.defaults.get("nonfinite", "propagate")
        if policy in ("skip", "raise"):
            grads = [p.grad for p in self.owned_params() if p.grad is not None]
            local = float(not all(bool(torch.isfinite(g).all()) for g in grads))
            if self._all_reduce_max([local])[0]:
                if policy == "raise":
                    raise FloatingPointError(
                        f"{type(self.optimizer).__name__}: non-finite gradient (NaN/Inf) on some rank "
                        "(nonfinite='raise'); no parameter or state was changed"
                    )
                self.optimizer.skipped_steps = getattr(self.optimizer, "skipped_steps", 0) + 1
                return loss
        full = [g["params"] for g in self.param_groups]
        error: Exception | None = None
        try:
            for g, owned in zip(self.param_groups, self._owned_per_group):
                g["params"] = owned
            self.optimizer.step()
        except Exception as exc:  # agree on failure before anyone waits in a broadcast
            error = exc
        finally:
            for g, params in zip(self.param_groups, full):
                g["params"] = params
        failed = self._all_reduce_max([float(self.rank + 1) if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"ShardedOptimizer: the optimizer step failed on rank {int(failed) - 1} (see its error); "
                f"parameters were not synchronised on rank {self.rank}: restart every rank from the last checkpoint"
            )
        self._broadcast_params()
        return loss

    def _broadcast_params(self) -> None:
        if self.world_size == 1:
            return
        with self._collective("the broadcast of updated parameters"):
            self._broadcast_params_now()

    def _broadcast_params_now(self) -> None:
        params = self._params()
        pending = []
        for owner, indices in self._buckets:
            src = _global_rank(self.process_group, owner)
            tensors = [params[i] for i in indices]
            if len(tensors) == 1 and tensors[0].is_contiguous():
                work = dist.broadcast(tensors[0].detach(), src, group=self.process_group, async_op=True)
                pending.append((work, None, None))
                continue
            if owner == self.rank:
                flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            else:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            work = dist.broadcast(flat, src, group=self.process_group, async_op=True)
            pending.append((work, flat, tensors if owner != self.rank else None))
        for work, flat, tensors in pending:
            work.wait()
            if tensors is not None:
                offset = 0
                for t in tensors:
                    t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    # -------------------------------------------------------------- clipping, overflow

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the gradients of every parameter by their global norm; returns that norm.

        The norm is computed from this rank's owned gradients and reduced across ranks (sum of
        ``|g|^p``, max for ``inf``), so it is right whether or not a rank holds all gradients;
        with ZeRO-1 (every rank holds all gradients) it equals
        ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` up to summation order.
        """
        norm_type = float(norm_type)
        self.reduce_gradients()
        grads = [p.grad for p in self.owned_params() if p.grad is not None]
        all_grads = [p.grad for p in self._params() if p.grad is not None]
        device = all_grads[0].device if all_grads else torch.device("cpu")
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32).to(device) for g in grads])
            local = norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum()
        else:
            local = torch.zeros((), device=device)
        local = local.to(torch.float64)
        if self.world_size > 1:
            op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
            dist.all_reduce(local, op=op, group=self.process_group)
        total = local if math.isinf(norm_type) else local.pow(1.0 / norm_type)
        total = total.to(torch.float32)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot be clipped")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if all_grads:
            torch._foreach_mul_(all_grads, coef.to(device))
        return total

    def found_inf(self) -> bool:
        """Whether any rank's owned gradients hold NaN/Inf (all_reduce MAX of the flag)."""
        self.reduce_gradients()
        return found_inf([p.grad for p in self.owned_params() if p.grad is not None], self.process_group)

    # -------------------------------------------------------------- state dicts

    def _metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "world_size": self.world_size,
            "rank": self.rank,
            "partition": self.owned_indices,
            "partitions": self.partitions,
            "param_shapes": [list(s) for s in self._shapes],
            "optimizer": type(self.optimizer).__name__,
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """This rank's shard: ``state`` of the owned parameters (global indices), the full
        ``param_groups`` and ``sharding`` metadata. Never communicates.

        Right after :meth:`consolidate_state_dict` (torch's ZeroRedundancyOptimizer protocol,
        which Lightning and Fabric follow: consolidate on every rank, then ``state_dict()`` on
        rank 0), the receiving rank gets the consolidated dict once instead.
        """
        consolidated = self.__dict__.pop("_consolidated", None)
        if consolidated is not None:
            return consolidated
        inner = self.optimizer.state_dict()
        return {"state": inner["state"], "param_groups": inner["param_groups"], META_KEY: self._metadata()}

    def consolidate_state_dict(self, to_rank: int | None = 0) -> dict[str, Any] | None:
        """Collective (every rank must call it): the full torch-style state dict on ``to_rank``
        (on every rank with ``to_rank=None``), ``None`` on the others. Loadable by an
        unsharded optimizer of the same kind, or by a ShardedOptimizer of any world size."""
        self.__dict__.pop("_consolidated", None)
        shard = self.state_dict()
        cpu_state = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in shard["state"].items()}
        if self.world_size == 1:
            gathered: list[Any] | None = [cpu_state]
        elif to_rank is None:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, cpu_state, group=self.process_group)
        else:
            if not 0 <= to_rank < self.world_size:
                raise ValueError(f"invalid to_rank: {to_rank!r} (world size {self.world_size})")
            gathered = [None] * self.world_size if self.rank == to_rank else None
            dist.gather_object(cpu_state, gathered, dst=_global_rank(self.process_group, to_rank), group=self.process_group)
        if gathered is None:
            return None
        state: dict[int, Any] = {}
        for part in gathered:
            state.update(part)
        full = {"state": dict(sorted(state.items())), "param_groups": shard["param_groups"]}
        self._consolidated = full  # the next state_dict() on this rank returns it (Lightning saves that)
        return full

    def load_state_dict(self, state_dict: Any) -> None:  # type: ignore[override]
        """Load a shard of this rank (same world size and partition), a complete set of shards
        (list of dicts or files, or a directory of ``optimizer.rank*-of-*.pt``), a complete
        shard (world size 1), or a consolidated dict; reshards to this world size. Never
        communicates. A mismatch raises ``ValueError`` and leaves this optimizer unchanged."""
        if isinstance(state_dict, (str, os.PathLike)) and os.path.isdir(state_dict):
            files = shard_files(state_dict)  # a complete set, or ValueError
            own = os.path.join(os.fspath(state_dict), shard_file_name(self.rank, self.world_size))
            if own in files:  # same world size: this rank's file alone, when the partition matches too
                shard = torch.load(own, map_location="cpu", weights_only=True)
                if shard[META_KEY]["partitions"] == self.partitions:
                    return self.load_state_dict(shard)
            full = consolidate_shards([torch.load(f, map_location="cpu", weights_only=True) for f in files])
        elif isinstance(state_dict, (str, os.PathLike, list, tuple)):
            full = consolidate_shards(load_shards(state_dict))
        elif isinstance(state_dict, Mapping) and META_KEY in state_dict:
            meta = state_dict[META_KEY]
            self._check_shapes(meta["param_shapes"])
            if meta["world_size"] == self.world_size and meta["partitions"] == self.partitions:
                if meta["rank"] != self.rank:
                    raise ValueError(
                        f"optimizer shard of rank {meta['rank']} loaded on rank {self.rank}: each rank loads its own "
                        f"shard ({shard_file_name(self.rank, self.world_size)}), or pass the complete set of shards. "
                        "(The HF Trainer saves only rank 0's optimizer.state_dict(): resume with "
                        "optim_plugins.integrations.hf.OptimPluginsTrainer, which saves and loads one shard per rank)"
                    )
                full = {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
            elif _is_complete_shard(state_dict):
                full = {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
            else:
                what = (f"world size {meta['world_size']} (this run: {self.world_size})"
                        if meta["world_size"] != self.world_size else "a different partition of the parameters")
                raise ValueError(
                    f"optimizer shard of rank {meta['rank']} of {meta['world_size']} was saved with {what}, so it "
                    "holds only part of the state and cannot be resharded alone: load the complete set of shards "
                    "(a list of them or their directory) or a dict from consolidate_state_dict()"
                )
        elif isinstance(state_dict, Mapping):
            full = state_dict
        else:
            raise TypeError(f"cannot load an optimizer state from {type(state_dict).__name__}")
        if not isinstance(full, Mapping) or "state" not in full or "param_groups" not in full:
            raise ValueError("state_dict must be a mapping with 'state' and 'param_groups'")
        self._check_groups(full["param_groups"])
        self._check_state_indices(full)
        owners = self._owners
        mine = {i: s for i, s in full["state"].items() if owners[int(i)] == self.rank}
        self.optimizer.load_state_dict({"state": mine, "param_groups": full["param_groups"]})

    def _check_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        if len(shapes) != len(self._shapes):
            raise ValueError(f"optimizer shard is for {len(shapes)} parameters, this optimizer has {len(self._shapes)}")
        for i, (saved, mine) in enumerate(zip(shapes, self._shapes)):
            if list(saved) != list(mine):
                raise ValueError(f"optimizer shard: parameter {i} had shape {tuple(saved)}, now {tuple(mine)}")

    def _check_groups(self, groups: Sequence[Mapping[str, Any]]) -> None:
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"loaded parameter group {gi} has {len(saved['params'])} parameters, this optimizer's has {len(group['params'])}")

    def _check_state_indices(self, full: Mapping[str, Any]) -> None:
        n = len(self._owners)
        for i in full["state"]:
            if not 0 <= int(i) < n:
                raise ValueError(f"loaded state dict has state for parameter {i}, this optimizer has {n} parameters")


def found_inf(grads: Iterable[Tensor | None], process_group: Any = None) -> bool:
    """Whether any of ``grads`` on any rank holds NaN/Inf: the local flag, all_reduce MAX."""
    grads = [g for g in grads if g is not None]
    local = any(not bool(torch.isfinite(g).all()) for g in grads)
    rank, world_size = _rank_and_size(process_group)
    if world_size == 1:
        return local
    flag = torch.tensor([float(local)], dtype=torch.float64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
    return bool(flag.item())


def sync_grad_scaler(scaler: Any, optimizer: torch.optim.Optimizer, process_group: Any = None) -> bool:
    """After ``scaler.unscale_(optimizer)``: make the found-inf flags agree across ranks (MAX), so
    that ``scaler.step`` skips on every rank or on none and ``scaler.update`` moves the scale the
    same way everywhere. Returns the agreed flag. (Reads GradScaler's per-optimizer state, as
    torch's ShardedGradScaler does; tested on torch 2.13.)"""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None or id(optimizer) not in states or not states[id(optimizer)].get("found_inf_per_device"):
        raise RuntimeError("sync_grad_scaler needs scaler.unscale_(optimizer) to have run first in this iteration")
    per_device = states[id(optimizer)]["found_inf_per_device"]
    flag = float(any(bool(v.item()) for v in per_device.values()))
    _, world_size = _rank_and_size(process_group)
    if world_size > 1:
        t = torch.tensor([flag], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
        flag = t.item()
    for v in per_device.values():
        v.fill_(flag)
    return bool(flag)


def clip_grad_norm_(optimizer_or_params: Any, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> Tensor:
    """Global-norm clipping: across ranks for a :class:`ShardedOptimizer`, else torch's."""
    target = getattr(optimizer_or_params, "optimizer", None)
    if isinstance(optimizer_or_params, ShardedOptimizer):
        return optimizer_or_params.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)
    if isinstance(target, ShardedOptimizer):  # accelerate's AcceleratedOptimizer around ours
        return target.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)
    if isinstance(optimizer_or_params, torch.optim.Optimizer):
        optimizer_or_params = [p for g in optimizer_or_params.param_groups for p in g["params"]]
    return torch.nn.utils.clip_grad_norm_(optimizer_or_params, max_norm, norm_type, error_if_nonfinite)
