"""Lion: evolved sign momentum (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .base import Optimizer
from .common import check_betas, check_range


class Lion(Optimizer):
    """Lion: the step is the sign of an interpolation of momentum and gradient.

    p *= 1 - lr * wd;  p -= lr * sign(b1 m + (1 - b1) g);  m = b2 m + (1 - b2) g

    One state tensor (half of Adam's). Same numbers as ``lion_pytorch.Lion``.
    Recommended: lr 3-10x smaller than AdamW's (1e-4 where AdamW takes 3e-4 to 1e-3),
    betas (0.9, 0.99) (0.95, 0.98 for stability in LLMs), weight_decay 3-10x larger
    than AdamW's (0.01 to 0.1 and up), so that lr * wd stays similar.

    Args:
        lr: learning rate.
        betas: interpolation factor of the update (b1) and EMA factor of the momentum (b2).
        weight_decay: decoupled weight decay factor (p *= 1 - lr * wd).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        **options: Any,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("weight_decay", options["weight_decay"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled"

    def state_names(self, group):
        return ("exp_avg",)

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        direction = exp_avg.mul(beta1).add_(g, alpha=1 - beta1).sign_()
        p.add_(direction, alpha=-group["lr"])
        exp_avg.mul_(beta2).add_(g, alpha=1 - beta2)
