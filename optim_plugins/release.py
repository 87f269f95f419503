"""Gradient release: step each parameter inside backward and free its gradient at once.

    handle = op.release_gradients(model, optimizer)          # every optimizer parameter is hooked
    for batch in loader:
        loss_fn(model(batch)).backward()                       # steps happen here, grads are freed
        optimizer.step(); optimizer.zero_grad()                # no-ops while released (trainers call them)
        scheduler.step()                                       # still drives group["lr"]
    handle.remove()                                            # ordinary behaviour again

Each trainable tensor's ``register_post_accumulate_grad_hook`` runs when its gradient for
this backward is complete (after every use of the tensor in the graph), steps that one
tensor and sets ``p.grad = None``, so at most a few gradients are alive at a time instead
of all of them: the peak memory of the gradients drops from the model's size to about
its largest tensor.

* Our optimizers (``optim_plugins.optimizers.Optimizer``) are stepped through
  ``step_group(group, [p], [p.grad])``, the machinery's seam for stepping any subset: the
  same numbers as the ordinary step for every per-tensor update (bitwise with
  ``backend="reference"``; whole-tensor updates such as GaLore run per tensor anyway).
* Other ``torch.optim.Optimizer`` s (``torch.optim.AdamW`` ...) are stepped by running their
  own ``step`` on a one-parameter view of the group: the state and the group's
  hyper-parameters stay the optimizer's own, so ``state_dict`` and schedulers keep working
  (torch's tutorial builds one optimizer per parameter instead; that loses both).
  Optimizers whose step needs every parameter or a closure (``LBFGS``, SAM, schedule-free,
  Prodigy's global estimate, Lookahead) are refused.

While active, ``optimizer.step()`` and ``optimizer.zero_grad()`` are no-ops (a closure
passed to ``step`` is still evaluated, which is how Lightning runs backward), and anything
that needs every gradient at once cannot work: global-norm clipping is refused
(:meth:`GradientRelease.clip_grad_norm_`, :func:`check_max_grad_norm`). Clipping by value is
the handle's ``clip_value``. Gradient accumulation: see :data:`ACCUMULATION_SUPPORT`.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .optimizers.base import Optimizer as BaseOptimizer
from .optimizers.sgd import SGD

GLOBAL_NORM_HINT = (
    "gradient release steps each parameter as soon as its gradient exists, so no global gradient norm "
    "is ever available: turn global-norm clipping off (HF TrainingArguments(max_grad_norm=0) or "
    "--max_grad_norm 0; Lightning Trainer(gradient_clip_val=None); drop torch.nn.utils.clip_grad_norm_) "
    "or clip by value instead: release_gradients(..., clip_value=1.0)"
)

ACCUMULATION_SUPPORT = {
    "sgd": "momentum > 0 and nesterov=False: the momentum buffer is linear in the gradient and the "
           "update reads only the buffer, so micro-batch gradients are summed into it (no extra memory)",
}
"""Optimizers that accumulate gradients in their own state under release, and why.

