"""CAME: confidence-guided adaptive memory-efficient optimization (Luo et al., ACL 2023)."""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import check_betas, check_range
from .factored import FP32_STATE_OPTIONS, clipped_second_moment_step, factored_ema_, factored_rsqrt, factored_zeros, is_factored, row_col_means


class CAME(Optimizer):
    """CAME; same numbers as ``came_pytorch.CAME`` (decoupled weight decay as there).

    Adafactor's factored v (b2) gives u = g / sqrt(v), clipped to RMS(u) <= clip_threshold;
    m = b1 m + (1 - b1) u;  the instability (u - m)^2 + eps2 is factored too (EMA with b3),
    S;  p -= lr * m / sqrt(S)  (1-D tensors: p -= lr * m).

    Recommended (paper): lr 2e-4, betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16),
    weight_decay 1e-2; the paper trains BERT/GPT-2/T5 with the lr of AdamW's recipe.

    Args:
        lr: learning rate.
        eps: (eps1, eps2): added to the squared gradient, and to the squared instability.
        clip_threshold: the update is scaled down to RMS(update) <= clip_threshold.
        betas: EMA coefficients of the update, the squared gradient and the instability.
        weight_decay: decoupled weight decay (p *= 1 - lr * wd).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, shardable="tensors")
    common_options = FP32_STATE_OPTIONS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        **options: Any,
    ):
        options.setdefault("state_dtype", "fp32")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        eps = options["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"invalid eps: {eps!r} (expected two numbers (eps1, eps2))")
        check_range("eps[0]", eps[0], 0.0)
        check_range("eps[1]", eps[1], 0.0)
        check_range("clip_threshold", options["clip_threshold"], 0.0, low_open=True)
        check_betas(options["betas"], count=3)
        check_range("weight_decay", options["weight_decay"], 0.0)

    def weight_decay_mode(self, group):
        return "decoupled"

    def init_state(self, p, group):
        dtype = self.state_dtype(p, group)
        state = {"exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}
        state.update(factored_zeros(p, dtype, "exp_avg_sq"))
        if is_factored(p):
            state.update(factored_zeros(p, dtype, "exp_avg_res"))
        return state

    def update(self, p, g, state, group, step):
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2 = group["eps"]
        update = clipped_second_moment_step(p, g, state, beta2, eps1, group["clip_threshold"])
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)
        if is_factored(p):  # confidence: the instability (u - m)^2, factored the same way
            res = (update - exp_avg) ** 2 + eps2
            row, col = state["exp_avg_res_row"], state["exp_avg_res_col"]
            factored_ema_(row, col, *row_col_means(res), beta3)
            update = factored_rsqrt(row, col).mul_(exp_avg)
        else:
            update = exp_avg.clone()
        update.mul_(group["lr"])
        p.add_(-update)
