"""Cosine schedules: transformers' ``cosine`` family, ``warmup_cosine`` and ``sgdr``.

``cosine``, ``cosine_with_min_lr``, ``cosine_warmup_with_min_lr`` and
``cosine_with_restarts`` take transformers' arguments and give its curves (the last
is transformers' hard restarts with ``num_cycles``). ``warmup_cosine`` is the LLM
standard with a choice of warmup shape and a floor; ``sgdr`` is SGDR (Loshchilov &
Hutter, 2017) with ``T_0`` / ``T_mult`` cycles, a warmup in every cycle and a peak that
decays per restart (torch's ``CosineAnnealingWarmRestarts`` without warmup or decay).
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from .base import Schedule, check_number, check_steps, check_warmup, min_lr_ratio_of, warmup_factor


def _cosine(progress: float, num_cycles: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))


class WarmupCosine(Schedule):
    """Warmup (linear or cosine) from 0, then cosine decay to a floor: the LLM standard.

    With the defaults it equals transformers' ``cosine``; with ``min_lr_ratio`` it equals
    ``cosine_with_min_lr``. The floor is relative to each group's base lr.

    Args:
        num_warmup_steps: optimizer steps of the warmup from 0.
        num_training_steps: total optimizer steps (warmup included).
        warmup_type: shape of the warmup: "linear" or "cosine".
        min_lr: absolute floor for the optimizer's default lr (groups keep their ratios); excludes min_lr_ratio.
        min_lr_ratio: floor as a fraction of the peak lr, in [0, 1].
        num_cycles: cosine waves after warmup (0.5 is a half wave: peak down to the floor).
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, warmup_type: Literal["linear", "cosine"] = "linear",
                 min_lr: float | None = None, min_lr_ratio: float | None = None, num_cycles: float = 0.5,
                 last_epoch: int = -1):
        self.num_warmup_steps, self.num_training_steps = check_warmup(num_warmup_steps, num_training_steps)
        if warmup_type not in ("linear", "cosine"):
            raise ValueError(f"warmup_type={warmup_type!r} is not one of ['linear', 'cosine']")
        self.warmup_type = warmup_type
        self.min_lr_ratio = min_lr_ratio_of(optimizer, min_lr, min_lr_ratio)
        self.num_cycles = check_number("num_cycles", num_cycles, 0.0)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        warmup, total = self.num_warmup_steps, self.num_training_steps
        if step < warmup:
            return warmup_factor(step, warmup, self.warmup_type)
        progress = float(step - warmup) / float(max(1, total - warmup))
        floor = self.min_lr_ratio
        return max(0.0, _cosine(progress, self.num_cycles) * (1.0 - floor) + floor)


class CosineSchedule(WarmupCosine):
    """Linear warmup from 0, then cosine decay to 0 (transformers' ``cosine``).

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        num_training_steps: total optimizer steps (warmup included).
        num_cycles: cosine waves after warmup (0.5 is a half wave: peak down to 0).
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, num_cycles: float = 0.5, last_epoch: int = -1):
        super().__init__(optimizer, num_warmup_steps, num_training_steps, num_cycles=num_cycles,
                         last_epoch=last_epoch)


class CosineWithMinLR(WarmupCosine):
    """Linear warmup, then cosine decay to a floor (transformers' ``cosine_with_min_lr``).

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        num_training_steps: total optimizer steps (warmup included).
        num_cycles: cosine waves after warmup (0.5 is a half wave: peak down to the floor).
        min_lr: absolute floor for the optimizer's default lr; give this or min_lr_rate.
        min_lr_rate: floor as a fraction of the peak lr; give this or min_lr.
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, num_cycles: float = 0.5, last_epoch: int = -1,
                 min_lr: float | None = None, min_lr_rate: float | None = None):
        rate = min_lr_ratio_of(optimizer, min_lr, min_lr_rate, "min_lr_rate", required=True)
        super().__init__(optimizer, num_warmup_steps, num_training_steps, min_lr_ratio=rate,
                         num_cycles=num_cycles, last_epoch=last_epoch)


