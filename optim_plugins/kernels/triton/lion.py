"""Lion and Lion8bit: the twin of optimizers/lion.py's ``update``."""
from __future__ import annotations

from typing import Any, Mapping

import triton
import triton.language as tl

from .multi_tensor import Plan, add, sign


@triton.jit
def update(p, g, exp_avg, s1, s2, s3, beta1, weight1, beta2, weight2, neg_lr, h5, h6, h7, h8, h9,
           O0: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr):
    direction = sign(add(exp_avg * beta1, g, weight1))
    p = add(p, direction, neg_lr)
    exp_avg = add(exp_avg * beta2, g, weight2)
    return p, exp_avg, s1, s2, s3


def plan(group: Mapping[str, Any], step: float) -> Plan:
    beta1, beta2 = group["betas"]
    return Plan(update, ("exp_avg", None, None, None), (beta1, 1 - beta1, beta2, 1 - beta2, -group["lr"]))