Everything else is refused: Adam-family second moments (adam, adamw, nadam, radam, adamax,
adabelief, lamb, ...) are quadratic in the summed gradient, ``v = b2 v + (1 - b2) (g1 + ... + gk)^2``,
which needs the full sum, i.e. a gradient-sized buffer: exactly the memory that release saves
(use ordinary accumulation then). Plain SGD (momentum 0) has no state to sum into; Nesterov
SGD's update reads the gradient itself; sign- and normalised updates (Lion, signSGD, LARS,
factored and projected states) are non-linear in the gradient as well.
"""


class GradientRelease:
    """The handle :func:`release_gradients` returns; ``remove()`` restores ordinary training.

    Attributes:
        clip_value: clamp each gradient to ``[-clip_value, clip_value]`` before its step (None: off).
        accumulation_steps: micro-batches summed per optimizer step (see ``ACCUMULATION_SUPPORT``).
        skipped: parameter steps skipped for non-finite gradients (``nonfinite="skip"``).
    """

    def __init__(self, model: nn.Module | Iterable[Tensor] | None, optimizer: torch.optim.Optimizer, *,
                 clip_value: float | None = None, accumulation_steps: int = 1):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"release_gradients needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clip_value is not None and (isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)) or clip_value <= 0):
            raise ValueError(f"invalid clip_value: {clip_value!r} (expected a number > 0, or None)")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"invalid accumulation_steps: {accumulation_steps!r} (expected an integer >= 1)")
        if getattr(optimizer, "_gradient_release", None) is not None:
            raise RuntimeError("gradients of this optimizer are already released: remove() the first handle")
        _check_steppable(optimizer)
        if accumulation_steps > 1:
            _check_accumulation(optimizer)
        self.optimizer = optimizer
        self.clip_value = clip_value
        self.accumulation_steps = accumulation_steps
        self.skipped = 0
        self._micro: dict[Tensor, int] = {}
        self._group_of: dict[Tensor, dict] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._group_of[p] = group
        if model is not None:
            model_params = set(model.parameters() if isinstance(model, nn.Module) else model)
            foreign = [p for p in self._group_of if p not in model_params]
            if foreign:
                raise ValueError(
                    f"the optimizer holds {len(foreign)} tensor(s) (first of shape {tuple(foreign[0].shape)}) that are not "
                    "parameters of the model given to release_gradients"
                )
        self._tracked = [p for p in self._group_of if p.requires_grad]
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in self._tracked]
        self._saved = {name: optimizer.__dict__[name] for name in ("step", "zero_grad") if name in optimizer.__dict__}
        optimizer.step = _marked(types.MethodType(_released_step, optimizer))
        optimizer.zero_grad = types.MethodType(_released_zero_grad, optimizer)
        optimizer._gradient_release = self
        self.active = True

    # ------------------------------------------------------------------ public

    def remove(self) -> None:
        """Remove the hooks and give ``step`` / ``zero_grad`` back; safe to call twice."""
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        opt = self.optimizer
        for name in ("step", "zero_grad"):
            opt.__dict__.pop(name, None)
            if name in self._saved:
                opt.__dict__[name] = self._saved[name]
        opt._gradient_release = None
        self.active = False

    def clip_grad_norm_(self, *args: Any, **kwargs: Any):
        """Refused: no global norm exists under gradient release (the error says how to turn it off)."""
        raise RuntimeError(f"clip_grad_norm_ is not possible with gradient release: {GLOBAL_NORM_HINT}")

    def __enter__(self) -> GradientRelease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ------------------------------------------------------------------ the hook

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if p.grad is None:
            return
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"gradient release does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        if self.clip_value is not None:
            grad.clamp_(-self.clip_value, self.clip_value)
        group = self._group_of[p]
        if self._nonfinite(p, grad, group):
            p.grad = None
            return
        if self.accumulation_steps > 1:
            micro = self._micro.get(p, 0) + 1
            self._micro[p] = micro % self.accumulation_steps
            if micro < self.accumulation_steps:
                _accumulate_sgd(self.optimizer, p, grad, group)
                p.grad = None
                return
            grad = _last_micro_batch_sgd(self.optimizer, p, grad, group)
        self._step(p, grad, group)
        p.grad = None

    def _nonfinite(self, p: Tensor, grad: Tensor, group: dict) -> bool:
        policy = group.get("nonfinite", "propagate") if isinstance(self.optimizer, BaseOptimizer) else "propagate"
        if policy == "propagate" or bool(torch.isfinite(grad).all()):
            return False
        if policy == "raise":
            raise FloatingPointError(
                f"{type(self.optimizer).__name__}: non-finite gradient (NaN/Inf) in a parameter of shape {tuple(p.shape)} "
                "(nonfinite='raise'; under gradient release the parameters stepped earlier in this backward keep their step)"
            )
        self.skipped += 1  # "skip": under release only this parameter's step can be skipped
        return True

    def _step(self, p: Tensor, grad: Tensor, group: dict) -> None:
        opt = self.optimizer
        if isinstance(opt, BaseOptimizer):
            opt.step_group(group, [p], [grad])
            return
        view = {**group, "params": [p]}
        groups = opt.param_groups
        opt.param_groups = [view]
        try:
            _unwrapped(type(opt).step)(opt)
        finally:
            opt.param_groups = groups
        for key, value in view.items():  # an optimizer that writes group keys keeps them
            if key != "params":
                group[key] = value


def release_gradients(
    model: nn.Module | Iterable[Tensor] | None,
    optimizer: torch.optim.Optimizer,
    *,
    clip_value: float | None = None,
    accumulation_steps: int = 1,
) -> GradientRelease:
    """Step every parameter of ``optimizer`` inside backward and free its gradient; returns the handle.

    Args:
        model: the model (or its parameters) whose gradients are released; every tensor the
            optimizer holds must belong to it. None: take the optimizer's tensors as they are.
        optimizer: one of ours, or a ``torch.optim.Optimizer`` whose step is per parameter.
        clip_value: clamp each gradient element to ``[-clip_value, clip_value]`` first.
        accumulation_steps: sum this many backward passes per optimizer step (only where the
            optimizer's state can hold the sum: see ``ACCUMULATION_SUPPORT``).
    """
    return GradientRelease(model, optimizer, clip_value=clip_value, accumulation_steps=accumulation_steps)


def check_max_grad_norm(max_grad_norm: float | None, setting: str = "max_grad_norm") -> None:
    """For integrations: refuse a trainer's global-norm clipping while gradients are released.

    HF's ``TrainingArguments.max_grad_norm`` defaults to 1.0, Lightning's ``gradient_clip_val``
    (with the default "norm" algorithm) is the same thing: ``None`` or 0 pass, anything else raises.
    """
    if max_grad_norm is None or max_grad_norm == 0:
        return
    raise ValueError(f"{setting}={max_grad_norm!r} clips by the global gradient norm, which {GLOBAL_NORM_HINT}")


def is_released(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s gradients are released now (for integrations)."""
    return getattr(optimizer, "_gradient_release", None) is not None


# ----------------------------------------------------------------------------- helpers


def _released_step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """``optimizer.step`` while released: the parameters were stepped in backward; a closure still runs."""
    self._opt_called = True  # what torch's LR schedulers check to warn about the call order
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _marked(step: Callable) -> Callable:
    """``step`` as torch's LR schedulers mark the step they track (it sets ``_opt_called`` itself), so a
    scheduler built before the release does not warn that ``optimizer.step`` was overridden."""

    @functools.wraps(step)
    def released(*args: Any, **kwargs: Any) -> Any:
        return step(*args, **kwargs)

    released._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return released


def _released_zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    """``optimizer.zero_grad`` while released: gradients are already freed."""


def _unwrapped(step: Callable) -> Callable:
    # torch wraps Optimizer.step to run the step hooks; one parameter's step is not "a step" for them
    return getattr(step, "__wrapped__", step)


def overrides_step(cls: type) -> bool:
    """Whether a subclass of our base writes its own ``step`` or a whole-optimizer ``prepare_step`` pass
    (torch wraps ``step`` per class: compare unwrapped)."""
    for method in ("step", "prepare_step"):
        base = inspect.unwrap(BaseOptimizer.__dict__[method])
        for klass in cls.__mro__:
            if klass is BaseOptimizer:
                break
            if method in klass.__dict__ and inspect.unwrap(klass.__dict__[method]) is not base:
                return True
    return False


_SPLITTABLE_TORCH = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adamax,
    torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop, torch.optim.ASGD,
    torch.optim.Adadelta, torch.optim.Adafactor,
)


