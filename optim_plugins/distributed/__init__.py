"""Distributed training: ZeRO-1 style sharded optimizer state (``ShardedOptimizer``) and the
cross-rank helpers that go with it (global-norm clipping, agreed found-inf, shard files).

    from optim_plugins.distributed import ShardedOptimizer
    opt = ShardedOptimizer(model, "adamw", lr=3e-4)     # after init_process_group, model in DDP
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
    "state_bytes",
    "sync_grad_scaler",
]
