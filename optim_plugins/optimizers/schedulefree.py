"""Schedule-free learning (Defazio et al., 2024, "The Road Less Scheduled", arXiv:2405.15682).

Three sequences: z (the base optimizer's iterate), x (the weighted average of z, the point
to evaluate) and y = (1 - beta) z + beta x, where gradients are taken. The parameters
hold y while training and x while evaluating: call ``opt.train()`` before training steps
and ``opt.eval()`` before evaluation or saving a model (the HF and Lightning integrations
do). Only z (and Adam's second moment) is stored; x is recovered from y and z.

    y <- (1 - c) y + c z + lr (beta (1 - c) - 1) u;   z <- z - lr u
    with u the step direction, c = w_t / sum(w) and w_t = t^r * max(lr)^weight_lr_power.

Per-parameter scalars ``lr_max`` and ``weight_sum`` (float64) are state, so that
``state_dict`` round-trips bitwise. Same numbers as the ``schedulefree`` package.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities
from .base import Optimizer
from .common import bias_correction, check_betas, check_range
from .precision import LOW_PRECISION, resolve_compensation, working_copy, write_back


def _check_warmup(options: Mapping[str, Any]) -> None:
    value = options["warmup_steps"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid warmup_steps: {value!r} (expected an integer >= 0)")


class _ScheduleFree(Optimizer):
    """The schedule-free averaging, ``train()``/``eval()`` and state; subclasses give the direction u."""

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=True, train_eval=True, shardable="elements")

    def interpolation(self, group: Mapping[str, Any]) -> float:
        """beta of y = (1 - beta) z + beta x."""
        raise NotImplementedError

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("weight_decay", options["weight_decay"], 0.0)
        _check_warmup(options)
        check_range("r", options["r"], 0.0)
        check_range("weight_lr_power", options["weight_lr_power"], 0.0)

    def init_state(self, p, group):
        scalar = dict(dtype=torch.float64, device="cpu")
        return {
            "z": p.detach().to(self.state_dtype(p, group), copy=True),
            **{name: torch.zeros_like(p, dtype=self.state_dtype(p, group)) for name in self.state_names(group)},
            "lr_max": torch.tensor(-1.0, **scalar),
            "weight_sum": torch.tensor(0.0, **scalar),
        }

    def average_weight(self, state, group, step: float) -> tuple[float, float]:
        """(lr after warmup, c = w_t / sum of w) for this step; updates ``lr_max`` and ``weight_sum``."""
        warmup = group["warmup_steps"]
        lr = group["lr"] * (step / warmup) if step <= warmup else group["lr"]
        lr_max = state["lr_max"].clamp_min_(lr).item()
        weight = step ** group["r"] * lr_max ** group["weight_lr_power"]
        weight_sum = state["weight_sum"].add_(weight).item()
        return lr, (weight / weight_sum if weight_sum != 0 else 0.0)

    # -------------------------------------------------------------- train / eval

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One training step; the optimizer must be in train mode (``opt.train()``)."""
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() called in eval mode: call optimizer.train() "
                               "before training steps (and optimizer.eval() before evaluating)")
        return super().step(closure)

    def train(self) -> None:
        """Put the training point y into the parameters (no-op if already in train mode)."""
        self._switch(train=True)

    def eval(self) -> None:
        """Put the averaged point x into the parameters, for evaluation and saving a model."""
        self._switch(train=False)

    @torch.no_grad()
    def _switch(self, train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            beta = self.interpolation(group)
            weight = 1 - beta if train else 1 - 1 / beta  # x -> y, or y -> x = y + (1 - 1/beta)(z - y)
            for p in group["params"]:
                state = self.state[p]
                if "z" not in state:
                    continue
                mode = resolve_compensation(group["compensation"], p.dtype)
                if p.dtype in LOW_PRECISION and (mode is not None or state["z"].dtype != p.dtype):
                    work = working_copy(p, state.get("compensation"))
                    write_back(p, work.lerp_(state["z"].to(work.dtype), weight), mode, state.get("compensation"))
                else:
                    p.lerp_(state["z"], weight)
            group["train_mode"] = train

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault("train_mode", self.param_groups[0]["train_mode"] if self.param_groups else True)
        super().add_param_group(param_group)


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-free AdamW; same numbers as ``schedulefree.AdamWScheduleFree``.

    u = g / (sqrt(v / (1 - b2^t)) + eps) + wd * y, with v = b2 v + (1 - b2) g^2; the
    averaging above with beta = b1. Needs no learning-rate schedule (use ``warmup_steps``).

    Recommended: lr 1e-3 to 2.5e-3 (1x-10x AdamW's), betas (0.9, 0.999), warmup_steps
    ~5% of training, weight_decay 0-0.1; call ``train()``/``eval()`` (see the module doc).

    Args:
        lr: learning rate.
        betas: the interpolation beta between z and x (b1), and the EMA coefficient of g^2 (b2).
        eps: term added to the denominator.
        weight_decay: weight decay, evaluated at y and added to the normalized step.
        warmup_steps: linear learning-rate warmup over this many steps.
        r: polynomial weighting power of the average (w_t ~ t^r).
        weight_lr_power: the average's weights are max(lr)^weight_lr_power (down-weights warmup).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, train_mode=True)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_betas(options["betas"])
        check_range("betas[0]", options["betas"][0], 0.0, low_open=True)  # eval() divides by it
        check_range("eps", options["eps"], 0.0)

    def interpolation(self, group):
        return group["betas"][0]

    def weight_decay_mode(self, group):
        return None  # decay at y joins the normalized direction u: done in update()

    def state_names(self, group):
        return ("exp_avg_sq",)

    def update(self, p, g, state, group, step):
        beta1, beta2 = group["betas"]
        lr, c = self.average_weight(state, group, step)
        z, exp_avg_sq = state["z"], state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = g.div(exp_avg_sq.div(bias_correction(beta2, step)).sqrt_().add_(group["eps"]))
        if group["weight_decay"] != 0:
            u.add_(p, alpha=group["weight_decay"])
        p.lerp_(z.to(p.dtype), c)  # p may be the float32 working copy of a bf16 parameter
        p.add_(u, alpha=lr * (beta1 * (1 - c) - 1))
        z.sub_(u, alpha=lr)


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-free SGD; same numbers as ``schedulefree.SGDScheduleFree``.

    u = g + wd * y (L2 at y); the averaging above with beta = momentum.

    Recommended: lr 1.0-10x the lr of SGD with momentum (e.g. 0.5-1.0 for small nets),
    momentum 0.9, warmup_steps ~5% of training; call ``train()``/``eval()``.

    Args:
        lr: learning rate.
        momentum: the interpolation beta between z and x (0 < momentum < 1).
        weight_decay: L2 weight decay, evaluated at y.
        warmup_steps: linear learning-rate warmup over this many steps.
        r: polynomial weighting power of the average (w_t ~ t^r).
        weight_lr_power: the average's weights are max(lr)^weight_lr_power (down-weights warmup).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        **options: Any,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, train_mode=True)
        super().__init__(params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("momentum", options["momentum"], 0.0, 1.0, low_open=True, high_open=True)

    def interpolation(self, group):
        return group["momentum"]

    def weight_decay_mode(self, group):
        return "l2"

    def update(self, p, g, state, group, step):
        lr, c = self.average_weight(state, group, step)
        z = state["z"]
        p.lerp_(z.to(p.dtype), c)  # p may be the float32 working copy of a bf16 parameter
        p.add_(g, alpha=lr * (group["momentum"] * (1 - c) - 1))
        z.sub_(g, alpha=lr)
