"""GPU step benchmark: the Triton kernels (``backend="triton"``) beside torch's fused AdamW, torch's
other CUDA implementations and bitsandbytes' 8-bit optimizers, as time and achieved bandwidth.

``optim-plugins bench --suite gpu`` (1e8 parameters by default) writes ``benchmarks/gpu.md`` (needs a CUDA GPU;
``benchmarks/gpu_check.sh`` runs it with the native kernel tests in one call). The variants are
speed.py's (ours per backend, torch's, pytorch_optimizer's and bitsandbytes' where installed) on the
same transformer-like tensors, stepped interleaved, one step each in turn, each timed by CUDA events.
Achieved bandwidth counts the bytes a step must move (speed.BYTES_PER_PARAM: 28 per parameter for
fp32 AdamW) and is given as a fraction of the card's nominal peak (NOMINAL_PEAK_GBPS, by name) and of
what a device-to-device copy reaches on it, measured in the same run. Issue #9's targets: >= 85% of
peak from 100M parameters, >= 1.0x torch's fused AdamW, 8-bit Adam faster than bitsandbytes'.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from typing import Any, Callable, Mapping

import torch

from .speed import Row, interleaved, make_params, time_variants, variants

# HBM bandwidth in GB/s from the vendors' data sheets, by a part of torch.cuda.get_device_name()
# (first match wins, so the more specific names come first)
NOMINAL_PEAK_GBPS = {
    "H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "GH200": 4000, "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "RTX 4090": 1008,
}


def nominal_peak(device_name: str) -> float | None:
    """The data-sheet memory bandwidth (GB/s) of a GPU named ``device_name``; None when not listed."""
    return next((peak for part, peak in NOMINAL_PEAK_GBPS.items() if part in device_name), None)


def _cuda_rounds(steps: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """ms per call of each step over ``repeats`` rounds of one call each in turn, timed by CUDA events
    (one synchronisation per round)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        events = []
        for step in steps.values():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        for name, (start, end) in zip(steps, events):
            times[name].append(start.elapsed_time(end))
    return times


def copy_bandwidth(device: torch.device, numel: int = 2**28, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy of ``numel`` fp32 values (read + write counted)."""
    source = torch.empty(numel, device=device)
    target = torch.empty_like(source)
    ms = statistics.median(_cuda_rounds({"copy": lambda: target.copy_(source)}, repeats)["copy"])
    return 2 * 4 * numel / (ms * 1e-3) / 1e9


def run(names: list[str], total: int, device: torch.device, repeats: int = 20, warmup: int = 3,
        backends: tuple[str, ...] = ("foreach", "triton")) -> tuple[list[Row], int]:
    """Time every variant of every optimizer on ``device``, interleaved with torch's fused AdamW (speed.py's
    variants, less Inductor's and those of packages not installed here; CUDA events on a GPU, the host
    clock elsewhere)."""
    on_host = make_params(total)
    params = [torch.nn.Parameter(p.detach().to(device)) for p in on_host]
    for p, original in zip(params, on_host):
        p.grad = original.grad.to(device)
    del on_host
    skipped = ("Inductor", *(() if importlib.util.find_spec("pytorch_optimizer") else ("pytorch_optimizer",)))
    rounds = interleaved if device.type != "cuda" else (
        lambda built, count: _cuda_rounds({variant: optimizer.step for variant, optimizer in built.items()}, count))
    rows = []
    for name in names:
        found = {variant.replace(" (torch's fused kernel)", ""): build  # on CUDA auto picks Triton where it can
                 for variant, build in variants(name, backends).items()
                 if not any(word in variant for word in skipped)}
        rows += time_variants(name, found, params, warmup, repeats, rounds)
        print(f"gpu: {name} done", file=sys.stderr, flush=True)
    return rows, sum(p.numel() for p in params)


def markdown(rows: list[Row], numel: int, command: str, device_name: str, peak: float | None, copy: float) -> str:
    triton = importlib.util.find_spec("triton")
    triton_version = __import__("triton").__version__ if triton is not None else "not installed"

    def percent(value: float | None, of: float | None) -> str:
        return f"{100 * value / of:.0f}%" if value is not None and of else "-"

    lines = [
        "# GPU optimizer step benchmark",
        "",
        f"Command: `{command}`  ",
        f"GPU: {device_name}; torch {torch.__version__}, triton {triton_version}  ",
        f"Parameters: {numel:,} fp32 in transformer-like tensors; median of the timed steps (CUDA events), every "
        "variant of an optimizer timed interleaved with torch's fused AdamW.  ",
        f"Bandwidth: nominal peak {f'{peak:,.0f} GB/s (data sheet)' if peak else 'unknown for this GPU'}; a "
        f"device-to-device copy reached {copy:,.0f} GB/s in this run.",
        "",
        "| optimizer | implementation | ms / step | x fused AdamW | GB/s moved | of nominal peak | of copy | "
        "state bytes / param |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.name} | {row.variant} | failed: {row.error} | - | - | - | - | - |")
            continue
        bandwidth = row.bandwidth(numel)
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        lines.append(f"| {row.name} | {row.variant} | {row.ms_per_step:.3f} | {ratio} | "
                     f"{f'{bandwidth:,.0f}' if bandwidth else '-'} | {percent(bandwidth, peak)} | "
                     f"{percent(bandwidth, copy)} | {row.state_bytes_per_param:.2f} |")
    lines += ["", "GB/s moved: the bytes a step must read and write (28 per parameter for fp32 AdamW, "
              "speed.BYTES_PER_PARAM) over its time. bitsandbytes rows appear where it is installed.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace, command: str) -> str:
    if not torch.cuda.is_available():
        raise ValueError("bench --suite gpu: needs a CUDA GPU, and torch sees none here "
                         "(the CPU numbers are --suite speed)")
    device = torch.device("cuda")
    rows, numel = run(args.optimizers.split(","), int(args.params), device, repeats=args.repeats)
    name = torch.cuda.get_device_name(device)
    return markdown(rows, numel, command, name, nominal_peak(name), copy_bandwidth(device))
