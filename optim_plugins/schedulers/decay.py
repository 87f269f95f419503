"""Step-wise decays, closed-form twins of torch's ``StepLR``, ``MultiStepLR`` and ``ExponentialLR``.

Same lr as torch's (torch's ``ExponentialLR`` multiplies step by step, so it differs
by float rounding, ~1e-15 relative). These take no warmup; for warmup with a decay
use ``warmup_cosine``, ``linear``, ``polynomial`` or ``warmup_stable_decay``.
"""
from __future__ import annotations

import bisect

import torch

from .base import Schedule, check_number, check_steps


class StepSchedule(Schedule):
    """Multiply the lr by ``gamma`` every ``step_size`` steps (torch's ``StepLR``).

    Args:
        step_size: optimizer steps between two decays.
        gamma: multiplicative factor of each decay, in (0, 1].
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, step_size: int = 1000, gamma: float = 0.1,
                 last_epoch: int = -1):
        self.step_size = check_steps("step_size", step_size, minimum=1)
        self.gamma = check_number("gamma", gamma, 0.0, 1.0, low_open=True)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class MultiStepSchedule(Schedule):
    """Multiply the lr by ``gamma`` at each milestone step (torch's ``MultiStepLR``).

    Args:
        milestones: optimizer steps at which the lr decays (a repeated step decays twice).
        gamma: multiplicative factor of each decay, in (0, 1].
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: list[int] | None = None,
                 gamma: float = 0.1, last_epoch: int = -1):
        if not milestones:
            raise ValueError(f"milestones must be a non-empty list of steps, got {milestones!r}")
        self.milestones = sorted(check_steps("milestones", m) for m in milestones)
        self.gamma = check_number("gamma", gamma, 0.0, 1.0, low_open=True)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, step)


class ExponentialSchedule(Schedule):
    """Multiply the lr by ``gamma`` every step (torch's ``ExponentialLR``).

    Args:
        gamma: multiplicative factor per step, in (0, 1].
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 0.999, last_epoch: int = -1):
        self.gamma = check_number("gamma", gamma, 0.0, 1.0, low_open=True)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return self.gamma**step