class CosineWarmupWithMinLR(Schedule):
    """transformers' ``cosine_warmup_with_min_lr``: warmup that starts above 0, cosine to a floor.

    Its counting is shifted by one step against ``cosine_with_min_lr``: the warmup gives
    ``(step + 1) / warmup`` (or rises linearly from ``warmup_lr_rate``), and the decay
    reaches the floor at ``num_training_steps - 1``.

    Args:
        num_warmup_steps: optimizer steps of the warmup.
        num_training_steps: total optimizer steps (warmup included).
        num_cycles: cosine waves after warmup (0.5 is a half wave: peak down to the floor).
        min_lr: absolute floor for the optimizer's default lr; give this or min_lr_rate.
        min_lr_rate: floor as a fraction of the peak lr; give this or min_lr.
        warmup_lr_rate: start of the warmup as a fraction of the peak (default 1 / num_warmup_steps).
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, num_cycles: float = 0.5, last_epoch: int = -1,
                 min_lr: float | None = None, min_lr_rate: float | None = None,
                 warmup_lr_rate: float | None = None):
        self.num_warmup_steps, self.num_training_steps = check_warmup(num_warmup_steps, num_training_steps)
        self.min_lr_rate = min_lr_ratio_of(optimizer, min_lr, min_lr_rate, "min_lr_rate", required=True)
        self.num_cycles = check_number("num_cycles", num_cycles, 0.0)
        self.warmup_lr_rate = None if warmup_lr_rate is None else check_number("warmup_lr_rate", warmup_lr_rate, 0.0, 1.0)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        warmup, total = float(self.num_warmup_steps), float(self.num_training_steps)
        if step < warmup:
            if self.warmup_lr_rate is None:
                return (step + 1.0) / max(1.0, warmup)
            start = self.warmup_lr_rate
            return start + (1.0 - start) * step / max(1, self.num_warmup_steps - 1)
        progress = (step - warmup + 1.0) / max(1.0, total - warmup)
        floor = self.min_lr_rate
        return max(0.0, _cosine(progress, self.num_cycles) * (1.0 - floor) + floor)


class CosineWithRestarts(Schedule):
    """Linear warmup, then ``num_cycles`` cosine decays to 0 with hard restarts (transformers' ``cosine_with_restarts``).

    For SGDR with growing cycles (``T_0``, ``T_mult``), warmup in every cycle and peak
    decay, use ``sgdr``.

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        num_training_steps: total optimizer steps (warmup included).
        num_cycles: number of equal cosine cycles after warmup.
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, num_cycles: int = 1, last_epoch: int = -1):
        self.num_warmup_steps, self.num_training_steps = check_warmup(num_warmup_steps, num_training_steps)
        self.num_cycles = check_steps("num_cycles", num_cycles, minimum=1)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        warmup, total = self.num_warmup_steps, self.num_training_steps
        if step < warmup:
            return warmup_factor(step, warmup)
        progress = float(step - warmup) / float(max(1, total - warmup))
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(self.num_cycles) * progress) % 1.0))))


class SGDR(Schedule):
    """SGDR: cosine cycles of ``T_0 * T_mult**i`` steps, a warmup in each, peak decaying per restart.

    In cycle ``i`` (from 0) the peak is ``peak_decay**i``; the lr rises linearly from the
    floor to the peak over ``num_warmup_steps``, then falls along a half cosine to the floor
    at the cycle's end. With no warmup and ``peak_decay=1`` this is torch's
    ``CosineAnnealingWarmRestarts`` with ``eta_min = min_lr_ratio * lr``. The first warmup
    starts at the floor too (0 by default).

    Args:
        T_0: steps of the first cycle (default num_training_steps: one cycle).
        T_mult: factor by which each cycle is longer than the one before (integer >= 1).
        num_warmup_steps: steps of the linear warmup at the start of every cycle (< T_0).
        num_training_steps: total optimizer steps; used only as the default of T_0.
        peak_decay: the peak of cycle i is peak_decay**i times the base lr, in (0, 1].
        min_lr_ratio: floor as a fraction of the base lr, in [0, 1].
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, T_0: int | None = None, T_mult: int = 1,
                 num_warmup_steps: int = 0, num_training_steps: int | None = None, peak_decay: float = 1.0,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if T_0 is None:
            if num_training_steps is None:
                raise ValueError("sgdr needs T_0 (or num_training_steps for a single cycle)")
            T_0 = num_training_steps
        self.T_0 = check_steps("T_0", T_0, minimum=1)
        self.T_mult = check_steps("T_mult", T_mult, minimum=1)
        self.num_warmup_steps = check_steps("num_warmup_steps", num_warmup_steps)
        if self.num_warmup_steps >= self.T_0:
            raise ValueError(f"num_warmup_steps={num_warmup_steps} must be smaller than T_0={self.T_0} (warmup is per cycle)")
        self.peak_decay = check_number("peak_decay", peak_decay, 0.0, 1.0, low_open=True)
        self.min_lr_ratio = check_number("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        super().__init__(optimizer, last_epoch)

    def cycle_of(self, step: int) -> tuple[int, int, int]:
        """(cycle index, step within the cycle, cycle length) of ``step``."""
        if self.T_mult == 1:
            return step // self.T_0, step % self.T_0, self.T_0
        cycle, length = 0, self.T_0
        while step >= length:
            step -= length
            cycle, length = cycle + 1, length * self.T_mult
        return cycle, step, length

    def factor(self, step: int) -> float:
        cycle, t, length = self.cycle_of(step)
        floor, warmup = self.min_lr_ratio, self.num_warmup_steps
        peak = max(floor, self.peak_decay**cycle)
        if t < warmup:
            return floor + (peak - floor) * warmup_factor(t, warmup)
        progress = (t - warmup) / (length - warmup)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
