"""Step time vs parameter count and vs number of tensors (``optim-plugins bench --suite scale``).

Sizes 1M, 4M, 16M, 64M, 200M (capped by ``--params``) of transformer-like tensors, and the
launch-bound regime: 1000 tensors of 1024 elements. At each point AdamW is timed as torch's
fused and foreach implementations and ours (foreach, compiled, and auto: torch's fused kernel), interleaved
one step each per round. Writes the table (``benchmarks/scale.md``) and a PNG beside it.
Lion (no torch kernel) is timed on foreach and compiled as well. The compiled backend's first
step (its build) is listed too: it is what ``backend="auto"`` weighs against the per-step saving
(``LOOP_THRESHOLD`` / ``COMPILE_THRESHOLD`` in optimizers/base.py).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from .speed import interleaved, make_params

SIZES = (1_000_000, 4_000_000, 16_000_000, 64_000_000, 200_000_000)
MANY_TENSORS = (1000, 1024)  # count, elements each


def _variants():
    import optim_plugins as op

    return {
        "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "ours adamw foreach": lambda ps: op.create_optimizer("adamw", ps, lr=1e-3, backend="foreach"),
        "ours adamw compiled": lambda ps: op.create_optimizer("adamw", ps, lr=1e-3, backend="compiled"),
        "ours adamw auto": lambda ps: op.create_optimizer("adamw", ps, lr=1e-3),  # torch's fused kernel on CPU
        # an optimizer torch has no kernel for: what backend="auto" weighs from LOOP_THRESHOLD on
        "ours lion foreach": lambda ps: op.create_optimizer("lion", ps, lr=1e-4, backend="foreach"),
        "ours lion compiled": lambda ps: op.create_optimizer("lion", ps, lr=1e-4, backend="compiled"),
    }


def measure(params: list, repeats: int, warmup: int = 1) -> tuple[dict[str, float], float]:
    """Median ms per step of each variant (interleaved) and the compiled variant's first step in s."""
    built, first = {}, 0.0
    for name, make in _variants().items():
        optimizer = make(params)
        start = time.perf_counter()
        optimizer.step()
        if "compiled" in name:
            first = max(first, time.perf_counter() - start)
        for _ in range(warmup):
            optimizer.step()
        built[name] = optimizer
    return {name: statistics.median(t) for name, t in interleaved(built, repeats).items()}, first


def run(cap: float, repeats: int) -> list[tuple[str, int, int, dict[str, float], float]]:
    points = []
    for size in (s for s in SIZES if s <= cap):
        params = make_params(size)
        ms, first = measure(params, repeats)
        points.append(("params", sum(p.numel() for p in params), len(params), ms, first))
        del params
    count, each = MANY_TENSORS
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(each, generator=generator)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(each, generator=generator) * 1e-3
    ms, first = measure(params, repeats)
    points.append(("tensors", count * each, count, ms, first))
    return points


def plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [p for p in points if p[0] == "params"]
    many = [p for p in points if p[0] == "tensors"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in _variants():
        if sized:
            left.plot([p[1] / 1e6 for p in sized], [p[3][name] for p in sized], marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="ms / step",
             title="AdamW (and Lion) step time vs parameter count (CPU)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    if many:
        names = list(_variants())
        right.barh(names, [many[0][3][n] for n in names])
        right.set(xlabel="ms / step", title=f"{many[0][2]} tensors x {many[0][1] // many[0][2]} elements")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(points, command: str, png: str) -> str:
    names = list(_variants())
    lines = [
        "# Step time vs scale (AdamW and Lion, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only  ",
        "Median ms per step, variants interleaved one step each per round; ratio to torch fused AdamW in brackets. "
        f"Plot: `{png}`.",
        "",
        "| regime | parameters | tensors | " + " | ".join(names) + " | compiled first step s |",
        "|---|---:|---:|" + "---:|" * len(names) + "---:|",
    ]
    for kind, numel, count, ms, first in points:
        base = ms[names[0]]
        cells = " | ".join(f"{ms[n]:.2f} ({ms[n] / base:.2f}x)" for n in names)
        lines.append(f"| {kind} | {numel:,} | {count} | {cells} | {first:.1f} |")
    return "\n".join([*lines, "", *reading(points)]) + "\n"


def reading(points) -> list[str]:
    """What the table says, each number computed from its rows."""
    fused = "torch AdamW fused=True"
    rows = [(numel, ms) for kind, numel, _, ms, _ in points if kind == "params"]
    many = [(count, ms) for kind, _, count, ms, _ in points if kind == "tensors"]

    def span(ratios: list[float]) -> str:
        return f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"

    lines = ["Timings on this machine move by about +-10% between runs; compare within a row.", "", "Reading it:"]
    if rows:
        large = [ms for numel, ms in rows if numel >= 16_000_000]
        small = [ms for numel, ms in rows if numel < 16_000_000]
        lines += [
            f"- `ours adamw auto` (what `create_optimizer(\"adamw\", ...)` does on CPU: torch's fused kernel behind "
            f"our step machinery): {span([ms['ours adamw auto'] / ms[fused] for _, ms in rows])} torch's "
            f"`AdamW(fused=True)` from {rows[0][0]:,} to {rows[-1][0]:,} parameters.",
            f"- `ours adamw compiled` (the optimizer's own update as one C++ loop per bucket): "
            f"{span([ms['ours adamw compiled'] / ms[fused] for ms in large])} torch's fused kernel from 16M "
            f"parameters, {span([ms['ours adamw compiled'] / ms[fused] for ms in small])} below (host time shows "
            f"there); Lion, which torch has no kernel for, "
            f"{span([ms['ours lion foreach'] / ms['ours lion compiled'] for _, ms in rows])} faster on it than on "
            f"foreach, {span([ms['ours lion compiled'] / ms[fused] for _, ms in rows])} the time of a fused AdamW "
            "step (Lion moves 20 bytes per parameter, AdamW 28).",
        ]
    for count, ms in many:
        extra = (ms["ours adamw compiled"] - ms[fused]) * 1e3 / count
        per_tensor = (f"{extra:.1f} us more per tensor: our per-parameter host code" if extra > 0 else
                      f"{-extra:.1f} us less per tensor: its per-parameter host code")
        lines.append(f"- {count} small tensors (host-bound): compiled AdamW {ms['ours adamw compiled'] / ms[fused]:.2f}x "
                     f"torch's fused AdamW ({per_tensor}), auto {ms['ours adamw auto'] / ms[fused]:.2f}x, "
                     f"compiled Lion {ms['ours lion compiled'] / ms[fused]:.2f}x.")
    lines += [
        "- `compiled first step s`: the loop's build (~0.5 s a program, cached on disk: ~0 once built on this "
        "machine). `backend=\"auto\"` takes the compiled backend from `LOOP_THRESHOLD` = 2^20 elements for "
        "float32/float64 parameters and from `COMPILE_THRESHOLD` = 2^24 where Inductor would compile.",
        "- torch's foreach AdamW against its fused kernel: multi-tensor `_foreach_` ops are not fused on CPU.",
    ]
    return lines


def main(args: argparse.Namespace, command: str) -> str:
    points = run(float(args.params), args.repeats)
    output = Path(args.output) if args.output else Path("benchmarks/scale.md")
    png = output.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(points, png)
    return markdown(points, command, png.name)
