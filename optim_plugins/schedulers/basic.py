"""Constant, linear, polynomial and inverse-sqrt schedules: transformers' names, arguments and curves.

The warmup of each is transformers' linear ramp ``step / num_warmup_steps`` from 0.
Unlike transformers, ``num_warmup_steps > num_training_steps`` raises (the run would end
before the peak), and ``polynomial`` with ``num_warmup_steps == num_training_steps`` gives
``lr_end`` at the last step where transformers divides by zero.
"""
from __future__ import annotations

import math

import torch

from .base import Schedule, check_number, check_steps, check_warmup, optimizer_lr, warmup_factor


class ConstantSchedule(Schedule):
    """Constant learning rate (transformers' ``constant``).

    Args:
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return 1.0


class ConstantWithWarmup(Schedule):
    """Linear warmup from 0, then the constant base lr (transformers' ``constant_with_warmup``).

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0, last_epoch: int = -1):
        self.num_warmup_steps = check_steps("num_warmup_steps", num_warmup_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return warmup_factor(step, self.num_warmup_steps) if step < self.num_warmup_steps else 1.0


class LinearSchedule(Schedule):
    """Linear warmup from 0, then linear decay to 0 at ``num_training_steps`` (transformers' ``linear``).

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        num_training_steps: total optimizer steps; the lr is 0 from there on.
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, last_epoch: int = -1):
        self.num_warmup_steps, self.num_training_steps = check_warmup(num_warmup_steps, num_training_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        warmup, total = self.num_warmup_steps, self.num_training_steps
        if step < warmup:
            return warmup_factor(step, warmup)
        return max(0.0, float(total - step) / float(max(1, total - warmup)))


class PolynomialSchedule(Schedule):
    """Linear warmup, then ``(lr - lr_end) * (1 - progress) ** power + lr_end`` (transformers' ``polynomial``).

    ``lr_end`` is absolute for the optimizer's default lr; a group with another base lr
    ends at ``lr_end * base_lr / lr`` (transformers' behaviour, which keeps group ratios).

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        num_training_steps: total optimizer steps; the lr stays at lr_end from there on.
        lr_end: final learning rate (must be below the optimizer's lr).
        power: power of the polynomial decay (1 is linear decay to lr_end).
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, lr_end: float = 1e-7, power: float = 1.0,
                 last_epoch: int = -1):
        self.num_warmup_steps, self.num_training_steps = check_warmup(num_warmup_steps, num_training_steps)
        self.lr_end = check_number("lr_end", lr_end, 0.0)
        self.power = check_number("power", power, 0.0, low_open=True)
        self.lr_init = optimizer_lr(optimizer)
        if not self.lr_init > self.lr_end:
            raise ValueError(f"lr_end={lr_end!r} must be smaller than the optimizer's lr={self.lr_init!r}")
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        warmup, total = self.num_warmup_steps, self.num_training_steps
        if step < warmup:
            return warmup_factor(step, warmup)
        if step >= total:
            return self.lr_end / self.lr_init
        remaining = 1.0 - (step - warmup) / (total - warmup)
        return ((self.lr_init - self.lr_end) * remaining**self.power + self.lr_end) / self.lr_init


class InverseSqrtSchedule(Schedule):
    """Linear warmup, then ``1 / sqrt((step + timescale - warmup) / timescale)`` (transformers' ``inverse_sqrt``).

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        timescale: steps over which the decay acts (default num_warmup_steps, or 10000 without warmup).
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 timescale: int | None = None, last_epoch: int = -1):
        self.num_warmup_steps = check_steps("num_warmup_steps", num_warmup_steps)
        if timescale is None:
            timescale = self.num_warmup_steps or 10_000
        self.timescale = check_steps("timescale", timescale, minimum=1)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return warmup_factor(step, self.num_warmup_steps)
        shift = self.timescale - self.num_warmup_steps
        return 1.0 / math.sqrt((step + shift) / self.timescale)
