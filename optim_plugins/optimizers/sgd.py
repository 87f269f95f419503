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
        if not _fused_kernel_covers(group):
            return False
        torch._fused_sgd_(params, grads, _momentum_buffers(group, states), **_fused_options(group),
                          is_first_step=states[0]["step"].item() == 1, grad_scale=grad_scale, found_inf=None)
        return True

    def fused_step_with_sums(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                             states: list[dict], grad_scale: Tensor | None, sums: Tensor) -> bool:
        if not _fused_kernel_covers(group):
            return False
        return cpp_kernels.sgd_step_with_sums(params, grads, _momentum_buffers(group, states),
                                              [s["step"] for s in states], **_fused_options(group),
                                              grad_scale=grad_scale, sums=sums)

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


def _fused_kernel_covers(group: Mapping[str, Any]) -> bool:
    """torch's fused SGD kernel (and ours with the sums) knows L2 weight decay only."""
    return not (group["decoupled_weight_decay"] and group["weight_decay"])


def _momentum_buffers(group: Mapping[str, Any], states: list[dict]) -> list[Tensor]:
    return [s["momentum_buffer"] for s in states] if group["momentum"] != 0 else []


def _fused_options(group: Mapping[str, Any]) -> dict[str, Any]:
    return dict(weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
