"""Sophia: second-order clipped stochastic optimization (Liu et al., 2023, arXiv:2305.14342).

One algorithm, two estimators of the Hessian diagonal ``h``:

* ``SophiaG``: Gauss-Newton-Bartlett. Every k steps the caller samples labels from the
  model's own output distribution and calls :meth:`SophiaG.update_hessian`.
* ``SophiaH``: Hutchinson, ``u * (H u)`` with ``u ~ N(0, I)``, computed inside ``step`` every
  k steps from the gradient's graph (``loss.backward(create_graph=True)``).

The step itself is elementwise: ``m = b1 m + (1 - b1) g``, then a clipped
Newton-like step ``p -= lr * clip(m / max(rho h, eps), 1)``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping

import torch
from torch import Tensor

from ..registry import Capabilities
from .base import Optimizer
from .common import check_betas, check_choice, check_range, clip_


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _check_period(options: Mapping[str, Any], name: str) -> None:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {name}: {value!r} (expected an integer >= 1)")


class SophiaG(Optimizer):
    """SophiaG: Sophia with the Gauss-Newton-Bartlett Hessian estimate (as sophia-opt's ``SophiaG``).

    m = b1 m + (1 - b1) g;  every k steps h = b2 h + (1 - b2) g_hat^2 (g_hat: gradient of the
    loss on labels sampled from the model);  p -= lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)

    The step runs every iteration (``step()``, with decoupled weight decay). The Hessian
    estimate is the caller's: every ``hessian_interval`` steps (``opt.hessian_due()``) call
    ``opt.update_hessian(lambda: model(inputs).logits)``; it samples labels from the logits,
    differentiates their mean cross-entropy and updates ``h``, leaving ``.grad`` alone. Until
    the first estimate ``h = 0`` and the step is ``lr * sign(m)``.

    Recommended (paper, GPT-2): lr 2e-4 to 6e-4 (the largest per-coordinate step), betas
    (0.965, 0.99), rho 0.04 with ``bs`` = tokens per Hessian batch, weight_decay 0.1-0.2, k 10.

    Args:
        lr: learning rate (the largest per-coordinate step).
        betas: EMA coefficients of the gradient (b1) and of the Hessian estimate (b2).
        rho: clipping scale gamma: the step is Newton's step m / (rho * bs * h), clipped to 1.
        weight_decay: decoupled weight decay factor (p *= 1 - lr * wd).
        bs: labels (tokens) per Hessian batch, B of the estimate B * g_hat^2 (sophia-opt's step(bs=...)).
        eps: added to the denominator rho * bs * h.
        hessian_interval: k, steps between Hessian estimates (read by hessian_due()).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=True, needs_model=True, shardable="elements")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        bs: int = 5120,
        eps: float = 1e-15,
        hessian_interval: int = 10,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs, eps=eps,
                        hessian_interval=hessian_interval)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("rho", options["rho"], 0.0)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("bs", options["bs"], 0.0, low_open=True)
        check_range("eps", options["eps"], 0.0)
        _check_period(options, "hessian_interval")

    def weight_decay_mode(self, group):
        return "decoupled"

    def state_names(self, group):
        return ("exp_avg", "hessian")

    def update(self, p, g, state, group, step):
        beta1, _ = group["betas"]
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        ratio = exp_avg.abs().div(state["hessian"].mul(group["rho"] * group["bs"]).add_(group["eps"])).clamp_max_(1)
        p.addcmul_(exp_avg.sign(), ratio, value=-group["lr"])

    # -------------------------------------------------------------- the Hessian estimate

    def hessian_due(self) -> bool:
        """True when the steps taken so far are a multiple of ``hessian_interval`` (0 included)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    return int(self.state[p]["step"].item()) % group["hessian_interval"] == 0
        return True

    @torch.no_grad()
    def update_hessian(self, logits_fn: Callable[[], Tensor] | None = None) -> None:
        """Update the EMA of the Gauss-Newton-Bartlett estimate ``g_hat * g_hat``.

        ``logits_fn``: a callable returning the model's logits (``(..., classes)``) for a batch;
        labels are sampled from ``softmax(logits)`` and ``g_hat`` is the gradient of their mean
        cross-entropy (``.grad`` is not touched). Without it, ``g_hat`` is the current ``.grad``,
        which the caller computed from a loss on sampled labels (sophia-opt's training loop).
        """
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if logits_fn is None:
            grads = [p.grad for p in params]
        else:
            with torch.enable_grad():
                logits = logits_fn()
                flat = logits.reshape(-1, logits.shape[-1])
                labels = torch.distributions.Categorical(logits=flat.detach().float()).sample()
                loss = torch.nn.functional.cross_entropy(flat, labels)
                grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        by_param = dict(zip(params, grads))
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                g = by_param.get(p)
                if g is None:
                    continue
                hessian = self._state_of(p, group)["hessian"]
                g = _real(g.to(hessian.dtype))
                _real(hessian).mul_(beta2).addcmul_(g, g, value=1 - beta2)


class SophiaH(Optimizer):
    """SophiaH: Sophia with Hutchinson's Hessian estimate (paper, Algorithm 3 with the Hutchinson estimator).

    m = b1 m + (1 - b1) g;  every k steps h = b2 h + (1 - b2) u * (H u), u ~ N(0, I);
    p -= lr * clip(m / max(rho * h, eps), 1)

    ``H u`` is differentiated from the gradient's graph, so the backward pass must keep it:
    ``loss.backward(create_graph=True)`` (in the closure or before ``step()``). A step that
    is due for an estimate raises ``RuntimeError`` when no gradient carries a graph. ``u`` is
    drawn per parameter, in parameter order, from torch's global generator
    (``torch.randn_like``; ``randint_like`` for Rademacher). Decoupled weight decay.

    Recommended: lr 1e-4 to 6e-4 for LLMs (lr 0.002-0.01 for small nets), betas
    (0.965, 0.99), rho 0.01, k 10.

    Args:
        lr: learning rate (the largest per-coordinate step).
        betas: EMA coefficients of the gradient (b1) and of the Hessian estimate (b2).
        rho: clipping scale gamma of max(rho * h, eps).
        weight_decay: decoupled weight decay factor (p *= 1 - lr * wd).
        eps: floor of the denominator max(rho * h, eps).
        update_period: k, steps between Hutchinson estimates (steps 1, k+1, 2k+1, ... of each parameter).
        distribution: distribution of u: "gaussian" or "rademacher".
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=True, needs_create_graph=True, shardable="elements")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.01,
        weight_decay: float = 0.0,
        eps: float = 1e-12,
        update_period: int = 10,
        distribution: Literal["gaussian", "rademacher"] = "gaussian",
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                        update_period=update_period, distribution=distribution)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("rho", options["rho"], 0.0, low_open=True)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("eps", options["eps"], 0.0)
        _check_period(options, "update_period")
        check_choice("distribution", options["distribution"], ("gaussian", "rademacher"))

    def weight_decay_mode(self, group):
        return "decoupled"

    def state_names(self, group):
        return ("exp_avg", "hessian")

    def prepare_step(self, work: list) -> bool:
        """The Hutchinson estimate for the parameters due one (their gradients need a graph)."""
        self._hutchinson(work)
        return True

    def _hutchinson(self, work: list) -> None:
        """h = b2 h + (1 - b2) u * (H u) for every parameter due (one H u product for all groups)."""
        due = [(group, p, g) for group, params, grads in work for p, g in zip(params, grads)
               if self.state.get(p, {}).get("step", 0) % group["update_period"] == 0]
        if not due:
            return
        if any(p.is_complex() for _, p, _ in due):
            raise ValueError("SophiaH does not support complex parameters")
        if not any(g.requires_grad for _, _, g in due):
            raise RuntimeError(
                "SophiaH: the gradients carry no graph, so the Hutchinson estimate u * (H u) cannot be "
                "computed; call loss.backward(create_graph=True) (in the closure or before step())"
            )
        us = [torch.randn_like(p) if group["distribution"] == "gaussian" else torch.randint_like(p, 0, 2) * 2.0 - 1.0
              for group, p, _ in due]
        linked = [i for i, (_, _, g) in enumerate(due) if g.requires_grad]  # a constant gradient adds nothing to H u
        hvps = torch.autograd.grad([due[i][2] for i in linked], [p for _, p, _ in due],
                                   grad_outputs=[us[i] for i in linked], allow_unused=True)
        for (group, p, _), u, hvp in zip(due, us, hvps):
            hessian = self._state_of(p, group)["hessian"]
            estimate = torch.zeros_like(hessian) if hvp is None else (hvp * u).to(hessian.dtype)
            if group["maximize"]:  # the curvature of -f
                estimate.neg_()
            _real(hessian).lerp_(_real(estimate), 1 - group["betas"][1])

    def update(self, p, g, state, group, step):
        beta1, _ = group["betas"]
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        update = exp_avg.div(state["hessian"].mul(group["rho"]).clamp_min_(group["eps"]))
        p.add_(clip_(update, 1.0), alpha=-group["lr"])
