"""FAM: frequency-adaptive momentum, from the MaxFactor seed (EXPERIMENTAL)."""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import check_range


def _is_matrix(p) -> bool:
    """The seed's test for "substantial matrices": more than one dimension, every one above 4."""
    return p.dim() > 1 and min(p.shape) > 4


class FAM(Optimizer):
    """FAM: SGD on the seed's frequency-adaptive momentum direction. EXPERIMENTAL.

    The direction is exactly what ``frequency_adaptive_momentum`` of the MaxFactor seed
    returns (the seed marks it "very experimental", without a paper or results):

    * vectors and small tensors: u = m, m = alpha m + (1 - alpha) g (an EMA of g);
    * matrices (every dimension > 4): u = g for the first 100 steps, then
      u = g * (1 + 0.5 sigmoid(3 (r - 1.5)) sigmoid(3 (c - 1.5))^T), with r and c the row and
      column variances of g, each divided by its mean (tensors of more than two dimensions
      are read as (shape[0], -1) matrices).

    then p *= 1 - lr * wd; p -= lr * u. Where the seed differs: it builds this mask with
    ``sigmoid(r) @ sigmoid(c).T``, which fails for every matrix it is meant for; the outer
    product of the row and column factors is used here. The seed also computes FFT band
    powers of the gradient, a band-wise momentum and a blend factor, none of which reach the
    direction it returns; they are not computed here, so ``beta`` (the seed's decay of the
    band-power history) changes nothing and is kept only for the seed's signature.

    Recommended: lr 0.05-0.1 (an SGD learning rate), alpha 0.9.

    Args:
        lr: learning rate.
        alpha: EMA coefficient of the momentum of vectors and small tensors.
        beta: the seed's decay of its band-power history (no effect on the update; see above).
        weight_decay: decoupled weight decay factor (p *= 1 - lr * wd), as in MaxFactor.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, shardable="tensors")
    warmup: ClassVar[int] = 100  # steps before the matrix mask applies (the seed's constant)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.05,
        alpha: float = 0.9,
        beta: float = 0.999,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        defaults = dict(lr=lr, alpha=alpha, beta=beta, weight_decay=weight_decay)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("alpha", options["alpha"], 0.0, 1.0, high_open=True)
        check_range("beta", options["beta"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", options["weight_decay"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled"

    def init_state(self, p, group):
        if _is_matrix(p):
            return {}
        return {"momentum_buffer": torch.zeros_like(p, dtype=self.state_dtype(p, group),
                                                    memory_format=torch.preserve_format)}

    def update(self, p, g, state, group, step):
        if not _is_matrix(p):
            alpha = group["alpha"]
            direction = state["momentum_buffer"].mul_(alpha).add_(g * (1 - alpha))  # the seed's rounding
        elif step > self.warmup:
            matrix = g.reshape(g.shape[0], -1)
            rows, cols = matrix.var(dim=1, keepdim=True), matrix.var(dim=0, keepdim=True)
            rows, cols = rows / (rows.mean() + 1e-8), cols / (cols.mean() + 1e-8)
            mask = 1.0 + 0.5 * (torch.sigmoid(3 * (rows - 1.5)) @ torch.sigmoid(3 * (cols - 1.5)))
            direction = g * mask.reshape(g.shape)
        else:
            direction = g
        p.add_(direction, alpha=-group["lr"])
