"""SAM: sharpness-aware minimization (Foret et al., ICLR 2021) and ASAM, its adaptive,
scale-invariant form (Kwon et al., ICML 2021)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..registry import Capabilities
from .precision import LOW_PRECISION
from .common import check_range
from .wrapper import Wrapper, inner_options_of


class SAM(Wrapper):
    """SAM around any registered optimizer: the inner step uses the gradient at the worst nearby point.

    e = rho * T^2 g / ||T g||  (T = 1; ASAM: T = |p|);  g' = grad L(p + e);  inner step with g'

    ``step(closure)`` evaluates the closure twice (at p, then at p + e) and returns the first
    loss; the closure must zero the gradients, compute the loss, call ``backward()`` and
    return the loss (as Lightning's and torch's closures do). A step without a closure is a
    no-op when no parameter has a gradient and an error otherwise. Options of the inner
    optimizer pass through as for ``lookahead`` (flat or ``inner_options``).

    Recommended (paper): inner SGD with momentum 0.9 (or AdamW), its usual lr; rho 0.05
    (0.1 to 0.2 for noisy labels or fine-tuning); ASAM: rho 0.5 with SGD.

    Args:
        inner: registry name of the inner optimizer that takes the step.
        inner_options: options of the inner optimizer, e.g. {"momentum": 0.9}.
        rho: radius of the neighbourhood in which the worst point is sought.
        adaptive: ASAM: scale the neighbourhood by |p| (scale-invariant sharpness).
        eps: added to the gradient norm in the perturbation.
        lr: learning rate of the inner optimizer (None: its default).
        weight_decay: weight decay of the inner optimizer (None: its default).
    """

    capabilities = Capabilities(needs_closure=True, shardable="no")  # one global gradient norm

    def __init__(
        self,
        params: Iterable[Any],
        inner: str = "sgd",
        inner_options: dict[str, Any] | None = None,
        rho: float = 0.05,
        adaptive: bool = False,
        eps: float = 1e-12,
        lr: float | None = None,
        weight_decay: float | None = None,
        **options: Any,
    ):
        check_range("rho", rho, 0.0)
        check_range("eps", eps, 0.0)
        if not isinstance(adaptive, bool):
            raise ValueError(f"invalid adaptive: {adaptive!r} (expected True or False)")
        self.rho, self.adaptive, self.eps = rho, adaptive, eps
        super().__init__(params, inner, inner_options, dict(rho=rho, adaptive=adaptive, eps=eps),
                         **inner_options_of(lr, weight_decay, options))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` at p and at p + e, restore p and let the inner optimizer step."""
        if closure is None:
            params = self._with_grad()
            if not params:
                return None
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that zeroes the gradients, computes the loss, "
                "calls backward() and returns the loss: SAM evaluates it at the perturbed weights. "
                "In a plain loop: optimizer.step(closure); in Lightning pass the closure Lightning gives."
            )
        with torch.enable_grad():
            loss = closure()
        params = self._with_grad()
        if not params or self._skip_for_nonfinite(params):
            return loss
        saved = [p.detach().clone() for p, _ in params]
        for (p, maximize), e in zip(params, self._perturbations(params)):
            p.sub_(e) if maximize else p.add_(e)  # towards higher loss of the objective being minimised
        with torch.enable_grad():
            closure()
        for (p, _), old in zip(params, saved):
            p.copy_(old)
        self.optimizer.step()
        return loss

    def _with_grad(self) -> list[tuple[torch.Tensor, bool]]:
        """(parameter, maximize) of every parameter with a gradient; sparse gradients are refused."""
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                        f"{tuple(p.shape)}); use a dense gradient, e.g. nn.Embedding(sparse=False)"
                    )
                params.append((p, bool(group.get("maximize", False))))
        return params

    def _skip_for_nonfinite(self, params: list[tuple[torch.Tensor, bool]]) -> bool:
        """The inner optimizer's non-finite policy, applied to the first gradients (before perturbing)."""
        check = getattr(self.optimizer, "_skip_for_nonfinite", None)
        if check is None:
            return False
        return check([(None, [p for p, _ in params], [p.grad for p, _ in params])])

    def _perturbations(self, params: list[tuple[torch.Tensor, bool]]) -> list[torch.Tensor]:
        weighted = []
        for p, _ in params:
            g = p.grad
            if self.adaptive:
                g = (g.float() if g.dtype in LOW_PRECISION else g) * p.abs()
            weighted.append(g.float() if g.dtype in LOW_PRECISION else g)
        norm = torch.stack([w.norm() for w in weighted]).float().square_().sum().sqrt_().add_(self.eps)
        scale = self.rho / norm
        return [(torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p) for p, _ in params]


class ASAM(SAM):
    """ASAM: SAM with the neighbourhood scaled by |p| (adaptive, scale-invariant sharpness).

    e = rho * p^2 g / ||p g||;  otherwise as ``sam``. Recommended (paper): rho 0.5 with
    SGD (momentum 0.9), rho 1.0 to 2.0 on larger vision models.

    Args:
        rho: radius of the |p|-scaled neighbourhood.
    """

    def __init__(
        self,
        params: Iterable[Any],
        inner: str = "sgd",
        inner_options: dict[str, Any] | None = None,
        rho: float = 0.5,
        eps: float = 1e-12,
        lr: float | None = None,
        weight_decay: float | None = None,
        **options: Any,
    ):
        if options.pop("adaptive", True) is not True:
            raise ValueError("invalid adaptive: ASAM is always adaptive (use SAM for adaptive=False)")
        super().__init__(params, inner, inner_options, rho, True, eps, lr, weight_decay, **options)
