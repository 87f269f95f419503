"""Per-layer optimizer telemetry: ``op.telemetry(optimizer, every=N, by="layer", model=model)``.

While a recorder is on, every ``every``-th ``optimizer.step()`` records, per unit (a param
group, a layer of ``model`` or a single parameter):

* ``grad_norm``: L2 norm of the gradients the step used (``p.grad``, before weight decay);
* ``update_norm``: L2 norm of the parameter change of this step (new p - old p; for bf16/fp16
  parameters with Kahan compensation, of the float32 value that the compensation carries);
* ``weight_norm``: L2 norm of the parameters before the step; ``update_ratio`` = update / weight;
* ``lr``: the effective step size, ``optimizer.effective_lr(group, state)`` (``group["lr"]`` by
  default; Prodigy: d * lr; Adafactor: its relative step times RMS(p); Maxfactor: its alpha),
  averaged over the unit's parameters;
* ``second_moment``: for adaptive optimizers, the root mean square of the denominator sqrt(v),
  i.e. sqrt(mean(v)) over the unit's elements, read from the first state of
  :data:`SECOND_MOMENT_KEYS` a parameter has (the raw state, without bias correction or eps;
  factored and 8-bit states are left out);

and per step ``state_bytes`` (:func:`optim_plugins.state_bytes`) and ``skipped_steps`` (the
optimizer's count of steps skipped for NaN/Inf gradients or overflow).

Alerts (opt-in, ``alerts=True`` or an :class:`Alerts`): a :class:`TelemetryWarning` when a
unit's update/weight ratio stays outside a band for ``patience`` consecutive records, or when a
gradient is non-finite, naming the unit (the model's module name with ``by="layer"``) and its
parameters; each record then lists its ``alerts`` (``Telemetry.alerts`` holds them all).

Cost. Off (the default, or after ``remove()``) it costs nothing: no hook, no attribute, no
state. On, the steps it does not record cost one torch step pre-hook. A recording step takes the
four sums (g^2, update^2, old p^2, v) per tensor inside the step's own pass where the step has a
kernel for it (one extra reduction, no copy; :meth:`Telemetry.add_sums`): the Triton kernels
(``backend="triton"``); on CPU, for groups ``backend="auto"`` hands to torch's fused Adam/AdamW
or SGD kernel, the C++ kernels of :mod:`optim_plugins.kernels.cpp` (the same bits as torch's), and
for buckets of the compiled backend the twin of its C++ loop that sums (kernels/cpp/loops.py); a
few percent of a 20M-parameter step (``benchmarks/telemetry.md``). Elsewhere (foreach, per-tensor
optimizers, stochastic rounding) a recording step copies the stepped parameters once (the update is
new minus old: an exact update norm needs the old values; on CPU the copy's memory is kept while the
recorder is on, as fresh allocations there cost page faults). On CPU for fp32/fp64 parameters the
copy is a C++ pass that also sums g^2 and p^2, and one more pass after the step sums (new - old)^2
and v (about 20 bytes per parameter: +11-21% of a foreach AdamW step on a 2-core CPU); otherwise
torch's passes take the norms (``torch._foreach_norm``; the update in place in the copy) and one
sum of v per tensor (about 36 bytes per parameter). The sums stay tensors until the record (one
host sync); record every N steps to divide the overhead by N.
Optimizers on this package's base class are measured inside the step machinery (one
attribute check per group step); any other ``torch.optim.Optimizer`` (torch.optim.*, the
SAM/Lookahead wrappers) is measured by a step pre-/post-hook pair around the whole step:
it copies every parameter that has a gradient and measures the net change of the whole step
(SAM's perturbation and its undo cancel).

Readers: :meth:`Telemetry.snapshot` (a plain dict), :attr:`Telemetry.history`,
:meth:`Telemetry.scalars` (flat ``{"telemetry/<unit>/<metric>": float}`` for loggers),
:meth:`Telemetry.log_to` (any callable, e.g. ``accelerator.log``), :meth:`Telemetry.save`
(JSON lines) and :func:`plot_heatmap` (``optim-plugins plot-telemetry``). The HF Trainer and
Lightning callbacks are in :mod:`optim_plugins.integrations.telemetry_callbacks`.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .kernels import cpp as cpp_kernels
from .memory import state_bytes

SECOND_MOMENT_KEYS = ("exp_avg_sq", "exp_avg_var", "square_avg", "sum", "v")
METRICS = ("grad_norm", "update_norm", "weight_norm", "update_ratio", "lr", "second_moment")
Unit = Literal["group", "layer", "param"]


def _unwrap(optimizer: Any) -> Any:
    from .training import unwrap_optimizer

    return unwrap_optimizer(optimizer)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t.detach()) if t.is_complex() else t.detach()


def _norms(tensors: list[Tensor]) -> Tensor:
    """L2 norms of ``tensors`` as one 1-d tensor (bf16/fp16 accumulated in float32): one
    multi-tensor reduction, no host sync."""
    ts = [_real(t) for t in tensors]
    low = [t.dtype in (torch.bfloat16, torch.float16) for t in ts]
    if not any(low):
        norms = torch._foreach_norm(ts)
    elif all(low):
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32)
    else:
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32 if lp else None) for t, lp in zip(ts, low)]
    return torch.stack([n.to(ts[0].device) for n in norms])


def _second_moment_name(p: Tensor, state: Any) -> str | None:
    """The first of :data:`SECOND_MOMENT_KEYS` in ``state`` that is a float tensor shaped like ``p``."""
    for key in SECOND_MOMENT_KEYS:
        v = state.get(key) if isinstance(state, Mapping) else None
        if torch.is_tensor(v) and v.is_floating_point() and v.shape == p.shape:
            return key
    return None


def _second_moment(p: Tensor, state: Any) -> Tensor | None:
    name = _second_moment_name(p, state)
    return None if name is None else state[name]


class TelemetryWarning(UserWarning):
    """Warned by :func:`telemetry` alerts (see :class:`Alerts`)."""


@dataclass(frozen=True)
class Alerts:
    """Opt-in warnings of :func:`telemetry` (``telemetry(..., alerts=Alerts(...))``, or ``alerts=True``).

    Args:
        band: (low, high): warn when a unit's update/weight ratio is outside it for ``patience``
            consecutive records (once per excursion; again after it came back); None: no band check.
        patience: the number of consecutive records (K) outside the band before warning.
        nonfinite: warn when a gradient is NaN/Inf, naming the unit and its parameters (on
            recording steps; on every step for optimizers that skip such steps, ``nonfinite="skip"``).
    """

    band: tuple[float, float] | None = (1e-5, 1e-1)
    patience: int = 3
    nonfinite: bool = True

    def __post_init__(self) -> None:
        band = self.band
        if band is not None:
            if (not isinstance(band, (tuple, list)) or len(band) != 2
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in band)
                    or not 0 <= band[0] < band[1]):
                raise ValueError(f"invalid alerts band: {band!r} (expected (low, high) with 0 <= low < high, or None)")
            object.__setattr__(self, "band", (float(band[0]), float(band[1])))
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"invalid alerts patience: {self.patience!r} (expected an integer >= 1)")
        if not isinstance(self.nonfinite, bool):
            raise ValueError(f"invalid alerts nonfinite: {self.nonfinite!r} (expected True or False)")


def _alerts(alerts: bool | Alerts | Mapping[str, Any] | None) -> Alerts | None:
    if alerts is None or alerts is False:
        return None
    if alerts is True:
        return Alerts()
    if isinstance(alerts, Alerts):
        return alerts
    if isinstance(alerts, Mapping):
        unknown = [k for k in alerts if k not in ("band", "patience", "nonfinite")]
        if unknown:
            raise ValueError(f"invalid alerts option: {unknown[0]!r} (expected band, patience, nonfinite)")
        return Alerts(**alerts)
    raise ValueError(f"invalid alerts: {alerts!r} (expected None, True, an Alerts or a dict of its fields)")


def unit_names(optimizer: torch.optim.Optimizer, by: Unit = "group", model: nn.Module | None = None,
               depth: int | None = None) -> dict[int, str]:
    """``{id(parameter): unit name}`` for every parameter of ``optimizer``.

    ``by="group"``: ``group<i>``; ``by="param"``: the parameter's name in ``model`` (else
    ``param<i>``, its ``state_dict`` index); ``by="layer"``: the name in ``model`` without its last
    component (``model.layers.3.mlp.up_proj``), or its first ``depth`` components when given
    (``depth=3``: ``model.layers.3``; never the parameter's own last component). A parameter not found in ``model`` is ``param<i>``.
    """
    if by not in ("group", "layer", "param"):
        raise ValueError(f"invalid by: {by!r} (expected 'group', 'layer' or 'param')")
    if by == "layer" and model is None:
        raise ValueError("by='layer' needs the model (op.telemetry(optimizer, by='layer', model=model)); "
                         "without it use by='group' or by='param'")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"invalid depth: {depth!r} (expected an integer >= 1)")
    named = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)} if model is not None else {}
    units: dict[int, str] = {}
    index = 0
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            name = named.get(id(p))
            if by == "group":
                unit = f"group{gi}"
            elif name is None:
                unit = f"param{index}"
            elif by == "param":
                unit = name
            else:
                parts = name.split(".")
                keep = len(parts) - 1 if depth is None else min(depth, len(parts) - 1)  # never the leaf name
                unit = ".".join(parts[:keep]) or name
            units.setdefault(id(p), unit)
            index += 1
    return units


class Telemetry:
    """A recorder attached to one optimizer; build it with :func:`telemetry`.

    ``history`` is the list of records (plain dicts, see :meth:`snapshot`); ``remove()`` detaches
    it (the records stay readable). ``keep`` bounds ``history`` to the last ``keep`` records.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int = 1, by: Unit = "group",
                 model: nn.Module | None = None, depth: int | None = None, path: str | Path | None = None,
                 keep: int | None = None, alerts: bool | Alerts | Mapping[str, Any] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"invalid every: {every!r} (expected an integer >= 1)")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"invalid keep: {keep!r} (expected None or an integer >= 1)")
        alert_config = _alerts(alerts)
        from .optimizers.base import Optimizer as Base

        optimizer = _unwrap(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"op.telemetry needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if "_telemetry_recorder" in optimizer.__dict__:
            raise ValueError(f"{type(optimizer).__name__} already has a telemetry recorder; remove() it first")
        from .release import is_released

        if is_released(optimizer):  # its parameters step one at a time in backward, not in optimizer.step()
            raise ValueError("op.telemetry cannot record an optimizer under op.release_gradients; "
                             "remove the release (handle.remove()) to record its steps")
        self.optimizer, self.every, self.by, self.depth, self.keep = optimizer, every, by, depth, keep
        self.units = unit_names(optimizer, by, model, depth)
        self.param_names = unit_names(optimizer, "param", model) if by != "param" else self.units
        self.native = isinstance(optimizer, Base)  # measured inside step_group; else around the whole step
        # every parameter's effective lr is its group's lr: asked once per group, not per parameter
        self._group_lr = (not callable(getattr(optimizer, "effective_lr", None))
                          or (self.native and type(optimizer).effective_lr is Base.effective_lr))
        self.path = Path(path) if path is not None else None
        self.history: list[dict[str, Any]] = []
        self.steps = 0
        self.alert_config = alert_config
        self.alerts: list[dict[str, Any]] = []  # every alert raised (each record lists its own)
        self._new_alerts: list[dict[str, Any]] = []
        self._outside_band: dict[str, int] = {}
        self._skipped = 0
        self._sinks: list[tuple[Callable[..., Any], str, bool]] = []
        self._acc: list | None = None
        self._outside: list | None = None
        self._copies: dict[int, Tensor] = {}  # the parameters before a recorded step (CPU: reused)
        self._moments: dict[tuple, str | None] = {}  # second_moment_name's answers
        self._bytes: tuple[tuple, int] = ((), 0)  # state_bytes and the state tensors it was counted for
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        optimizer.__dict__["_telemetry_recorder"] = self  # one recorder per optimizer
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    # ------------------------------------------------------------------ lifecycle

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Detach: remove the hooks and every attribute set on the optimizer (records stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer.__dict__.pop("_telemetry", None)
        if self.optimizer.__dict__.get("_telemetry_recorder") is self:
            del self.optimizer.__dict__["_telemetry_recorder"]
        self._acc = self._outside = None
        self._copies = {}

    def sync(self, step: int) -> None:
        """Number the next ``optimizer.step()`` ``step + 1`` (a trainer's global step before it), so
        that record steps and the ``every`` cadence follow the trainer's count, also after a resume."""
        self.steps = int(step)

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ------------------------------------------------------------------ hooks

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.alert_config is not None:
            self._skipped = int(getattr(optimizer, "skipped_steps", 0) or 0)
        if self.steps % self.every:
            optimizer.__dict__.pop("_telemetry", None)
            return
        self._acc = []
        if self.native:
            optimizer.__dict__["_telemetry"] = self  # base.step_group calls before()/after()
            return
        self._outside = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                states = [optimizer.state.get(p, {}) for p in params]
                self._outside.append((group, params, self.before(optimizer, group, params, [p.grad for p in params], states)))

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.alert_config is not None and self.alert_config.nonfinite:
            if int(getattr(optimizer, "skipped_steps", 0) or 0) > self._skipped:
                self._skipped_alert(optimizer)
        if self._acc is None:
            return
        optimizer.__dict__.pop("_telemetry", None)
        for group, params, before in self._outside or ():
            self.after(optimizer, group, params, [optimizer.state.get(p, {}) for p in params], before)
        self._outside = None
        self._record(optimizer)

    def before(self, optimizer: Any, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
               states: list[Mapping[str, Any]]) -> tuple[list[Tensor], Tensor, bool]:
        """Before a group's update: a copy of the parameters (their float32 value with Kahan
        compensation), and per parameter the gradient's and the weight's sum of squares (the C++
        copy that sums, on CPU; ``squared`` False: their norms, taken by torch)."""
        old, sources, copies = [], [], []
        for p, s in zip(params, states):
            comp = s.get("compensation") if isinstance(s, Mapping) else None
            if torch.is_tensor(comp):
                old.append(p.detach().float() + comp)
                continue
            copy = self._copies.get(id(p))
            if copy is None or copy.shape != p.shape or copy.dtype != p.dtype or copy.device != p.device:
                copy = torch.empty_like(p)
                if p.device.type == "cpu":  # kept: a fresh CPU allocation per record costs page faults
                    self._copies[id(p)] = copy
            old.append(copy)
            sources.append(p.detach())
            copies.append(copy)
        if len(copies) == len(params):
            sums = cpp_kernels.copy_with_sums(sources, copies, [g.detach() for g in grads])
            if sums is not None:
                return old, sums, True
        if copies:
            torch._foreach_copy_(copies, sources)
        grad_norms = _norms(grads)
        return old, torch.stack([grad_norms, _norms(old).to(grad_norms.dtype)], dim=1), False

    def after(self, optimizer: Any, group: Mapping[str, Any], params: list[Tensor], states: list[Mapping[str, Any]],
              before: tuple[list[Tensor], Tensor, bool]) -> None:
        """After a group's update: update norms (new - old; by the torch path in place in the copy) and
        second-moment sums; kept as tensors, read once per record."""
        if self._acc is None:
            return
        old, pre, squared = before
        moments = [_second_moment(p, s) for p, s in zip(params, states)]
        counts = [0 if v is None else p.numel() for p, v in zip(params, moments)]
        if squared:  # the copies are ours and plain: the change and v summed in one pass
            post = cpp_kernels.change_sums(old, [p.detach() for p in params],
                                           [None if v is None else v.detach() for v in moments])
            if post is not None:
                stats = torch.stack([pre[:, 0], post[:, 0], pre[:, 1], post[:, 1]], dim=1)
                self._keep(optimizer, group, params, states, stats, counts)
                return
            pre, squared = pre.sqrt(), False
        new = []
        for p, s in zip(params, states):
            comp = s.get("compensation") if isinstance(s, Mapping) else None
            new.append(p.detach().float() + comp if torch.is_tensor(comp) else p.detach())
        torch._foreach_sub_([_real(o) for o in old], [_real(n) for n in new])  # old is our own copy
        update_norms = _norms(old)
        sums = [torch.zeros((), dtype=update_norms.dtype, device=update_norms.device) if v is None else
                v.detach().sum(dtype=torch.float32 if v.dtype in (torch.bfloat16, torch.float16) else None)
                for v in moments]
        stats = torch.stack([pre[:, 0].to(update_norms), update_norms, pre[:, 1].to(update_norms),
                             torch.stack([t.to(update_norms) for t in sums])], dim=1)
        self._keep(optimizer, group, params, states, stats, counts, squared=False)  # squared in double at the record

    def second_moment_name(self, p: Tensor, state: Any) -> str | None:
        """:func:`_second_moment_name`, looked up again only when the state dict is another one or has
        other keys (a record asks for every parameter)."""
        key = (id(p), id(state), len(state) if isinstance(state, (dict, Mapping)) else -1)  # dict: no ABC check
        name = self._moments.get(key, False)
        if name is False or (name is not None and getattr(state.get(name), "shape", None) != p.shape):
            name = self._moments[key] = _second_moment_name(p, state)
        return name

    def add_sums(self, optimizer: Any, group: Mapping[str, Any], params: list[Tensor],
                 states: list[Mapping[str, Any]], sums: Tensor | list[list[float]],
                 moments: list[str | None] | None = None) -> None:
        """Sums a kernel computed during the step, one row per parameter: g^2, update^2, old p^2 and
        the second moment named by :meth:`second_moment_name` (Triton kernels, the C++ kernels and
        loops); a tensor (read at the record, with the others: one host sync) or rows of floats.
        ``moments``: those names where the caller looked them up already."""
        if self._acc is None:
            return
        if moments is None:
            moments = [self.second_moment_name(p, s) for p, s in zip(params, states)]
        counts = [0 if m is None else p.numel() for p, m in zip(params, moments)]
        self._keep(optimizer, group, params, states, sums, counts)

    def _keep(self, optimizer: Any, group: Mapping[str, Any], params: list[Tensor], states: list[Mapping[str, Any]],
              sums: Tensor | list[list[float]], counts: list[int], squared: bool = True) -> None:
        """Hold one group's per-parameter (grad^2, update^2, weight^2, sum v) until the record
        (``squared=False``: the first three are norms); ``counts``: the elements of each parameter's
        second moment (0: none)."""
        if self._group_lr:
            lrs = [float(group.get("lr") or 0.0)] * len(params)
        else:
            lrs = [float(optimizer.effective_lr(group, s)) for s in states]
        self._acc.append(([id(p) for p in params], sums, lrs, counts, squared))

    def _state_bytes(self, optimizer: Any) -> int:
        """:func:`state_bytes`, counted again only when a state value was added or replaced (a new
        object: ``load_state_dict``, ``.to()``) since the last record (counting walks every storage:
        ~17 us per parameter; the check takes each value's id)."""
        key = tuple(map(id, itertools.chain.from_iterable(state.values() if isinstance(state, dict) else (state,)
                                                          for state in optimizer.state.values())))
        if key != self._bytes[0]:
            self._bytes = (key, state_bytes(optimizer))
        return self._bytes[1]

    def _record(self, optimizer: Any) -> None:
        acc, self._acc = self._acc or [], None
        sums: dict[str, list[float]] = {}  # unit: [grad^2, update^2, weight^2, n, lr, sum v, numel v]
        nonfinite: dict[str, list[str]] = {}
        tensors = [entry[1] for entry in acc if torch.is_tensor(entry[1])]
        read = iter(torch.cat([t.to(tensors[0]) for t in tensors]).tolist() if tensors else ())  # one host sync
        for pids, stats, lrs, counts, squared in acc:
            for pid, (g2, u2, w2, v), lr, vn in zip(pids, read if torch.is_tensor(stats) else stats, lrs, counts):
                if not squared:
                    g2, u2, w2 = g2 * g2, u2 * u2, w2 * w2
                unit = self.units.get(pid, "other")
                a = sums.get(unit)
                if a is None:
                    a = sums[unit] = [0.0] * 7
                a[0] += g2
                a[1] += u2
                a[2] += w2
                a[3] += 1
                a[4] += lr
                a[5] += v
                a[6] += vn
                if not math.isfinite(g2):
                    nonfinite.setdefault(unit, []).append(self.param_names.get(pid, "?"))
        units: dict[str, dict[str, float]] = {}
        for name, (g2, u2, w2, n, lr, v, vn) in sums.items():
            g, u, w = (math.sqrt(x) if x > 0 else x for x in (g2, u2, w2))  # 0 and NaN as they are
            units[name] = {"grad_norm": g, "update_norm": u, "weight_norm": w,
                           "update_ratio": u / w if w > 0 else math.nan, "lr": lr / n}
            if vn:
                units[name]["second_moment"] = math.sqrt(v / vn)
        record = {"step": self.steps, "state_bytes": self._state_bytes(optimizer),
                  "skipped_steps": int(getattr(optimizer, "skipped_steps", 0) or 0), "units": units}
        if self.alert_config is not None:
            self._check(units, nonfinite)
            record["alerts"], self._new_alerts = self._new_alerts, []
        self.history.append(record)
        if self.keep is not None and len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for sink, prefix, pass_step in self._sinks:
            values = self.scalars(record, prefix)
            sink(values, step=record["step"]) if pass_step else sink(values)

    # ------------------------------------------------------------------ alerts

    def _alert(self, kind: str, unit: str, value: float, params: list[str], message: str) -> None:
        alert = {"step": self.steps, "kind": kind, "unit": unit, "value": value, "params": params, "message": message}
        self.alerts.append(alert)
        self._new_alerts.append(alert)
        warnings.warn(message, TelemetryWarning, stacklevel=2)

    def _check(self, units: Mapping[str, Mapping[str, float]], nonfinite: Mapping[str, list[str]]) -> None:
        config = self.alert_config
        if config.nonfinite:
            for unit, params in nonfinite.items():
                self._alert("nonfinite", unit, units[unit]["grad_norm"], params,
                            f"op.telemetry: non-finite gradient (NaN/Inf) in {unit!r} (parameters: "
                            f"{', '.join(params)}) at step {self.steps}")
        if config.band is None:
            return
        low, high = config.band
        for unit, values in units.items():
            ratio = values["update_ratio"]
            if not (ratio < low or ratio > high):  # inside, or NaN (a zero weight): the run of records ends
                self._outside_band[unit] = 0
                continue
            count = self._outside_band[unit] = self._outside_band.get(unit, 0) + 1
            if count == config.patience:
                params = [name for pid, name in self.param_names.items() if self.units.get(pid) == unit]
                self._alert("update_ratio", unit, ratio, params,
                            f"op.telemetry: update/weight ratio of {unit!r} outside [{low:g}, {high:g}] for "
                            f"{count} recorded steps (now {ratio:.3g}, step {self.steps})")

    def _skipped_alert(self, optimizer: Any) -> None:
        """The optimizer skipped this step for non-finite gradients: name the parameters."""
        bad: dict[str, list[str]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    bad.setdefault(self.units.get(id(p), "other"), []).append(self.param_names.get(id(p), "?"))
        for unit, params in bad.items():
            self._alert("nonfinite", unit, math.nan, params,
                        f"op.telemetry: non-finite gradient (NaN/Inf) in {unit!r} (parameters: {', '.join(params)}) "
                        f"at step {self.steps}; the optimizer skipped the step")

    # ------------------------------------------------------------------ readers

    def snapshot(self) -> dict[str, Any]:
        """The latest record as a plain dict (``{}`` before the first):
        ``{"step", "state_bytes", "skipped_steps", "units": {unit: {metric: float}}}`` (and
        ``"alerts"``, a list of ``{"step", "kind", "unit", "value", "params", "message"}``, with alerts on)."""
        return json.loads(json.dumps(self.history[-1])) if self.history else {}

    def scalars(self, record: Mapping[str, Any] | None = None, prefix: str = "telemetry/") -> dict[str, float]:
        """A record (default: the latest) flattened for loggers: ``{prefix + "unit/metric": value}``;
        with alerts on also ``prefix + "alerts"`` (their number) and ``prefix + "unit/alert_<kind>": 1.0``."""
        record = record if record is not None else (self.history[-1] if self.history else None)
        if not record:
            return {}
        flat = {f"{prefix}state_bytes": float(record["state_bytes"]), f"{prefix}skipped_steps": float(record["skipped_steps"])}
        for unit, values in record["units"].items():
            flat.update({f"{prefix}{unit}/{metric}": value for metric, value in values.items()})
        if "alerts" in record:
            flat[f"{prefix}alerts"] = float(len(record["alerts"]))
            flat.update({f"{prefix}{alert['unit']}/alert_{alert['kind']}": 1.0 for alert in record["alerts"]})
        return flat

    def log_to(self, sink: Callable[..., Any], prefix: str = "telemetry/", pass_step: bool = False) -> "Telemetry":
        """Call ``sink(scalars)`` after every record (``sink(scalars, step=n)`` with ``pass_step``,
        e.g. ``recorder.log_to(accelerator.log, pass_step=True)``). Returns the recorder."""
        self._sinks.append((sink, prefix, pass_step))
        return self

    def save(self, path: str | Path) -> Path:
        """Write ``history`` as JSON lines (one record per line); :func:`load` and the plot read it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(record) + "\n" for record in self.history))
        return path

    def __repr__(self) -> str:
        state = "on" if self.active else "removed"
        return f"Telemetry({type(self.optimizer).__name__}, every={self.every}, by={self.by!r}, {state}, {len(self.history)} records)"


def telemetry(optimizer: torch.optim.Optimizer, every: int = 1, by: Unit = "group", model: nn.Module | None = None,
              depth: int | None = None, path: str | Path | None = None, keep: int | None = None,
              alerts: bool | Alerts | Mapping[str, Any] | None = None) -> Telemetry:
    """Record per-unit optimizer numbers every ``every`` steps (see the module doc); returns the recorder.

    ``by``: "group" (param groups), "layer" (needs ``model``: the parameter name without its last
    component, or its first ``depth`` components) or "param". ``path``: also append each record to
    this JSON-lines file. ``keep``: bound ``history`` to the last ``keep`` records. ``alerts``:
    True or an :class:`Alerts` (or a dict of its fields) turns on :class:`TelemetryWarning` s.
    Call ``.remove()`` (or use it as a context manager) to turn it off.
    """
    return Telemetry(optimizer, every=every, by=by, model=model, depth=depth, path=path, keep=keep, alerts=alerts)


# ---------------------------------------------------------------------- files and plots


def _find(source: str | Path) -> Path:
    source = Path(source)
    if source.is_dir():
        found = sorted(source.rglob("telemetry*.jsonl"))
        if not found:
            raise ValueError(f"no telemetry*.jsonl under {str(source)!r} (write one with recorder.save(path))")
        return found[0]
    if not source.exists():
        raise ValueError(f"no such telemetry file: {str(source)!r}")
    return source


def load(source: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file written by :meth:`Telemetry.save` (or the first
    ``telemetry*.jsonl`` under a run directory)."""
    lines = _find(source).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def heatmap_values(records: Iterable[Mapping[str, Any]], metric: str = "update_ratio",
                   ) -> tuple[list[str], list[int], list[list[float]]]:
    """(units in first-seen order, steps, ``values[unit][step]``; NaN where a unit has no value)."""
    records = list(records)
    units: list[str] = []
    for record in records:
        units.extend(u for u in record["units"] if u not in units)
    steps = [int(record["step"]) for record in records]
    values = [[float(r["units"].get(u, {}).get(metric, math.nan)) for r in records] for u in units]
    return units, steps, values


def plot_heatmap(source: str | Path | Iterable[Mapping[str, Any]], out: str | Path, metric: str = "update_ratio",
                 log: bool = True, dpi: int = 100) -> str:
    """Write a PNG heat map (units x steps) of ``metric`` (log10 with ``log``) to ``out``; returns ``out``.

    ``source``: records, a JSON-lines file or a run directory. Needs matplotlib (the ``plot`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_heatmap needs matplotlib: pip install 'optim-plugins[plot]'") from exc
    if metric not in METRICS:
        raise ValueError(f"invalid metric: {metric!r} (expected one of {', '.join(METRICS)})")
    records = load(source) if isinstance(source, (str, Path)) else list(source)
    units, steps, values = heatmap_values(records, metric)
    if not units:
        raise ValueError("no telemetry records with units to plot")
    data = torch.tensor(values, dtype=torch.float64)
    if log:
        data = torch.where(data > 0, data.clamp(min=1e-30).log10(), torch.full_like(data, math.nan))
    figure = Figure(figsize=(min(4 + 0.15 * len(steps), 16), min(2 + 0.25 * len(units), 14)))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    image = ax.imshow(data.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{'log10 ' if log else ''}{metric}")
    figure.colorbar(image, ax=ax)
    figure.tight_layout()
    figure.savefig(out, dpi=dpi, format="png")
    return str(out)
