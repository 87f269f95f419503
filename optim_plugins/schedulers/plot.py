"""Curves of a registered schedule: values per step, and a PNG of them (``optim-plugins plot-schedule``).

The schedule drives a one-parameter ``torch.optim.SGD(lr, momentum=0.9)``, so schedules
that cycle momentum show it. Metric-driven schedules (``plateau``, ``loss_trend``) see
a synthetic loss that falls linearly for 40% of the run and then stays flat, once per
step; their curve shows the mechanism, not what a real run would do. matplotlib is
imported only inside :func:`plot_schedule`.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..registry import SchedulerSpec, check_options, get_scheduler_spec
from .adaptive import LossTrend


def parse_option_pairs(pairs: Iterable[str], spec: SchedulerSpec | str) -> dict[str, Any]:
    """``["k=v", ...]`` as typed options of ``spec`` (a spec or a registry name).

    Each value is typed by the option's annotation (``Option.parse``). ``ValueError``
    names a pair without ``=``, an unknown option (with close matches) or a bad value.
    """
    spec = get_scheduler_spec(spec) if isinstance(spec, str) else spec
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"option {pair!r} is not of the form key=value")
        if key not in spec.options:
            check_options(spec, {key: value}, "scheduler")
        options[key] = spec.options[key].parse(value)
    return options


def demo_loss(step: int, steps: int) -> float:
    """The synthetic loss fed to metric-driven schedules: falls for 40% of the run, then flat."""
    return max(0.2, 1.0 - 0.8 * step / max(1.0, 0.4 * steps))


def schedule_values(name: str, steps: int, options: Mapping[str, Any] | None = None, lr: float = 1.0,
                    ) -> tuple[list[float], list[float] | None]:
    """The lr used at each of ``steps`` optimizer steps, and the momentum where the schedule changes it.

    ``num_training_steps`` defaults to ``steps`` for schedules that take it.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    spec = get_scheduler_spec(name)
    kwargs = dict(options or {})
    check_options(spec, kwargs, "scheduler")
    if "num_training_steps" in spec.options:
        kwargs.setdefault("num_training_steps", steps)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9)
    scheduler = spec.factory(optimizer, **kwargs)
    lrs, momentums = [], []
    for step in range(steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        momentums.append(float(optimizer.param_groups[0]["momentum"]))
        optimizer.step()  # no gradient: nothing changes, but step hooks and torch's order checks see a step
        if isinstance(scheduler, (ReduceLROnPlateau, LossTrend)):
            scheduler.step(demo_loss(step, steps))
        else:
            scheduler.step()
    changed = any(m != momentums[0] for m in momentums)
    return lrs, (momentums if changed else None)


def plot_schedule(name: str, steps: int, options: Mapping[str, Any] | None, out: str, lr: float = 1.0,
                  dpi: int = 100) -> str:
    """Write a PNG of the lr per step (and the momentum, in a second panel, where it cycles) to ``out``.

    ``lr`` is the base lr of the plotted optimizer (1.0 shows the schedule's factor).
    Returns ``out``. Needs matplotlib (the ``plot`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_schedule needs matplotlib: pip install 'optim-plugins[plot]'") from exc
    lrs, momentums = schedule_values(name, steps, options, lr=lr)
    panels = 2 if momentums is not None else 1
    figure = Figure(figsize=(8, 3 * panels + 1))
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    described = ", ".join(f"{k}={v}" for k, v in (options or {}).items())
    axes[0].plot(range(steps), lrs, color="tab:blue")
    axes[0].set_ylabel("learning rate")
    axes[0].set_title(f"{name}({described})" if described else name)
    if momentums is not None:
        axes[1].plot(range(steps), momentums, color="tab:orange")
        axes[1].set_ylabel("momentum / beta1")
    axes[-1].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=dpi, format="png")
    return out
