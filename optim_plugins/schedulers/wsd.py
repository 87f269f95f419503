"""Warmup-stable-decay (WSD): transformers' ``warmup_stable_decay``, same arguments and curve."""
from __future__ import annotations

import math
from typing import Literal

import torch

from .base import WARMUP_TYPES, Schedule, check_number, check_steps, warmup_factor

_SHAPES = {"linear": "linear", "cosine": "cosine", "1-sqrt": "1-sqrt", "sqrt": "1-sqrt"}


def _shape(name: str, value: str) -> str:
    if value not in _SHAPES:
        raise ValueError(f"{name}={value!r} is not one of {list(WARMUP_TYPES)}")
    return _SHAPES[value]


class WarmupStableDecay(Schedule):
    """Warmup to the peak, hold it, then decay to ``min_lr_ratio`` (transformers' ``warmup_stable_decay``).

    Phases: warmup from ``min_lr_ratio`` (linear, cosine or 1-sqrt), ``num_stable_steps``
    at the peak, ``num_decay_steps`` of decay (linear, cosine, 1-sqrt), then the floor.
    ``num_stable_steps`` defaults to ``num_training_steps - warmup - decay``; given both,
    ``num_stable_steps`` wins (transformers warns; this does not). ``"sqrt"`` is accepted for
    ``"1-sqrt"``.

    Args:
        num_warmup_steps: optimizer steps of the warmup.
        num_decay_steps: optimizer steps of the final decay (required).
        num_training_steps: total optimizer steps; sets num_stable_steps when that is not given.
        num_stable_steps: optimizer steps at the peak lr.
        warmup_type: shape of the warmup: "linear", "cosine" or "1-sqrt".
        decay_type: shape of the decay: "linear", "cosine" or "1-sqrt".
        min_lr_ratio: start of the warmup and end of the decay as a fraction of the peak, in [0, 1].
        num_cycles: cosine waves of a cosine decay (0.5: peak down to the floor).
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_decay_steps: int | None = None, num_training_steps: int | None = None,
                 num_stable_steps: int | None = None,
                 warmup_type: Literal["linear", "cosine", "1-sqrt", "sqrt"] = "linear",
                 decay_type: Literal["linear", "cosine", "1-sqrt", "sqrt"] = "cosine",
                 min_lr_ratio: float = 0.0, num_cycles: float = 0.5, last_epoch: int = -1):
        self.num_warmup_steps = check_steps("num_warmup_steps", num_warmup_steps)
        self.num_decay_steps = check_steps("num_decay_steps", num_decay_steps)
        if num_stable_steps is None:
            if num_training_steps is None:
                raise ValueError("warmup_stable_decay needs num_training_steps or num_stable_steps")
            total = check_steps("num_training_steps", num_training_steps, minimum=1)
            num_stable_steps = total - self.num_warmup_steps - self.num_decay_steps
            if num_stable_steps < 0:
                raise ValueError(f"num_warmup_steps={self.num_warmup_steps} + num_decay_steps={self.num_decay_steps} "
                                 f"is larger than num_training_steps={total}")
        self.num_stable_steps = check_steps("num_stable_steps", num_stable_steps)
        self.warmup_type = _shape("warmup_type", warmup_type)
        self.decay_type = _shape("decay_type", decay_type)
        self.min_lr_ratio = check_number("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        self.num_cycles = check_number("num_cycles", num_cycles, 0.0)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        warmup, stable, decay, floor = self.num_warmup_steps, self.num_stable_steps, self.num_decay_steps, self.min_lr_ratio
        if step < warmup:
            return warmup_factor(step, warmup, self.warmup_type, start=floor)
        if step < warmup + stable:
            return 1.0
        if step < warmup + stable + decay:
            progress = float(step - warmup - stable) / float(max(1, decay))
            if self.decay_type == "linear":
                shape = 1.0 - progress
            elif self.decay_type == "cosine":
                shape = 0.5 * (1.0 + math.cos(math.pi * float(self.num_cycles) * 2.0 * progress))
            else:
                shape = 1.0 - math.sqrt(progress)
            return max(0.0, shape * (1.0 - floor) + floor)
        return floor
