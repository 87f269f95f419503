"""Stochastic gradient descent with momentum, dampening and Nesterov momentum."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..kernels import cpp as cpp_kernels
from .base import Optimizer
from .common import check_range


class SGD(Optimizer):
    """SGD with (Nesterov) momentum; same numbers as ``torch.optim.SGD``.

    buf = momentum * buf + (1 - dampening) * g  (buf = g at the first step)
    p -= lr * (g + momentum * buf if nesterov else buf)

    Recommended: lr 0.1 with momentum 0.9 for vision (batch 256), weight_decay 1e-4 to 5e-4.

    ``backend="auto"`` steps plain buckets (see ``Optimizer.torch_fused_step``) with torch's fused
    kernel, ``torch._fused_sgd_``: the numbers of ``torch.optim.SGD(fused=True)`` bit for bit
    (not with ``decoupled_weight_decay``, which torch's kernel does not know).

    Args:
        lr: learning rate.
        momentum: momentum factor (0 disables the buffer).
        dampening: dampening of the momentum's gradient term.
        weight_decay: weight decay factor (L2 penalty unless decoupled).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        decoupled_weight_decay: decay the weights directly (p *= 1 - lr * wd, "SGDW").
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        **options: Any,
    ):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("momentum", options["momentum"], 0.0)
        check_range("dampening", options["dampening"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        if options["nesterov"] and (options["momentum"] <= 0 or options["dampening"] != 0):
            raise ValueError(
                f"invalid nesterov: True needs momentum > 0 and dampening == 0 "
                f"(got momentum={options['momentum']!r}, dampening={options['dampening']!r})"
            )

    def weight_decay_mode(self, group):
        return "decoupled" if group["decoupled_weight_decay"] else "l2"

    def state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def torch_fused_step(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                         states: list[dict], grad_scale: Tensor | None) -> bool:
        if group["decoupled_weight_decay"] and group["weight_decay"]:
            return False  # torch's kernel knows L2 decay only
        momentum = group["momentum"]
        torch._fused_sgd_(params, grads, [s["momentum_buffer"] for s in states] if momentum != 0 else [],
                          weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"],
                          dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                          is_first_step=states[0]["step"].item() == 1, grad_scale=grad_scale, found_inf=None)
        return True

    def fused_step_with_sums(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                             states: list[dict], grad_scale: Tensor | None, sums: Tensor) -> bool:
        if group["decoupled_weight_decay"] and group["weight_decay"]:
            return False
        momentum = group["momentum"]
        return cpp_kernels.sgd_step_with_sums(
            params, grads, [s["momentum_buffer"] for s in states] if momentum != 0 else [], [s["step"] for s in states],
            weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"], grad_scale=grad_scale, sums=sums)

    def update(self, p, g, state, group, step):
        momentum = group["momentum"]
        if momentum != 0:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(g, alpha=-group["lr"])
