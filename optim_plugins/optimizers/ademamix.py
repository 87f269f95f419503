"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA (Pagliardini et al., 2024, arXiv:2409.03137)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from .base import Optimizer
from .common import bias_correction, check_betas, check_range


def alpha_schedule(alpha: float, t_alpha: int | None, step: float) -> float:
    """Linear warmup of alpha over t_alpha steps."""
    return alpha if not t_alpha else min(step * alpha / t_alpha, alpha)


def beta3_schedule(beta1: float, beta3: float, t_beta3: int | None, step: float) -> float:
    """beta3 warmup from beta1 to beta3 over t_beta3 steps, linear in the EMA's half-life."""
    if not t_beta3:
        return beta3
    ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
    scale = step / t_beta3
    return min(math.exp((ln_beta1 * ln_beta3) / ((1 - scale) * ln_beta3 + scale * ln_beta1)), beta3)


class AdEMAMix(Optimizer):
    """AdEMAMix: Adam's step on a mix of a fast EMA m1 and a slow EMA m2 of the gradient.

    m1 = b1 m1 + (1 - b1) g;  m2 = b3 m2 + (1 - b3) g;  v = b2 v + (1 - b2) g^2
    p -= lr * ((m1 / (1 - b1^t) + alpha m2) / (sqrt(v / (1 - b2^t)) + eps) + wd p)

    alpha and b3 warm up over ``t_alpha`` / ``t_beta3`` steps (the paper's schedulers).
    Arguments mean what they mean in bitsandbytes' ``AdEMAMix`` (transformers' ``ademamix``):
    ``betas=(b1, b2, b3)``, ``alpha``, ``t_alpha``, ``t_beta3``; weight decay is decoupled.

    Recommended (paper): lr as AdamW's, betas (0.9, 0.999, 0.9999), alpha 5 (2-10),
    t_alpha = t_beta3 = the number of training steps for LLM pre-training, weight_decay 0.1.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the fast EMA (b1), of the squared gradient (b2) and of the slow EMA (b3).
        alpha: weight of the slow EMA in the update.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay factor (p *= 1 - lr * wd).
        t_alpha: steps of alpha's linear warmup (None: no warmup).
        t_beta3: steps of b3's warmup from b1 (None: no warmup).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        t_alpha=t_alpha, t_beta3=t_beta3)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"], count=3)
        check_range("alpha", options["alpha"], 0.0)
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        for name in ("t_alpha", "t_beta3"):
            if options[name] is not None:
                check_range(name, options[name], 0.0)
        if options["t_beta3"] and options["betas"][0] == 0:
            raise ValueError("invalid betas[0]: 0.0 (the beta3 warmup starts from betas[0]; it must be > 0)")

    def weight_decay_mode(self, group):
        return "decoupled"

    def state_names(self, group):
        return ("exp_avg", "exp_avg_sq", "exp_avg_slow")

    def update(self, p, g, state, group, step):
        beta1, beta2, beta3 = group["betas"]
        alpha = alpha_schedule(group["alpha"], group["t_alpha"], step)
        beta3 = beta3_schedule(beta1, beta3, group["t_beta3"], step)
        exp_avg, exp_avg_sq, exp_avg_slow = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_slow"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg_slow.lerp_(g, 1 - beta3)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction(beta2, step))).add_(group["eps"])
        update = exp_avg.div(bias_correction(beta1, step)).add_(exp_avg_slow, alpha=alpha)
        p.add_(update.div_(denom), alpha=-group["lr"])
