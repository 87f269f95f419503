"""Prodigy: an expeditiously adaptive parameter-free learner (Mishchenko & Defazio, 2023, arXiv:2306.06101)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import apply_weight_decay, bias_correction, check_betas, check_range
from .precision import working_copy


class Prodigy(Optimizer):
    """Prodigy: Adam whose step size d estimates the distance to the solution; same numbers as ``prodigyopt``.

    With dlr = d * lr (* sqrt(1 - b2^k) / (1 - b1^k) with use_bias_correction), per step:
    m = b1 m + (1 - b1) d g;  v = b2 v + (1 - b2) d^2 g^2;  s = b3 s + (d / d0) dlr g;
    r = b3 r + (d / d0) dlr <g, p0 - p>;  d = max(d, d_coef * r / sum|s|);
    p -= dlr * m / (sqrt(v) + d eps)

    d (with ``d_max``, the numerator ``d_numerator`` and the step count ``k``) is one estimate
    for the whole optimizer, kept in every param group (so ``state_dict`` carries it). Groups
    share it: their lr must be equal, or 0 (such a group is frozen). ``s`` and ``p0`` are kept
    for every ``slice_p``-th element of each tensor.

    Recommended: lr 1.0 (tune d_coef, e.g. 0.5-2, rather than lr), weight_decay 0-0.01 with
    decouple, safeguard_warmup=True and use_bias_correction=True with an lr warmup schedule.

    Args:
        lr: multiplier of the estimated step size d (leave at 1.0).
        betas: EMA coefficients of the gradient and of its square.
        beta3: EMA coefficient of the d estimate's sums; None means sqrt(betas[1]).
        eps: term added to the denominator (times d).
        weight_decay: weight decay factor.
        decouple: decoupled (AdamW-style, p -= wd * dlr * p) weight decay instead of L2.
        use_bias_correction: Adam's bias correction of the step size.
        safeguard_warmup: leave lr out of the denominator sum s (safer with lr warmup).
        d0: initial d estimate.
        d_coef: coefficient of the d estimate (the knob to tune).
        growth_rate: largest factor by which d may grow per step (inf: unbounded).
        slice_p: estimate d from every slice_p-th element (1: all; ~11 saves memory).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, shardable="no")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        slice_p: int = 1,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0,
                        d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p,
                        d=d0, d_max=d0, d_numerator=0.0, k=0)  # the estimate: state, not options
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        if options["beta3"] is not None:
            check_range("beta3", options["beta3"], 0.0, 1.0, high_open=True)
        check_range("eps", options["eps"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("d0", options["d0"], 0.0, low_open=True)
        check_range("d_coef", options["d_coef"], 0.0, low_open=True)
        check_range("growth_rate", options["growth_rate"], 1.0)
        slice_p = options["slice_p"]
        if isinstance(slice_p, bool) or not isinstance(slice_p, int) or slice_p < 1:
            raise ValueError(f"invalid slice_p: {slice_p!r} (expected an integer >= 1)")

    def weight_decay_mode(self, group):
        return None if group["decouple"] else "l2"  # decoupled decay scales with d: done in update()

    def init_state(self, p, group):
        dtype = self.state_dtype(p, group)
        sliced = p.detach().flatten()[:: group["slice_p"]]
        state = {"s": torch.zeros_like(sliced, dtype=dtype), "p0": sliced.to(dtype, copy=True)}
        names = ("exp_avg", "exp_avg_sq") if group["betas"][0] > 0 else ("exp_avg_sq",)
        state.update({name: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format) for name in names})
        return state

    def prepare_step(self, work: list) -> bool:
        """The moments and the new d over every group; like prodigyopt, no step without signal (sum |s| == 0)."""
        return self._estimate_d(work)

    def step_group(self, group: dict[str, Any], params: list, grads: list) -> None:
        if group["lr"] > 0:  # a group with lr 0 is frozen (prodigyopt would still decay it)
            super().step_group(group, params, grads)

    def _estimate_d(self, work: list) -> bool:
        """Update the moments, s and the d estimate (prodigyopt's first pass); False if sum |s| is 0."""
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        d, d_max, k = first["d"], first["d_max"], first["k"]
        lr = max(group["lr"] for group in self.param_groups)
        bad = [group["lr"] for group in self.param_groups if group["lr"] not in (lr, 0.0)]
        if bad:
            raise ValueError(f"invalid lr: {bad[0]!r} (Prodigy's groups share one step size: "
                             f"every group's lr must be {lr!r} or 0)")
        correction = bias_correction(beta2, k + 1) ** 0.5 / bias_correction(beta1, k + 1) if first["use_bias_correction"] else 1
        dlr = d * lr * correction
        d_numerator = first["d_numerator"] * beta3
        delta_numerator = d_denom = 0.0
        for group, params, grads in work:
            if group["lr"] == 0:
                continue
            d0, slice_p = group["d0"], group["slice_p"]
            for p, g in zip(params, grads):
                state = self._state_of(p, group)
                s, exp_avg_sq = state["s"], state["exp_avg_sq"]
                g = -g if group["maximize"] else g
                g = apply_weight_decay(p, g, None if group["decouple"] else "l2", group["weight_decay"], lr).to(s.dtype)
                sliced = g.flatten()[::slice_p]
                x = p if "compensation" not in state else working_copy(p, state["compensation"])  # Kahan: true value
                distance = (state["p0"] - x.flatten()[::slice_p]).to(sliced.dtype)
                delta_numerator += (d / d0) * dlr * torch.dot(sliced, distance).item()
                if beta1 > 0:
                    state["exp_avg"].mul_(beta1).add_(g, alpha=d * (1 - beta1))
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
                s.mul_(beta3).add_(sliced, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
                d_denom += s.abs().sum().item()
        if d_denom == 0:
            return False
        d_numerator += delta_numerator
        d_hat = first["d_coef"] * d_numerator / d_denom
        if d == self.param_groups[-1]["d0"]:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])
        for group in self.param_groups:
            group.update(d=d, d_max=d_max, d_numerator=d_numerator, k=group["k"] + 1)
        self._dlr = dlr  # the step size of this step (the d before this update)
        return True

    def effective_lr(self, group, state):
        """The step size of the last step: d * lr (times the bias correction where it is on); 0 in a frozen group."""
        dlr = self.__dict__.get("_dlr")
        if not group["lr"]:
            return 0.0
        return float(dlr) if dlr is not None else float(group["d"] * group["lr"])

    def update(self, p, g, state, group, step):
        d, dlr = group["d"], self._dlr
        denom = state["exp_avg_sq"].sqrt().add_(d * group["eps"])
        if group["decouple"] and group["weight_decay"] != 0:
            p.add_(p, alpha=-group["weight_decay"] * dlr)
        if group["betas"][0] > 0:
            p.addcdiv_(state["exp_avg"], denom, value=-dlr)
        else:
            p.addcdiv_(g, denom, value=-dlr * d)
