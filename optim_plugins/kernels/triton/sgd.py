"""SGD with momentum, dampening and Nesterov momentum: the twin of optimizers/sgd.py's ``update``."""
from __future__ import annotations

from typing import Any, Mapping

import triton
import triton.language as tl

from .multi_tensor import Plan, add


@triton.jit
def update(p, g, buf, s1, s2, s3, momentum, weight, neg_lr, h3, h4, h5, h6, h7, h8, h9,
           HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr):
    if HAS_MOMENTUM:
        if FIRST:  # the buffer starts as the gradient
            buf = g
        else:
            buf = add(buf * momentum, g, weight)
        if NESTEROV:
            g = add(g, buf, momentum)
        else:
            g = buf
    p = add(p, g, neg_lr)
    return p, buf, s1, s2, s3


def plan(group: Mapping[str, Any], step: float) -> Plan:
    momentum = group["momentum"]
    return Plan(update, ("momentum_buffer" if momentum != 0 else None, None, None, None),
                (momentum, 1 - group["dampening"], -group["lr"]),
                (int(momentum != 0), int(bool(group["nesterov"])), int(step == 1)))
