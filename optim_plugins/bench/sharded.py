"""Optimizer-state bytes per rank under ``ShardedOptimizer`` (ZeRO-1), measured in real gloo processes.

For each world size (2 and 4) the suite starts that many CPU processes; each builds the same
GPT-like stack of layers (token embedding, 4 blocks, head: about 5.3M parameters), shards every
optimizer of :data:`NAMES` across the ranks, takes one step and reports the bytes its
``optimizer.state`` holds (tensors of one or more dimensions). The table puts them next to the
unsharded optimizer's state (one process) and the largest single tensor's state, the bound of the
imbalance (the partition is by whole tensors).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from typing import Any

import torch
from torch import nn

NAMES = ["adamw", "adabelief", "lion", "adafactor", "lamb", "muon", "adam8bit"]
WORLD_SIZES = (2, 4)


def make_model(vocab: int = 8192, width: int = 256, blocks: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Embedding(vocab, width)]
    for _ in range(blocks):
        layers += [nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width),
                   nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)]
    layers.append(nn.Linear(width, vocab, bias=False))
    return nn.Sequential(*layers)


def _fake_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    optimizer.step()


def _per_tensor_state(optimizer: torch.optim.Optimizer) -> list[int]:
    return [sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
            for s in optimizer.state.values()]


def _rank(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    import torch.distributed as dist

    from ..distributed import ShardedOptimizer, optimizer_state_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        for name in names:
            model = make_model()
            opt = ShardedOptimizer(model, name)
            _fake_step(model, opt)
            mine = optimizer_state_bytes(opt)
            every = [None] * world
            dist.all_gather_object(every, mine)
            result[name] = every
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(names: list[str] = NAMES, world_sizes: tuple[int, ...] = WORLD_SIZES) -> dict[str, Any]:
    """{name: {"params", "total", "largest", "per_rank": {world: [bytes per rank]}}}."""
    import torch.multiprocessing as mp

    from .. import create_optimizer
    from ..distributed import optimizer_state_bytes

    rows: dict[str, Any] = {}
    for name in names:
        model = make_model()
        opt = create_optimizer(name, model)
        _fake_step(model, opt)
        rows[name] = {"params": sum(p.numel() for p in model.parameters()), "total": optimizer_state_bytes(opt),
                      "largest": max(_per_tensor_state(opt)), "per_rank": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in world_sizes:
            out = os.path.join(tmp, f"w{world}.json")
            mp.start_processes(_rank, args=(world, _free_port(), out, list(names)), nprocs=world,
                               join=True, start_method="spawn")
            with open(out) as f:
                for name, every in json.load(f).items():
                    rows[name]["per_rank"][world] = every
    return rows


def table(rows: dict[str, Any], command: str = "") -> str:
    mib = 2.0**20
    lines = [
        "# Optimizer state per rank under ShardedOptimizer (ZeRO-1)",
        "",
        f"Command: `{command}`. Real gloo processes on CPU; a GPT-like stack of {next(iter(rows.values()))['params']:,} "
        "fp32 parameters; state bytes after one step (tensors of >= 1 dimension).",
        "Partitioned by whole tensors, so ranks differ by at most one tensor's state.",
        "",
        "| optimizer | 1 process (MiB) | largest tensor's state (MiB) | world | per rank (MiB) | max rank / (total / world) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, row in rows.items():
        for world, every in sorted(row["per_rank"].items(), key=lambda kv: int(kv[0])):
            ideal = row["total"] / int(world)
            lines.append(
                f"| {name} | {row['total'] / mib:.2f} | {row['largest'] / mib:.2f} | {world} | "
                + " / ".join(f"{b / mib:.2f}" for b in every) + f" | {max(every) / ideal:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(args: Any, command: str) -> str:
    return table(measure(), command)


if __name__ == "__main__":
    print(table(measure(), "python -m optim_plugins.bench.sharded"))
