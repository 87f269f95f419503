"""Schedules shared with transformers: same arguments, same curve."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def constant(optimizer: torch.optim.Optimizer, last_epoch: int = -1) -> LambdaLR:
    """Constant learning rate (transformers' ``constant``).

    Args:
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """
    return LambdaLR(optimizer, lambda _: 1.0, last_epoch=last_epoch)
