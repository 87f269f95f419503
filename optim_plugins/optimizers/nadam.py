"""NAdam: Adam with Nesterov momentum (Dozat, 2016)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .base import Optimizer, _scalar_dtype
from .common import bias_correction, check_betas, check_range


class NAdam(Optimizer):
    """NAdam with momentum decay; same numbers as ``torch.optim.NAdam``.

    mu_t = b1 (1 - 0.5 * 0.96^(t psi));  the update mixes the gradient (weight
    (1 - mu_t) / (1 - prod mu)) and the momentum (weight mu_{t+1} / (1 - prod mu next)),
    both over sqrt(v_t / (1 - b2^t)) + eps.

    Recommended: lr 2e-3, betas (0.9, 0.999), momentum_decay 4e-3.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: weight decay factor.
        momentum_decay: psi, the momentum schedule's decay.
        decoupled_weight_decay: decoupled (AdamW-style) weight decay instead of L2.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("momentum_decay", options["momentum_decay"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled" if group["decoupled_weight_decay"] else "l2"

    def init_state(self, p, group):
        state = super().init_state(p, group)
        state["mu_product"] = torch.ones((), dtype=_scalar_dtype(), device="cpu" if p.device.type != "meta" else "meta")
        return state

    def state_names(self, group):
        return ("exp_avg", "exp_avg_sq")

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        lr, psi = group["lr"], group["momentum_decay"]
        exp_avg, exp_avg_sq, mu_product = state["exp_avg"], state["exp_avg_sq"], state["mu_product"]
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        mu_product.mul_(mu)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.div(bias_correction(beta2, step)).sqrt().add_(group["eps"])
        product = mu_product.item()
        p.addcdiv_(g, denom, value=-lr * (1.0 - mu) / (1.0 - product))
        p.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - product * mu_next))
