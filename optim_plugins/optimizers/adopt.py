"""ADOPT: modified Adam that converges with any beta2 (Taniguchi et al., NeurIPS 2024, arXiv:2411.02853)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .base import Optimizer
from .common import check_betas, check_range, clip_


class ADOPT(Optimizer):
    """ADOPT: normalise the gradient by the *previous* second moment, then take momentum.

    step 1: v = g^2 (no parameter change);  then
    m = b1 m + (1 - b1) clip(g / max(sqrt(v), eps), t^0.25);  p -= lr m;  v = b2 v + (1 - b2) g^2

    Same numbers as the authors' ``ADOPT`` and ``pytorch_optimizer.ADOPT``. Recommended:
    lr 1e-3, betas (0.9, 0.9999), eps 1e-6 (the paper's defaults); as an AdamW replacement
    weight_decay 0.01-0.1 with decoupled_weight_decay=True.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the normalised gradient and of the squared gradient.
        eps: floor of the denominator sqrt(v).
        weight_decay: weight decay factor (L2 penalty unless decoupled).
        decoupled_weight_decay: decoupled (AdamW-style, p *= 1 - lr * wd) weight decay.
        clip_exponent: clip the normalised gradient to step^clip_exponent (None: no clipping).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        clip_exponent: float | None = 0.25,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, clip_exponent=clip_exponent)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        if options["clip_exponent"] is not None:
            check_range("clip_exponent", options["clip_exponent"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled" if group["decoupled_weight_decay"] else "l2"

    def state_names(self, group):
        return ("exp_avg", "exp_avg_sq")

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if step == 1:
            exp_avg_sq.addcmul_(g, g)
            return
        normed = g.div(exp_avg_sq.sqrt().clamp_min_(group["eps"]))
        if group["clip_exponent"] is not None:
            clip_(normed, step ** group["clip_exponent"])
        exp_avg.lerp_(normed, 1 - beta1)
        p.add_(exp_avg, alpha=-group["lr"])
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
