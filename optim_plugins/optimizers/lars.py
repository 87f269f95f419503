"""LARS: layer-wise adaptive rate scaling for large-batch SGD (You, Gitman & Ginsburg, 2017)."""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import apply_weight_decay, check_range, trust_ratio


class Lars(Optimizer):
    """LARS: momentum SGD whose step per tensor is scaled by eta ||w|| / (||g|| + wd ||w||).

    local_lr = trust_coefficient * ||w|| / (||g|| + wd ||w||)  (1 if a norm is 0);
    buf = momentum * buf + (1 - dampening) * local_lr * (g + wd * w);  p -= lr * buf
    (Nesterov: p -= lr * (local_lr (g + wd w) + momentum * buf)). The buffer starts at 0.

    Same numbers as ``pytorch_optimizer.LARS`` with exclude_1d=True (its fixed behaviour:
    0/1-dim tensors take plain momentum SGD, without weight decay or trust ratio).

    Recommended: lr 0.1-1 per 256 examples with trust_coefficient 1e-3 (ImageNet with
    batch 8k-32k: lr ~ 10 with warmup), momentum 0.9, weight_decay 5e-4 to 1e-4.

    Args:
        lr: global learning rate.
        momentum: momentum factor (0 disables the buffer).
        dampening: dampening of the momentum's gradient term.
        weight_decay: L2 weight decay, part of the trust ratio's denominator.
        nesterov: Nesterov momentum.
        trust_coefficient: eta, the trust coefficient of the local learning rate.
        exclude_1d: 0/1-dim tensors (biases, norm weights) get neither the trust ratio nor weight decay.
        max_trust_ratio: clamp the local learning rate from above (None: no clamp; 1.0 is LARC's clipping of eta-scaled steps).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, shardable="tensors")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 1e-3,
        exclude_1d: bool = True,
        max_trust_ratio: float | None = None,
        **options: Any,
    ):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coefficient=trust_coefficient, exclude_1d=exclude_1d, max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("momentum", options["momentum"], 0.0, 1.0, high_open=True)
        check_range("dampening", options["dampening"], 0.0, 1.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("trust_coefficient", options["trust_coefficient"], 0.0, low_open=True)
        if options["max_trust_ratio"] is not None:
            check_range("max_trust_ratio", options["max_trust_ratio"], 0.0, low_open=True)
        if options["nesterov"] and options["momentum"] <= 0:
            raise ValueError(f"invalid nesterov: True needs momentum > 0 (got momentum={options['momentum']!r})")

    def weight_decay_mode(self, group):
        return None  # part of the trust ratio (and skipped for excluded tensors): applied in update()

    def state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] > 0 else ()

    def update(self, p, g, state, group, step):
        if not (group["exclude_1d"] and p.dim() <= 1):
            param_norm = torch.linalg.norm(p)
            ratio = trust_ratio(param_norm, torch.linalg.norm(g) + group["weight_decay"] * param_norm,
                                coefficient=group["trust_coefficient"], max_ratio=group["max_trust_ratio"])
            g = apply_weight_decay(p, g, "l2", group["weight_decay"], group["lr"]).mul(ratio)
        momentum = group["momentum"]
        if momentum > 0:
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(g, alpha=1.0 - group["dampening"])
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(g, alpha=-group["lr"])
