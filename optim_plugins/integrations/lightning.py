"""Lightning adapter: ``configure_optimizers`` from names/configs/hparams, checks, callbacks, a LightningCLI.

    import optim_plugins.integrations.lightning as opl

    class Net(pl.LightningModule):
        def configure_optimizers(self):
            return opl.configure_optimizers(self, "adamw", lr=3e-4, scheduler="warmup_cosine",
                                            num_warmup_steps=0.05)   # or: opl.configure_optimizers(self) from self.hparams

The schedule is returned with ``interval="step"``: it advances once per optimizer step (after
``accumulate_grad_batches``), and its total is ``trainer.estimated_stepping_batches`` unless given.

What Lightning 2.x does with the optimizer's closure, and what we check (``check_trainer``):

- fp32, ``bf16-mixed`` (also ``precision="16-mixed"`` on CPU, which Lightning turns into bf16):
  Lightning passes a closure (forward + backward) to ``optimizer.step``, which our optimizers call.
- ``16-mixed`` with a GradScaler (GPU, or an explicit ``MixedPrecision("16-mixed", device, scaler)``
  plugin), FSDP with a scaler, DeepSpeed: Lightning runs the closure itself and calls ``step()``
  without it. An optimizer flagged ``needs_closure`` (SAM/ASAM, SophiaH: two passes per step)
  would silently do one pass, so this raises ``ValueError`` at fit start instead.
- ``accumulate_grad_batches > 1`` with a ``needs_closure`` optimizer: the closure re-evaluates only
  the last micro-batch on top of the accumulated gradients; also refused.
- Schedule-free optimizers (``train_eval``) get :class:`TrainEvalCallback`, which
  :func:`configure_optimizers` adds to the trainer when it is missing.

LightningCLI: its automatic optimizer/scheduler wiring steps schedulers once per epoch and cannot
set ``interval`` from YAML. Use :class:`LightningCLI` from this module (a subclass): the
``lr_scheduler:`` of the YAML steps per optimizer step, and a ``num_training_steps`` the YAML leaves
out is taken from the trainer. Callable-based wiring (``OptimizerCallable`` / ``LRSchedulerCallable``
arguments of your module) also works: pass them to :func:`configure_optimizers`.

Tested with Lightning 2.4-2.6 (``lightning.pytorch``; ``pytorch_lightning`` is not supported).
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI as _LightningCLI
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, FSDPPrecision, MixedPrecision

from .. import create_optimizer, create_scheduler
from ..config import OptimizerConfig, SchedulerConfig
from ..registry import get_optimizer_spec, get_scheduler_spec
from ..training import capabilities_of, optimizer_name, unwrap_optimizer

__all__ = ["LightningCLI", "OptimizerChecks", "TrainEvalCallback", "check_trainer", "configure_optimizers"]

_OPTIMIZER_HPARAMS = ("optimizer", "optim", "optimizer_name")
_SCHEDULER_HPARAMS = ("lr_scheduler", "scheduler", "lr_scheduler_type")


# ----------------------------------------------------------------------------- checks


def _runs_closure_itself(trainer: pl.Trainer) -> str | None:
    """Why Lightning will call ``optimizer.step()`` without a closure under this trainer, or None."""
    plugin = trainer.precision_plugin
    strategy = type(trainer.strategy).__name__
    if isinstance(plugin, DeepSpeedPrecision) or "DeepSpeed" in strategy:
        return "the DeepSpeed strategy steps the optimizer inside its engine"
    if isinstance(plugin, (MixedPrecision, FSDPPrecision)) and getattr(plugin, "scaler", None) is not None:
        return (f"precision={plugin.precision!r} with a GradScaler runs the closure itself and calls "
                "optimizer.step() without one (GradScaler does not support closures)")
    return None


def check_trainer(trainer: pl.Trainer, optimizers: list[Any] | None = None) -> None:
    """Raise ``ValueError`` when an optimizer cannot work the way this trainer will drive it.

    Checked: ``needs_closure`` under 16-mixed-with-scaler / FSDP-with-scaler / DeepSpeed (Lightning
    calls ``step()`` without a closure there) and with ``accumulate_grad_batches > 1``;
    ``needs_closure`` with manual optimization is left to your ``training_step``.
    """
    optimizers = trainer.optimizers if optimizers is None else optimizers
    automatic = trainer.lightning_module.automatic_optimization if trainer.lightning_module is not None else True
    for optimizer in optimizers:
        caps = capabilities_of(optimizer)
        name = optimizer_name(optimizer)
        if caps.needs_closure and automatic:
            why = _runs_closure_itself(trainer)
            if why is not None:
                raise ValueError(
                    f"{name} needs a closure (two forward/backward passes per step), but {why}: it would silently do "
                    "one pass. Use precision='32-true' or 'bf16-mixed' (Lightning passes the closure there), "
                    "or another optimizer."
                )
            if trainer.accumulate_grad_batches > 1:
                raise ValueError(
                    f"{name} needs a closure, and with accumulate_grad_batches={trainer.accumulate_grad_batches} "
                    "Lightning's closure re-evaluates only the last micro-batch on top of the accumulated gradients. "
                    "Use accumulate_grad_batches=1 (a larger batch) with this optimizer."
                )


class OptimizerChecks(Callback):
    """Checks at fit start, and schedules that do not advance on skipped fp16 steps.

    - :func:`check_trainer` at fit start (for optimizers not built by :func:`configure_optimizers`,
      e.g. LightningCLI's ``optimizer:`` section or your own ``configure_optimizers``);
    - under ``16-mixed`` with a GradScaler, Lightning steps a ``interval="step"`` schedule even when
      the scaler skipped the optimizer step (Inf/NaN gradients). Our convention is that a skipped
      step does not advance the schedule: this callback moves a closed-form schedule (every
      ``optim_plugins.schedulers.Schedule``) back by that step. :func:`configure_optimizers` adds
      this callback when the trainer has a scaler.
    """

    def __init__(self) -> None:
        self._scale: float | None = None
        self._epochs: list[int] = []
        self.skipped_steps = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_trainer(trainer)

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = self._scaler(trainer)
        if scaler is None:
            return
        self._scale = float(scaler.get_scale())
        self._epochs = [config.scheduler.last_epoch if hasattr(config.scheduler, "last_epoch") else None
                        for config in trainer.lr_scheduler_configs]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        scaler, before = self._scaler(trainer), self._scale
        self._scale = None
        if scaler is None or before is None or float(scaler.get_scale()) >= before:
            return
        self.skipped_steps += 1  # the scale shrank: GradScaler skipped optimizer.step()
        for config, epoch in zip(trainer.lr_scheduler_configs, self._epochs):
            scheduler = config.scheduler
            if config.interval != "step" or epoch is None or not hasattr(scheduler, "lr_at"):
                continue
            if scheduler.last_epoch > epoch:
                scheduler.last_epoch = epoch
                for group, lr in zip(scheduler.optimizer.param_groups, scheduler.lr_at(epoch)):
                    group["lr"] = lr
                scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class TrainEvalCallback(Callback):
    """``optimizer.train()`` / ``optimizer.eval()`` around training, validation, testing and checkpoints,
    for optimizers flagged ``train_eval`` (schedule-free: the weights to evaluate and to save are the
    averaged ``x``, training runs on ``y``).

    Training: ``train()`` at train start and after each validation inside fit; ``eval()`` before
    validation/test/predict and at train end. A checkpoint taken in training mode stores the weights
    and optimizer state of ``eval()`` mode (consistent with each other, so resuming is exact).
    Optimizers without ``train_eval`` are left alone.
    """

    def __init__(self) -> None:
        self._mode: str | None = None

    @staticmethod
    def _targets(trainer: pl.Trainer) -> list[Any]:
        return [unwrap_optimizer(o) for o in trainer.optimizers if capabilities_of(o).train_eval]

    def _set(self, trainer: pl.Trainer, mode: str) -> None:
        targets = self._targets(trainer)
        for optimizer in targets:
            getattr(optimizer, mode)()
        if targets:
            self._mode = mode

    def on_train_start(self, trainer, pl_module) -> None:
        self._set(trainer, "train")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._set(trainer, "train")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._set(trainer, "eval")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training and not trainer.sanity_checking:
            self._set(trainer, "train")

    def on_test_start(self, trainer, pl_module) -> None:
        self._set(trainer, "eval")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._set(trainer, "eval")

    def on_train_end(self, trainer, pl_module) -> None:
        self._set(trainer, "eval")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._mode != "train" or not self._targets(trainer):
            return
        self._set(trainer, "eval")
        try:
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
        finally:
            self._set(trainer, "train")


def _ensure_callbacks(trainer: pl.Trainer | None, optimizer: Any) -> None:
    """Add :class:`TrainEvalCallback` for a ``train_eval`` optimizer and :class:`OptimizerChecks`
    under a GradScaler, when the trainer lacks them."""
    if trainer is None:
        return
    if capabilities_of(optimizer).train_eval and not any(isinstance(cb, TrainEvalCallback) for cb in trainer.callbacks):
        trainer.callbacks.append(TrainEvalCallback())
    if getattr(trainer.precision_plugin, "scaler", None) is not None and not any(
        isinstance(cb, OptimizerChecks) for cb in trainer.callbacks
    ):
        trainer.callbacks.append(OptimizerChecks())


# ----------------------------------------------------------------------------- configure_optimizers


def _trainer_of(module: nn.Module) -> pl.Trainer | None:
    return getattr(module, "_trainer", None)


def _total_steps(module: nn.Module, given: int | None) -> int | None:
    if given is not None:
        return int(given)
    trainer = _trainer_of(module)
    if trainer is None:
        return None
    total = trainer.estimated_stepping_batches
    if total is None or not math.isfinite(total):
        raise ValueError(
            "the schedule needs num_training_steps, and trainer.estimated_stepping_batches is infinite: "
            "set Trainer(max_steps=...) or max_epochs, or pass num_training_steps"
        )
    return int(total)


def _accepts(factory: Any, name: str) -> bool:
    target = factory
    if isinstance(factory, functools.partial):
        if name in factory.keywords:
            return True
        target = next((a for a in factory.args if inspect.isclass(a)), factory.func)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    return name in signature.parameters or any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def _needs_value(factory: Any, name: str) -> bool:
    """Whether ``factory`` takes ``name`` and has no value for it yet (jsonargparse partials keep ``None``)."""
    if not _accepts(factory, name):
        return False
    if isinstance(factory, functools.partial):
        return factory.keywords.get(name) is None
    return True


def _split_options(options: Mapping[str, Any], optimizer: Any, scheduler: Any) -> tuple[dict, dict]:
    opt_schema = get_optimizer_spec(optimizer).options if isinstance(optimizer, str) else {}
    sched_schema = get_scheduler_spec(scheduler).options if isinstance(scheduler, str) else {}
    opt_options, sched_options = {}, {}
    for key, value in options.items():
        in_opt = key in opt_schema or (key.startswith("beta") and "betas" in opt_schema)
        in_sched = key in sched_schema
        if in_opt and in_sched:
            raise ValueError(f"option {key!r} is taken by both the optimizer and the schedule: "
                             "pass optimizer_options={...} or scheduler_options={...}")
        if in_sched:
            sched_options[key] = value
        else:
            opt_options[key] = value  # unknown names are reported by the optimizer's check
    return opt_options, sched_options


def _from_hparams(module: nn.Module) -> Mapping[str, Any]:
    hparams = getattr(module, "hparams", None)
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def _build_optimizer(module: nn.Module, optimizer: Any, lr: float | None, weight_decay: float | None,
                     options: dict[str, Any], hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is not None or weight_decay is not None or options:
            raise ValueError("optimizer is already built: lr, weight_decay and options cannot apply to it")
        return optimizer
    if optimizer is None:
        if any(k in hparams for k in _OPTIMIZER_HPARAMS) or "lr" in hparams or "learning_rate" in hparams:
            config = OptimizerConfig.from_hparams(hparams)
            if isinstance(hparams.get("optimizer"), Mapping):  # a section: flat lr/weight_decay fill its gaps
                flat_lr = hparams.get("lr", hparams.get("learning_rate"))
                lr = lr if lr is not None else (config.lr if config.lr is not None else flat_lr)
                flat_wd = hparams.get("weight_decay")
                weight_decay = weight_decay if weight_decay is not None else (
                    config.weight_decay if config.weight_decay is not None else flat_wd)
        else:
            config = OptimizerConfig(name="adamw")
        return create_optimizer(config, module, lr=lr, weight_decay=weight_decay, **options)
    if isinstance(optimizer, (str, OptimizerConfig, Mapping)):
        return create_optimizer(optimizer, module, lr=lr, weight_decay=weight_decay, **options)
    if callable(optimizer):  # an OptimizerCallable (jsonargparse partial) or an optimizer class
        kwargs = dict(options)
        if lr is not None:
            kwargs["lr"] = lr
        if weight_decay is not None:
            kwargs["weight_decay"] = weight_decay
        return optimizer(module.parameters(), **kwargs)
    raise ValueError(f"optimizer must be a name, config, dict, callable or optimizer, got {optimizer!r}")


def _build_scheduler(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     num_training_steps: int | None, num_warmup_steps: int | float | None,
                     options: dict[str, Any], hparams: Mapping[str, Any]) -> Any:
    if scheduler is None:
        if not any(hparams.get(k) for k in _SCHEDULER_HPARAMS):
            if num_warmup_steps or options:
                raise ValueError("num_warmup_steps / schedule options given without scheduler=...")
            return None
        scheduler = SchedulerConfig.from_hparams(hparams)
    if isinstance(scheduler, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return scheduler
    if isinstance(scheduler, (str, SchedulerConfig, Mapping)):
        config = SchedulerConfig.from_dict(scheduler)
        if num_warmup_steps is not None:
            config = SchedulerConfig(config.name, config.num_training_steps, num_warmup_steps, dict(config.options))
        spec = get_scheduler_spec(config.name)
        total = num_training_steps if num_training_steps is not None else config.num_training_steps
        fractional = isinstance(config.num_warmup_steps, float)
        if total is None and ("num_training_steps" in spec.options or fractional):
            total = _total_steps(module, None)
        warmup = config.warmup_steps(total) if config.num_warmup_steps else 0
        return create_scheduler(config, optimizer, num_training_steps=total, num_warmup_steps=warmup, **options)
    if callable(scheduler):  # an LRSchedulerCallable (jsonargparse partial) or a schedule class
        kwargs = dict(options)
        if _needs_value(scheduler, "num_training_steps"):
            kwargs["num_training_steps"] = _total_steps(module, num_training_steps)
        if num_warmup_steps is not None:
            kwargs["num_warmup_steps"] = num_warmup_steps
        return scheduler(optimizer, **kwargs)
    raise ValueError(f"scheduler must be a name, config, dict, callable or schedule, got {scheduler!r}")


def scheduler_config(scheduler: Any, interval: str = "step", frequency: int = 1,
                     monitor: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` dict: per optimizer step for our schedules; a plateau schedule
    steps per epoch on ``monitor`` (default: the schedule's ``monitor`` attribute, else ``val_loss``)."""
    config: dict[str, Any] = {"scheduler": scheduler, "interval": interval, "frequency": frequency}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["interval"] = "epoch" if interval == "step" else interval
        config["monitor"] = monitor or getattr(scheduler, "monitor", None) or "val_loss"
    elif monitor is not None:
        config["monitor"] = monitor
    if name is not None:
        config["name"] = name
    return config


def configure_optimizers(
    module: pl.LightningModule,
    optimizer: Any = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    *,
    scheduler: Any = None,
    num_training_steps: int | None = None,
    num_warmup_steps: int | float | None = None,
    interval: str = "step",
    monitor: str | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    scheduler_options: Mapping[str, Any] | None = None,
    check: bool = True,
    shard_optimizer_state: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns, built by name, config, hparams or callable.

    Args:
        module: the LightningModule (its parameters get the no-decay groups of ``op.param_groups``).
        optimizer: a registry name, :class:`OptimizerConfig` or dict, an ``OptimizerCallable`` /
            optimizer class (called with ``module.parameters()``), or a built optimizer. ``None``:
            from ``module.hparams`` (``OptimizerConfig.from_hparams``), else ``"adamw"``.
        lr, weight_decay: win over the config's.
        scheduler: a registry name, :class:`SchedulerConfig` or dict, an ``LRSchedulerCallable`` /
            schedule class, or a built schedule. ``None``: from ``module.hparams``
            (``SchedulerConfig.from_hparams``) when they name one, else no schedule.
        num_training_steps: optimizer steps in all; ``None``: ``trainer.estimated_stepping_batches``
            (it accounts for ``max_steps``, epochs, ``limit_train_batches`` and ``accumulate_grad_batches``).
        num_warmup_steps: steps, or a fraction ``< 1`` of the total.
        interval: ``"step"`` (the default: the schedule counts optimizer steps) or ``"epoch"``.
        monitor: the metric of a plateau schedule.
        optimizer_options, scheduler_options: options for one side; ``**options`` are routed by
            name (an option of the schedule goes to it, the rest to the optimizer).
        check: run :func:`check_trainer` now, when a trainer is attached.
        shard_optimizer_state: ZeRO-1 under ``strategy="ddp"``: wrap the optimizer in
            :class:`optim_plugins.distributed.ShardedOptimizer`. Lightning's checkpointing calls its
            ``consolidate_state_dict()`` on every rank and saves the full state from rank 0 (as for
            torch's ``ZeroRedundancyOptimizer``); loading reshards, also into another world size.
    """
    hparams = _from_hparams(module)
    opt_options, sched_options = _split_options(options, optimizer if optimizer is not None else
                                                _hparams_name(hparams, _OPTIMIZER_HPARAMS, "adamw"),
                                                scheduler if scheduler is not None else
                                                _hparams_name(hparams, _SCHEDULER_HPARAMS, None))
    opt_options.update(optimizer_options or {})
    sched_options.update(scheduler_options or {})
    opt = _build_optimizer(module, optimizer, lr, weight_decay, opt_options, hparams)
    trainer = _trainer_of(module)
    if check and trainer is not None:
        check_trainer(trainer, [opt])
    _ensure_callbacks(trainer, opt)
    if shard_optimizer_state:
        from ..distributed import ShardedOptimizer

        opt = opt if isinstance(opt, ShardedOptimizer) else ShardedOptimizer.wrap(opt)
    sched = _build_scheduler(module, opt, scheduler, num_training_steps, num_warmup_steps, sched_options, hparams)
    if sched is None:
        return {"optimizer": opt}
    return {"optimizer": opt, "lr_scheduler": scheduler_config(sched, interval=interval, monitor=monitor)}


def _hparams_name(hparams: Mapping[str, Any], keys: tuple[str, ...], default: Any) -> Any:
    for key in keys:
        value = hparams.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            return None  # a section: its own options are in it
    return default


# ----------------------------------------------------------------------------- LightningCLI


class LightningCLI(_LightningCLI):
    """``lightning.pytorch.cli.LightningCLI`` whose YAML ``lr_scheduler:`` steps per optimizer step.

        optimizer:
          class_path: optim_plugins.optimizers.AdamW
          init_args: {lr: 0.001, weight_decay: 0.01}
        lr_scheduler:
          class_path: optim_plugins.schedulers.WarmupCosine
          init_args: {num_warmup_steps: 10}      # num_training_steps: from the trainer when left out

    Lightning's own wiring builds the schedule when the CLI starts (before the trainer knows its
    length) and steps it once per epoch; here the schedule is built in ``configure_optimizers``,
    with ``interval="step"`` and the trainer's ``estimated_stepping_batches`` as its total where
    the YAML gives none, and :func:`check_trainer` runs on the optimizer. Only the top-level
    ``lr_scheduler`` key is handled; subclasses overriding ``before_instantiate_classes`` or
    ``after_instantiate_classes`` must call ``super()``.
    """

    scheduler_interval = "step"

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        self._op_scheduler_config = None
        if self.auto_configure_optimizers and config.get("lr_scheduler") is not None:
            self._op_scheduler_config = config["lr_scheduler"]
            config["lr_scheduler"] = None  # built in configure_optimizers, when the trainer is known

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if getattr(self, "_op_scheduler_config", None) is not None:  # keep the saved config.yaml complete
            config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
            config["lr_scheduler"] = self._op_scheduler_config

    def configure_optimizers(self, lightning_module: pl.LightningModule, optimizer: torch.optim.Optimizer,
                             lr_scheduler: Any = None) -> Any:
        trainer = _trainer_of(lightning_module)
        if trainer is not None:
            check_trainer(trainer, [optimizer])
            _ensure_callbacks(trainer, optimizer)
        init = getattr(self, "_op_scheduler_config", None)
        if lr_scheduler is None and init is not None:
            init = init.as_dict() if hasattr(init, "as_dict") else dict(init)
            init_args = dict(init.get("init_args") or {})
            cls = _import_class(init["class_path"])
            if init_args.get("num_training_steps") is None and _accepts(cls, "num_training_steps"):
                init_args["num_training_steps"] = _total_steps(lightning_module, None)
            lr_scheduler = instantiate_class(optimizer, {"class_path": init["class_path"], "init_args": init_args})
        if lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(lr_scheduler, interval=self.scheduler_interval)}


def _import_class(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