def _check_steppable(optimizer: torch.optim.Optimizer) -> None:
    name = type(optimizer).__name__
    if isinstance(optimizer, BaseOptimizer):
        caps = type(optimizer).capabilities
        overrides = overrides_step(type(optimizer))
        if caps.needs_closure or overrides and not getattr(type(optimizer), "release_safe", False):
            why = "needs a closure (it evaluates the loss more than once)" if caps.needs_closure else \
                "has its own step() (state shared across parameters), which cannot be split per parameter"
            raise ValueError(f"gradient release cannot drive {name}: it {why}")
        return
    if isinstance(optimizer, _SPLITTABLE_TORCH):
        return
    raise ValueError(
        f"gradient release cannot drive {name}: only optimizers whose step is independent per parameter are "
        f"supported (optim_plugins optimizers, or torch's {', '.join(c.__name__ for c in _SPLITTABLE_TORCH)})"
    )


def _check_accumulation(optimizer: torch.optim.Optimizer) -> None:
    name = type(optimizer).__name__
    if type(optimizer) is SGD:
        bad = [g for g in optimizer.param_groups if g["momentum"] <= 0 or g["nesterov"]]
        if not bad:
            return
        raise ValueError(
            f"accumulation_steps > 1 under gradient release needs SGD with momentum > 0 and nesterov=False "
            f"(got momentum={bad[0]['momentum']!r}, nesterov={bad[0]['nesterov']!r}): micro-batch gradients are summed "
            "into the momentum buffer"
        )
    raise ValueError(
        f"accumulation_steps > 1 is not supported for {name} under gradient release: its state cannot hold the sum "
        "of micro-batch gradients (Adam-like second moments are quadratic in the summed gradient, which would need "
        "a gradient-sized buffer, i.e. the memory release saves). Supported: "
        + "; ".join(f"{k}: {v}" for k, v in ACCUMULATION_SUPPORT.items())
        + ". Use accumulation_steps=1, or ordinary gradient accumulation without release."
    )


@torch.no_grad()
def _accumulate_sgd(optimizer: SGD, p: Tensor, grad: Tensor, group: dict) -> None:
    """Sum a micro-batch gradient into SGD's momentum buffer so that the final ordinary step is exact.

    SGD's step is ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` at its first step),
    then ``p -= lr * buf``. The micro-batch sum ``S = g_1 + ... + g_{k-1}`` is added to the buffer
    beforehand as ``buf += c * S`` with ``c = (1 - dampening) / momentum`` (negated for
    ``maximize``, as the machinery negates ``g_k``), so the ordinary step on ``g_k`` gives exactly
    the step on ``S + g_k``; weight decay and lr are read once, at that step. Before SGD's first
    step the buffer is zero and simply holds S, and that step gets ``S + g_k``
    (:func:`_last_micro_batch_sgd`).
    """
    state = optimizer._state_of(p, group)  # the machinery's lazy state init (zero buffer, step 0)
    buf = state["momentum_buffer"]
    if float(state["step"]) == 0:
        buf.add_(grad.to(buf.dtype))
        return
    coefficient = (1 - group["dampening"]) / group["momentum"]
    buf.add_(grad.to(buf.dtype), alpha=-coefficient if group["maximize"] else coefficient)


def _last_micro_batch_sgd(optimizer: SGD, p: Tensor, grad: Tensor, group: dict) -> Tensor:
    state = optimizer.state.get(p)
    if state and float(state["step"]) == 0:
        return grad + state["momentum_buffer"].to(grad.dtype)
    return grad


__all__ = ["ACCUMULATION_SUPPORT", "GradientRelease", "check_max_grad_norm", "is_released", "release_gradients"]
