"""Distributed training: ZeRO-1/2 style sharded optimizer state (``ShardedOptimizer``) and the
cross-rank helpers that go with it (global-norm clipping, agreed found-inf, shard files).

    from optim_plugins.distributed import ShardedOptimizer
    opt = ShardedOptimizer(model, "adamw", lr=3e-4)     # after init_process_group, model in DDP
    opt = ShardedOptimizer(model, "adamw", stage=2)     # ZeRO-2: no DDP, gradients reduce-scattered

Trainers: ``OptimPluginsArguments(shard_optimizer_state=True)`` with ``hf.OptimPluginsTrainer``
(one shard file per rank in each checkpoint), ``opl.configure_optimizers(..., shard_optimizer_state=True)``
under Lightning ``strategy="ddp"`` (consolidated into Lightning's checkpoint), ``accelerator.prepare``.

Other engines. FSDP2 (``fully_shard``): optimizers with ``shardable="elements"`` step the DTensor
shards unchanged (tested: 2 CPU ranks on gloo, torch 2.13, equal to one process); whole-tensor ones
(factored, trust-ratio, orthogonalised) would see only the local shard. DeepSpeed ZeRO: pass ours as
the client optimizer with ``"zero_allow_untested_optimizer": true``; it steps one flat partition per
parameter group, so only elementwise optimizers are equivalent there.
"""
from .sharded import (
    ShardedOptimizer,
    check_shardable,
    clip_grad_norm_,
    consolidate_shards,
    found_inf,
    load_shards,
    optimizer_state_bytes,
    partition,
    save_sharded,
    shard_file_name,
    shard_files,
    state_bytes,
    sync_grad_scaler,
)

__all__ = [
    "ShardedOptimizer",
    "check_shardable",
    "clip_grad_norm_",
    "consolidate_shards",
    "found_inf",
    "load_shards",
    "optimizer_state_bytes",
    "partition",
    "save_sharded",
    "shard_file_name",
    "shard_files",
    "state_bytes",
    "sync_grad_scaler",
]
