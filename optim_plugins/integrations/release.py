"""Gradient release (:func:`optim_plugins.release_gradients`) under the HF Trainer and Lightning.

Both trainers build the optimizer themselves, then call ``backward``, ``optimizer.step()`` and
``zero_grad()`` in their loop. A callback releases the gradients once the optimizer exists and
before the first backward; from then on each parameter is stepped inside ``backward`` and the
trainers' own ``step()`` / ``zero_grad()`` are no-ops (schedulers, logging of the lr and
checkpoints of the optimizer state keep working). The callback removes the hooks when training ends.

    # Hugging Face: any optimizer the Trainer builds (optim="adamw_torch", "op_adamw", ...)
    args = TrainingArguments(..., max_grad_norm=0)
    Trainer(model, args, callbacks=[HFGradientReleaseCallback()], ...).train()

    # Lightning: automatic or manual optimization
    L.Trainer(..., callbacks=[LightningGradientReleaseCallback()]).fit(module)

What the trainers cannot do under release, refused with a clear error when training starts
(before any parameter or state changes):

* global-norm clipping needs every gradient at once: HF ``max_grad_norm`` must be 0 (its default
  is 1.0), Lightning ``gradient_clip_val`` with the "norm" algorithm must be None/0. Lightning's
  ``gradient_clip_algorithm="value"`` is carried out by the release hook (``clip_value``).
* loss scaling (fp16 with a GradScaler): the scaler unscales gradients after backward, but
  release has stepped with the scaled ones inside backward. bf16 autocast works.
* gradient accumulation over k micro-batches: the trainers call ``backward`` k times per
  optimizer step, so the release hook must sum them in the optimizer's state
  (``release_gradients(..., accumulation_steps=k)``, only SGD with momentum, see
  ``optim_plugins.release.ACCUMULATION_SUPPORT``), and each epoch must hold a whole number of
  optimizer steps (the trainers step on a short last group; the hook's count would drift).

The HF Trainer still computes a gradient norm for its logs; with no gradients alive it logs 0.
The classes are built when first used, so importing this module imports neither trainer.
"""
from __future__ import annotations

from typing import Any

import torch

from ..release import GradientRelease, check_max_grad_norm, is_released, release_gradients

SCALER_REASON = (
    "gradient release cannot run with a loss-scaling GradScaler (fp16 mixed precision): the scaler unscales "
    "gradients after backward, but release steps each parameter inside backward with the still-scaled gradient; "
    "use bf16 (HF bf16=True, Lightning precision='bf16-mixed') or fp32"
)


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's / Lightning's wrappers."""
    for _ in range(8):
        if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__name__ != "AcceleratedOptimizer":
            break
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def _check_accumulation(steps: int, batches_per_epoch: int | None, setting: str) -> None:
    if steps > 1 and batches_per_epoch and batches_per_epoch % steps:
        raise ValueError(
            f"{setting}={steps} with {batches_per_epoch} batches per epoch: under gradient release each epoch must "
            f"hold a whole number of optimizer steps (the trainer steps on the short last group, which the release "
            f"hook's micro-batch count cannot see); choose a batch count divisible by {steps}"
        )


class _Release:
    """The trainer-independent part: the handles of the released optimizers."""

    def __init__(self, clip_value: float | None = None):
        self.clip_value = clip_value
        self.handles: list[GradientRelease] = []

    def _start(self, model: Any, optimizers: list[Any], accumulation_steps: int, clip_value: float | None) -> None:
        self._stop()
        for wrapped in optimizers:
            optimizer = _unwrap(wrapped)
            if is_released(optimizer):  # the user released it already: keep that handle
                optimizer._gradient_release.accumulation_steps = accumulation_steps
                continue
            self.handles.append(release_gradients(model, optimizer, clip_value=clip_value,
                                                  accumulation_steps=accumulation_steps))

    def _stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _hf_class() -> type:
    from transformers import TrainerCallback

    class HFGradientReleaseCallback(_Release, TrainerCallback):
        """Release the gradients of the optimizer the HF Trainer built (see the module doc).

        Args:
            clip_value: clamp each gradient element to [-clip_value, clip_value] before its step.
        """

        def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
            if optimizer is None or model is None:
                raise ValueError("HFGradientReleaseCallback: the Trainer passed no model or optimizer to on_train_begin")
            check_max_grad_norm(args.max_grad_norm, "TrainingArguments.max_grad_norm")
            if getattr(optimizer, "scaler", None) is not None:
                raise ValueError(SCALER_REASON)
            steps = args.gradient_accumulation_steps
            batches = len(train_dataloader) if train_dataloader is not None and hasattr(train_dataloader, "__len__") else None
            _check_accumulation(steps, batches, "TrainingArguments.gradient_accumulation_steps")
            self._start(model, [optimizer], steps, self.clip_value)

        def on_train_end(self, args, state, control, **kwargs):
            self._stop()

    HFGradientReleaseCallback.__module__ = __name__
    return HFGradientReleaseCallback


def _lightning_class() -> type:
    from lightning.pytorch.callbacks import Callback

    class LightningGradientReleaseCallback(_Release, Callback):
        """Release the gradients of every optimizer of a Lightning run (see the module doc).

        Args:
            clip_value: clamp each gradient element to [-clip_value, clip_value] before its step
                (``Trainer(gradient_clip_val=v, gradient_clip_algorithm="value")`` sets it too).
        """

        def on_train_start(self, trainer, pl_module):  # after the optimizers and the train data loader exist
            if not trainer.optimizers:
                raise ValueError("LightningGradientReleaseCallback: the trainer has no optimizer")
            clip_value = self.clip_value
            algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
            by_value = bool(trainer.gradient_clip_val) and "value" in algorithm
            if by_value:
                clip_value = float(trainer.gradient_clip_val)
            elif trainer.gradient_clip_val:
                check_max_grad_norm(trainer.gradient_clip_val, "Trainer(gradient_clip_val)")
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                raise ValueError(SCALER_REASON)
            steps = trainer.accumulate_grad_batches
            batches = trainer.num_training_batches
            _check_accumulation(steps, batches if isinstance(batches, int) else None, "Trainer(accumulate_grad_batches)")
            self._start(pl_module, list(trainer.optimizers), steps, clip_value)
            if by_value:  # the hook clips; Lightning's own pass would find no gradients (and fails on none)
                self._trainer_clip = (trainer, trainer.gradient_clip_val)
                trainer.gradient_clip_val = None

        def on_train_end(self, trainer, pl_module):
            self._stop()

        def on_exception(self, trainer, pl_module, exception):
            self._stop()

        def _stop(self) -> None:
            super()._stop()
            saved = self.__dict__.pop("_trainer_clip", None)
            if saved is not None:
                saved[0].gradient_clip_val = saved[1]

    LightningGradientReleaseCallback.__module__ = __name__
    return LightningGradientReleaseCallback


def __getattr__(name: str) -> Any:
    builders = {"HFGradientReleaseCallback": _hf_class, "LightningGradientReleaseCallback": _lightning_class}
    if name in builders:
        cls = globals()[name] = builders[name]()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HFGradientReleaseCallback", "LightningGradientReleaseCallback", "SCALER_REASON"]
