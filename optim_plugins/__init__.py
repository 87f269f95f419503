"""optim_plugins: optimizers and learning-rate schedules for PyTorch, by name.

    import optim_plugins as op
    opt = op.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1)
    sched = op.create_scheduler("constant", opt)

``import optim_plugins`` imports torch only; trainer integrations are imported where used.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from . import optimizers
from .param_groups import param_groups
from .registry import (
    OptimizerSpec,
    SchedulerSpec,
    check_options,
    describe,
    get_optimizer_spec,
    get_scheduler_spec,
    list_optimizers,
    list_schedulers,
    register_optimizer,
    register_scheduler,
)

__version__ = "0.1.0"


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float | None = None,
    weight_decay: float | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    A ``torch.nn.Module`` gets parameter groups with no weight decay on biases, norm
    weights and 0/1-dim tensors (``weight_decay`` defaults to the optimizer's own
    default); an iterable of tensors or group dicts is passed through. Unknown options
    raise ``ValueError`` naming the option; bad values raise ``ValueError`` naming the
    option and the value.
    """
    spec = get_optimizer_spec(name)
    kwargs = dict(options)
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    check_options(spec, kwargs, "optimizer")
    if isinstance(model_or_params, nn.Module):
        if "weight_decay" in spec.options:
            decay = kwargs.get("weight_decay", spec.default_weight_decay) or 0.0
            params: Any = param_groups(model_or_params, weight_decay=decay)
        else:
            params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = model_or_params
    return spec.factory(params, **kwargs)


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int | None = None,
    num_warmup_steps: int = 0,
    **options: Any,
) -> Any:
    """Build the learning-rate schedule registered as ``name`` for ``optimizer``.

    ``num_training_steps`` and ``num_warmup_steps`` count optimizer steps; they are passed
    to schedules that take them (a schedule without warmup refuses ``num_warmup_steps > 0``).
    """
    spec = get_scheduler_spec(name)
    kwargs = dict(options)
    check_options(spec, kwargs, "scheduler")
    if "num_training_steps" in spec.options:
        kwargs["num_training_steps"] = num_training_steps
    if "num_warmup_steps" in spec.options:
        kwargs["num_warmup_steps"] = num_warmup_steps
    elif num_warmup_steps:
        raise ValueError(f"scheduler {spec.name!r} has no warmup: num_warmup_steps={num_warmup_steps!r} cannot apply")
    return spec.factory(optimizer, **kwargs)


__all__ = [
    "OptimizerSpec",
    "SchedulerSpec",
    "create_optimizer",
    "create_scheduler",
    "describe",
    "get_optimizer_spec",
    "get_scheduler_spec",
    "list_optimizers",
    "list_schedulers",
    "optimizers",
    "param_groups",
    "register_optimizer",
    "register_scheduler",
]
