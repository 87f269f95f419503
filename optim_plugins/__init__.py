"""optim_plugins: optimizers and learning-rate schedules for PyTorch, by name.

    import optim_plugins as op
    opt = op.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1)
    sched = op.create_scheduler("constant", opt)

``import optim_plugins`` imports torch only; trainer integrations are imported where used.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import distributed, optimizers, schedulers
from .config import OptimizerConfig, SchedulerConfig, parse_optim_args
from .lr_finder import LRFindResult, lr_find
from .memory import state_bytes, state_bytes_per_param
from .param_groups import describe_param_groups, format_param_groups, param_groups
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
from .release import GradientRelease, release_gradients
from .telemetry import Telemetry, telemetry
from .training import StepResult, StepRunner, adaptive_clip_grad_

__version__ = "0.1.0"


def create_optimizer(
    name: str | OptimizerConfig | Mapping[str, Any],
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float | None = None,
    weight_decay: float | None = None,
    *,
    layer_decay: float | None = None,
    overrides: Sequence[tuple[str, Mapping[str, Any]]] | None = None,
    no_decay: Any = None,
    decay_embeddings: bool | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    A ``torch.nn.Module`` gets parameter groups from :func:`param_groups` (or from the
    optimizer's own ``model_param_groups``, e.g. Muon's and GaLore's): no weight decay
    on biases, norm weights and 0/1-dim tensors (``weight_decay`` defaults to the
    optimizer's own default), and optionally ``layer_decay``, ``overrides``, ``no_decay``
    and ``decay_embeddings`` as there. An iterable of tensors or group dicts is passed
    through. Unknown options raise ``ValueError`` naming the option; bad values raise
    ``ValueError`` naming the option and the value.

    ``name`` may be an :class:`OptimizerConfig` (or its dict); arguments given here win
    over the config's. Its ``max_grad_norm`` is for the trainer.
    """
    settings = dict(layer_decay=layer_decay, overrides=overrides, no_decay=no_decay, decay_embeddings=decay_embeddings)
    group_settings = {key: value for key, value in settings.items() if value is not None}
    if not isinstance(name, str):  # an OptimizerConfig or a dict: explicit arguments win over it
        config = OptimizerConfig.from_dict(name)
        name = config.name
        lr = lr if lr is not None else config.lr
        weight_decay = weight_decay if weight_decay is not None else config.weight_decay
        options = {**config.options, **options}
        group_settings = {**config.group_options(), **group_settings}
    spec = get_optimizer_spec(name)
    kwargs = dict(options)
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    check_options(spec, kwargs, "optimizer")
    if isinstance(model_or_params, nn.Module):
        model_groups = getattr(spec.factory, "model_param_groups", None)
        if model_groups is not None:  # optimizers that choose their tensors from the model (Muon, GaLore, APOLLO)
            params, kwargs = model_groups(model_or_params, kwargs, **group_settings)
        else:
            default_lr = spec.options["lr"].default if "lr" in spec.options else None
            params = param_groups(model_or_params, weight_decay=weight_decay, lr=kwargs.get("lr", default_lr),
                                  optimizer=spec.name, **group_settings)
    elif group_settings:
        raise ValueError(f"{', '.join(group_settings)} need a torch.nn.Module, not a list of parameters or groups")
    else:
        params = model_or_params
    return spec.factory(params, **kwargs)


def create_scheduler(
    name: str | SchedulerConfig | Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    num_training_steps: int | None = None,
    num_warmup_steps: int = 0,
    **options: Any,
) -> Any:
    """Build the learning-rate schedule registered as ``name`` for ``optimizer``.

    ``num_training_steps`` and ``num_warmup_steps`` count optimizer steps; they are passed
    to schedules that take them (a schedule without warmup refuses ``num_warmup_steps > 0``).
    ``name`` may be a :class:`SchedulerConfig` (or its dict); arguments given here win over it,
    and a fractional warmup in it is resolved against ``num_training_steps``.
    """
    if not isinstance(name, str):  # a SchedulerConfig or a dict: explicit arguments win over it
        config = SchedulerConfig.from_dict(name)
        name = config.name
        num_training_steps = num_training_steps if num_training_steps is not None else config.num_training_steps
        num_warmup_steps = num_warmup_steps or config.warmup_steps(num_training_steps)
        options = {**config.options, **options}
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
    "GradientRelease",
    "LRFindResult",
    "OptimizerConfig",
    "OptimizerSpec",
    "SchedulerConfig",
    "SchedulerSpec",
    "StepResult",
    "StepRunner",
    "Telemetry",
    "adaptive_clip_grad_",
    "create_optimizer",
    "create_scheduler",
    "describe",
    "describe_param_groups",
    "distributed",
    "format_param_groups",
    "get_optimizer_spec",
    "get_scheduler_spec",
    "list_optimizers",
    "list_schedulers",
    "lr_find",
    "optimizers",
    "param_groups",
    "parse_optim_args",
    "register_optimizer",
    "register_scheduler",
    "release_gradients",
    "schedulers",
    "state_bytes",
    "state_bytes_per_param",
    "telemetry",
]
