"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..kernels import cpp as cpp_kernels
from .base import Optimizer
from .common import amsgrad_bound, bias_correction, check_betas, check_range


class Adam(Optimizer):
    """Adam: adaptive moments with bias correction; same numbers as ``torch.optim.Adam``.

    m_t = b1 m + (1 - b1) g;  v_t = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)

    Recommended: lr 1e-3 (3e-4 for transformers), betas (0.9, 0.999); prefer ``adamw``
    for weight decay.

    ``backend="auto"`` steps plain buckets (see ``Optimizer.torch_fused_step``: CPU, and CUDA when
    the Triton kernels are not available) with torch's own fused kernel (``torch._fused_adam_`` /
    ``torch._fused_adamw_``, what ``fused=True`` runs): the numbers of
    ``torch.optim.Adam(W)(fused=True)`` bit for bit; other buckets and explicit backends run
    ``update`` below.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: weight decay factor (L2 penalty added to the gradient unless decoupled).
        decoupled_weight_decay: apply weight decay as AdamW does (p *= 1 - lr * wd).
        amsgrad: use the running maximum of the second moment (AMSGrad).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled" if group["decoupled_weight_decay"] else "l2"

    def state_names(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def torch_fused_step(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                         states: list[dict], grad_scale: Tensor | None) -> bool:
        fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        fused(params, grads, *_fused_states(group, states), **_fused_options(group), grad_scale=grad_scale,
              found_inf=None)
        return True

    def fused_step_with_sums(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                             states: list[dict], grad_scale: Tensor | None, sums: Tensor) -> bool:
        return cpp_kernels.adam_step_with_sums(params, grads, *_fused_states(group, states), **_fused_options(group),
                                               decoupled=group["decoupled_weight_decay"], grad_scale=grad_scale,
                                               sums=sums)

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second_moment = amsgrad_bound(state["max_exp_avg_sq"], exp_avg_sq) if group["amsgrad"] else exp_avg_sq
        step_size = group["lr"] / bias_correction(beta1, step)
        denom = (second_moment.sqrt() / bias_correction(beta2, step) ** 0.5).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)


def _fused_states(group: Mapping[str, Any], states: list[dict]) -> tuple[list[Tensor], ...]:
    """exp_avgs, exp_avg_sqs, max_exp_avg_sqs and steps, as torch's fused Adam kernels take them."""
    return ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], [s["step"] for s in states])


def _fused_options(group: Mapping[str, Any]) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return dict(amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay; same numbers as ``torch.optim.AdamW``.

    p *= 1 - lr * wd, then the Adam step. Recommended: lr 3e-4 (LLMs) or 1e-4
    (fine-tuning), betas (0.9, 0.95) for LLM pre-training, weight_decay 0.01-0.1 with
    no decay on biases and norms (``create_optimizer`` does that for a model).

    Args:
        weight_decay: decoupled weight decay factor.
        decoupled_weight_decay: must stay True (use ``adam`` for L2).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **options: Any,
    ):
        if options.get("decoupled_weight_decay", True) is not True:
            raise ValueError("invalid decoupled_weight_decay: AdamW always decouples weight decay (use Adam for L2)")
        options["decoupled_weight_decay"] = True
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad=amsgrad, **options)
