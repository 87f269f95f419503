"""Adan: adaptive Nesterov momentum (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm
for Faster Optimizing Deep Models", 2022; TPAMI 2024)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from .base import Optimizer
from .common import bias_correction, check_betas, check_range


class Adan(Optimizer):
    """Adan: three moments (gradient, gradient difference, squared Nesterov gradient).

    d = g - g_prev (0 at the first step);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) d
    n = b3 n + (1 - b3) (g + b2 d)^2;  u = (m / (1 - b1^t) + b2 v / (1 - b2^t)) / (sqrt(n / (1 - b3^t)) + eps)
    p = (p - lr u) / (1 + lr wd)   (proximal decay; ``no_prox``: p *= 1 - lr wd, then p -= lr u)

    Betas in torch's convention, as the authors' code: the paper's (0.02, 0.08, 0.01) are
    (0.98, 0.92, 0.99) here. Same numbers as ``pytorch_optimizer.Adan`` (the authors'
    algorithm). ``restart_interval`` k restarts the moments every k steps (the paper's
    restart condition): steps k+1, 2k+1, ... begin afresh from the parameters reached.

    Recommended (paper): lr 1e-3 (ViT, bs 4096: 1.5e-2 with warmup), weight_decay 0.02
    (ViT/ResNet) to 0.05, betas (0.98, 0.92, 0.99); LLMs: betas (0.98, 0.92, 0.99),
    lr about 5x AdamW's is often reported stable.

    Args:
        lr: learning rate.
        betas: EMA factors of the gradient, the gradient difference and the squared Nesterov gradient.
        eps: term added to the denominator for numerical stability.
        weight_decay: weight decay factor (proximal unless no_prox).
        no_prox: decoupled weight decay (p *= 1 - lr * wd) before the step instead of the proximal division after it.
        restart_interval: restart the moments every this many steps (None: never).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
        restart_interval: int | None = None,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                        restart_interval=restart_interval)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"], count=3)
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        interval = options["restart_interval"]
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"invalid restart_interval: {interval!r} (expected None or an integer >= 1)")

    def weight_decay_mode(self, group):
        return "decoupled" if group["no_prox"] else None  # the proximal form divides after the step (below)

    def state_names(self, group):
        return ("exp_avg", "exp_avg_diff", "exp_avg_sq", "previous_grad")

    def update(self, p, g, state, group, step):
        beta1, beta2, beta3 = group["betas"]
        lr, interval = group["lr"], group["restart_interval"]
        t = (step - 1) % interval + 1 if interval else step  # steps since the last (re)start
        exp_avg, exp_avg_diff, exp_avg_sq, previous = (
            state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"], state["previous_grad"])
        if t == 1:  # (re)start: zero moments, and no gradient difference yet
            if step > 1:
                for moment in (exp_avg, exp_avg_diff, exp_avg_sq):
                    moment.zero_()
            previous.copy_(g)

        diff = g - previous
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_diff.lerp_(diff, 1 - beta2)
        nesterov = diff.mul_(beta2).add_(g)
        exp_avg_sq.mul_(beta3).addcmul_(nesterov, nesterov, value=1 - beta3)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction(beta3, t))).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction(beta1, t))
        p.addcdiv_(exp_avg_diff, denom, value=-lr * beta2 / bias_correction(beta2, t))
        if not group["no_prox"] and group["weight_decay"] != 0:
            p.div_(1 + lr * group["weight_decay"])
        previous.copy_(g)
