"""What every closed-form schedule here shares: the base class, warmup and argument checks.

A schedule is ``lr_g(step) = base_lr_g * factor(step)``: one number per step, the same
for every parameter group, so per-group base lrs (layer-wise decay) keep their ratios.
``factor`` is a pure function of the step, so ``last_epoch`` resume and
``step(epoch)`` (torch's closed form) give exactly the lr of an uninterrupted run.

Every attribute of a schedule is a Python primitive (no lambdas, unlike ``LambdaLR``), so
``state_dict()`` loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

WARMUP_TYPES = ("linear", "cosine", "1-sqrt")


def warmup_factor(step: int, num_warmup_steps: int, kind: str = "linear", start: float = 0.0) -> float:
    """Factor of the warmup at ``step < num_warmup_steps``: from ``start`` at step 0 towards 1.

    ``kind`` is the shape of the ramp in the progress ``p = step / num_warmup_steps``:
    ``linear`` p, ``cosine`` (1 - cos(pi p)) / 2, ``1-sqrt`` 1 - sqrt(1 - p); the same
    formulas as transformers (its warmups start at 0; its WSD starts at ``min_lr_ratio``).
    """
    progress = float(step) / float(max(1, num_warmup_steps))
    if kind == "linear":
        shape = progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif kind == "1-sqrt":
        shape = 1.0 - math.sqrt(1.0 - progress)
    else:
        raise ValueError(f"warmup_type={kind!r} is not one of {list(WARMUP_TYPES)}")
    return max(0.0, shape * (1.0 - start) + start)


def check_steps(name: str, value: Any, minimum: int = 0, required: bool = True) -> int | None:
    """``value`` as an int >= ``minimum``; ``ValueError`` naming the option otherwise."""
    if value is None:
        if required:
            raise ValueError(f"{name} is required (got None)")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in the given range; ``ValueError`` naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def check_warmup(num_warmup_steps: Any, num_training_steps: Any) -> tuple[int, int]:
    """Both step counts checked: total >= 1, 0 <= warmup <= total."""
    total = check_steps("num_training_steps", num_training_steps, minimum=1)
    warmup = check_steps("num_warmup_steps", num_warmup_steps)
    if warmup > total:
        raise ValueError(f"num_warmup_steps={warmup} is larger than num_training_steps={total}")
    return warmup, total


def optimizer_lr(optimizer: torch.optim.Optimizer) -> float:
    """The optimizer's default lr, which transformers' absolute ``min_lr`` / ``lr_end`` refer to."""
    return float(optimizer.defaults["lr"])


def min_lr_ratio_of(optimizer: torch.optim.Optimizer, min_lr: float | None, min_lr_ratio: float | None,
                    ratio_name: str = "min_lr_ratio", required: bool = False) -> float:
    """The floor as a fraction of the peak, from an absolute ``min_lr`` or a ratio (not both).

    An absolute ``min_lr`` is divided by the optimizer's default lr (as transformers does),
    so every group keeps its ratio to its own base lr.
    """
    if min_lr is not None and min_lr_ratio is not None:
        raise ValueError(f"give min_lr or {ratio_name}, not both (got min_lr={min_lr!r}, {ratio_name}={min_lr_ratio!r})")
    if min_lr is not None:
        check_number("min_lr", min_lr, 0.0)
        lr = optimizer_lr(optimizer)
        if min_lr > lr:
            raise ValueError(f"min_lr={min_lr!r} is larger than the optimizer's lr={lr!r}")
        return min_lr / lr if lr > 0 else 0.0
    if min_lr_ratio is None:
        if required:
            raise ValueError(f"one of min_lr or {ratio_name} is required")
        return 0.0
    return check_number(ratio_name, min_lr_ratio, 0.0, 1.0)


class Schedule(LRScheduler):
    """Base of the closed-form schedules: ``lr_g = base_lr_g * self.factor(step)``.

    A subclass sets its (primitive) attributes, then calls ``super().__init__`` (which
    applies ``factor(0)``, or ``factor(last_epoch)`` when resuming), and writes ``factor``.
    """

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float | torch.Tensor]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float | torch.Tensor]:
        return self.get_lr()

    def lr_at(self, step: int) -> list[float]:
        """The lrs this schedule gives at ``step`` (no side effects)."""
        return [float(base_lr) * self.factor(step) for base_lr in self.base_lrs]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, base_lrs={self.base_lrs})"


def group_values(optimizer: torch.optim.Optimizer, value: float | Sequence[float] | None, name: str,
                 default: Sequence[float]) -> list[float]:
    """One value per param group: ``default`` when ``value`` is None, a scalar repeated, or a list."""
    groups = len(optimizer.param_groups)
    if value is None:
        return [float(v) for v in default]
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"{name} has {len(value)} values for {groups} param groups")
        return [float(v) for v in value]
    return [float(value)] * groups
