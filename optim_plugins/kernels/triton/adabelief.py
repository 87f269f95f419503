"""AdaBelief (decoupled/fixed/L2 decay, rectify, ams_bound, adam_debias): the twin of
optimizers/adabelief.py's ``update``. ``adanorm`` (a per-tensor gradient norm) has no kernel."""
from __future__ import annotations

import math
from typing import Any, Mapping

import triton
import triton.language as tl

from .multi_tensor import Plan, add, addcdiv, addcmul, bias_correction, div, lerp, maximum, sqrt

ADAPTIVE, SGD, NO_STEP = 0, 1, 2


@triton.jit
def update(p, g, exp_avg, exp_avg_var, max_exp_avg_var, unused,
           weight1, beta2, weight2, eps, denom_div, step_value, h6, h7, h8, h9,
           AMS_BOUND: tl.constexpr, KIND: tl.constexpr, O2: tl.constexpr):
    exp_avg = lerp(exp_avg, g, weight1)
    residual = g - exp_avg
    exp_avg_var = addcmul(exp_avg_var * beta2, residual, residual, weight2) + eps
    second_moment = exp_avg_var
    if AMS_BOUND:
        max_exp_avg_var = maximum(max_exp_avg_var, exp_avg_var)
        second_moment = max_exp_avg_var
    if KIND == 0:  # adaptive step: p += v * m / (sqrt(s) / c + eps)
        p = addcdiv(p, exp_avg, div(sqrt(second_moment), denom_div) + eps, step_value)
    elif KIND == 1:  # rectify below the threshold: an SGD-with-momentum step
        p = add(p, exp_avg, step_value)
    return p, exp_avg, exp_avg_var, max_exp_avg_var, unused


def rectification(beta2: float, step: float) -> tuple[float, float | None]:
    """RAdam's ``(rho_t, r_t)`` as optimizers/common.rectification (kernels may not import optimizers/)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)
    if rho_t <= 5.0:
        return rho_t, None
    return rho_t, ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def plan(group: Mapping[str, Any], step: float) -> Plan:
    beta1, beta2 = group["betas"]
    lr, eps, ams = group["lr"], group["eps"], bool(group["ams_bound"])
    debias = 1.0 if group["adam_debias"] else bias_correction(beta1, step)
    kind, denom_div, value = ADAPTIVE, math.sqrt(bias_correction(beta2, step)), -lr / debias
    if group["rectify"]:
        rho_t, r_t = rectification(beta2, step)
        if r_t is not None and rho_t >= group["n_sma_threshold"]:
            denom_div, value = 1.0, -(lr * r_t * math.sqrt(bias_correction(beta2, step)) / debias)
        else:
            kind = SGD if group["degenerated_to_sgd"] else NO_STEP
    slots = ("exp_avg", "exp_avg_var", "max_exp_avg_var" if ams else None, None)
    return Plan(update, slots, (1 - beta1, beta2, 1 - beta2, eps, denom_div, value), (int(ams), kind, 0))
