"""Schedules that adapt to the run: ``plateau``, ``loss_trend`` and the MaxFactor seed's ``adaptive``.

* ``plateau``: torch's ``ReduceLROnPlateau`` (a subclass, so trainers pass it a metric)
  with a linear warmup that follows the optimizer's own steps.
* ``loss_trend``: reduces the lr when an exponential moving average of the training loss
  stops falling; the decision is ReduceLROnPlateau's, taken every step on the EMA.
* ``adaptive``: the seed's ``AdaptiveSchedule``: the lr the optimizer reports through
  ``_get_lr(group, state)``, with a warmup.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .base import check_number, check_steps, warmup_factor


class Plateau(ReduceLROnPlateau):
    """Reduce the lr when a metric stops improving (torch's ``ReduceLROnPlateau``), after a warmup.

    ``step(metric)`` is ReduceLROnPlateau's step; ``step()`` without a metric does nothing,
    so a loop that calls ``step()`` every batch is harmless. The warmup counts the
    optimizer's own steps (a step post-hook, so it advances in the HF Trainer, which steps
    a ReduceLROnPlateau only at evaluation, and skipped fp16 steps do not count): the lr is
    ``base_lr * k / num_warmup_steps`` after k optimizer steps. Metrics reported during the
    warmup are ignored. With ``num_warmup_steps=0`` it is exactly ReduceLROnPlateau (and
    therefore transformers' ``reduce_lr_on_plateau``, registered as an alias).

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0.
        mode: "min" (reduce when the metric stops falling) or "max".
        factor: the lr is multiplied by factor at each reduction, in (0, 1).
        patience: evaluations without improvement before a reduction.
        threshold: least change that counts as an improvement.
        threshold_mode: "rel" (relative to the best) or "abs".
        cooldown: evaluations to wait after a reduction before counting again.
        min_lr: lower bound on the lr (one value, or one per param group).
        eps: reductions smaller than eps are skipped.
    """

    aliases = ("reduce_lr_on_plateau",)

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 mode: Literal["min", "max"] = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: Literal["rel", "abs"] = "rel", cooldown: int = 0,
                 min_lr: float | list[float] = 0.0, eps: float = 1e-8):
        self.num_warmup_steps = check_steps("num_warmup_steps", num_warmup_steps)
        check_number("factor", factor, 0.0, 1.0, low_open=True, high_open=True)
        check_steps("patience", patience)
        check_steps("cooldown", cooldown)
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is not one of ['min', 'max']")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode={threshold_mode!r} is not one of ['rel', 'abs']")
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr, eps=eps)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.warmup_step = 0
        self._hook = None
        if self.num_warmup_steps > 0:
            self._set_warmup_lrs()
            self_ref = weakref.ref(self)

            def after_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
                scheduler = self_ref()
                if scheduler is not None and scheduler.warmup_step < scheduler.num_warmup_steps:
                    scheduler.warmup_step += 1
                    scheduler._set_warmup_lrs()

            self._hook = optimizer.register_step_post_hook(after_optimizer_step)

    def _set_warmup_lrs(self) -> None:
        factor = warmup_factor(self.warmup_step, self.num_warmup_steps) if self.warmup_step < self.num_warmup_steps else 1.0
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    @property
    def in_warmup(self) -> bool:
        return self.warmup_step < self.num_warmup_steps

    def step(self, metrics: Any = None, epoch: int | None = None) -> None:  # type: ignore[override]
        """Reduce-on-plateau step with ``metrics``; without a metric, nothing happens."""
        if metrics is None:
            return
        if self.in_warmup:
            self.last_epoch += 1
            return
        super().step(metrics, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().state_dict().items() if key != "_hook"}


class LossTrend(LRScheduler):
    """Reduce the lr when an exponential moving average of the training loss stops falling.

    Give it the loss each step, ``scheduler.step(loss)`` or ``scheduler.observe(loss)``
    before a plain ``step()`` (as a trainer calls it). On each step with a new loss:

    1. ``ema = beta * ema + (1 - beta) * loss``, debiased: ``ema / (1 - beta**n)``;
    2. after the warmup, the debiased EMA is judged as ReduceLROnPlateau judges a metric:
       it improves when below ``best - threshold * |best|``; after more than ``patience``
       steps without improvement the lr is multiplied by ``factor`` (not below
       ``min_lr_ratio`` of the base lr), then ``cooldown`` steps are not counted.

    The lr is ``base_lr * warmup(step) * scale``, ``scale`` being the product of the
    reductions. Non-finite losses are ignored. Steps without a loss leave the trend as is.
    It cannot tell noise from a plateau faster than its EMA horizon (about ``1 / (1 - beta)``
    steps): keep ``patience`` larger than that.

    Args:
        num_warmup_steps: optimizer steps of the linear warmup from 0 (the EMA is tracked, no reductions).
        beta: EMA coefficient of the loss, in [0, 1).
        patience: steps with a loss and no improvement of the EMA before a reduction.
        factor: the lr is multiplied by factor at each reduction, in (0, 1).
        threshold: least relative fall of the EMA that counts as an improvement.
        cooldown: steps after a reduction during which no new reduction is counted.
        min_lr_ratio: lower bound of the lr as a fraction of the base lr, in [0, 1].
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0, beta: float = 0.98,
                 patience: int = 250, factor: float = 0.5, threshold: float = 1e-3, cooldown: int = 0,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        self.num_warmup_steps = check_steps("num_warmup_steps", num_warmup_steps)
        self.beta = check_number("beta", beta, 0.0, 1.0, high_open=True)
        self.patience = check_steps("patience", patience)
        self.factor = check_number("factor", factor, 0.0, 1.0, low_open=True, high_open=True)
        self.threshold = check_number("threshold", threshold, 0.0)
        self.cooldown = check_steps("cooldown", cooldown)
        self.min_lr_ratio = check_number("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        self.scale, self.ema, self.num_losses = 1.0, 0.0, 0
        self.best, self.bad_steps, self.cooldown_counter = math.inf, 0, 0
        self.pending_loss: float | None = None
        super().__init__(optimizer, last_epoch)

    def observe(self, loss: float | torch.Tensor) -> None:
        """Record the loss of the current step (a tensor is read with ``float``: a host sync)."""
        self.pending_loss = float(loss)

    def step(self, loss: float | torch.Tensor | None = None) -> None:  # type: ignore[override]
        if loss is not None:
            self.observe(loss)
        if self.pending_loss is not None:
            self._update_trend(self.pending_loss, step=self.last_epoch + 1)
            self.pending_loss = None
        super().step()

    @property
    def smoothed_loss(self) -> float:
        """The debiased EMA of the loss (nan before the first loss)."""
        return self.ema / (1.0 - self.beta**self.num_losses) if self.num_losses else math.nan

    def _update_trend(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            return
        self.num_losses += 1
        self.ema = self.beta * self.ema + (1.0 - self.beta) * loss
        if step < self.num_warmup_steps:
            return
        current = self.smoothed_loss
        if self.best == math.inf or current < self.best - self.threshold * abs(self.best):
            self.best, self.bad_steps = current, 0
        else:
            self.bad_steps += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.bad_steps = 0
        if self.bad_steps > self.patience:
            self.scale = max(self.scale * self.factor, self.min_lr_ratio)
            self.cooldown_counter, self.bad_steps = self.cooldown, 0

    def get_lr(self) -> list[float | torch.Tensor]:
        step = self.last_epoch
        factor = warmup_factor(step, self.num_warmup_steps) if step < self.num_warmup_steps else 1.0
        return [base_lr * factor * self.scale for base_lr in self.base_lrs]


class AdaptiveSchedule(LRScheduler):
    """The MaxFactor seed's schedule: the lr the optimizer computes itself, with a warmup.

    Each step, a group's lr is ``optimizer._get_lr(group, state)`` for the group's first
    parameter that has optimizer state (the base lr while there is none, or when the
    optimizer has no ``_get_lr``), times ``max(0.001, step / num_warmup_steps)`` during the
    warmup. The base lr is ``initial_lr`` when it is > 0, else the group's lr.

    Differences from the seed, on purpose: the seed squared ``initial_lr`` in its fallback,
    dropped groups without gradients (shifting the others' lrs), needed gradients present
    at ``step()`` and deleted ``initial_lr`` from the groups (which broke resuming). It
    cannot know an optimizer's internal lr except through ``_get_lr``.

    Args:
        initial_lr: base lr of every group when > 0 (0 keeps each group's lr).
        num_warmup_steps: optimizer steps of the warmup (factor max(0.001, step / warmup)).
        decay_factor: accepted for the seed's signature; the seed never used it, nor does this.
        warmup_steps: the seed's name for num_warmup_steps.
        last_epoch: index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float = 0.0, num_warmup_steps: int = 0,
                 decay_factor: float = 0.1, warmup_steps: int | None = None, last_epoch: int = -1):
        if warmup_steps is not None:
            if num_warmup_steps not in (0, warmup_steps):
                raise ValueError(f"warmup_steps={warmup_steps!r} and num_warmup_steps={num_warmup_steps!r} disagree")
            num_warmup_steps = warmup_steps
        self.num_warmup_steps = check_steps("num_warmup_steps", num_warmup_steps)
        self.initial_lr = check_number("initial_lr", initial_lr, 0.0)
        self.decay_factor = float(decay_factor)
        if last_epoch == -1 and self.initial_lr > 0:
            for group in optimizer.param_groups:
                group["initial_lr"] = self.initial_lr
        super().__init__(optimizer, last_epoch)

    def _reported_lr(self, group: dict[str, Any]) -> float | None:
        get_lr = getattr(self.optimizer, "_get_lr", None)
        if get_lr is None:
            return None
        for p in group["params"]:
            state = self.optimizer.state.get(p)
            if state:
                return float(get_lr(group, state))
        return None

    def get_lr(self) -> list[float | torch.Tensor]:
        step = self.last_epoch
        warm = max(0.001, step / self.num_warmup_steps) if step < self.num_warmup_steps else 1.0
        lrs = []
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            reported = self._reported_lr(group)
            lrs.append((base_lr if reported is None else reported) * warm)
        return lrs
