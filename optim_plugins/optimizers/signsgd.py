"""signSGD and Signum: sign of the gradient or of its momentum (Bernstein et al., ICML 2018)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .base import Optimizer
from .common import check_range


class SignSGD(Optimizer):
    """signSGD (momentum 0) and Signum (momentum > 0): every coordinate moves by exactly lr.

    m = b m + (1 - b) g  (m = g when momentum is 0);  p -= lr * sign(m)

    Same numbers as ``pytorch_optimizer.SignSGD``. Recommended: lr 1e-4 to 1e-3 (an
    update's size is lr per coordinate, whatever the gradient's scale), momentum 0.9,
    decoupled weight decay (an L2 term inside the sign only nudges its direction).

    Args:
        lr: learning rate (the size of every coordinate's step).
        momentum: EMA factor of the momentum (0: plain signSGD).
        weight_decay: weight decay factor.
        decoupled_weight_decay: decay the weights directly (p *= 1 - lr * wd); False adds wd * p to the gradient.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        **options: Any,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("momentum", options["momentum"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", options["weight_decay"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled" if group["decoupled_weight_decay"] else "l2"

    def state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] > 0 else ()

    def update(self, p, g, state, group, step):
        if group["momentum"] > 0:
            g = state["momentum_buffer"].lerp_(g, 1 - group["momentum"])
        p.add_(g.sign(), alpha=-group["lr"])
