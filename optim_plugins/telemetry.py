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
* ``second_moment``: for adaptive optimizers, the mean of sqrt(second moment) over the unit's
  elements, read from the first state of :data:`SECOND_MOMENT_KEYS` a parameter has (the raw
  state, without bias correction or eps; factored and 8-bit states are left out);

and per step ``state_bytes`` (:func:`optim_plugins.state_bytes`) and ``skipped_steps`` (the
optimizer's count of steps skipped for NaN/Inf gradients or overflow).

Cost. Off (the default, or after ``remove()``) it costs nothing: no hook, no attribute, no
state. On, the steps it does not record cost one torch step pre-hook. A recording step copies
the stepped parameters once (to measure the update) and syncs once to read the numbers.
Optimizers on this package's base class are measured inside the step machinery (one
attribute check per group step); any other ``torch.optim.Optimizer`` (torch.optim.*, the
SAM/Lookahead wrappers) is measured by a step pre-/post-hook pair around the whole step,
which copies every parameter that has a gradient: costlier, and it measures the net change
of the whole step (SAM's perturbation and its undo cancel).

Readers: :meth:`Telemetry.snapshot` (a plain dict), :attr:`Telemetry.history`,
:meth:`Telemetry.scalars` (flat ``{"telemetry/<unit>/<metric>": float}`` for loggers),
:meth:`Telemetry.log_to` (any callable, e.g. ``accelerator.log``), :meth:`Telemetry.save`
(JSON lines) and :func:`plot_heatmap` (``optim-plugins plot-telemetry``). The HF Trainer and
Lightning callbacks are in :mod:`optim_plugins.integrations.telemetry_callbacks`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import Tensor, nn

from .memory import state_bytes

SECOND_MOMENT_KEYS = ("exp_avg_sq", "exp_avg_var", "square_avg", "sum", "v")
METRICS = ("grad_norm", "update_norm", "weight_norm", "update_ratio", "lr", "second_moment")
Unit = Literal["group", "layer", "param"]


def _unwrap(optimizer: Any) -> Any:
    from .training import unwrap_optimizer

    return unwrap_optimizer(optimizer)


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float32) if not t.is_complex() else torch.linalg.vector_norm(t.detach()).float()


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
                 keep: int | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"invalid every: {every!r} (expected an integer >= 1)")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"invalid keep: {keep!r} (expected None or an integer >= 1)")
        from .optimizers.base import Optimizer as Base

        optimizer = _unwrap(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"op.telemetry needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if "_telemetry_recorder" in optimizer.__dict__:
            raise ValueError(f"{type(optimizer).__name__} already has a telemetry recorder; remove() it first")
        self.optimizer, self.every, self.by, self.depth, self.keep = optimizer, every, by, depth, keep
        self.units = unit_names(optimizer, by, model, depth)
        self.native = isinstance(optimizer, Base)  # measured inside step_group; else around the whole step
        self.path = Path(path) if path is not None else None
        self.history: list[dict[str, Any]] = []
        self.steps = 0
        self._sinks: list[tuple[Callable[..., Any], str, bool]] = []
        self._acc: dict[str, dict[str, Any]] | None = None
        self._outside: list | None = None
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

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ------------------------------------------------------------------ hooks

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.steps % self.every:
            optimizer.__dict__.pop("_telemetry", None)
            return
        self._acc = {}
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
        if self._acc is None:
            return
        optimizer.__dict__.pop("_telemetry", None)
        for group, params, before in self._outside or ():
            self.after(optimizer, group, params, [optimizer.state.get(p, {}) for p in params], before)
        self._outside = None
        self._record(optimizer)

    def before(self, optimizer: Any, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
               states: list[Mapping[str, Any]]) -> tuple[list[Tensor], list[Tensor]]:
        """Before a group's update: copies of the parameters (float32 value with Kahan) and grad norms."""
        old = []
        for p, s in zip(params, states):
            comp = s.get("compensation") if isinstance(s, Mapping) else None
            old.append(p.detach().float() + comp if torch.is_tensor(comp) else p.detach().clone())
        return old, [_norm(g) for g in grads]

    def after(self, optimizer: Any, group: Mapping[str, Any], params: list[Tensor], states: list[Mapping[str, Any]],
              before: tuple[list[Tensor], list[Tensor]]) -> None:
        """After a group's update: accumulate the unit sums (tensors; read once per step)."""
        if self._acc is None:
            return
        old, grad_norms = before
        effective = getattr(optimizer, "effective_lr", None)
        for p, s, o, gn in zip(params, states, old, grad_norms):
            comp = s.get("compensation") if isinstance(s, Mapping) else None
            new = p.detach().float() + comp if torch.is_tensor(comp) else p.detach()
            acc = self._acc.setdefault(self.units.get(id(p), "other"), {"sq": [], "n": 0, "lr": 0.0, "v": [], "vn": 0})
            acc["sq"].append(torch.stack([gn, _norm(new - o), _norm(o)]).square())
            acc["n"] += 1
            acc["lr"] += float(effective(group, s)) if effective is not None else float(group.get("lr") or 0.0)
            for key in SECOND_MOMENT_KEYS:
                v = s.get(key) if isinstance(s, Mapping) else None
                if torch.is_tensor(v) and v.is_floating_point() and v.shape == p.shape:
                    acc["v"].append(v.detach().float().sqrt().sum())
                    acc["vn"] += v.numel()
                    break

    def _record(self, optimizer: Any) -> None:
        acc, self._acc = self._acc or {}, None
        units: dict[str, dict[str, float]] = {}
        for name, a in acc.items():
            g2, u2, w2 = torch.stack(a["sq"]).sum(0).sqrt().tolist()
            values = {"grad_norm": g2, "update_norm": u2, "weight_norm": w2,
                      "update_ratio": u2 / w2 if w2 > 0 else math.nan, "lr": a["lr"] / a["n"]}
            if a["v"]:
                values["second_moment"] = float(torch.stack(a["v"]).sum()) / a["vn"]
            units[name] = values
        record = {"step": self.steps, "state_bytes": state_bytes(optimizer),
                  "skipped_steps": int(getattr(optimizer, "skipped_steps", 0) or 0), "units": units}
        self.history.append(record)
        if self.keep is not None and len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for sink, prefix, pass_step in self._sinks:
            values = self.scalars(record, prefix)
            sink(values, step=record["step"]) if pass_step else sink(values)

    # ------------------------------------------------------------------ readers

    def snapshot(self) -> dict[str, Any]:
        """The latest record as a plain dict (``{}`` before the first):
        ``{"step", "state_bytes", "skipped_steps", "units": {unit: {metric: float}}}``."""
        return json.loads(json.dumps(self.history[-1])) if self.history else {}

    def scalars(self, record: Mapping[str, Any] | None = None, prefix: str = "telemetry/") -> dict[str, float]:
        """A record (default: the latest) flattened for loggers: ``{prefix + "unit/metric": value}``."""
        record = record if record is not None else (self.history[-1] if self.history else None)
        if not record:
            return {}
        flat = {f"{prefix}state_bytes": float(record["state_bytes"]), f"{prefix}skipped_steps": float(record["skipped_steps"])}
        for unit, values in record["units"].items():
            flat.update({f"{prefix}{unit}/{metric}": value for metric, value in values.items()})
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
              depth: int | None = None, path: str | Path | None = None, keep: int | None = None) -> Telemetry:
    """Record per-unit optimizer numbers every ``every`` steps (see the module doc); returns the recorder.

    ``by``: "group" (param groups), "layer" (needs ``model``: the parameter name without its last
    component, or its first ``depth`` components) or "param". ``path``: also append each record to
    this JSON-lines file. ``keep``: bound ``history`` to the last ``keep`` records.
    Call ``.remove()`` (or use it as a context manager) to turn it off.
    """
    return Telemetry(optimizer, every=every, by=by, model=model, depth=depth, path=path, keep=keep)


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
