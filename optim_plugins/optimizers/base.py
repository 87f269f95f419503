"""The step machinery every optimizer here shares.

An optimizer subclasses :class:`Optimizer` and writes three things:

* ``check_options(options)``: raise ``ValueError`` naming a bad option and its value;
* ``state_names(group)`` (or ``init_state``): its per-parameter state;
* ``update(p, g, state, group, step)``: the algorithm, once, as in-place tensor code.

Everything else is done here, once: the closure under ``torch.enable_grad()``,
collecting gradients (``None`` skipped, sparse refused), the per-parameter ``step``
count, ``maximize``, weight decay in every mode, the non-finite-gradient policy, the
precision of the parameter write (Kahan / stochastic rounding for bf16), backends
(``reference``: one tensor at a time; ``foreach``: the same ``update`` run on
``TensorList`` buckets; ``compiled``: that update compiled by Inductor, kernels/compiled.py;
``triton``: the GPU kernels of kernels/triton; ``auto`` picks, see ``Optimizer.backend_for``),
GradScaler's loss scale inside the step (``_step_supports_amp_scaling``), state codecs (``state_codecs``: states stored compactly, e.g.
8-bit, decoded around ``update``), and a ``load_state_dict`` that checks before it changes.
"""
from __future__ import annotations

from collections import defaultdict
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from ..kernels import compiled as compiled_kernels
from ..kernels.foreach import TensorList
from ..registry import Capabilities, Option, options_of
from .codecs import StateCodec
from .common import WeightDecayMode, apply_weight_decay, check_choice, check_lr
from .precision import LOW_PRECISION, StoredAs, resolve_compensation, working_copy, write_back

