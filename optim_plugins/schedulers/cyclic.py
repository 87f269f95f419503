"""Cyclical schedules that also cycle momentum: torch's ``CyclicLR`` and ``OneCycleLR``, by name.

These are torch's classes (same numbers, same momentum / beta1 cycling: for an
optimizer with ``betas`` they set ``betas[0]``, otherwise ``momentum``), with two
conveniences: ``num_training_steps`` sets the length, and the peak lr defaults to each
group's lr, so per-group base lrs (layer-wise decay) survive. Both raise where torch
does: cycling momentum on an optimizer with neither ``momentum`` nor ``betas``, and
``onecycle`` stepped past ``num_training_steps``.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from .base import check_number, check_steps, group_values


def _group_lrs(optimizer: torch.optim.Optimizer, key: str, last_epoch: int) -> list[float]:
    """Each group's lr, or when resuming by ``last_epoch`` the value the first run stored under ``key``."""
    if last_epoch == -1:
        return [float(group["lr"]) for group in optimizer.param_groups]
    try:
        return [float(group[key]) for group in optimizer.param_groups]
    except KeyError:
        raise ValueError(f"resuming with last_epoch={last_epoch} needs {key!r} in every param group "
                         "(load the optimizer's state first, or pass the lrs explicitly)") from None


class OneCycle(OneCycleLR):
    """One-cycle policy (Smith & Topin, 2018): torch's ``OneCycleLR`` over ``num_training_steps``.

    The lr rises from ``max_lr / div_factor`` to ``max_lr`` in ``pct_start`` of the run, then
    anneals to ``max_lr / (div_factor * final_div_factor)``; momentum (beta1 for Adam-family
    optimizers) moves the other way between ``max_momentum`` and ``base_momentum``.

    Args:
        num_training_steps: total optimizer steps of the cycle.
        max_lr: peak lr (default: each group's lr).
        pct_start: fraction of the run spent rising, in [0, 1].
        anneal_strategy: "cos" or "linear".
        cycle_momentum: cycle momentum (or beta1) inversely to the lr.
        base_momentum: momentum at the peak lr.
        max_momentum: momentum at the start and end.
        div_factor: initial lr = max_lr / div_factor.
        final_div_factor: final lr = initial lr / final_div_factor.
        three_phase: symmetric rise and fall, then a third phase down to the final lr.
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_training_steps: int | None = None,
                 max_lr: float | list[float] | None = None, pct_start: float = 0.3,
                 anneal_strategy: Literal["cos", "linear"] = "cos", cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False, last_epoch: int = -1):
        total = check_steps("num_training_steps", num_training_steps, minimum=1)
        pct_start = check_number("pct_start", pct_start, 0.0, 1.0)
        check_number("div_factor", div_factor, 0.0, low_open=True)
        check_number("final_div_factor", final_div_factor, 0.0, low_open=True)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy={anneal_strategy!r} is not one of ['cos', 'linear']")
        max_lrs = group_values(optimizer, max_lr, "max_lr", _group_lrs(optimizer, "max_lr", last_epoch))
        super().__init__(optimizer, max_lr=max_lrs, total_steps=total, pct_start=pct_start,
                         anneal_strategy=anneal_strategy, cycle_momentum=cycle_momentum,
                         base_momentum=base_momentum, max_momentum=max_momentum, div_factor=div_factor,
                         final_div_factor=final_div_factor, three_phase=three_phase, last_epoch=last_epoch)


class Cyclic(CyclicLR):
    """Cyclical lr (Smith, 2017): torch's ``CyclicLR`` (triangular, triangular2, exp_range).

    Also stores ``max_lr`` in each param group, so that a resume by ``last_epoch`` finds it.

    Args:
        num_training_steps: total optimizer steps; sets step_size_up to half of it when that is not given.
        base_lr: lower lr of the cycle (default: max_lr / div_factor).
        max_lr: upper lr of the cycle (default: each group's lr).
        div_factor: base_lr = max_lr / div_factor when base_lr is not given.
        step_size_up: steps of the rising half of a cycle (default num_training_steps // 2, else 2000).
        step_size_down: steps of the falling half (default step_size_up).
        mode: "triangular", "triangular2" (amplitude halves per cycle) or "exp_range" (amplitude times gamma**step).
        gamma: decay of the amplitude per step in "exp_range".
        cycle_momentum: cycle momentum (or beta1) inversely to the lr.
        base_momentum: momentum at the peak lr.
        max_momentum: momentum at the base lr.
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_training_steps: int | None = None,
                 base_lr: float | list[float] | None = None, max_lr: float | list[float] | None = None,
                 div_factor: float = 10.0, step_size_up: int | None = None, step_size_down: int | None = None,
                 mode: Literal["triangular", "triangular2", "exp_range"] = "triangular", gamma: float = 1.0,
                 cycle_momentum: bool = True, base_momentum: float = 0.8, max_momentum: float = 0.9,
                 last_epoch: int = -1):
        check_number("div_factor", div_factor, 0.0, low_open=True)
        max_lrs = group_values(optimizer, max_lr, "max_lr", _group_lrs(optimizer, "max_lr", last_epoch))
        base_lrs = group_values(optimizer, base_lr, "base_lr", [lr / div_factor for lr in max_lrs])
        for low, high in zip(base_lrs, max_lrs):
            if not 0 <= low <= high:
                raise ValueError(f"base_lr={low!r} must be in [0, max_lr={high!r}]")
        if step_size_up is None:
            step_size_up = max(1, num_training_steps // 2) if num_training_steps else 2000
        step_size_up = check_steps("step_size_up", step_size_up, minimum=1)
        step_size_down = check_steps("step_size_down", step_size_down, minimum=1, required=False)
        if mode not in ("triangular", "triangular2", "exp_range"):
            raise ValueError(f"mode={mode!r} is not one of ['triangular', 'triangular2', 'exp_range']")
        check_number("gamma", gamma, 0.0, 1.0, low_open=True)
        for group, lr in zip(optimizer.param_groups, max_lrs):
            group["max_lr"] = lr
        super().__init__(optimizer, base_lr=base_lrs, max_lr=max_lrs, step_size_up=step_size_up,
                         step_size_down=step_size_down, mode=mode, gamma=gamma, cycle_momentum=cycle_momentum,
                         base_momentum=base_momentum, max_momentum=max_momentum, last_epoch=last_epoch)
