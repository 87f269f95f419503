"""Adam / AdamW (incl. AMSGrad) and their 8-bit forms: the twin of optimizers/adam.py's ``update``."""
from __future__ import annotations

from typing import Any, Mapping

import triton
import triton.language as tl

from .multi_tensor import Plan, addcdiv, addcmul, bias_correction, div, lerp, maximum, sqrt


@triton.jit
def update(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, unused,
           weight1, beta2, weight2, step_value, sqrt_bias_correction2, eps, h6, h7, h8, h9,
           AMSGRAD: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr):
    exp_avg = lerp(exp_avg, g, weight1)
    exp_avg_sq = addcmul(exp_avg_sq * beta2, g, g, weight2)
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = div(sqrt(second_moment), sqrt_bias_correction2) + eps
    p = addcdiv(p, exp_avg, denom, step_value)
    return p, exp_avg, exp_avg_sq, max_exp_avg_sq, unused


def plan(group: Mapping[str, Any], step: float) -> Plan:
    beta1, beta2 = group["betas"]
    amsgrad = bool(group.get("amsgrad"))
    step_size = group["lr"] / bias_correction(beta1, step)
    return Plan(update, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else None, None),
                (1 - beta1, beta2, 1 - beta2, -step_size, bias_correction(beta2, step) ** 0.5, group["eps"]),
                (int(amsgrad), 0, 0))
