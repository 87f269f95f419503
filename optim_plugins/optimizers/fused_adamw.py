"""FusedAdamW: AdamW whose whole step is one fused kernel launch per (device, dtype) bucket."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from .adam import AdamW
from .precision import resolve_compensation


class FusedAdamW(AdamW):
    """AdamW (same options and numbers as ``adamw``) stepped by one fused kernel per bucket.

    With ``backend="auto"`` (the default): on CPU it calls torch's own fused AdamW kernel,
    ``torch._fused_adamw_`` (what ``torch.optim.AdamW(fused=True)`` runs; same numbers bit
    for bit, GradScaler's scale and overflow flag handled inside it): our adamw at <= 1.0x
    torch fused AdamW may mean calling torch's fused kernel, and here it does. On CUDA it
    runs the Triton kernel of ``kernels/triton`` (momentum, variance, bias correction,
    weight decay and the parameter write in one launch), or torch's fused CUDA kernel where
    Triton is missing. Buckets the fused kernels do not cover (Kahan or stochastic
    compensation of bf16/fp16 parameters, ``state_dtype`` other than the parameter's,
    complex parameters) and explicit backends step as ``adamw`` does.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: decoupled weight decay factor.
        amsgrad: use the running maximum of the second moment (AMSGrad).
    """

    _step_supports_amp_scaling: ClassVar[bool] = True  # as torch's fused=True: unscale and skip in the step


    def _torch_fusable(self, group: Mapping[str, Any], params: list[Tensor], states: list[dict]) -> bool:
        p = params[0]
        if group["backend"] != "auto" or group["foreach"] is not None or p.is_complex():
            return False
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return False
        if resolve_compensation(group["compensation"], p.dtype) is not None or self.state_dtype(p, group) != p.dtype:
            return False
        return not self._codecs(p, group, states[0])

    def _apply(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict],
               per_tensor: bool, compile: bool = False, inv_scale: float | None = None) -> None:
        if per_tensor or not self._torch_fusable(group, params, states):
            super()._apply(group, params, grads, states, per_tensor, compile, inv_scale)
            return
        beta1, beta2 = group["betas"]
        scale = None if inv_scale is None else torch.tensor(1.0 / inv_scale, device=params[0].device)
        torch._fused_adamw_(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            grad_scale=scale, found_inf=None,
        )
