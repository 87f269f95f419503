"""Step-speed and state-memory benchmark: ours side by side with torch.optim in one run.

``optim-plugins bench`` (suite ``speed``, the default) runs it and writes a Markdown table
(``benchmarks/results.md`` by default). Each row times ``optimizer.step()`` on the same tensors (a transformer-like
mix of 2-D weights and 1-D biases/norms) and reports the time per step, the ratio to
torch's fastest AdamW on this machine, and the effective bandwidth in GB/s from the bytes
a step must move (AdamW: 28 bytes per fp32 parameter, DESIGN.md "Speed is bandwidth").
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Bytes a step must read + write per fp32 parameter (p, g, states).
BYTES_PER_PARAM = {"adamw": 28, "adam": 28, "adabelief": 28, "sgd": 20, "lion": 20, "rmsprop": 20, "adan": 44}


@dataclass
class Row:
    name: str
    variant: str
    ms_per_step: float
    state_bytes_per_param: float
    bytes_per_param: int | None

    def bandwidth(self, n: int) -> float | None:
        if self.bytes_per_param is None:
            return None
        return self.bytes_per_param * n / (self.ms_per_step * 1e-3) / 1e9


def make_params(total: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """Tensors shaped like transformer blocks (d x 4d, 4d x d, d x d, biases, norms) adding up to ~``total``."""
    generator = torch.Generator().manual_seed(seed)
    d = max(8, int((total / 24) ** 0.5))
    shapes = []
    while sum(torch.Size(s).numel() for s in shapes) < total:
        shapes += [(d, 4 * d), (4 * d,), (4 * d, d), (d,), (d, d), (d,), (d,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def time_steps(make: Callable[[list], torch.optim.Optimizer], params: list, warmup: int, repeats: int) -> tuple[float, float]:
    """Median ms per step after ``warmup`` steps, and the optimizer's state bytes per parameter."""
    optimizer = make(params)
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times.sort()
    numel = sum(p.numel() for p in params)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return 1e3 * times[len(times) // 2], state / numel


def variants(name: str) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """Ours per backend, plus torch's own implementations where torch has the algorithm."""
    import optim_plugins as op

    found: dict[str, Callable[[list], torch.optim.Optimizer]] = {}
    torch_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
                 "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}.get(name)
    extra = {"momentum": 0.9} if name == "sgd" else {}
    if torch_cls is not None:
        found["torch foreach=False"] = lambda ps: torch_cls(ps, lr=1e-3, foreach=False, **extra)
        found["torch foreach=True"] = lambda ps: torch_cls(ps, lr=1e-3, foreach=True, **extra)
        if name in ("adamw", "adam", "sgd", "adagrad"):
            found["torch fused=True"] = lambda ps: torch_cls(ps, lr=1e-3, fused=True, **extra)
    for backend in ("reference", "foreach"):
        found[f"optim_plugins backend={backend}"] = lambda ps, b=backend: op.create_optimizer(name, ps, lr=1e-3, backend=b, **extra)
    return found


def run(names: list[str], total: int = 4_000_000, warmup: int = 3, repeats: int = 10) -> tuple[list[Row], int]:
    params = make_params(total)
    rows = []
    for name in names:
        for variant, make in variants(name).items():
            ms, state = time_steps(make, params, warmup, repeats)
            rows.append(Row(name, variant, ms, state, BYTES_PER_PARAM.get(name)))
    return rows, sum(p.numel() for p in params)


def markdown(rows: list[Row], numel: int, command: str) -> str:
    baseline = min((r.ms_per_step for r in rows if r.name == "adamw" and r.variant.startswith("torch")), default=None)
    lines = [
        "# Optimizer step benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only  ",
        f"Parameters: {numel:,} fp32 in transformer-like tensors; median of the timed steps.",
        "",
        "| optimizer | implementation | ms / step | x fastest torch AdamW | GB/s moved | state bytes / param |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r.ms_per_step / baseline:.2f}" if baseline else "-"
        bandwidth = r.bandwidth(numel)
        lines.append(f"| {r.name} | {r.variant} | {r.ms_per_step:.2f} | {ratio} | "
                     f"{'-' if bandwidth is None else f'{bandwidth:.1f}'} | {r.state_bytes_per_param:.2f} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, command: str) -> str:
    rows, numel = run(args.optimizers.split(","), total=int(args.params), repeats=args.repeats)
    return markdown(rows, numel, command)
