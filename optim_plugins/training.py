"""Step mechanics for a plain PyTorch (or accelerate) loop: loss scaling, accumulation, clipping, guards.

    runner = op.training.StepRunner(optimizer, scheduler, precision="fp16", accumulation_steps=4,
                                    max_grad_norm=1.0, model=model)
    for batch in loader:
        with runner.autocast():
            loss = model(batch).loss
        runner.backward(loss)
        result = runner.step()          # truthy only when the optimizer stepped
        if result:
            log(lr=scheduler.get_last_lr()[0], grad_norm=result.grad_norm)

What happens at an accumulation boundary, in this order:

1. token normalisation (``normalize="tokens"``): gradients divided by the tokens of the window;
2. ``GradScaler.unscale_`` (``precision="fp16"`` or an explicit ``scaler``; bf16 and fp32 use none);
3. the total gradient norm (before clipping; what ``StepResult.grad_norm`` reports);
4. the non-finite guard (``nan_guard``): without a scaler, a NaN/Inf gradient raises
   ``FloatingPointError`` naming the parameter(s) and the step, or skips the step;
5. clipping: adaptive (AGC, unit-wise), by value, by norm (torch's ``clip_grad_*`` functions);
6. ``optimizer.step()`` (through ``GradScaler.step``, which skips it on overflow), ``scaler.update()``;
7. ``scheduler.step()`` only when the optimizer stepped: a skipped step does not advance the
   schedule (schedules count optimizer steps);
8. ``optimizer.zero_grad(set_to_none=True)``.

Nothing here knows a trainer; the math is torch's (``GradScaler``, ``clip_grad_norm_``,
``clip_grad_value_``) except AGC, which torch lacks.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from .registry import Capabilities

Precision = Literal["fp32", "fp16", "bf16"]
_PRECISION_ALIASES = {
    "fp32": "fp32", "32": "fp32", "32-true": "fp32", "no": "fp32", "float32": "fp32", None: "fp32",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "float16": "fp16",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
}


# ----------------------------------------------------------------------------- capabilities


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Lightning's ``LightningOptimizer`` / accelerate's ``AcceleratedOptimizer``."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "_optimizer", None)  # LightningOptimizer
        if inner is None and type(optimizer).__name__ == "AcceleratedOptimizer":
            inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def capabilities_of(optimizer: Any) -> Capabilities:
    """Capability flags of an optimizer object: its ``capabilities`` attribute, else its registry
    entry (matched by class), else the defaults (a plain ``torch.optim`` optimizer needs nothing)."""
    optimizer = unwrap_optimizer(optimizer)
    caps = getattr(optimizer, "capabilities", None)
    if isinstance(caps, Capabilities):
        return caps
    from .registry import OPTIMIZERS

    try:
        specs = OPTIMIZERS._load().values()
    except RuntimeError:  # not installed: no registry to ask
        specs = ()
    for spec in specs:
        if spec.factory is type(optimizer):
            return spec.capabilities
    return Capabilities()


def optimizer_name(optimizer: Any) -> str:
    return type(unwrap_optimizer(optimizer)).__name__


# ----------------------------------------------------------------------------- clipping


def _unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit: whole tensor for 0/1-dim, else over every dim but the first (PyTorch layout)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (AGC; Brock et al. 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization", Sec. 4.1), unit-wise, in place.

    For each unit ``i`` (a row of a weight: an output unit; a whole bias or gain vector):
    ``G_i <- G_i * clip_factor * max(||W_i||, eps) / ||G_i||`` where
    ``||G_i|| / max(||W_i||, eps) > clip_factor``, else unchanged. The paper does not clip the
    final classifier layer: leave it out of ``parameters`` (``StepRunner(agc_exclude=...)``).
    """
    if clip_factor <= 0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor!r}")
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad
        max_norm = _unitwise_norm(p.detach()).clamp(min=eps).mul_(clip_factor)
        g_norm = _unitwise_norm(g)
        scale = max_norm / g_norm.clamp(min=1e-6)
        g.copy_(torch.where(g_norm > max_norm, g * scale, g))


