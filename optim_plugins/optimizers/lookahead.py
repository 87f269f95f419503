"""Lookahead: k steps forward, 1 step back (Zhang, Lucas, Hinton & Ba, NeurIPS 2019)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .common import check_range, lookahead_
from .wrapper import Wrapper, inner_options_of


class Lookahead(Wrapper):
    """Lookahead around any registered optimizer: its fast weights are pulled back every k steps.

    fast: k steps of the inner optimizer;  slow += alpha (fast - slow);  fast = slow

    The slow weights start at the parameters' values before their first step and are kept
    in the inner optimizer's state as ``slow_param`` (so ``state_dict`` carries them). Options
    of the inner optimizer pass through flat (``lr``, ``weight_decay`` and the common
    options such as ``backend``) or in ``inner_options`` (``{"betas": (0.9, 0.95)}``; when
    building the class directly, any inner option may also be given flat).

    Recommended (paper): k 5 to 10, alpha 0.5, the inner optimizer's usual settings.

    Args:
        inner: registry name of the inner (fast) optimizer.
        inner_options: options of the inner optimizer, e.g. {"betas": (0.9, 0.95)}.
        k: inner steps between two syncs of the slow weights.
        alpha: step of the slow weights towards the fast ones (slow += alpha * (fast - slow)).
        lr: learning rate of the inner optimizer (None: its default).
        weight_decay: weight decay of the inner optimizer (None: its default).
    """

    def __init__(
        self,
        params: Iterable[Any],
        inner: str = "adamw",
        inner_options: dict[str, Any] | None = None,
        k: int = 5,
        alpha: float = 0.5,
        lr: float | None = None,
        weight_decay: float | None = None,
        **options: Any,
    ):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"invalid k: {k!r} (expected an integer >= 1)")
        check_range("alpha", alpha, 0.0, 1.0)
        self.k, self.alpha = k, alpha
        super().__init__(params, inner, inner_options, dict(k=k, alpha=alpha),
                         **inner_options_of(lr, weight_decay, options))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One inner step; parameters whose step count reaches a multiple of k are synced."""
        params = [p for group in self.param_groups for p in group["params"]]
        steps_before = [self._steps(p) for p in params]
        # slow weights start from the values before a parameter's first step (grads may come from the closure)
        start = [p.detach().clone() if "slow_param" not in self.state.get(p, {}) else None for p in params]
        loss = self.optimizer.step(closure)
        for p, before, initial in zip(params, steps_before, start):
            steps = self._steps(p)
            if steps == before:  # not stepped: no gradient, or the step was skipped
                continue
            state = self.state[p]
            if initial is not None:
                state["slow_param"] = initial
            if steps % self.k == 0:
                lookahead_(p, state["slow_param"], self.alpha)
                if "compensation" in state:  # the rounding error belonged to the fast weights
                    state["compensation"].zero_()
        return loss

    def _steps(self, p: torch.Tensor) -> int:
        step = self.state.get(p, {}).get("step")
        return 0 if step is None else int(step)
