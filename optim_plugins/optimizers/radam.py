"""RAdam: Adam with a rectified adaptive learning rate (Liu et al., 2020)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .base import Optimizer
from .common import bias_correction, check_betas, check_range, rectification


class RAdam(Optimizer):
    """RAdam; same numbers as ``torch.optim.RAdam``.

    While the variance of the adaptive lr is intractable (rho_t <= 5) the step is SGD
    with bias-corrected momentum; afterwards Adam's step times the rectification r_t.

    Recommended: lr 1e-3, betas (0.9, 0.999); needs no warmup.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: weight decay factor.
        decoupled_weight_decay: decoupled (AdamW-style) weight decay instead of L2.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled" if group["decoupled_weight_decay"] else "l2"

    def state_names(self, group):
        return ("exp_avg", "exp_avg_sq")

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        corrected_exp_avg = exp_avg / bias_correction(beta1, step)
        _, r_t = rectification(beta2, step)
        if r_t is None:
            p.add_(corrected_exp_avg * group["lr"], alpha=-1.0)
        else:
            adaptive_lr = bias_correction(beta2, step) ** 0.5 / exp_avg_sq.sqrt().add_(group["eps"])
            p.add_(corrected_exp_avg * group["lr"] * adaptive_lr * r_t, alpha=-1.0)
