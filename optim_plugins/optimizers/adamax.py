"""Adamax: Adam with the infinity norm (Kingma & Ba, 2015, section 7.1)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..kernels.foreach import maximum_
from .base import Optimizer
from .common import bias_correction, check_betas, check_range


class Adamax(Optimizer):
    """Adamax; same numbers as ``torch.optim.Adamax``.

    m = b1 m + (1 - b1) g;  u = max(b2 u, |g| + eps);  p -= lr / (1 - b1^t) * m / u

    Recommended: lr 2e-3, betas (0.9, 0.999).

    Args:
        lr: learning rate.
        betas: EMA coefficient of the gradient and decay of the infinity norm.
        eps: term added to |g| for numerical stability.
        weight_decay: L2 penalty added to the gradient.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)

    def state_names(self, group):
        return ("exp_avg", "exp_inf")

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
        exp_avg.lerp_(g, 1 - beta1)
        maximum_(exp_inf.mul_(beta2), g.abs().add_(group["eps"]))
        p.addcdiv_(exp_avg, exp_inf, value=-group["lr"] / bias_correction(beta1, step))
