"""accelerate adapter: schedules that count optimizer steps, and the DeepSpeed offload trap.

    accelerator = Accelerator(gradient_accumulation_steps=4)
    optimizer = op.create_optimizer("adamw", model, lr=3e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = op.create_scheduler("warmup_cosine", optimizer, num_training_steps=N, num_warmup_steps=W)
    scheduler = opa.prepare_scheduler(accelerator, scheduler)   # not accelerator.prepare(scheduler)

Facts (accelerate 1.15):

- ``accelerator.prepare(scheduler)`` wraps it in ``AcceleratedScheduler``, which steps the schedule
  ``num_processes`` times per optimizer step unless ``split_batches=True`` (it assumes
  ``num_training_steps`` was counted on the un-sharded dataloader). Our schedules count optimizer
  steps, independent of the number of processes, so :func:`prepare_scheduler` prepares it (it is
  then saved by ``accelerator.save_state``) and makes it step once per optimizer step. It still
  skips steps accelerate skipped (fp16 overflow) and steps only when gradients sync (accumulation).
- ``prepare(optimizer)`` round-trips ``state_dict()`` / ``load_state_dict()`` to place state on the
  device: our optimizers' checked ``load_state_dict`` takes that.
- DeepSpeed with ``offload_optimizer`` replaces any optimizer that is not a ``DummyOptim`` by
  ``DeepSpeedCPUAdam`` (L2-mode Adam for anything but ``torch.optim.AdamW``, ours included) unless
  the DeepSpeed config says ``"zero_force_ds_cpu_optimizer": false``. :func:`check_deepspeed`
  warns (it runs in :func:`prepare_scheduler` too).
- FSDP2 (``fully_shard``) replaces each ``param_groups[i]["params"]`` entry by a ``DTensor`` shard
  when the optimizer is prepared after the model: elementwise optimizers (capability
  ``shardable="elements"``) step shards as they are; whole-tensor optimizers
  (``shardable="tensors"``: factored, trust-ratio, orthogonalised updates) see only the local shard
  and are not equivalent to the unsharded run. Gradient norms must be taken with
  ``accelerator.clip_grad_norm_`` (it reduces across shards), not torch's on local shards.
"""
from __future__ import annotations

import warnings
from typing import Any

from ..training import capabilities_of, optimizer_name

__all__ = ["check_deepspeed", "prepare_scheduler"]


def _deepspeed_config(accelerator_or_plugin: Any) -> dict[str, Any] | None:
    plugin = accelerator_or_plugin
    state = getattr(accelerator_or_plugin, "state", None)
    if state is not None and hasattr(state, "deepspeed_plugin"):
        plugin = state.deepspeed_plugin
    if plugin is None:
        return None
    config = getattr(plugin, "deepspeed_config", None)
    if config is None and isinstance(plugin, dict):
        config = plugin
    return config if isinstance(config, dict) else None


def check_deepspeed(accelerator_or_plugin: Any, optimizer: Any = None) -> bool:
    """Warn when accelerate will silently replace ``optimizer`` by ``DeepSpeedCPUAdam``.

    Reads the DeepSpeed config of an ``Accelerator`` (or a ``DeepSpeedPlugin``, or the config
    dict): ``zero_optimization.offload_optimizer.device`` other than ``"none"`` and
    ``zero_force_ds_cpu_optimizer`` not ``False``. Returns whether it warned.
    """
    config = _deepspeed_config(accelerator_or_plugin)
    if not config:
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else "none"
    if device in (None, "none") or config.get("zero_force_ds_cpu_optimizer", True) is False:
        return False
    if optimizer is not None and type(optimizer).__name__ in ("DummyOptim", "DeepSpeedCPUAdam", "DeepSpeedCPUAdagrad"):
        return False
    name = optimizer_name(optimizer) if optimizer is not None else "your optimizer"
    warnings.warn(
        f"DeepSpeed offload_optimizer (device={device!r}) is on: accelerate will replace {name} by "
        "DeepSpeedCPUAdam (Adam with L2 decay unless it is torch.optim.AdamW), silently. To keep "
        f"{name}, set \"zero_force_ds_cpu_optimizer\": false in the DeepSpeed config (it then runs "
        "on the offloaded fp32 state on CPU), or turn offload_optimizer off.",
        UserWarning,
        stacklevel=2,
    )
    return True


def prepare_scheduler(accelerator: Any, scheduler: Any) -> Any:
    """``accelerator.prepare_scheduler(scheduler)`` made to step once per optimizer step.

    Create ``scheduler`` with ``num_training_steps`` / warmup in optimizer steps (after
    accumulation, for the whole run, independent of the number of processes) and call
    ``scheduler.step()`` after every ``optimizer.step()`` in the loop, as with one process:
    the returned ``AcceleratedScheduler`` steps the schedule only when gradients synced
    and the optimizer really stepped, once (not ``num_processes`` times).
    """
    prepared = accelerator.prepare_scheduler(scheduler)
    prepared.split_batches = True  # one schedule step per optimizer step, whatever num_processes
    optimizer = getattr(scheduler, "optimizer", None)
    if optimizer is not None:
        check_deepspeed(accelerator, optimizer)
        if capabilities_of(optimizer).needs_closure and getattr(accelerator, "scaler", None) is not None:
            raise ValueError(
                f"{optimizer_name(optimizer)} needs a closure, which accelerate's fp16 GradScaler does not pass: "
                "use mixed_precision='bf16' or 'no'"
            )
    return prepared
