"""Learning-rate schedules, each a ``torch.optim.lr_scheduler.LRScheduler``, registered by name.

Closed-form schedules (``base.Schedule``) give ``lr_g = base_lr_g * factor(step)``;
``cyclic`` / ``onecycle`` are torch's classes; ``plateau`` subclasses
``ReduceLROnPlateau``. Every state dict holds only primitives (``weights_only`` loads).
This package imports torch only (matplotlib is imported inside ``plot.plot_schedule``).
"""
from .adaptive import AdaptiveSchedule, LossTrend, Plateau
from .base import Schedule, warmup_factor
from .basic import ConstantSchedule, ConstantWithWarmup, InverseSqrtSchedule, LinearSchedule, PolynomialSchedule
from .cosine import SGDR, CosineSchedule, CosineWarmupWithMinLR, CosineWithMinLR, CosineWithRestarts, WarmupCosine
from .cyclic import Cyclic, OneCycle
from .decay import ExponentialSchedule, MultiStepSchedule, StepSchedule
from .wsd import WarmupStableDecay

__all__ = [
    "AdaptiveSchedule", "ConstantSchedule", "ConstantWithWarmup", "CosineSchedule", "CosineWarmupWithMinLR",
    "CosineWithMinLR", "CosineWithRestarts", "Cyclic", "ExponentialSchedule", "InverseSqrtSchedule",
    "LinearSchedule", "LossTrend", "MultiStepSchedule", "OneCycle", "Plateau", "PolynomialSchedule", "SGDR",
    "Schedule", "StepSchedule", "WarmupCosine", "WarmupStableDecay", "warmup_factor",
]
