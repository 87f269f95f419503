"""Pieces shared by the optimizers, written once: option checks, weight-decay modes,
bias correction, the AMSGrad bound and RAdam's rectification.

Every function here works on single tensors and on ``TensorList`` buckets alike.
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Literal, Sequence

import torch

from ..kernels.foreach import TensorList, maximum_

WeightDecayMode = Literal["l2", "decoupled", "fixed"]


# ----------------------------------------------------------------------------- option checks


def check_range(name: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless low <= value <= high."""
    if isinstance(value, bool) or not isinstance(value, Number) or math.isnan(value):
        raise ValueError(f"invalid {name}: {value!r} (expected a number)")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ValueError(f"invalid {name}: {value!r} (must satisfy {lo}{name}{hi})")


def check_lr(lr) -> None:
    if not isinstance(lr, Number) or isinstance(lr, bool):
        raise ValueError(f"invalid lr: {lr!r} (expected a Python number; tensor learning rates are not supported)")
    check_range("lr", lr, 0.0)


def check_betas(betas: Sequence[float], count: int = 2, name: str = "betas") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"invalid {name}: {betas!r} (expected {count} numbers)")
    for i, beta in enumerate(betas):
        check_range(f"{name}[{i}]", beta, 0.0, 1.0, high_open=True)


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"invalid {name}: {value!r} (expected one of {list(choices)})")


# ----------------------------------------------------------------------------- update pieces


def apply_weight_decay(p, g, mode: WeightDecayMode | None, weight_decay: float, lr: float):
    """Weight decay of every mode, applied before the algorithm's own update.

    ``l2``: the penalty joins the gradient, ``g + wd * p`` (Adam, SGD);
    ``decoupled``: ``p *= 1 - lr * wd`` (AdamW, Loshchilov & Hutter 2019);
    ``fixed``: ``p *= 1 - wd``, independent of lr (AdaBelief's ``fixed_decay``).
    Returns the gradient the algorithm should use.
    """
    if weight_decay == 0 or mode is None:
        return g
    if mode == "l2":
        return g.add(p, alpha=weight_decay)
    if mode == "decoupled":
        p.mul_(1 - lr * weight_decay)
    elif mode == "fixed":
        p.mul_(1 - weight_decay)
    else:
        raise ValueError(f"invalid weight decay mode: {mode!r}")
    return g


def bias_correction(beta: float, step: float) -> float:
    """``1 - beta ** step``: the factor that un-biases a zero-initialised EMA at ``step`` (from 1)."""
    return 1 - beta**step


def amsgrad_bound(max_exp_avg_sq, exp_avg_sq):
    """AMSGrad: keep the running maximum of the second moment and use it (Reddi et al. 2018)."""
    return maximum_(max_exp_avg_sq, exp_avg_sq)


def rectification(beta2: float, step: float) -> tuple[float, float | None]:
    """RAdam's variance rectification (Liu et al. 2020).

    Returns ``(rho_t, r_t)``; ``r_t`` is ``None`` while ``rho_t <= 5``, where the adaptive
    learning rate's variance is intractable and the update falls back to momentum SGD.
    """
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)
    if rho_t <= 5.0:
        return rho_t, None
    r_t = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    return rho_t, r_t


# ----------------------------------------------------------------------------- trust ratio (LARS, LAMB)


def trust_ratio(param_norm, update_norm, coefficient: float = 1.0, eps: float = 0.0,
                max_ratio: float | None = None):
    """Layer-wise trust ratio ``coefficient * ||w|| / (||u|| + eps)`` of one tensor (0-d tensors in and out).

    1 where either norm is 0 (a fresh or zero tensor keeps the plain step), as in LARS
    (You et al., 2017) and LAMB (You et al., 2020); ``max_ratio`` clamps it from above
    (LARC's clipping, timm's ``trust_clip``).
    """

    ratio = torch.where((param_norm > 0) & (update_norm > 0), coefficient * param_norm / (update_norm + eps),
                        torch.ones_like(param_norm))
    return ratio.clamp_(max=max_ratio) if max_ratio is not None else ratio


def clip_(update, bound: float):
    """Clip ``update`` elementwise to ``[-bound, bound]`` in place (Sophia's and ADOPT's clipping)."""
    return update.clamp_min_(-bound).clamp_max_(bound)


# ----------------------------------------------------------------------------- family I pieces
# (AdaNorm, gradient centralization, Lookahead's slow-weight sync)


def adanorm_gradient(g, exp_grad_norm, r: float):
    """AdaNorm (Dubey et al. 2023): lift a gradient whose norm is below its running average.

    ``e = r e + (1 - r) ||g||``; returns ``g * e / ||g||`` where ``e > ||g|| > 0``, else ``g``.
    ``exp_grad_norm`` (shape ``(1,)``, one per tensor) is updated in place. Per-tensor norms:
    on a ``TensorList`` each tensor is handled whole.
    """
    if isinstance(g, TensorList):
        return TensorList(adanorm_gradient(t, e, r) for t, e in zip(g, exp_grad_norm))
    grad_norm = torch.linalg.vector_norm(g)
    exp_grad_norm.mul_(r).add_(grad_norm, alpha=1 - r)
    e = exp_grad_norm.reshape(())
    lift = (grad_norm > 0) & (e > grad_norm)  # no host sync: both branches as tensor ops
    return g.mul(torch.where(lift, e, 1.0)).div_(torch.where(lift, grad_norm, 1.0))


def centralize_gradient(g, conv_only: bool = False):
    """Gradient centralization (Yong et al. 2020): subtract the mean over all dims but the first.

    Applies to tensors of more than one dimension (more than three with ``conv_only``); others
    are returned unchanged. Out of place; per tensor on a ``TensorList``.
    """
    if isinstance(g, TensorList):
        return TensorList(centralize_gradient(t, conv_only) for t in g)
    if g.dim() <= (3 if conv_only else 1):
        return g
    return g.sub(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))


def lookahead_(p, slow, alpha: float) -> None:
    """Lookahead (Zhang et al. 2019): ``slow += alpha (p - slow)``; then ``p = slow``.

    ``slow`` may be kept in another dtype than ``p`` (``state_dtype``); ``p`` is rounded to it.
    """
    slow.lerp_(p if p.dtype == slow.dtype else p.to(slow.dtype), alpha)
    p.copy_(slow)