Backend = Literal["auto", "reference", "foreach", "compiled", "triton"]
AVAILABLE_BACKENDS = ("auto", "reference", "foreach", "compiled", "triton")
# backend="auto" on CPU compiles only from this many elements in the optimizer (all groups).
# LOOP_THRESHOLD where the compiled step is the C++ loop (float32/float64/bfloat16 parameters; its build
# takes ~0.5 s once per program, cached on disk, and at 2^20 elements it saved 1.7-9 ms per step
# over foreach for Lion and AdaBelief in two runs: repaid within 60-300 steps); COMPILE_THRESHOLD
# where it is Inductor's code (float16 parameters: seconds to minutes of compile per program).
# benchmarks/scale.md measures both sides.
LOOP_THRESHOLD = 2**20
COMPILE_THRESHOLD = 2**24
DECODED_CHUNK = 2**22  # elements of coded (8/4-bit) states decoded at a time within a bucket
TORCH_FUSED_DEVICES = ("cpu", "cuda")  # where torch ships its fused optimizer kernels (Optimizer.torch_fused_step)
NONFINITE_POLICIES = ("propagate", "skip", "raise")
STATE_DTYPES = {None: None, "param": None, "fp32": torch.float32, "float32": torch.float32,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
MACHINERY_STATE = ("step", "compensation")


def _common_options(
    maximize: bool = False,
    backend: Backend = "auto",
    foreach: bool | None = None,
    nonfinite: Literal["propagate", "skip", "raise"] = "propagate",
    compensation: Literal["auto", "kahan", "stochastic"] | None = "auto",
    state_dtype: Literal["fp32", "bf16", "param"] | None = None,
    differentiable: bool = False,
    capturable: bool = False,
    fused: bool | None = None,
) -> None:
    """Options every optimizer of this package takes.

    Args:
        maximize: maximize the objective instead of minimizing it (as torch.optim).
        backend: "auto" (Triton on CUDA, compiled on CPU from LOOP_THRESHOLD elements, else foreach), "reference" (one tensor at a time), "foreach" (multi-tensor), "compiled" (CPU: a C++ loop, or Inductor) or "triton"; same numbers from each (to fp32 rounding).
        foreach: torch.optim's switch: True means backend "foreach", False means "reference".
        nonfinite: NaN/Inf gradients: "propagate" (torch's behaviour, no host sync), "skip" the whole step, or "raise".
        compensation: for bf16/fp16 parameters: "kahan" buffer, "stochastic" rounding, None (torch's behaviour); "auto" = Kahan for bf16/fp16, nothing for fp32.
        state_dtype: None keeps states in the parameter's dtype (torch); "fp32" keeps fp32 states and math for bf16/fp16 parameters; "bf16" stores the states of fp32 parameters in bfloat16 (math stays fp32).
        differentiable: torch.optim's differentiable step; not supported (only False).
        capturable: torch.optim's CUDA-graph capturable step; not supported (only False).
        fused: torch.optim's fused kernels; not supported here (use backend).
    """


COMMON_OPTIONS: dict[str, Option] = options_of(_common_options, skip=0)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _is_array(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() > 0


def _is_scalar(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 0


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run in this process (None: it can)."""
    if backend == "compiled":
        return compiled_kernels.unavailable_reason()
    if backend == "triton":
        try:
            from ..kernels import triton as triton_kernels
        except ImportError as exc:  # pragma: no cover - the module ships with the package
            return f"its kernels do not import ({exc})"
        return triton_kernels.unavailable_reason()
    return None


def _triton_refusal(optimizer: Any, group: Mapping[str, Any], params: list[Tensor]) -> str | None:
    reason = _unavailable("triton")
    if reason is not None:
        return f"triton: {reason}"
    from ..kernels import triton as triton_kernels

    for device in {p.device for p in params}:
        reason = triton_kernels.unavailable_reason(device)
        if reason is not None:
            return f"triton: {reason}"
    if not triton_kernels.supports(optimizer, group):
        return f"triton: no kernel covers {type(optimizer).__name__} with these options and parameters"
    return None


def _pick(index: Sequence[int], *lists: list) -> tuple[list, ...]:
    """The entries ``index`` of each list."""
    return tuple([values[i] for i in index] for values in lists)


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group holds at most ``limit`` elements (or one tensor)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if groups[-1] and total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _bucket(work: list[Tensor], grads: list[Tensor], views: list[dict[str, Any]]
            ) -> tuple[TensorList, TensorList, dict[str, Any], dict[str, list[Tensor]], dict[str, Any]]:
    """A bucket as ``update`` takes it (p, g and the state of TensorLists) and as the compiled backend
    takes it: the parameter-shaped states (``arrays``) apart from the rest (0-d states, Python values)."""
    names = [k for k in views[0] if k not in MACHINERY_STATE]  # (uncoded states come as they are stored)
    if work[0].is_complex():  # a bucket is complex or real throughout (step_group's key)
        p, g = TensorList(map(_real, work)), TensorList(map(_real, grads))
        state = {k: TensorList(_real(s[k]) if _is_array(s[k]) else s[k] for s in views)
                 if torch.is_tensor(views[0][k]) else views[0][k] for k in names}
    else:
        p, g = TensorList(work), TensorList(grads)
        state = {k: TensorList([s[k] for s in views]) if torch.is_tensor(views[0][k]) else views[0][k] for k in names}
    arrays = {k: v.tensors for k, v in state.items() if isinstance(v, TensorList) and _is_array(views[0][k])}
    return p, g, state, arrays, {k: v for k, v in state.items() if k not in arrays}


class _BucketPlan(NamedTuple):
    """How ``Optimizer._apply`` steps a bucket, decided once from its group, dtype and state formats."""

    mode: str | None  # the parameters' compensation: None, "kahan" or "stochastic" (precision.py)
    state_dtype: torch.dtype
    # 8/4-bit states coded inside the compiled C++ loop: no fp32 copy of them, one pass (two with rank-1
    # 4-bit states; the formats it cannot code, rank-1 of n-D tensors, decoded before and coded after);
    # fp32 parameters, or bf16 ones (read as
    # float, with their Kahan compensation where they keep one) beside fp32 math
    coded_loop: bool
    folded: bool  # Kahan on bf16 parameters folded into the compiled C++ loop (p + compensation read, both written)
    in_place: bool  # no working copy to write back


_NO_CODECS: Mapping[str, StateCodec] = MappingProxyType({})  # the codecs of a group that codes no state


def _hidden(codecs: Mapping[str, StateCodec]) -> set[str]:
    """The state keys ``update`` does not see: the machinery's and the codecs' side tensors (absmax, ...)."""
    return {*MACHINERY_STATE, *(key for name, codec in codecs.items() for key in codec.keys(name)[1:])}


def _decoded(state: Mapping[str, Any], codecs: Mapping[str, StateCodec], dtype: torch.dtype) -> dict[str, Any]:
    """The state ``update`` sees: machinery entries left out, coded states decoded to ``dtype``; without
    codecs the state itself (its machinery entries are left out where it is read: no dict per parameter)."""
    if not codecs:
        return state
    hidden = _hidden(codecs)
    return {k: codecs[k].decode(k, state, dtype) if k in codecs else v for k, v in state.items() if k not in hidden}


class Optimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose subclasses write only their math.

    With ``_step_supports_amp_scaling`` on (``fused_adamw``, and any optimizer with an explicit
    ``backend="compiled"`` or ``"triton"``, as torch turns it on only for ``fused=True``),
    ``torch.amp.GradScaler.step`` hands this optimizer the loss scale (``grad_scale``) and
    the overflow flag (``found_inf``) instead of unscaling the gradients itself: a nonzero
    ``found_inf`` skips the step (no state changes, ``step`` not counted; one host read of
    the flag), and elementwise updates multiply g by ``1 / grad_scale`` inside the update
    (fused in the compiled and Triton backends); other optimizers unscale the gradients in
    place first, as ``GradScaler.unscale_`` would. It is off otherwise because trainers refuse
    gradient clipping for optimizers that unscale inside the step (Lightning's precision plugins).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=True, shardable="elements")
    _step_supports_amp_scaling: ClassVar[bool] = False
    common_options: ClassVar[dict[str, Option]] = COMMON_OPTIONS

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any], **common: Any):
        unknown = [key for key in common if key not in COMMON_OPTIONS]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no option {unknown[0]!r} (value {common[unknown[0]]!r})")
        options = {name: option.default for name, option in COMMON_OPTIONS.items()}
        options.update(common)
        self.skipped_steps = 0
        self._step_counters: dict[tuple, tuple] = {}  # _count_step's packed step tensors
        self._numel: tuple[tuple, int] | None = None  # _total_numel's count and what it counted
        super().__init__(params, {**defaults, **options})
        if any(group["backend"] in ("compiled", "triton") for group in self.param_groups):
            self._step_supports_amp_scaling = True  # the fused step unscales and skips itself

    # -------------------------------------------------------------- what subclasses write

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Validate one group's options; raise ``ValueError`` naming the option and value."""
        if "lr" in options:
            check_lr(options["lr"])

    def state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """Names of the zero-initialised, parameter-shaped state tensors."""
        return ()

    def init_state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        """The per-parameter state tensors (``step`` is added by the machinery)."""
        dtype = self.state_dtype(p, group)
        return {name: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format) for name in self.state_names(group)}

    def state_codecs(self, p: Tensor, group: Mapping[str, Any]) -> Mapping[str, StateCodec]:
        """``{state name: codec}`` for the states of ``p`` stored compactly (none by default).

        The machinery encodes what ``init_state`` returns, decodes each coded state into a
        temporary of the working dtype before ``update`` and encodes it back after it.
        """
        return {}

    def effective_lr(self, group: Mapping[str, Any], state: Mapping[str, Any]) -> float:
        """The step size the last step of a parameter used (``op.telemetry`` reads it).

        ``group["lr"]`` unless the algorithm scales it (Prodigy's d * lr, Adafactor's relative step).
        """
        return float(group.get("lr") or 0.0)

    def weight_decay_mode(self, group: Mapping[str, Any]) -> WeightDecayMode | None:
        """How ``group["weight_decay"]`` applies: "l2", "decoupled", "fixed" (None: not at all)."""
        return "l2"

    def torch_fused_step(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                         states: list[dict], grad_scale: Tensor | None) -> bool:
        """Step ``params`` with torch's own fused kernel for this algorithm, or return False.

        Optional: Adam/AdamW, SGD and Adagrad call ``torch._fused_*_`` (what ``fused=True`` runs)
        for ``backend="auto"``. The machinery calls it only for plain buckets (real float
        parameters on CPU/CUDA, no compensation, states in the parameter's dtype, no state codecs;
        ``step`` already counted); ``grad_scale`` is GradScaler's scale (the kernel divides by it).
        """
        return False

    def fused_step_with_sums(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                             states: list[dict], grad_scale: Tensor | None, sums: Tensor) -> bool:
        """``torch_fused_step``'s step, bit for bit, that also writes ``op.telemetry``'s sums, or False
        with nothing changed.

        Optional; called on recording steps for the parameters ``torch_fused_step`` would take. Writes
        one row of ``sums`` (float64, ``[len(params), 4]``) per parameter: g^2 (after unscaling),
        (new p - old p)^2, old p^2 and the second moment the recorder reads, all from the one pass
        of the step (Adam/AdamW and SGD: the C++ kernels of :mod:`optim_plugins.kernels.cpp`).
        """
        return False

    def update(self, p, g, state: dict[str, Any], group: Mapping[str, Any], step: float) -> None:
        """The algorithm: update ``p`` and ``state`` in place from gradient ``g``.

        ``p``, ``g`` and the state values are single tensors (reference backend) or
        ``TensorList`` buckets (foreach backend); ``step`` counts from 1.
        """
        raise NotImplementedError

    # -------------------------------------------------------------- options

    def state_dtype(self, p: Tensor, group: Mapping[str, Any]) -> torch.dtype:
        """The dtype ``update`` sees the states in (and the working dtype of the step)."""
        wanted = STATE_DTYPES[group.get("state_dtype")]
        return wanted if wanted == torch.float32 and p.dtype in LOW_PRECISION else p.dtype

    def _codecs(self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, StateCodec]:
        """``state_codecs`` plus, with ``state_dtype="bf16"``, bf16 storage for the other float states."""
        codecs = dict(self.state_codecs(p, group))
        narrow = STATE_DTYPES[group.get("state_dtype")]
        if narrow is not None and narrow.itemsize < p.element_size() and p.is_floating_point():
            taken = {*MACHINERY_STATE, *(key for name, codec in codecs.items() for key in codec.keys(name))}
            for name, value in state.items():
                if name not in taken and _is_array(value) and value.is_floating_point():
                    codecs[name] = StoredAs(narrow)
        return codecs

    def _check_group(self, options: Mapping[str, Any]) -> None:
        check_choice("backend", options["backend"], Backend.__args__)
        reason = _unavailable(options["backend"])
        if reason is not None:
            raise ValueError(f"invalid backend: {options['backend']!r} is not available here ({options['backend']}: {reason})")
        foreach = options["foreach"]
        if foreach is not None and options["backend"] not in ("auto", "foreach" if foreach else "reference"):
            raise ValueError(f"invalid foreach: {foreach!r} contradicts backend={options['backend']!r}")
        check_choice("nonfinite", options["nonfinite"], NONFINITE_POLICIES)
        check_choice("compensation", options["compensation"], (None, "auto", "kahan", "stochastic"))
        check_choice("state_dtype", options["state_dtype"], tuple(STATE_DTYPES))
        for flag in ("differentiable", "capturable", "fused"):
            if options[flag]:
                raise ValueError(f"invalid {flag}: {options[flag]!r} ({flag}=True is not supported; use backend=...)")
        if not isinstance(options["maximize"], bool):
            raise ValueError(f"invalid maximize: {options['maximize']!r} (expected True or False)")
        self.check_options(options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(options)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        for group in self.param_groups:  # checkpoints from torch.optim or older versions
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler.step
        if found_inf is not None and bool(found_inf.item()):
            return loss
        work = [(group, *self._params_with_grad(group)) for group in self.param_groups]
        inv_scale = self._inverse_scale(work)
        if self._skip_for_nonfinite(work) or not self.prepare_step(work):
            return loss
        self.__dict__["_inv_scale"] = inv_scale
        try:
            for group, params, grads in work:
                if params:
                    self.step_group(group, params, grads)
        finally:
            self.__dict__.pop("_inv_scale", None)
        return loss

    def _inverse_scale(self, work: list) -> float | None:
        """GradScaler's ``1 / grad_scale`` for the update to apply, or None.

        Where the update cannot take it (whole-tensor math, a ``prepare_step`` that reads the
        gradients, telemetry recording this step), the gradients are unscaled in place here.
        """
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return None
        inv = 1.0 / float(scale)
        fused = (self.capabilities.elementwise and type(self).prepare_step is Optimizer.prepare_step
                 and type(self).step_group is Optimizer.step_group and "_telemetry" not in self.__dict__)
        if fused:
            return inv
        grads = [g for _, _, gs in work for g in gs]
        if grads:
            torch._foreach_mul_(grads, inv)
        return None

    def prepare_step(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> bool:
        """A pass over every ``(group, params, grads)`` before the per-parameter updates.

        For whole-optimizer statistics (Sophia-H's Hessian-vector product, Prodigy's d
        estimate). Runs after the gradients are checked; returning False skips the step.
        """
        return True

    def _params_with_grad(self, group: Mapping[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        elementwise = self.capabilities.elementwise
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use a dense gradient, e.g. nn.Embedding(sparse=False)"
                )
            if not elementwise and p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters")
            params.append(p)
            grads.append(g)
        return params, grads

    def _skip_for_nonfinite(self, work: list) -> bool:
        policy = self.defaults["nonfinite"]
        grads = [g for _, _, gs in work for g in gs]
        if policy == "propagate" or not grads:
            return False
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
        if bool(finite.all()):
            return False
        if policy == "raise":
            bad = int((~finite).nonzero()[0])
            shape = tuple(grads[bad].shape)
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient (NaN/Inf) in parameter {bad} of shape {shape} "
                "(nonfinite='raise'); no parameter or state was changed"
            )
        self.skipped_steps += 1
        return True

    def step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Update ``params`` of ``group`` from ``grads``: any subset of the group may be stepped."""
        backend = self.backend_for(group, params)
        states = [self._state_of(p, group) for p in params]
        steps = self._count_step(states)
        per_tensor = backend == "reference" or not self.capabilities.elementwise
        if per_tensor:  # whole-tensor math (norms, factored moments, matmuls) runs one tensor at a time
            buckets: Iterable[list[int]] = ([i] for i in range(len(params)))
        else:  # one bucket per device, dtype and value of every 0-d state (the update reads them as numbers)
            scalar_names = sorted(k for k in set().union(*states) - {"step"}
                                  if _is_scalar(next(s[k] for s in states if k in s)))
            keyed: dict[tuple, list[int]] = defaultdict(list)
            coded = backend == "compiled" and self._may_code(group)  # coded and plain states: a loop each
            for i, (p, state) in enumerate(zip(params, states)):
                scalars = (steps[i], *(state[k].item() for k in scalar_names if k in state))
                forms = tuple((k, c.loop_form()) for k, c in self._codecs(p, group, state).items()) if coded else ()
                keyed[(p.device, p.dtype, scalars, forms)].append(i)  # complex parameters: complex dtypes
            buckets = []
            for key, index in keyed.items():
                if any(form is None for _, form in key[-1]):  # states the loop cannot code (n-D rank-1) are
                    sizes = [params[i].numel() for i in index]  # decoded around it: a few tensors at a time
                    buckets += [[index[k] for k in chunk] for chunk in _chunks(sizes, DECODED_CHUNK)]
                else:
                    buckets.append(index)
        probe = self.__dict__.get("_telemetry")  # op.telemetry: set only on its recording steps
        inv_scale = self.__dict__.get("_inv_scale")
        if backend == "triton":
            self._triton_step(group, params, grads, states, inv_scale, probe)
            return
        buckets = list(buckets)
        if probe is not None and not per_tensor:  # summed in the pass that steps, where a kernel can
            kept = [left for index in buckets
                    if (left := self._step_with_sums(group, index, params, grads, states, backend, inv_scale, probe))]
            chosen = sorted(i for index in kept for i in index)  # left: measured around an ordinary step
            position = {i: k for k, i in enumerate(chosen)}
            buckets = [[position[i] for i in index] for index in kept]
            params, grads, states = _pick(chosen, params, grads, states)
            if not params:
                return
        before = probe.before(self, group, params, grads, states) if probe is not None else None
        for index in buckets:
            self._apply(group, *_pick(index, params, grads, states), per_tensor, backend == "compiled", inv_scale)
        if before is not None:
            probe.after(self, group, params, states, before)

    def _count_step(self, states: list[dict]) -> list[float]:
        """Add 1 to every state's ``step`` and return the new counts, in one operation where it can:
        the 0-d step tensors of a step's states are made views into one 1-d tensor (each parameter
        keeps its own count; a checkpoint saves them as before), made again when the states or their
        step tensors are other ones. ``torch._foreach_add_`` on 0-d CPU tensors costs ~2-5 us each
        (2 ms a step at 1000 tensors); one ``add_`` costs one."""
        steps = [state["step"] for state in states]
        if len(steps) < 2:  # one parameter (gradient release steps them one at a time): nothing to share
            steps[0].add_(1)
            return [steps[0].item()]
        counters = self.__dict__.setdefault("_step_counters", {})  # (unpickled optimizers lack it)
        known = counters.get(tuple(map(id, steps)))  # holds the step tensors: their ids are not reused
        if known is None:
            if not all(t.dim() == 0 and t.dtype == steps[0].dtype and t.device == steps[0].device
                       and not t.requires_grad for t in steps):
                torch._foreach_add_(steps, 1)
                return [t.item() for t in steps]
            if len(counters) >= 64:  # states come and go (parameters added, checkpoints loaded)
                counters.clear()
            packed = torch.stack(steps)
            for i, state in enumerate(states):
                state["step"] = packed[i]
            steps = [state["step"] for state in states]
            known = counters[tuple(map(id, steps))] = (steps, packed)
        packed = known[1]
        packed.add_(1)
        return packed.tolist()

    def _step_with_sums(self, group: dict[str, Any], index: list[int], params: list[Tensor], grads: list[Tensor],
                        states: list[dict], backend: str, inv_scale: float | None, probe: Any) -> list[int]:
        """op.telemetry on one bucket (``index`` into ``params``): steps and sums in one pass what a kernel can
        (parameters torch's fused kernel would step: ``fused_step_with_sums``, the C++ Adam/SGD kernels; the
        rest of a compiled bucket: its C++ loop) and returns the others, for the recorder to measure around
        an ordinary step (a copy of the parameters, norms after)."""
        bucket = _pick(index, params, grads, states)
        fusable = self._torch_fusable(group, bucket[0], bucket[2])
        if any(fusable) and type(self).fused_step_with_sums is not Optimizer.fused_step_with_sums:
            chosen = [k for k, f in enumerate(fusable) if f]
            p, g, s = _pick(chosen, *bucket)
            sums = torch.zeros(len(p), 4, dtype=torch.float64, device=p[0].device)
            if self.fused_step_with_sums(group, p, g, s, self._torch_grad_scale(inv_scale, p), sums):
                # the states torch's fused kernel takes have one layout (plain, the same keys): one name
                probe.add_sums(self, group, p, s, sums, [probe.second_moment_name(p[0], s[0])] * len(p))
                index = [i for i, f in zip(index, fusable) if not f]
        if index and backend == "compiled" and self._compiled_step_with_sums(
                group, *_pick(index, params, grads, states), inv_scale, probe):
            return []
        return index

    def _compiled_step_with_sums(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                                 states: list[dict], inv_scale: float | None, probe: Any) -> bool:
        """op.telemetry on a compiled bucket: the C++ loop steps it and sums in the same pass (False, with
        nothing changed, where it cannot: the recorder then copies the parameters and measures after)."""
        done = self._apply(group, params, grads, states, False, True, inv_scale, with_sums=True)
        if done is None:
            return False
        rows, names = done  # g^2 of the gradient as stored: recording steps unscale first (_inverse_scale)
        moments = [probe.second_moment_name(p, state) for p, state in zip(params, states)]
        sums = [[*row[:3], row[3 + names.index(m)] if m in names else 0.0]  # a CPU tensor: read now, in Python
                for row, m in zip(rows.tolist(), moments)]
        probe.add_sums(self, group, params, states, sums, moments)
        return True

    def _triton_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict],
                     inv_scale: float | None, probe: Any) -> None:
        """The Triton kernels step the whole group (they bucket it themselves); op.telemetry's
        sums come out of the same kernels. An error (raised before any launch) undoes the step count."""
        from ..kernels import triton as triton_kernels

        device = params[0].device
        scale = None if inv_scale is None else torch.tensor(inv_scale, device=device)
        stats = None if probe is None else torch.zeros(len(params), 4, dtype=torch.float32, device=device)
        try:
            triton_kernels.step(self, group, params, grads, states, grad_scale=scale, stats=stats,
                                second_moment=None if probe is None else probe.second_moment_name)
        except Exception:
            torch._foreach_sub_([state["step"] for state in states], 1)
            raise
        if probe is not None:
            probe.add_sums(self, group, params, states, stats)

    def _backend(self, group: Mapping[str, Any]) -> str:
        return self.backend_for(group, [p for p in group["params"] if p.grad is not None])

    def backend_for(self, group: Mapping[str, Any], params: list[Tensor]) -> str:
        """The backend that steps ``params`` of ``group``.

        ``auto``: ``triton`` for CUDA tensors when its kernels cover the optimizer and options;
        on CPU ``compiled`` for elementwise optimizers of at least ``LOOP_THRESHOLD`` elements
        (``COMPILE_THRESHOLD`` where Inductor, not the C++ loop, would compile) when a C++
        compiler is found; else ``foreach`` (``reference`` when
        ``foreach=False``). An explicit ``triton`` that cannot run raises ``ValueError``.
        """
        backend = group["backend"]
        if backend == "triton":
            reason = _triton_refusal(self, group, params)
            if reason is not None:
                raise ValueError(f"invalid backend: 'triton' cannot step this group ({reason})")
            return backend
        if backend != "auto":
            return backend
        if group["foreach"] is not None:
            return "foreach" if group["foreach"] else "reference"
        if not self.capabilities.elementwise:
            return "reference"
        if params and params[0].device.type == "cuda" and _triton_refusal(self, group, params) is None:
            return "triton"
        if params and all(p.device.type == "cpu" for p in params) and _unavailable("compiled") is None:
            total = self._total_numel()
            if total >= COMPILE_THRESHOLD or (total >= LOOP_THRESHOLD  # the dtypes looked at only from there
                                              and compiled_kernels.loops_cover({p.dtype for p in params})):
                return "compiled"
        return "foreach"

    def _total_numel(self) -> int:
        """Elements of every parameter of every group, counted again when a group or parameter is added
        or removed (``backend_for`` asks at each step)."""
        key = tuple(len(group["params"]) for group in self.param_groups)
        known = self.__dict__.get("_numel")
        if known is None or known[0] != key:
            known = self.__dict__["_numel"] = (key, sum(p.numel() for g in self.param_groups for p in g["params"]))
        return known[1]

    def describe_backend(self, group: Mapping[str, Any]) -> str:
        """What steps ``group`` now: a backend name, or "torch fused kernel" where ``backend="auto"``
        hands the parameters to ``torch_fused_step`` (benchmark tables print it)."""
        params = [p for p in group["params"] if p.grad is not None] or list(group["params"])
        backend = self.backend_for(group, params)
        states = [self.state.get(p, {}) for p in params]
        if backend != "triton" and params and all(self._torch_fusable(group, params, states)):
            return "torch fused kernel"
        return backend

    def _state_of(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state.update(self._initial_state(p, group))
            if resolve_compensation(group["compensation"], p.dtype) == "kahan":
                state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _initial_state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        """``init_state`` with the coded states encoded: what ``self.state[p]`` holds."""
        state = self.init_state(p, group)
        for name, codec in self._codecs(p, group, state).items():
            state.update(codec.init(name, state.pop(name)))
        return state

    def _torch_grad_scale(self, inv_scale: float | None, params: list[Tensor]) -> Tensor | None:
        """The ``grad_scale`` torch's fused kernels take: GradScaler's own scale tensor (set whenever
        ``inv_scale`` is) on the parameters' device, not ``1 / inv_scale`` rounded twice."""
        return None if inv_scale is None else self.grad_scale.to(params[0].device)

    def _torch_fusable(self, group: Mapping[str, Any], params: list[Tensor], states: list[dict]) -> list[bool]:
        """Which parameters of a bucket (one device and dtype) may take ``torch_fused_step``: decided per
        parameter (state codecs), so that a parameter's numbers never depend on the bucket it shares."""
        p = params[0]
        if (type(self).torch_fused_step is Optimizer.torch_fused_step or group["backend"] != "auto"
                or group["foreach"] is not None or p.is_complex() or p.device.type not in TORCH_FUSED_DEVICES
                or p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                or resolve_compensation(group["compensation"], p.dtype) is not None
                or self.state_dtype(p, group) != p.dtype):
            return [False] * len(params)
        if not self._may_code(group):
            return [True] * len(params)
        return [not self._codecs(t, group, s) for t, s in zip(params, states)]

    def _may_code(self, group: Mapping[str, Any]) -> bool:
        """Whether any parameter of ``group`` may have coded states (``state_codecs``, ``state_dtype``)."""
        return type(self).state_codecs is not Optimizer.state_codecs or group.get("state_dtype") not in (None, "param")

    def _plan(self, group: Mapping[str, Any], params: list[Tensor], codecs: list[dict[str, StateCodec]],
              per_tensor: bool, compile: bool) -> _BucketPlan:
        """The bucket's :class:`_BucketPlan` (``codecs``: each parameter's state codecs)."""
        dtype = params[0].dtype
        mode = resolve_compensation(group["compensation"], dtype)
        state_dtype = self.state_dtype(params[0], group)
        looped = [bool(codec.loop_form()) for codec in codecs[0].values()]
        coded_loop = (compile and not per_tensor and any(looped) and state_dtype == torch.float32
                      and (dtype == torch.float32 and mode is None
                           or dtype == torch.bfloat16 and mode in (None, "kahan"))
                      and all(c.keys() == codecs[0].keys()
                              and [bool(codec.loop_form()) for codec in c.values()] == looped for c in codecs))
        folded = (compile and not per_tensor and mode == "kahan" and state_dtype == dtype
                  and compiled_kernels.loops_cover({dtype}) and not any(codecs))
        return _BucketPlan(mode, state_dtype, coded_loop, folded, in_place=mode is None and state_dtype == dtype)

    def _apply(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict],
               per_tensor: bool, compile: bool = False, inv_scale: float | None = None,
               with_sums: bool = False) -> tuple[Tensor, list[str]] | None:
        """Step one bucket: the coding loop, torch's fused kernel for the parameters it takes, the rest
        (a few tensors at a time where states are decoded) through :meth:`_working_step`. ``with_sums``:
        only through the compiled C++ loop that also sums (op.telemetry), returning its rows and the
        names of the state columns, or None with nothing changed."""
        fusable = [False] * len(params) if per_tensor else self._torch_fusable(group, params, states)
        if self._may_code(group):
            codecs = [self._codecs(p, group, s) for p, s in zip(params, states)]
        else:
            codecs = [_NO_CODECS] * len(params)  # (allocating a dict per parameter costs GC passes)
        plan = self._plan(group, params, codecs, per_tensor, compile)
        summable = plan.coded_loop or (not any(codecs) and (plan.in_place or plan.folded))
        if with_sums and (any(fusable) or not summable):
            return None
        if plan.coded_loop:
            done = self._coded_loop_step(group, params, grads, states, codecs, inv_scale, with_sums,
                                         plan.mode == "kahan")
            if with_sums:
                return done or None
            if done:
                return None
        if any(fusable):
            chosen = [i for i, f in enumerate(fusable) if f]
            if self.torch_fused_step(group, [params[i] for i in chosen], [grads[i] for i in chosen],
                                     [states[i] for i in chosen], self._torch_grad_scale(inv_scale, params)):
                rest = [i for i, f in enumerate(fusable) if not f]
                if not rest:
                    return None
                params, grads, states, codecs = _pick(rest, params, grads, states, codecs)
        chunks = _chunks([p.numel() for p in params], DECODED_CHUNK) if not per_tensor else []
        if len(chunks) > 1 and any(codecs):
            # decoded states are fp32 temporaries: stepping a few tensors at a time bounds them (and
            # keeps them small enough for the allocator to reuse) instead of decoding the whole bucket
            for index in chunks:
                self._apply(group, *_pick(index, params, grads, states), per_tensor, compile, inv_scale)
            return None
        return self._working_step(group, params, grads, states, codecs, plan, per_tensor, compile, inv_scale,
                                  with_sums)

    def _working_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict],
                      codecs: list[dict[str, StateCodec]], plan: _BucketPlan, per_tensor: bool, compile: bool,
                      inv_scale: float | None, with_sums: bool) -> tuple[Tensor, list[str]] | None:
        """A bucket through working copies where its parameters need one (precision.working_copy:
        compensation, or a state dtype other than theirs) and its coded states decoded to them: the
        update one tensor at a time (``per_tensor``), as the compiled program (``compile``; Kahan folded
        into its C++ loop), else eagerly on TensorLists; states coded and parameters written back after."""
        step = states[0]["step"].item()
        upcast = not (plan.folded or plan.in_place)
        work = [working_copy(p, s.get("compensation")) for p, s in zip(params, states)] if upcast else params
        if plan.state_dtype != params[0].dtype:
            grads = [g.float() for g in grads]
        views = [_decoded(s, c, w.dtype) for s, c, w in zip(states, codecs, work)]
        if per_tensor:
            names = [k for k in views[0] if k not in MACHINERY_STATE]
            p, g = _real(work[0]), _real(grads[0])
            state = {k: _real(views[0][k]) if _is_array(views[0][k]) else views[0][k] for k in names}
            self.update(p, self._prologue(group, inv_scale)(p, g), state, group, step)
        else:
            p, g, state, arrays, others = _bucket(work, grads, views)
            arguments = (self._bound_update(group, step), p.tensors, g.tensors, arrays, others,
                         self._prologue(group, inv_scale))
            compensations = [s["compensation"] for s in states] if plan.folded else None
            if with_sums:  # nothing to encode or write back (checked by _apply)
                rows = compiled_kernels.run_with_sums(*arguments, compensations=compensations)
                return None if rows is None else (rows, list(arrays))
            if plan.folded:
                if not compiled_kernels.run(*arguments, compensations=compensations):
                    self._apply(group, params, grads, states, per_tensor, False, inv_scale)  # working copies, eager
                return None
            if not (compile and compiled_kernels.run(*arguments)):
                self.update(p, arguments[-1](p, g), state, group, step)
        for view, stored, coded in zip(views, states, codecs):
            for name, codec in coded.items():
                codec.encode(name, view[name], stored)
        if upcast:
            for param, w, s in zip(params, work, states):
                write_back(param, w, plan.mode, s.get("compensation"))
        return None

    def _coded_loop_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict],
                         codecs: list[dict[str, StateCodec]], inv_scale: float | None, with_sums: bool,
                         kahan: bool) -> bool | tuple[Tensor, list[str]]:
        """A bucket of float32 (or bfloat16, math in float) parameters with coded states, stepped by the
        compiled C++ loop that decodes, steps and codes those with a ``loop_form`` block by block (the bytes
        of decoding, stepping and coding in turn; a bf16 parameter's Kahan compensation read and written in
        the same pass); the others are decoded to float32 before it and coded after. True (or the sums'
        rows and state names), or False with nothing changed where the loop cannot. ``kahan``: the
        parameters keep a Kahan compensation."""
        hidden = _hidden(codecs[0])
        around = [name for name, codec in codecs[0].items() if not codec.loop_form()]
        views = [{k: c[k].decode(k, s, torch.float32) if k in around else v for k, v in s.items() if k not in hidden}
                 for s, c in zip(states, codecs)]
        p, g, _, arrays, others = _bucket(params, grads, views)
        if not set(codecs[0]) <= set(arrays):
            return False
        coded = {name: (codec.loop_form(), [s[codec.keys(name)[1]] for s in states])
                 for name, codec in codecs[0].items() if name not in around}
        arguments = (self._bound_update(group, states[0]["step"].item()), p.tensors, g.tensors, arrays, others,
                     self._prologue(group, inv_scale))
        compensations = [s["compensation"] for s in states] if kahan else None
        if with_sums:
            rows = compiled_kernels.run_with_sums(*arguments, coded=coded, compensations=compensations)
            done = False if rows is None else (rows, list(arrays))
        else:
            done = compiled_kernels.run(*arguments, compensations=compensations, coded=coded)
        if done:
            for view, state, c in zip(views, states, codecs):
                for name in around:
                    c[name].encode(name, view[name], state)
        return done

    def _bound_update(self, group: Mapping[str, Any], step: float) -> Callable[[Any, Any, Any], None]:
        return lambda p, g, state: self.update(p, g, state, group, step)

    def _prologue(self, group: Mapping[str, Any], inv_scale: float | None) -> Callable[[Any, Any], Any]:
        """maximize, the loss scale and weight decay: what runs on the gradient before the algorithm's update."""
        factor = (-1.0 if group["maximize"] else 1.0) * (1.0 if inv_scale is None else inv_scale)

        def prologue(p, g):
            g = g if factor == 1.0 else -g if factor == -1.0 else g.mul(factor)
            return apply_weight_decay(p, g, self.weight_decay_mode(group), group.get("weight_decay", 0.0),
                                      group.get("lr", 0.0))

        return prologue

    # -------------------------------------------------------------- state dicts

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking it: group sizes, options, state names and shapes.

        A bad state dict raises ``ValueError`` and leaves this optimizer unchanged. State
        tensors are copied (not shared with ``state_dict``) in the dtype this optimizer keeps.
        """
        expected = self._check_state_dict(state_dict)
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for index, (p, wanted) in expected.items():
            for name, value in saved_state[index].items():
                if torch.is_tensor(value) and name != "step":
                    dtype = wanted[name].dtype if name in wanted else (p.dtype if value.is_floating_point() else value.dtype)
                    self.state[p][name] = value.to(device=p.device, dtype=dtype, copy=True)

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> dict[Any, tuple[Tensor, dict[str, Tensor]]]:
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a mapping with 'state' and 'param_groups' (from optimizer.state_dict())")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        expected: dict[Any, tuple[Tensor, dict[str, Tensor]]] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded parameter group {gi} has {len(saved['params'])} parameters, this optimizer's has {len(group['params'])}"
                )
            options = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self._check_group(options)
            except ValueError as exc:
                raise ValueError(f"loaded parameter group {gi}: {exc}") from None
            for index, p in zip(saved["params"], group["params"]):
                if index not in saved_state:
                    continue
                wanted = self._initial_state(torch.empty_like(p, device="meta"), options)
                self._check_param_state(saved_state[index], p, wanted, f"parameter {index} (group {gi})")
                expected[index] = (p, wanted)
        return expected

    @staticmethod
    def _check_param_state(state: Mapping[str, Any], p: Tensor, wanted: Mapping[str, Tensor], where: str) -> None:
        missing = [name for name in ("step", *wanted) if name not in state]
        if missing:
            raise ValueError(f"loaded state of {where} lacks {missing[0]!r}")
        for name, value in state.items():
            if not torch.is_tensor(value):
                continue
            if name == "step" or (name in wanted and wanted[name].dim() == 0):
                if value.numel() != 1:
                    raise ValueError(f"loaded state {name!r} of {where} has shape {tuple(value.shape)}, expected a scalar")
                continue
            shape = wanted[name].shape if name in wanted else p.shape
            if value.shape != shape:
                raise ValueError(
                    f"loaded state {name!r} of {where} has shape {tuple(value.shape)}, expected {tuple(shape)}"
                )
