"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .base import Optimizer
from .common import amsgrad_bound, bias_correction, check_betas, check_range
from .precision import resolve_compensation

# Devices where torch ships fused Adam/AdamW kernels (``torch._fused_adam(w)_``).
_TORCH_FUSED_DEVICES = ("cpu", "cuda")


class Adam(Optimizer):
    """Adam: adaptive moments with bias correction; same numbers as ``torch.optim.Adam``.

    m_t = b1 m + (1 - b1) g;  v_t = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)

    Recommended: lr 1e-3 (3e-4 for transformers), betas (0.9, 0.999); prefer ``adamw``
    for weight decay.

    ``backend="auto"`` steps with torch's own fused kernel (``torch._fused_adam_`` /
    ``torch._fused_adamw_``, what ``fused=True`` runs) where it covers the bucket: CPU (and
    CUDA when the Triton kernels are not available), real float parameters, no Kahan or
    stochastic compensation, states in the parameter's dtype. There the numbers are those of
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

    def _torch_fusable(self, group: Mapping[str, Any], p: Tensor, state: dict) -> bool:
        """torch's fused kernel covers this parameter (decided per parameter, so that the numbers of
        one parameter never depend on which others share its bucket, e.g. across sharded ranks)."""
        if group["backend"] != "auto" or group["foreach"] is not None or p.is_complex():
            return False
        if p.device.type not in _TORCH_FUSED_DEVICES or p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return False
        if resolve_compensation(group["compensation"], p.dtype) is not None or self.state_dtype(p, group) != p.dtype:
            return False
        return not self._codecs(p, group, state)

    def _apply(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict],
               per_tensor: bool, compile: bool = False, inv_scale: float | None = None) -> None:
        fusable = [not per_tensor and self._torch_fusable(group, p, s) for p, s in zip(params, states)]
        if not all(fusable):
            rest = [i for i, f in enumerate(fusable) if not f]
            super()._apply(group, [params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest],
                           per_tensor, compile, inv_scale)
            if not any(fusable):
                return
            params, grads, states = ([xs[i] for i, f in enumerate(fusable) if f] for xs in (params, grads, states))
        beta1, beta2 = group["betas"]
        fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        scale = None if inv_scale is None else torch.tensor(1.0 / inv_scale, device=params[0].device)
        fused(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], [s["step"] for s in states],
              amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=group["maximize"], grad_scale=scale, found_inf=None)

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second_moment = amsgrad_bound(state["max_exp_avg_sq"], exp_avg_sq) if group["amsgrad"] else exp_avg_sq
        step_size = group["lr"] / bias_correction(beta1, step)
        denom = (second_moment.sqrt() / bias_correction(beta2, step) ** 0.5).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)


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
