"""AdaBelief: adapting step sizes by the belief in observed gradients (Zhuang et al., NeurIPS 2020)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import adanorm_gradient, amsgrad_bound, bias_correction, check_betas, check_range, rectification


class AdaBelief(Optimizer):
    """AdaBelief: Adam whose second moment is the EMA of (g - m)^2, the "belief" in g.

    m = b1 m + (1 - b1) g;  s = b2 s + (1 - b2) (g - m)^2 + eps
    p -= lr / (1 - b1^t) * m / (sqrt(s) / sqrt(1 - b2^t) + eps)

    Options as in the seed (``pytorch_optimizer``'s AdaBelief): decoupled or fixed weight
    decay, RAdam's rectification (``rectify``; below ``n_sma_threshold`` an SGD step, or none),
    the running maximum of ``s`` (``ams_bound``), AdaNorm (``adanorm``: m is fed the gradient
    lifted to its norm's running average), and AdamD (``adam_debias``: no bias correction of
    the step). Same numbers as ``pytorch_optimizer.AdaBelief``; as the official
    ``adabelief_pytorch`` except that ``rectify`` with ``ams_bound`` uses the bounded ``s``.

    Recommended (the seed's table; the reference setup is AdamW, lr 1e-4, batch 4):

    =====================  =====  ===========================================================
    setting                lr     options
    =====================  =====  ===========================================================
    <= 16 GB, batch 1      1e-4   eps 1e-8, weight_decay 0.01, weight_decouple
    24 GB, batch 4         1e-4   as above + rectify
    80 GB, batch 16        5e-5   as above + rectify, ams_bound, adanorm (r 0.95)
    =====================  =====  ===========================================================

    eps: 1e-16 (the default) where Adam beats SGD (transformers, GANs), 1e-8 for CNNs.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of the squared belief (g - m)^2.
        weight_decay: weight decay factor.
        weight_decouple: decoupled weight decay as in AdamW (p *= 1 - lr * wd); False adds wd * p to the gradient.
        fixed_decay: with weight_decouple, decay independent of lr (p *= 1 - wd).
        rectify: RAdam's variance rectification of the step.
        n_sma_threshold: with rectify, the length of the SMA (rho_t) from which the adaptive step is used (>= 5).
        degenerated_to_sgd: with rectify, below the threshold take an SGD-with-momentum step (else no step).
        ams_bound: normalise by the running maximum of the second moment (AMSGrad bound).
        r: EMA factor of the gradient norm for adanorm (0.9 to 0.99).
        adanorm: AdaNorm: rescale the gradient fed to the first moment to the EMA of its norm.
        adam_debias: correct only the denominator (AdamD): the step is not divided by 1 - b1^t.
        eps: term added inside the second moment and to the denominator.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = False,
        n_sma_threshold: int = 5,
        degenerated_to_sgd: bool = True,
        ams_bound: bool = False,
        r: float = 0.95,
        adanorm: bool = False,
        adam_debias: bool = False,
        eps: float = 1e-16,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, weight_decouple=weight_decouple,
                        fixed_decay=fixed_decay, rectify=rectify, n_sma_threshold=n_sma_threshold,
                        degenerated_to_sgd=degenerated_to_sgd, ams_bound=ams_bound, r=r, adanorm=adanorm,
                        adam_debias=adam_debias, eps=eps)
        super().__init__(params, defaults, **options)
        if any(group["adanorm"] for group in self.param_groups):  # a per-tensor norm: split by whole tensors only
            self.capabilities = Capabilities(elementwise=True, shardable="tensors")

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("eps", options["eps"], 0.0)
        check_range("r", options["r"], 0.0, 1.0, high_open=True)
        check_range("n_sma_threshold", options["n_sma_threshold"], 5.0)

    def weight_decay_mode(self, group):
        if not group["weight_decouple"]:
            return "l2"
        return "fixed" if group["fixed_decay"] else "decoupled"

    def init_state(self, p, group):
        dtype = self.state_dtype(p, group)
        names = ("exp_avg", "exp_avg_var", "max_exp_avg_var") if group["ams_bound"] else ("exp_avg", "exp_avg_var")
        state = {name: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format) for name in names}
        if group["adanorm"]:
            real = torch.empty((), dtype=dtype).real.dtype
            state["exp_grad_norm"] = torch.zeros(1, dtype=real, device=p.device)
        return state

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_var = state["exp_avg"], state["exp_avg_var"]
        moment_grad = adanorm_gradient(g, state["exp_grad_norm"], group["r"]) if group["adanorm"] else g
        exp_avg.lerp_(moment_grad, 1 - beta1)
        residual = g - exp_avg
        exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(group["eps"])
        second_moment = amsgrad_bound(state["max_exp_avg_var"], exp_avg_var) if group["ams_bound"] else exp_avg_var
        denom = second_moment.sqrt()
        debias = 1.0 if group["adam_debias"] else bias_correction(beta1, step)

        if not group["rectify"]:
            denom.div_(math.sqrt(bias_correction(beta2, step))).add_(group["eps"])
            p.addcdiv_(exp_avg, denom, value=-group["lr"] / debias)
            return
        rho_t, r_t = rectification(beta2, step)
        if r_t is not None and rho_t >= group["n_sma_threshold"]:
            # r_t * sqrt(1 - b2^t): the rectified step carries the second moment's bias correction
            step_size = group["lr"] * r_t * math.sqrt(bias_correction(beta2, step)) / debias
            p.addcdiv_(exp_avg, denom.add_(group["eps"]), value=-step_size)
        elif group["degenerated_to_sgd"]:
            p.add_(exp_avg, alpha=-group["lr"] / debias)
