"""LAMB: layer-wise adaptive moments for large-batch training (You et al., ICLR 2020)."""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import apply_weight_decay, bias_correction as debias, check_betas, check_range, trust_ratio


class Lamb(Optimizer):
    """LAMB: Adam's direction, rescaled per tensor by the trust ratio phi(||w||) / ||r||.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  r = m / (sqrt(v) + eps)
    (+ wd * w when the decay is not decoupled: the paper's r + lambda w);
    p -= lr / (1 - b1^t) * min(||w||, max_weight_norm) / (||r|| + eps) * r   (ratio 1 if a norm is 0).

    The trust ratio fixes the step's norm at lr ||w|| / (1 - b1^t), so the paper's bias
    correction inside r only matters through eps and lambda w; like ``pytorch_optimizer.Lamb``
    (whose numbers this gives, ||w|| clamped at 10, decoupled decay) the first moment's
    correction is applied to the step size.

    Recommended: lr 1e-3 to 2e-3 (BERT pre-training with batch 32k: lr ~ 5e-3 with warmup),
    betas (0.9, 0.999), weight_decay 0.01, exclude_1d=True for biases and norms.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: added to the denominator of the Adam ratio and to the update norm.
        weight_decay: weight decay factor.
        decoupled_weight_decay: True: p *= 1 - lr * wd before the step; False: the paper's wd * w added to r, inside the trust ratio.
        bias_correction: divide the step size by 1 - beta1^t (pytorch_optimizer's default; False = its adam_debias=True).
        exclude_1d: 0/1-dim tensors (biases, norm weights) get neither the trust ratio nor weight decay.
        max_weight_norm: phi(||w||) = min(||w||, max_weight_norm) in the trust ratio (None: no clamp).
        max_trust_ratio: clamp the trust ratio from above (None: no clamp; 1.0 is timm's trust_clip).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, shardable="tensors")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        bias_correction: bool = True,
        exclude_1d: bool = False,
        max_weight_norm: float | None = 10.0,
        max_trust_ratio: float | None = None,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, bias_correction=bias_correction,
                        exclude_1d=exclude_1d, max_weight_norm=max_weight_norm, max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        for name in ("max_weight_norm", "max_trust_ratio"):
            if options[name] is not None:
                check_range(name, options[name], 0.0, low_open=True)

    def weight_decay_mode(self, group):
        return None  # part of the trust ratio (and skipped for excluded tensors): applied in update()

    def state_names(self, group):
        return ("exp_avg", "exp_avg_sq")

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        adapt = not (group["exclude_1d"] and p.dim() <= 1)
        decoupled = group["decoupled_weight_decay"]
        if adapt and decoupled:
            apply_weight_decay(p, g, "decoupled", wd, group["lr"])
        step_size = group["lr"] / debias(beta1, step) if group["bias_correction"] else group["lr"]
        update = exp_avg_sq.sqrt().add_(eps)
        torch.div(exp_avg, update, out=update)
        if adapt and not decoupled and wd > 0:
            update.add_(p, alpha=wd)
        if not adapt:
            p.add_(update, alpha=-step_size)
            return
        weight_norm = torch.linalg.norm(p)
        if group["max_weight_norm"] is not None:
            weight_norm = weight_norm.clamp_(min=0, max=group["max_weight_norm"])
        ratio = trust_ratio(weight_norm, torch.linalg.norm(update), eps=eps, max_ratio=group["max_trust_ratio"])
        p.add_(update, alpha=-step_size * ratio)
