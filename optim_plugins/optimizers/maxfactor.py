"""MaxFactor: factored second moment, max-normalised, sign-and-row-max update (the project's seed 003)."""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import apply_weight_decay, check_range
from .factored import factored_ema_, factored_rsqrt, factored_zeros, is_factored, rms


class MaxFactor(Optimizer):
    """MaxFactor (seed 003): Adafactor's factored moment, Adamax's infinity norm, signSGD's sign.

    b2t: new statistics enter with weight t^beta2_decay; 2-D+: row/column EMAs of the mean
    squared gradient, V = R C^T / max(R); 1-D: v = gamma v + (1 - gamma) g^2.
    u = g / sqrt(V), u /= ||u||_inf;  alpha = max(eps2, RMS(p)) * min(lr, 1/sqrt(t));
    p *= 1 - lr * wd;  p -= alpha / max(1, RMS(u) / d) * sign(u) * max_row |u|.

    Same numbers as the seed's code, with one fix: the seed's in-place ``rsqrt_`` on the
    1-D state overwrote ``v`` with the update (an aliasing bug); here ``v`` stays the EMA of
    g^2. ``_get_lr`` is the seed's (for the ``adaptive`` schedule); the seed read a state
    ``RMS`` its step never set: it is kept here (RMS of the parameter at its last step).

    Recommended (seed): lr 0.01, beta2_decay -0.8, eps (1e-10, 1e-3), d 1.0, weight_decay 0.01,
    gamma 0.99; conservative steps (about RMS(p) * lr per element), state ~ m + n per matrix.

    Args:
        lr: learning rate (caps the relative step min(lr, 1/sqrt(t)); also scales weight decay).
        beta2_decay: exponent of the second-moment EMA weight t^beta2_decay (negative).
        eps: (eps1, eps2): floor of the variance estimate and of the update norm (None: the dtype's eps), and the least parameter scale.
        d: the update is scaled down to RMS(update) <= d.
        weight_decay: decoupled weight decay (p *= 1 - lr * wd), applied after the parameter scale is read.
        gamma: EMA coefficient of the unfactored second moment of 0/1-dim tensors.
        eps_rms: accepted for the seed's signature; the seed never used it, nor does this.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, shardable="tensors")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (1e-10, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.01,
        gamma: float = 0.99,
        eps_rms: float = 1e-8,
        **options: Any,
    ):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        gamma=gamma, eps_rms=eps_rms)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("beta2_decay", options["beta2_decay"], high=0.0)
        eps = options["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"invalid eps: {eps!r} (expected two numbers (eps1, eps2); eps1 may be None)")
        if eps[0] is not None:
            check_range("eps[0]", eps[0], 0.0)
        check_range("eps[1]", eps[1], 0.0)
        check_range("d", options["d"], 0.0, low_open=True)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("gamma", options["gamma"], 0.0, 1.0, high_open=True)
        check_range("eps_rms", options["eps_rms"], 0.0)

    def weight_decay_mode(self, group):
        return None  # decoupled, but after the step size reads the parameter's RMS: applied in update()

    def init_state(self, p, group):
        dtype = self.state_dtype(p, group)
        state = factored_zeros(p, dtype, "var") if is_factored(p) else factored_zeros(p, dtype, "v")
        state["RMS"] = torch.zeros((), dtype=dtype, device=p.device)
        return state

    def _get_lr(self, param_group: Mapping[str, Any], param_state: Mapping[str, Any]) -> float:
        """The seed's relative step: max(eps2, RMS(p)) * min(1e-5 t, 1/sqrt(t)) (for the ``adaptive`` schedule)."""
        step = float(param_state["step"])
        rel_step_sz = min(1e-5 * step, 1.0 / step**0.5)
        return max(param_group["eps"][1], float(param_state["RMS"])) * rel_step_sz

    def effective_lr(self, group, state):
        """alpha of the last step: max(eps2, RMS(p)) * min(lr, 1/sqrt(t)) (before the update's RMS clipping)."""
        step = float(state.get("step", 0))
        if "RMS" not in state or step < 1:
            return float(group["lr"])
        return max(group["eps"][1], float(state["RMS"])) * min(group["lr"], 1 / step**0.5)

    def update(self, p, g, state, group, step):
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(p.dtype).eps
        weight = step ** group["beta2_decay"]
        rho_t = min(group["lr"], 1 / (step**0.5))
        state["RMS"].copy_(rms(p))
        alpha = max(eps2, p.norm(2).item() / (p.numel() ** 0.5)) * rho_t
        apply_weight_decay(p, g, "decoupled", group["weight_decay"], group["lr"])
        if is_factored(p):
            row, col = state["var_row"], state["var_col"]
            row_stat = torch.norm(g, dim=-1).square_().div_(g.size(-1) + 1e-8)
            col_stat = torch.norm(g, dim=-2).square_().div_(g.size(-2) + 1e-8)
            factored_ema_(row, col, row_stat, col_stat, 1.0 - weight, lerp_weight=weight)
            update = factored_rsqrt(row, col, "max", eps1).mul_(g)
        else:
            v = state["v"]
            v.mul_(group["gamma"]).add_(g**2, alpha=1 - group["gamma"])
            update = v.clamp(min=eps1 * eps1).rsqrt_().mul_(g)
        update.div_(torch.norm(update, float("inf")).clamp_(min=eps1))
        denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * group["d"]))
        p.add_(-alpha / denom * update.sign() * update.abs().max(dim=-1, keepdim=True)[0])
