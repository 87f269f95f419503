"""The optimizer test database: one entry per registered optimizer.

Like torch's ``OptimizerInfo``: each entry says which option sets to try, which
independent reference to compare against, and the hyper-parameters that must reach a
stated accuracy on real data. ``test_optimizers.py`` runs one suite over every entry;
an optimizer registered without an entry fails ``test_every_optimizer_has_an_entry``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def grid(**axes: list) -> list[dict[str, Any]]:
    """Every combination of the given option values."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


@dataclass
class OptimInfo:
    name: str
    option_sets: list[dict[str, Any]]
    # Builds the independent reference optimizer for (params, options); None: no reference here.
    reference: Callable[[list, dict], torch.optim.Optimizer] | None = None
    rtol: float = 1e-6
    # Options that are invalid, each with a fragment the error message must contain.
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    # Convergence on scikit-learn's digits: options and the accuracy they must reach.
    recommended: dict[str, Any] = field(default_factory=dict)
    accuracy: float = 0.95
    # Zero gradients from the first step leave parameters unchanged (with weight decay 0).
    zero_grads_keep_params: bool = True
    supports_complex: bool = True
    # Steps of the reference comparison (200 by the Foundation's rule; fewer only with a reason).
    reference_steps: int = 200
    # bf16/fp16 parameters: the objective falls within 20 steps at the first option set.
    low_precision_learns: bool = True
    # Generic tests that do not apply, each with the reason: {"test_name": "why"}.
    not_applicable: dict[str, str] = field(default_factory=dict)


def torch_reference(cls: type, drop: tuple[str, ...] = ()) -> Callable[[list, dict], torch.optim.Optimizer]:
    def make(params, options):
        options = {k: v for k, v in options.items() if k not in drop}
        options.setdefault("foreach", False)
        return cls(params, **options)
    return make


class DecoupledSGDReference(torch.optim.Optimizer):
    """SGDW written out: p *= 1 - lr * wd, then torch's SGD step without weight decay."""

    def __init__(self, params, **options):
        self.decay = options.pop("weight_decay", 0.0)
        options.pop("decoupled_weight_decay", None)
        options.setdefault("foreach", False)
        self.inner = torch.optim.SGD(params, **options)
        super().__init__(self.inner.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * self.decay)
        self.inner.step()
        return loss


def sgd_reference(params, options):
    if options.get("decoupled_weight_decay"):
        return DecoupledSGDReference(params, **options)
    return torch_reference(torch.optim.SGD, drop=("decoupled_weight_decay",))(params, options)


ADAM_INVALID = [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.999)), "betas[0]"),
    (dict(betas=(0.9, -0.1)), "betas[1]"),
    (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
]

CORE_ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "sgd",
        grid(lr=[0.05], momentum=[0.9, 0.0], weight_decay=[0.0, 0.1], nesterov=[False])
        + grid(lr=[0.05], momentum=[0.9], dampening=[0.0], nesterov=[True], weight_decay=[0.0, 0.1], maximize=[False, True])
        + grid(lr=[0.05], momentum=[0.9], dampening=[0.5], weight_decay=[0.1], decoupled_weight_decay=[True]),
        reference=sgd_reference,
        invalid=[(dict(lr=-0.1), "lr"), (dict(momentum=-0.9), "momentum"),
                 (dict(nesterov=True), "nesterov"), (dict(momentum=0.9, dampening=0.1, nesterov=True), "nesterov")],
        recommended=dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
    ),
    OptimInfo(
        "adam",
        grid(lr=[0.01], amsgrad=[False, True], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True])
        + [dict(lr=0.01, maximize=True, weight_decay=0.1)],
        reference=torch_reference(torch.optim.Adam),
        invalid=ADAM_INVALID,
        recommended=dict(lr=3e-3),
    ),
    OptimInfo(
        "adamw",
        grid(lr=[0.01], amsgrad=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True]),
        reference=torch_reference(torch.optim.AdamW),
        invalid=ADAM_INVALID,
        recommended=dict(lr=3e-3, weight_decay=0.01),
    ),
    OptimInfo(
        "adamax",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], maximize=[False, True]),
        reference=torch_reference(torch.optim.Adamax),
        invalid=ADAM_INVALID,
        recommended=dict(lr=5e-3),
    ),
    OptimInfo(
        "nadam",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True], momentum_decay=[4e-3])
        + [dict(lr=0.01, momentum_decay=0.01, maximize=True)],
        reference=torch_reference(torch.optim.NAdam),
        invalid=ADAM_INVALID + [(dict(momentum_decay=-1.0), "momentum_decay")],
        recommended=dict(lr=3e-3),
    ),
    OptimInfo(
        "radam",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True])
        + [dict(lr=0.01, maximize=True)],
        reference=torch_reference(torch.optim.RAdam),
        invalid=ADAM_INVALID,
        recommended=dict(lr=3e-3),
    ),
    OptimInfo(
        "adagrad",
        grid(lr=[0.05], lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.1], initial_accumulator_value=[0.0, 0.1])
        + [dict(lr=0.05, maximize=True, eps=1e-6)],
        reference=torch_reference(torch.optim.Adagrad),
        invalid=[(dict(lr=-1.0), "lr"), (dict(lr_decay=-0.1), "lr_decay"),
                 (dict(initial_accumulator_value=-1.0), "initial_accumulator_value"), (dict(eps=-1.0), "eps")],
        recommended=dict(lr=0.05),
    ),
    OptimInfo(
        "rmsprop",
        grid(lr=[0.01], momentum=[0.0, 0.9], centered=[False, True], weight_decay=[0.0, 0.1])
        + [dict(lr=0.01, alpha=0.9, maximize=True)],
        reference=torch_reference(torch.optim.RMSprop),
        invalid=[(dict(lr=-1.0), "lr"), (dict(alpha=-0.5), "alpha"), (dict(momentum=-0.1), "momentum"),
                 (dict(eps=-1.0), "eps")],
        recommended=dict(lr=1e-3),
    ),
]


def _collect() -> dict[str, OptimInfo]:
    """Core entries plus ``ENTRIES`` of every ``optim_db_*.py`` beside this file (one per family)."""
    import importlib
    from pathlib import Path

    entries = list(CORE_ENTRIES)
    for path in sorted(Path(__file__).parent.glob("optim_db_*.py")):
        entries += importlib.import_module(path.stem).ENTRIES
    db: dict[str, OptimInfo] = {}
    for info in entries:
        assert info.name not in db, f"two test-database entries for {info.name!r}"
        db[info.name] = info
    return db


OPTIMIZER_DB = _collect()
