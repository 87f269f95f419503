"""The factored second moment, written once (Shazeer & Stern, 2018, "Adafactor").

For a tensor of shape ``(..., m, n)`` the second moment ``V`` (m x n) is kept as two
vectors: row statistics ``R`` (shape ``(..., m)``, a mean over the last dimension) and
column statistics ``C`` (shape ``(..., n)``, a mean over the second-to-last one), each an
exponential moving average. ``V`` is reconstructed as the rank-1 product ``R C^T``
divided by a normaliser of ``R``: its mean (Adafactor, CAME) or its maximum (MaxFactor).
Memory: ``m + n`` numbers instead of ``m * n``. Tensors with fewer than 2 dimensions keep
an ordinary, unfactored moment (as transformers' Adafactor does).

Used by ``adafactor``, ``came`` and ``maxfactor``; all functions work on single tensors.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import COMMON_OPTIONS
from ..registry import Option


def is_factored(p: Tensor) -> bool:
    """Whether ``p`` gets a factored moment (2 or more dimensions)."""
    return p.dim() >= 2


def factored_zeros(p: Tensor, dtype: torch.dtype, name: str) -> dict[str, Tensor]:
    """Zero state for ``p``: ``{name}_row`` and ``{name}_col`` if factored, else ``name`` shaped like ``p``."""
    if not is_factored(p):
        return {name: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}
    shape = p.shape
    return {
        f"{name}_row": torch.zeros(shape[:-1], dtype=dtype, device=p.device),
        f"{name}_col": torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=p.device),
    }


def factored_ema_(row: Tensor, col: Tensor, row_stat: Tensor, col_stat: Tensor, beta: float, *,
                  lerp_weight: float | None = None) -> None:
    """EMAs of the row and column statistics: ``R = beta R + (1 - beta) row_stat`` (same for C).

    ``lerp_weight`` computes the same EMA as ``R.lerp_(row_stat, lerp_weight)`` instead: the
    MaxFactor seed's operation order. Its sign-based update turns even a last-bit difference
    into a different step, so it keeps the seed's rounding (as transformers' Adafactor keeps its own).
    """
    if lerp_weight is not None:
        row.lerp_(row_stat, lerp_weight)
        col.lerp_(col_stat, lerp_weight)
    else:
        row.mul_(beta).add_(row_stat, alpha=1.0 - beta)
        col.mul_(beta).add_(col_stat, alpha=1.0 - beta)


def row_col_means(x: Tensor) -> tuple[Tensor, Tensor]:
    """The row and column means of ``x`` (Adafactor's statistics of ``g^2 + eps``)."""
    return x.mean(dim=-1), x.mean(dim=-2)


def factored_rsqrt(row: Tensor, col: Tensor, normalizer: Literal["mean", "max"] = "mean", eps: float = 0.0) -> Tensor:
    """``1 / sqrt(V)`` of the rank-1 estimate ``V = R C^T / normalizer(R)`` (a new tensor).

    ``"mean"``: Adafactor's ``rsqrt(R / mean(R)) * rsqrt(C)`` (fairseq's and transformers' order);
    ``"max"``: MaxFactor's ``(R C^T) / max(max(R), eps)``, clamped at ``eps^2`` before ``rsqrt``.
    """
    if normalizer == "mean":
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        return torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
    if normalizer == "max":
        r, c = row.unsqueeze(-1), col.unsqueeze(-2)
        estimate = r @ c
        estimate.div_(r.max(dim=-2, keepdim=True)[0].clamp_(min=eps))
        return estimate.clamp_(min=eps * eps).rsqrt_()
    raise ValueError(f"invalid normalizer: {normalizer!r} (expected 'mean' or 'max')")


def rms(t: Tensor) -> Tensor:
    """Root mean square ``||t||_2 / sqrt(numel)`` as a 0-d tensor (Adafactor's RMS)."""
    return t.norm(2) / (t.numel() ** 0.5)


# transformers' Adafactor and came-pytorch keep fp32 states and fp32 math for bf16/fp16
# parameters; these optimizers default to state_dtype="fp32" to give the same numbers.
FP32_STATE_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS,
    "state_dtype": Option(
        "state_dtype", "fp32", COMMON_OPTIONS["state_dtype"].annotation,
        '"fp32" (default here, as transformers/came-pytorch): fp32 states and math for bf16/fp16 parameters; '
        "None keeps states in the parameter's dtype.",
    ),
}


def clipped_second_moment_step(p: Tensor, g: Tensor, state: dict, beta2: float, eps: float,
                               clip_threshold: float) -> Tensor:
    """Adafactor's direction, shared with CAME: ``g / sqrt(v)`` with ``v`` an EMA of ``g^2 + eps``,
    factored into row/column statistics for matrices, then scaled down to RMS <= ``clip_threshold``
    (Shazeer & Stern 2018, Alg. 4-5; update clipping, section 6). Updates ``state`` in place."""
    update = (g**2) + eps
    if is_factored(p):
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        factored_ema_(row, col, *row_col_means(update), beta2)
        update = factored_rsqrt(row, col).mul_(g)
    else:
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).add_(update, alpha=1.0 - beta2)
        update = exp_avg_sq.rsqrt().mul_(g)
    return update.div_((rms(update) / clip_threshold).clamp_(min=1.0))
