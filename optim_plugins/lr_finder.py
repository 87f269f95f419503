"""Learning-rate range test (Smith, 2017; the fastai "lr finder"): ``lr_find``.

Train for ``num_steps`` batches while the lr grows from ``start_lr`` to ``end_lr``
(geometrically by default), record the loss, stop when it diverges, and suggest the lr
where the smoothed loss falls fastest. The model's parameters and buffers, the
optimizer's state (lrs included), the model's train/eval mode and torch's CPU random
state are restored afterwards, whatever happens. It cannot restore other side effects
of ``loss_fn`` or of the data iterator (a consumed generator stays consumed), nor the
CUDA random state.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import nn


@dataclass
class LRFindResult:
    """What ``lr_find`` measured: one entry per step taken.

    ``suggested_lr`` is the lr of the steepest fall of the smoothed loss (per log lr)
    before its minimum; ``None`` when fewer than 3 steps ran before divergence.
    ``min_loss_lr`` is the lr of the smallest smoothed loss (a common rule picks a tenth of it).
    """

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggested_lr: float | None
    min_loss_lr: float | None
    diverged: bool


def _lr_at(step: int, num_steps: int, start_lr: float, end_lr: float, mode: str) -> float:
    fraction = step / max(1, num_steps - 1)
    if mode == "exp":
        return start_lr * (end_lr / start_lr) ** fraction
    return start_lr + (end_lr - start_lr) * fraction


def _suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    if not smoothed:
        return None, None
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    if best < 2:
        return None, lrs[best]
    slopes = [(smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(best)]
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[steepest], lrs[best]


def _loss_of(model: nn.Module, loss_fn: Callable, batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        return loss_fn(model(inputs), targets)
    return loss_fn(model, batch)


def lr_find(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Iterable[Any],
    optimizer: str | torch.optim.Optimizer = "adamw",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    mode: Literal["exp", "linear"] = "exp",
    beta: float = 0.98,
    diverge_threshold: float = 4.0,
    optimizer_options: Mapping[str, Any] | None = None,
) -> LRFindResult:
    """Run an lr range test on ``model`` and restore it (and the optimizer) afterwards.

    Args:
        model: the model to train briefly; its parameters and buffers are restored.
        loss_fn: for a batch ``(inputs, targets)``: ``loss_fn(model(inputs), targets)``;
            for any other batch: ``loss_fn(model, batch)``; returns a scalar loss.
        data: an iterable of batches (a DataLoader); iterated again when exhausted.
        optimizer: a registry name (built with ``create_optimizer(name, model, **optimizer_options)``)
            or an optimizer over the model's parameters, whose state is restored. With several
            param groups, each group's lr keeps its ratio to the largest; the lrs reported are the largest.
        start_lr: lr of the first step (> 0).
        end_lr: lr of the last step (> start_lr).
        num_steps: number of steps (batches), at least 2.
        mode: "exp" (geometric lrs, the usual) or "linear".
        beta: EMA coefficient for the smoothed, bias-corrected loss, in [0, 1).
        diverge_threshold: stop when the smoothed loss exceeds this many times its minimum
            (or the loss is not finite).
        optimizer_options: options for an optimizer built by name.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr!r}, end_lr={end_lr!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if mode not in ("exp", "linear"):
        raise ValueError(f"mode={mode!r} is not one of ['exp', 'linear']")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not diverge_threshold > 1:
        raise ValueError(f"diverge_threshold must be > 1, got {diverge_threshold!r}")
    if isinstance(optimizer, str):
        from . import create_optimizer  # at call time: the package face imports this module

        optimizer = create_optimizer(optimizer, model, **dict(optimizer_options or {}))
    elif optimizer_options:
        raise ValueError("optimizer_options apply only to an optimizer given by name")

    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    rng_state = torch.get_rng_state()
    top = max(float(group["lr"]) for group in optimizer.param_groups)
    ratios = [float(group["lr"]) / top if top > 0 else 1.0 for group in optimizer.param_groups]

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged = False
    try:
        model.train()
        batches = _cycle(data)
        ema, best = 0.0, math.inf
        for step in range(num_steps):
            lr = _lr_at(step, num_steps, start_lr, end_lr, mode)
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            optimizer.zero_grad(set_to_none=True)
            loss = _loss_of(model, loss_fn, next(batches))
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            ema = beta * ema + (1 - beta) * value
            average = ema / (1 - beta ** (step + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(average)
            if not math.isfinite(average) or average > diverge_threshold * best:
                diverged = True
                break
            best = min(best, average)
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        model.train(was_training)
        torch.set_rng_state(rng_state)
    considered = smoothed[:-1] if diverged else smoothed
    suggested, at_min = _suggest(lrs[: len(considered)], considered)
    return LRFindResult(lrs, losses, smoothed, suggested, at_min, diverged)


def _cycle(data: Iterable[Any]):
    """The batches of ``data``, starting over when it is exhausted; an empty ``data`` raises."""
    for epoch in itertools.count():
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: data yielded no batch" + (" on a new pass (a one-shot iterator?)" if epoch else ""))
