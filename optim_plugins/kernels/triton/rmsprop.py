"""RMSprop (centered, momentum): the twin of optimizers/rmsprop.py's ``update``."""
from __future__ import annotations

from typing import Any, Mapping

import triton
import triton.language as tl

from .multi_tensor import Plan, add, addcdiv, addcmul, lerp, sqrt


@triton.jit
def update(p, g, square_avg, buf, grad_avg, s3, alpha, weight, eps, momentum, neg_lr, h5, h6, h7, h8, h9,
           CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, O2: tl.constexpr):
    square_avg = addcmul(square_avg * alpha, g, g, weight)
    if CENTERED:
        grad_avg = lerp(grad_avg, g, weight)
        avg = sqrt(addcmul(square_avg, grad_avg, grad_avg, -1.0))
    else:
        avg = sqrt(square_avg)
    avg = avg + eps
    if HAS_MOMENTUM:
        buf = addcdiv(buf * momentum, g, avg, 1.0)
        p = add(p, buf, neg_lr)
    else:
        p = addcdiv(p, g, avg, neg_lr)
    return p, square_avg, buf, grad_avg, s3


def plan(group: Mapping[str, Any], step: float) -> Plan:
    momentum, centered = group["momentum"] > 0, bool(group["centered"])
    slots = ("square_avg", "momentum_buffer" if momentum else None, "grad_avg" if centered else None, None)
    alpha = group["alpha"]
    return Plan(update, slots, (alpha, 1 - alpha, group["eps"], group["momentum"], -group["lr"]),
                (int(centered), int(momentum), 0))