def total_grad_norm(grads: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Total norm of ``grads`` as one vector (torch's ``get_total_norm``; no clipping)."""
    if not grads:
        return torch.tensor(0.0)
    get_total_norm = getattr(nn.utils, "get_total_norm", None)
    if get_total_norm is not None:  # torch >= 2.6
        return get_total_norm(grads, norm_type=norm_type)
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), norm_type)


# ----------------------------------------------------------------------------- the runner


@dataclass
class StepResult:
    """What :meth:`StepRunner.step` did. Truthy only when the optimizer stepped.

    ``accumulating``: not an accumulation boundary (nothing was done); ``skipped``: why a boundary
    did not step (``"overflow"`` = GradScaler found Inf/NaN, ``"nonfinite"`` = the NaN guard);
    ``grad_norm``: total norm of the unscaled gradients before clipping (``None`` while accumulating);
    ``scale``: the loss scale used for this step (``None`` without a scaler).
    """

    stepped: bool
    accumulating: bool = False
    skipped: str | None = None
    grad_norm: float | None = None
    scale: float | None = None
    optimizer_step: int = 0
    report: str | None = None

    def __bool__(self) -> bool:
        return self.stepped


class StepRunner:
    """Loss scaling, gradient accumulation, clipping and guards around ``optimizer.step()``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (ours or torch's).
        scheduler: a schedule stepped once per optimizer step that happened (``None``: none).
            A ``ReduceLROnPlateau`` is left to you (it needs a metric).
        precision: "fp32", "bf16" (autocast, no loss scaling) or "fp16" (autocast + a dynamic
            ``torch.amp.GradScaler`` on the parameters' device; on CPU too). Lightning spellings
            ("16-mixed", "bf16-mixed", "32-true") are accepted.
        scaler: your own ``GradScaler`` (implies loss scaling whatever ``precision`` says).
        accumulation_steps: micro-batches per optimizer step.
        normalize: how accumulated micro-batch losses are combined: "mean" (each loss is
            divided by ``accumulation_steps``: right when micro-batches are equal), "tokens"
            (pass ``backward(loss, num_tokens=n)`` with a per-token mean ``loss``; the step uses
            the mean over every token of the window, right for uneven micro-batches) or "sum"
            (losses are added as they are).
        max_grad_norm: clip the total gradient norm to this (``clip_grad_norm_``); ``None``: no.
        norm_type: the norm of ``max_grad_norm`` and of the reported ``grad_norm``.
        clip_value: clamp every gradient element to ``[-clip_value, clip_value]``; ``None``: no.
        agc_clip_factor: adaptive gradient clipping factor (``adaptive_clip_grad_``); ``None``: no.
        agc_eps: AGC's floor on the weight norm.
        agc_exclude: regexes of parameter names (needs ``model``) that AGC leaves alone, e.g. the
            final classifier as in the paper.
        nan_guard: non-finite gradients without a scaler: "raise" (``FloatingPointError`` naming
            the parameters and the step), "skip" (warn, skip the optimizer and the schedule) or
            None (step anyway, torch's behaviour). With a scaler an overflow is normal and
            skipped silently; ``max_overflow_skips`` consecutive skips raise (with "raise") as
            that is a NaN the scale cannot fix.
        max_overflow_skips: see ``nan_guard``.
        model: gives parameter names to the reports and to ``agc_exclude``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        precision: str | None = "fp32",
        scaler: torch.amp.GradScaler | None = None,
        accumulation_steps: int = 1,
        normalize: Literal["mean", "tokens", "sum"] = "mean",
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        agc_clip_factor: float | None = None,
        agc_eps: float = 1e-3,
        agc_exclude: Sequence[str] = (),
        nan_guard: Literal["raise", "skip"] | None = "raise",
        max_overflow_skips: int = 25,
        model: nn.Module | None = None,
    ):
        if precision not in _PRECISION_ALIASES:
            raise ValueError(f"precision must be one of 'fp32', 'bf16', 'fp16', got {precision!r}")
        self.precision: Precision = _PRECISION_ALIASES[precision]  # type: ignore[assignment]
        if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if normalize not in ("mean", "tokens", "sum"):
            raise ValueError(f"normalize must be 'mean', 'tokens' or 'sum', got {normalize!r}")
        if nan_guard not in ("raise", "skip", None):
            raise ValueError(f"nan_guard must be 'raise', 'skip' or None, got {nan_guard!r}")
        for name, value in (("max_grad_norm", max_grad_norm), ("clip_value", clip_value), ("agc_clip_factor", agc_clip_factor)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
        if agc_exclude and model is None:
            raise ValueError("agc_exclude matches parameter names: pass model=... as well")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation_steps = accumulation_steps
        self.normalize = normalize
        self.max_grad_norm = max_grad_norm
        self.norm_type = float(norm_type)
        self.clip_value = clip_value
        self.agc_clip_factor = agc_clip_factor
        self.agc_eps = agc_eps
        self.agc_exclude = [re.compile(p) for p in agc_exclude]
        self.nan_guard = nan_guard
        self.max_overflow_skips = max_overflow_skips
        self.model = model
        self.device_type = self._device_type()
        if scaler is None and self.precision == "fp16":
            scaler = torch.amp.GradScaler(self.device_type)
        self.scaler = scaler
        caps = capabilities_of(optimizer)
        if caps.needs_closure:
            raise ValueError(
                f"{optimizer_name(optimizer)} needs a closure (it evaluates the loss twice per step), which "
                "StepRunner cannot give it: call optimizer.step(closure) yourself, without loss scaling or accumulation"
            )
        self.micro_step = 0          # micro-batches since the last boundary
        self.optimizer_steps = 0     # optimizer steps that happened
        self.skipped_steps = 0       # boundaries that did not step (overflow or NaN guard)
        self.consecutive_skips = 0
        self._tokens = 0
        self.last_result: StepResult | None = None

    # ------------------------------------------------------------------ helpers

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _device_type(self) -> str:
        params = self._params()
        return params[0].device.type if params else "cpu"

    def _names(self) -> dict[int, str]:
        names = {}
        if self.model is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                names.setdefault(id(p), f"param_groups[{gi}]['params'][{pi}]")
        return names

    @property
    def is_boundary(self) -> bool:
        """Whether the next :meth:`step` is an optimizer step (the window is full)."""
        return self.micro_step >= self.accumulation_steps

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for fp16/bf16 on the parameters' device; a no-op for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device_type, dtype=dtype)

    # ------------------------------------------------------------------ the loop

    def backward(self, loss: Tensor, num_tokens: int | Tensor | None = None, **backward_kwargs: Any) -> None:
        """Back-propagate one micro-batch: normalised for accumulation, scaled for fp16."""
        if self.normalize == "tokens":
            if num_tokens is None:
                raise ValueError("normalize='tokens': pass backward(loss, num_tokens=...) with the micro-batch's token count")
            n = int(num_tokens)
            if n < 0:
                raise ValueError(f"num_tokens must be >= 0, got {n}")
            self._tokens += n
            loss = loss * n  # per-token mean -> sum; divided by the window's tokens at the step
        elif self.normalize == "mean" and self.accumulation_steps > 1:
            loss = loss / self.accumulation_steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward(**backward_kwargs)
        self.micro_step += 1

    def step(self, force: bool = False) -> StepResult:
        """Call after each :meth:`backward`. At an accumulation boundary (or with ``force``, e.g.
        for a shorter last window) unscale, guard, clip, step the optimizer and (only then) the
        schedule, and zero the gradients. Returns a :class:`StepResult`, truthy iff the optimizer stepped."""
        if self.micro_step == 0:
            raise RuntimeError("StepRunner.step() without a backward() since the last step")
        if not (force or self.is_boundary):
            self.last_result = StepResult(False, accumulating=True, optimizer_step=self.optimizer_steps)
            return self.last_result
        try:
            result = self._boundary()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.micro_step = 0
            self._tokens = 0
        self.last_result = result
        return result

    def _boundary(self) -> StepResult:
        params = self._params()
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        if self.normalize == "tokens" and grads:
            if self._tokens == 0:
                raise ValueError("normalize='tokens': the accumulation window had 0 tokens")
            torch._foreach_mul_(grads, 1.0 / self._tokens)
        scale = None
        if self.scaler is not None:
            scale = float(self.scaler.get_scale())
            self.scaler.unscale_(self.optimizer)
        norm = total_grad_norm(grads, self.norm_type)
        norm_value = float(norm)
        next_step = self.optimizer_steps + 1
        if not math.isfinite(norm_value):
            report = self._nonfinite_report(with_grad, next_step)
            if self.scaler is None:
                return self._guard(report, norm_value)
            # with a scaler: an overflow; GradScaler.step below skips the optimizer
            if self.nan_guard == "raise" and self.consecutive_skips + 1 >= self.max_overflow_skips:
                raise FloatingPointError(
                    f"{self.consecutive_skips + 1} consecutive optimizer steps skipped for non-finite gradients "
                    f"under fp16 loss scaling (scale now {scale:g}): {report}"
                )
        else:
            self._clip(with_grad, norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = float(self.scaler.get_scale()) >= scale  # the scale shrinks only when the step was skipped
        else:
            self.optimizer.step()
            stepped = True
        if not stepped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            return StepResult(False, skipped="overflow", grad_norm=norm_value, scale=scale,
                              optimizer_step=self.optimizer_steps)
        self.optimizer_steps += 1
        self.consecutive_skips = 0
        self._step_scheduler()
        return StepResult(True, grad_norm=norm_value, scale=scale, optimizer_step=self.optimizer_steps)

    def _step_scheduler(self) -> None:
        if self.scheduler is None or isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return
        self.scheduler.step()

    def _clip(self, params: list[Tensor], norm: Tensor) -> None:
        changed = False
        if self.agc_clip_factor is not None:
            agc_params = params
            if self.agc_exclude:
                names = self._names()
                agc_params = [p for p in params if not any(r.search(names[id(p)]) for r in self.agc_exclude)]
            adaptive_clip_grad_(agc_params, self.agc_clip_factor, self.agc_eps)
            changed = True
        if self.clip_value is not None:
            nn.utils.clip_grad_value_(params, self.clip_value)
            changed = True
        if self.max_grad_norm is not None:
            clip_with_norm = getattr(nn.utils, "clip_grads_with_norm_", None)
            if changed or clip_with_norm is None:
                nn.utils.clip_grad_norm_(params, self.max_grad_norm, norm_type=self.norm_type)
            else:  # reuse the norm computed above (torch >= 2.6)
                clip_with_norm(params, self.max_grad_norm, norm)

    def _nonfinite_report(self, params: list[Tensor], step: int) -> str:
        names = self._names()
        bad = []
        for p in params:
            g = p.grad
            finite = torch.isfinite(g)
            if not bool(finite.all()):
                nan = int(torch.isnan(g).sum())
                inf = int(g.numel() - int(finite.sum()) - nan)
                bad.append(f"{names[id(p)]} (shape {tuple(p.shape)}: {nan} NaN, {inf} Inf)")
        where = f"optimizer step {step} (after {self.optimizer_steps} steps, {self.skipped_steps} skipped)"
        what = "; ".join(bad) if bad else "no single non-finite element: the total norm overflowed"
        return f"non-finite gradient at {where} in {len(bad)} parameter(s): {what}"

    def _guard(self, report: str, norm_value: float) -> StepResult:
        if self.nan_guard == "raise":
            raise FloatingPointError(report + " (StepRunner(nan_guard='raise'); parameters and schedule unchanged)")
        if self.nan_guard == "skip":
            warnings.warn(report + " -- step skipped (optimizer and schedule)", RuntimeWarning, stacklevel=3)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            return StepResult(False, skipped="nonfinite", grad_norm=norm_value, optimizer_step=self.optimizer_steps,
                              report=report)
        self.optimizer.step()  # nan_guard=None: torch's behaviour, NaN propagates
        self.optimizer_steps += 1
        self._step_scheduler()
        return StepResult(True, grad_norm=norm_value, optimizer_step=self.optimizer_steps, report=report)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Counters and the GradScaler's state (the optimizer and schedule save their own)."""
        return {
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if state.get("scaler") is not None:
            if self.scaler is None:
                raise ValueError("the state has a GradScaler's state, this StepRunner has no scaler (precision='fp16')")
            self.scaler.load_state_dict(state["scaler"])


__all__ = ["StepResult", "StepRunner", "adaptive_clip_grad_", "capabilities_of", "total_grad_norm", "unwrap_optimizer"]
