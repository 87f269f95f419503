"""Trainer callbacks for :func:`optim_plugins.telemetry`: they attach a recorder when training
starts, log its scalars through the trainer's own logging, save ``telemetry.jsonl`` in the run
directory (read by ``optim-plugins plot-telemetry RUN_DIR``) and detach when training ends.

* ``HFTelemetryCallback`` (a ``transformers.TrainerCallback``): logs through ``Trainer.log``, so
  ``state.log_history`` and every ``report_to`` logger (TensorBoard, W&B, CSV...) get the values.
  Attach it with ``add_telemetry(trainer, ...)`` (or ``HFTelemetryCallback(trainer=trainer)``);
  passed to ``Trainer(callbacks=[...])`` without a trainer, it adds its values to the next
  ``on_log`` (``log_history`` and the loggers that run after it see them).
* ``LightningTelemetryCallback`` (a ``lightning.pytorch.Callback``): logs to every ``trainer.loggers``
  (``log_metrics(values, step=global_step)``, as Lightning's ``LearningRateMonitor``; ``pl_module.log``
  would log the values again, stale, at every later logging step of the epoch).

``every`` defaults to the trainer's logging interval (``logging_steps`` / ``log_every_n_steps``);
``alerts`` (True or an ``op.telemetry`` ``Alerts``) turns on its warnings, and their counts are
logged with the values. Records are numbered by the trainer's global step (the recorder is
synced before each optimizer step), so a run resumed from a checkpoint attaches a recorder to
the new optimizer and goes on with the same steps and cadence; ``telemetry.jsonl`` keeps the
records of the earlier run before the resumed step and appends the new ones.
The classes are built when first used, so importing this module imports neither trainer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..telemetry import Alerts, Telemetry, load, telemetry


class _Recording:
    """The trainer-independent part: a recorder and the records not yet logged."""

    def __init__(self, every: int | None = None, by: str = "layer", depth: int | None = None,
                 prefix: str = "telemetry/", save: bool = True, alerts: bool | Alerts | dict | None = None):
        self.every, self.by, self.depth, self.prefix, self.save, self.alerts = every, by, depth, prefix, save, alerts
        self.recorder: Telemetry | None = None
        self._logged = self._resumed_at = 0

    def _start(self, optimizer: Any, model: Any, every: int, global_step: int) -> None:
        if self.recorder is not None and self.recorder.active:
            self.recorder.remove()
        by = self.by if model is not None or self.by != "layer" else "group"
        self.recorder = telemetry(optimizer, every=self.every or max(1, int(every)), by=by, model=model,
                                  depth=self.depth, alerts=self.alerts)
        self.recorder.sync(global_step)  # resumed runs go on with the trainer's step numbers
        self._logged, self._resumed_at = 0, int(global_step)

    def _sync(self, global_step: int) -> None:
        if self.recorder is not None and self.recorder.active:
            self.recorder.sync(global_step)

    def _new_scalars(self) -> dict[str, float]:
        if self.recorder is None or self._logged >= len(self.recorder.history):
            return {}
        values: dict[str, float] = {}
        for record in self.recorder.history[self._logged:]:
            values.update(self.recorder.scalars(record, self.prefix))
        self._logged = len(self.recorder.history)
        return values

    def _stop(self, run_dir: str | Path | None) -> None:
        if self.recorder is None:
            return
        self.recorder.remove()
        if self.save and run_dir is not None and self.recorder.history:
            path = Path(run_dir) / "telemetry.jsonl"
            resumed = self._resumed_at > 0 and path.is_file()  # keep the earlier run's records up to the resume
            earlier = [r for r in load(path) if r["step"] <= self._resumed_at] if resumed else []
            with path.open("w") as f:
                f.write("".join(json.dumps(record) + "\n" for record in earlier + self.recorder.history))


def _hf_class() -> type:
    from transformers import TrainerCallback

    from .hf import _unwrap

    class HFTelemetryCallback(_Recording, TrainerCallback):
        """Log ``op.telemetry`` scalars through the HF Trainer (see the module doc)."""

        def __init__(self, every: int | None = None, by: str = "layer", depth: int | None = None,
                     prefix: str = "telemetry/", save: bool = True, alerts: bool | Alerts | dict | None = None,
                     trainer: Any = None):
            super().__init__(every, by, depth, prefix, save, alerts)
            self.trainer = trainer

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if optimizer is None:
                raise ValueError("HFTelemetryCallback: the Trainer passed no optimizer to on_train_begin")
            logging_steps = args.logging_steps if args.logging_steps >= 1 else 1
            self._start(_unwrap(optimizer), model, logging_steps, state.global_step)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._sync(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.trainer is not None:
                values = self._new_scalars()
                if values:
                    self.trainer.log(values)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.trainer is None and logs is not None:
                values = self._new_scalars()
                logs.update(values)
                if state.log_history and values:
                    state.log_history[-1].update(values)

        def on_train_end(self, args, state, control, **kwargs):
            self._stop(args.output_dir if state.is_world_process_zero else None)

    HFTelemetryCallback.__module__ = __name__
    return HFTelemetryCallback


def _lightning_class() -> type:
    from lightning.pytorch.callbacks import Callback

    class LightningTelemetryCallback(_Recording, Callback):
        """Log ``op.telemetry`` scalars to the trainer's loggers (see the module doc); the first optimizer."""

        def on_train_start(self, trainer, pl_module):
            if not trainer.optimizers:
                raise ValueError("LightningTelemetryCallback: the trainer has no optimizer")
            self._start(trainer.optimizers[0], pl_module, trainer.log_every_n_steps, trainer.global_step)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._sync(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # straight to the loggers, as Lightning's LearningRateMonitor does: values put through
            # pl_module.log stay in the result collection and are logged again, stale, until the epoch ends
            values = self._new_scalars()
            if values:
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=trainer.global_step)

        def on_train_end(self, trainer, pl_module):
            self._stop((trainer.log_dir or trainer.default_root_dir) if trainer.is_global_zero else None)

    LightningTelemetryCallback.__module__ = __name__
    return LightningTelemetryCallback


def add_telemetry(trainer: Any, **options: Any) -> Any:
    """Add an ``HFTelemetryCallback(trainer=trainer, **options)`` to an HF ``trainer``; returns it."""
    callback = __getattr__("HFTelemetryCallback")(trainer=trainer, **options)
    trainer.add_callback(callback)
    return callback


def __getattr__(name: str) -> Any:
    builders = {"HFTelemetryCallback": _hf_class, "LightningTelemetryCallback": _lightning_class}
    if name in builders:
        cls = globals()[name] = builders[name]()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
