"""Ranger: RAdam + Lookahead + gradient centralization (Wright, 2019; Yong et al., 2020)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..registry import Capabilities
from .base import Optimizer
from .common import centralize_gradient, check_range, lookahead_
from .radam import RAdam


class Ranger(RAdam):
    """Ranger: RAdam's step on the centralized gradient, and every k steps a Lookahead sync.

    g <- g - mean(g over all dims but the first)  (``use_gc``; tensors of more than 1 dim)
    RAdam step (``radam``'s update, reused);  every k steps: slow += alpha (p - slow); p = slow

    Weight decay is decoupled (p *= 1 - lr * wd), as in Ranger. Same numbers as torch's
    RAdam with GC and Lookahead written around it; ``pytorch_optimizer.Ranger`` agrees to
    rounding (it orders the rectified step's arithmetic differently).

    Recommended (Ranger's defaults): lr 1e-3, betas (0.95, 0.999), eps 1e-5, k 6, alpha
    0.5, GC on; a flat-then-cosine schedule (``warmup_stable_decay``) suits it.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: decoupled weight decay factor.
        alpha: Lookahead's step towards the fast weights (slow += alpha * (fast - slow)).
        k: fast steps between Lookahead syncs.
        use_gc: gradient centralization of tensors with more than one dimension.
        gc_conv_only: centralize only convolution kernels (more than 3 dimensions).
    """

    capabilities = Capabilities(elementwise=False, shardable="tensors")  # GC: a mean over each tensor

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        alpha: float = 0.5,
        k: int = 6,
        use_gc: bool = True,
        gc_conv_only: bool = False,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, k=k,
                        use_gc=use_gc, gc_conv_only=gc_conv_only)
        Optimizer.__init__(self, params, defaults, **options)  # RAdam's update, Ranger's options

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("alpha", options["alpha"], 0.0, 1.0)
        k = options["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"invalid k: {k!r} (expected an integer >= 1)")

    def weight_decay_mode(self, group):
        return "decoupled"

    def init_state(self, p, group):
        state = super().init_state(p, group)
        state["slow_buffer"] = p.detach().to(self.state_dtype(p, group), copy=True)
        return state

    def update(self, p, g, state, group, step):
        if group["use_gc"]:
            g = centralize_gradient(g, group["gc_conv_only"])
        super().update(p, g, state, group, step)
        if step % group["k"] == 0:
            lookahead_(p, state["slow_buffer"], group["alpha"])

