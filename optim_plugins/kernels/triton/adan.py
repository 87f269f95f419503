"""Adan (proximal or decoupled weight decay, restarts): the twin of optimizers/adan.py's ``update``."""
from __future__ import annotations

import math
from typing import Any, Mapping

import triton
import triton.language as tl

from .multi_tensor import Plan, addcdiv, addcmul, bias_correction, div, lerp, sqrt


@triton.jit
def update(p, g, exp_avg, exp_avg_diff, exp_avg_sq, previous,
           weight1, weight2, beta2, beta3, weight3, sqrt_bias_correction3, eps, step1, step2, prox,
           FIRST: tl.constexpr, PROX: tl.constexpr, O2: tl.constexpr):
    if FIRST:  # (re)start: zero moments, no gradient difference yet
        exp_avg = tl.zeros_like(exp_avg)
        exp_avg_diff = tl.zeros_like(exp_avg_diff)
        exp_avg_sq = tl.zeros_like(exp_avg_sq)
        previous = g
    diff = g - previous
    exp_avg = lerp(exp_avg, g, weight1)
    exp_avg_diff = lerp(exp_avg_diff, diff, weight2)
    nesterov = diff * beta2 + g
    exp_avg_sq = addcmul(exp_avg_sq * beta3, nesterov, nesterov, weight3)
    denom = div(sqrt(exp_avg_sq), sqrt_bias_correction3) + eps
    p = addcdiv(p, exp_avg, denom, step1)
    p = addcdiv(p, exp_avg_diff, denom, step2)
    if PROX:
        p = div(p, prox)
    return p, exp_avg, exp_avg_diff, exp_avg_sq, g


def plan(group: Mapping[str, Any], step: float) -> Plan:
    beta1, beta2, beta3 = group["betas"]
    lr, interval, wd = group["lr"], group["restart_interval"], group["weight_decay"]
    t = (step - 1) % interval + 1 if interval else step  # steps since the last (re)start
    scalars = (1 - beta1, 1 - beta2, beta2, beta3, 1 - beta3, math.sqrt(bias_correction(beta3, t)), group["eps"],
               -lr / bias_correction(beta1, t), -lr * beta2 / bias_correction(beta2, t), 1 + lr * wd)
    prox = not group["no_prox"] and wd != 0
    return Plan(update, ("exp_avg", "exp_avg_diff", "exp_avg_sq", "previous_grad"), scalars,
                (int(t == 1), int(prox), 0))
