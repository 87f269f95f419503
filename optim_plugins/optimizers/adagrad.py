"""Adagrad: per-coordinate learning rates from the sum of squared gradients (Duchi et al., 2011)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .base import Optimizer
from .common import check_range


class Adagrad(Optimizer):
    """Adagrad; same numbers as ``torch.optim.Adagrad`` (dense gradients).

    sum += g^2;  p -= lr / (1 + (t - 1) lr_decay) * g / (sqrt(sum) + eps)

    Recommended: lr 1e-2; suits sparse features, decays the step size aggressively.

    ``backend="auto"`` steps plain buckets (see ``Optimizer.torch_fused_step``) with torch's fused
    kernel, ``torch._fused_adagrad_``: the numbers of ``torch.optim.Adagrad(fused=True)`` bit for bit.

    Args:
        lr: learning rate.
        lr_decay: learning-rate decay per step.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: starting value of the sum of squares.
        eps: term added to the denominator for numerical stability.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        **options: Any,
    ):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("lr_decay", options["lr_decay"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("initial_accumulator_value", options["initial_accumulator_value"], 0.0)
        check_range("eps", options["eps"], 0.0)

    def init_state(self, p, group):
        value = group["initial_accumulator_value"]
        fill = complex(value, value) if p.is_complex() else value
        return {"sum": torch.full_like(p, fill, dtype=self.state_dtype(p, group), memory_format=torch.preserve_format)}

    def torch_fused_step(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                         states: list[dict], grad_scale: Tensor | None) -> bool:
        torch._fused_adagrad_(params, grads, [s["sum"] for s in states], [s["step"] for s in states],
                              lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                              eps=group["eps"], maximize=group["maximize"], grad_scale=grad_scale, found_inf=None)
        return True

    def update(self, p, g, state, group, step):
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        state_sum = state["sum"]
        state_sum.addcmul_(g, g, value=1)
        p.addcdiv_(g, state_sum.sqrt().add_(group["eps"]), value=-clr)
