"""Adafactor: adaptive learning rates with sublinear memory cost (Shazeer & Stern, 2018)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import check_lr, check_range
from .factored import FP32_STATE_OPTIONS, clipped_second_moment_step, factored_zeros, rms


class Adafactor(Optimizer):
    """Adafactor; same arguments and numbers as ``transformers.optimization.Adafactor``.

    v = b2t v + (1 - b2t) (g^2 + eps1), factored into row/column means for 2-D+ tensors,
    b2t = 1 - t^decay_rate;  u = g / sqrt(v), divided by max(1, RMS(u) / clip_threshold);
    m = b1 m + (1 - b1) u (only with beta1);  p -= rho * u (or m), where
    rho = lr, or min(1e-2, 1/sqrt(t)) with relative_step (1e-6 t instead of 1e-2 with warmup_init),
    times max(eps2, RMS(p)) with scale_parameter.

    Recommended: as transformers' Trainer, lr 1e-3 with relative_step=False and
    scale_parameter=False (use an lr schedule with warmup); or lr=None with
    relative_step=True (the paper's time-dependent step) and warmup_init=True.

    Args:
        lr: external learning rate; None with relative_step=True (the default), required otherwise.
        eps: (eps1, eps2): added to the squared gradient, and the least parameter scale.
        clip_threshold: the update is scaled down to RMS(update) <= clip_threshold.
        decay_rate: exponent of the second-moment coefficient b2t = 1 - t^decay_rate (negative).
        beta1: coefficient of the first moment (None: no first moment, the memory-lean default).
        weight_decay: decoupled weight decay, scaled by the step's learning rate (p -= wd * rho * p).
        scale_parameter: multiply the learning rate by the parameter's RMS (at least eps2).
        relative_step: compute the time-dependent learning rate instead of using lr.
        warmup_init: with relative_step, the step grows as 1e-6 * t (warmup) instead of starting at 1e-2.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, shardable="tensors")
    common_options = FP32_STATE_OPTIONS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        **options: Any,
    ):
        options.setdefault("state_dtype", "fp32")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        lr = options["lr"]
        if lr is not None and options["relative_step"]:
            raise ValueError(f"invalid lr: {lr!r} cannot be combined with relative_step=True (pass relative_step=False)")
        if lr is None and not options["relative_step"]:
            raise ValueError("invalid lr: None needs relative_step=True (give an lr with relative_step=False)")
        if lr is not None:
            check_lr(lr)
        if options["warmup_init"] and not options["relative_step"]:
            raise ValueError("invalid warmup_init: True requires relative_step=True")
        eps = options["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"invalid eps: {eps!r} (expected two numbers (eps1, eps2))")
        check_range("eps[0]", eps[0], 0.0)
        check_range("eps[1]", eps[1], 0.0)
        check_range("clip_threshold", options["clip_threshold"], 0.0, low_open=True)
        check_range("decay_rate", options["decay_rate"], high=0.0)
        if options["beta1"] is not None:
            check_range("beta1", options["beta1"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", options["weight_decay"], 0.0)

    def weight_decay_mode(self, group):
        return None  # decoupled, but scaled by the step's own learning rate: applied in update()

    def init_state(self, p, group):
        dtype = self.state_dtype(p, group)
        state = factored_zeros(p, dtype, "exp_avg_sq")
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["RMS"] = torch.zeros((), dtype=dtype, device=p.device)  # read by _get_lr (schedules)
        return state

    @staticmethod
    def _relative_lr(group: Mapping[str, Any], step: float, param_rms) -> Any:
        rel_step_sz = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            rel_step_sz = min(min_step, 1.0 / math.sqrt(step))
        param_scale = max(group["eps"][1], param_rms) if group["scale_parameter"] else 1.0
        return param_scale * rel_step_sz

    def _get_lr(self, param_group: Mapping[str, Any], param_state: Mapping[str, Any]) -> float:
        """The learning rate of the last step of a parameter (transformers' ``AdafactorSchedule`` reads it)."""
        return float(self._relative_lr(param_group, float(param_state["step"]), param_state["RMS"]))

    def effective_lr(self, group, state):
        """rho of the last step: lr or the relative step, times max(eps2, RMS(p)) with scale_parameter."""
        if "RMS" not in state or float(state["step"]) < 1:
            return float(group["lr"] or 0.0)
        return self._get_lr(group, state)

    def update(self, p, g, state, group, step):
        param_rms = rms(p)
        state["RMS"].copy_(param_rms)
        lr = self._relative_lr(group, step, param_rms)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = clipped_second_moment_step(p, g, state, beta2t, group["eps"][0], group["clip_threshold"])
        update.mul_(lr)
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        if group["weight_decay"] != 0:  # decoupled, as transformers writes it: p += -wd * lr * p keeps
            p.add_(p, alpha=-group["weight_decay"] * lr)  # a tiny wd * lr exact, where p *= 1 - wd * lr in fp32 would not
        p.add_(-update)
