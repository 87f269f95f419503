"""Step-time overhead of ``op.telemetry``: ``optim-plugins bench --suite telemetry``.

Per optimizer (``NAME`` or ``NAME@BACKEND``; the table names the backend the step really
used: ``auto`` compiles elementwise optimizers on CPU from ``COMPILE_THRESHOLD`` elements), one
optimizer per variant over the same tensors (:func:`.speed.make_params`): telemetry off, and
recording every step with ``by="group"`` and ``by="param"``, and a second optimizer with telemetry
off, whose ratio to the first shows what this machine's noise alone makes of a ratio. The steps are
interleaved (one step of each variant per round, the order rotated each round), so that load
from other processes hits every variant alike; the overhead is the median of the per-round
ratios to "off". The "measured" column says how the recording steps took their numbers: inside
the step's kernel (the C++ Adam/SGD kernels behind ``auto`` on CPU, :mod:`optim_plugins.kernels.cpp`)
or by a copy of the parameters and norm passes after the step. Two reference passes over the
parameters (a copy, a norm) are timed in the same rounds: the copy is the floor of the
every-step overhead where the step's kernel cannot sum.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch

from .speed import make_params

DEFAULT_OPTIMIZERS = "adamw,adamw@foreach,adafactor,adam8bit"
DEFAULT_PARAMS = 20_000_000
VARIANTS: dict[str, dict | None] = {
    "off": None,
    "off, a second optimizer (A/A: the noise)": None,
    "every step, by=group": {"every": 1, "by": "group"},
    "every step, by=param": {"every": 1, "by": "param"},
}


def _timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(names: list[str], total: int, repeats: int = 10, warmup: int = 2) -> tuple[dict, dict, tuple, tuple]:
    """``({(optimizer, variant): [seconds per round]}, {reference: [seconds]}, (numel, tensors), load averages)``."""
    import optim_plugins as op

    params = make_params(total)
    numel = sum(p.numel() for p in params)
    copies = [torch.empty_like(p) for p in params]
    steps: dict[tuple[str, str], Callable[[], object]] = {}
    backends: dict[str, str] = {}
    recorders = {}
    for label in names:
        name, _, backend = label.partition("@")
        for variant, options in VARIANTS.items():
            # its default options (Adafactor: relative step)
            optimizer = op.create_optimizer(name, params, **({"backend": backend} if backend else {}))
            if options is not None:
                recorders[(label, variant)] = op.telemetry(optimizer, keep=1, **options)
            steps[(label, variant)] = optimizer.step
            describe = getattr(optimizer, "describe_backend", None)
            backends[label] = describe(optimizer.param_groups[0]) if describe else "torch"
    references = {
        "one copy of the parameters (torch._foreach_copy_)": lambda: torch._foreach_copy_(copies, params),
        "one norm pass over the parameters (torch._foreach_norm)": lambda: torch._foreach_norm(params),
    }
    load_before = os.getloadavg()
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    ref_times: dict[str, list[float]] = {key: [] for key in references}
    for r in range(repeats):
        for name in names:
            order = list(VARIANTS)
            order = order[r % len(order):] + order[: r % len(order)]
            for variant in order:
                times[(name, variant)].append(_timed(steps[(name, variant)]))
        for key, fn in references.items():
            ref_times[key].append(_timed(fn))
    measured = {}
    for key, recorder in recorders.items():
        assert recorder.history, "telemetry recorded nothing"
        # the eager recorder keeps its CPU copies of the parameters; the in-step sums need none
        measured[key] = "a copy, sums around the step" if recorder._copies else "in the step's kernel"
        recorder.remove()
    return times, ref_times, (numel, len(params), backends, measured), (load_before, os.getloadavg())


def markdown(names: list[str], times: dict, ref_times: dict, size: tuple, loads: tuple, command: str) -> str:
    median = statistics.median
    numel, tensors, backends, measured = size
    lines = [
        "# Telemetry overhead",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU only; load average {loads[0][0]:.1f} before, {loads[1][0]:.1f} after"
        + (" (other processes were running: read the ratios, measured side by side in one run, not the times)"
           if loads[0][0] > (os.cpu_count() or 1) else "") + "  ",
        f"Parameters: {numel:,} fp32 in {tensors} transformer-like tensors; "
        f"{len(next(iter(times.values())))} interleaved rounds, medians.",
        "",
        "| optimizer | backend used | telemetry | measured | ms / step | x off (median of per-round ratios) "
        "| middle half of the ratios | overhead |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for name in names:
        off = times[(name, "off")]
        for variant in VARIANTS:
            t = times[(name, variant)]
            ratios = [a / b for a, b in zip(t, off)]
            ratio = median(ratios)
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
            spread = "-" if variant == "off" else f"{quartiles[0]:.3f}-{quartiles[2]:.3f}"
            overhead = "-" if variant == "off" else f"{100 * (ratio - 1):+.1f}%"
            how = measured.get((name, variant), "-")
            lines.append(f"| {name.partition('@')[0]} | {backends[name]} | {variant} | {how} | {1e3 * median(t):.1f} | "
                         f"{ratio:.3f} | {spread} | {overhead} |")
    lines += ["", "Reference passes, timed in the same rounds (share of each optimizer's step with telemetry off):", "",
              "| pass | ms | " + " | ".join(f"% of {name.partition('@')[0]} ({backends[name]}) step" for name in names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for key, t in ref_times.items():
        shares = " | ".join(f"{100 * median(t) / median(times[(name, 'off')]):.1f}%" for name in names)
        lines.append(f"| {key} | {1e3 * median(t):.1f} | {shares} |")
    lines += [
        "",
        "Where the numbers are taken inside the step: `backend=\"auto\"` groups that torch's fused Adam/AdamW or",
        "SGD kernel steps run this package's C++ kernel on recording steps (`optim_plugins/kernels/cpp`: ATen's",
        "fused update operation for operation, so parameters and states are bitwise those of an unrecorded step,",
        "tested), and the compiled backend's C++ loops (`kernels/cpp/loops.py`, 8/4-bit block-wise states",
        "included) sum in the pass that steps: g^2, update^2, old p^2 and v from values already in registers,",
        "no copy, no second pass. Elsewhere on CPU (foreach, reference, factored and n-D rank-1 4-bit states) a",
        "recording step copies the parameters before the update (the update is new minus old) with a C++ copy",
        "that sums g^2 and p^2 in its pass, and after it sums (new - old)^2 and v in one more pass: about 20",
        "bytes per parameter for fp32/fp64 parameters (torch's copy, norm and subtraction passes, which other",
        "dtypes take, move about 36). The Triton kernels (CUDA) take the four sums",
        "inside the step as well (tested under TRITON_INTERPRET=1; not timed here, no GPU). For the copy path,",
        "record every N steps, which divides the overhead by N (the trainer callbacks default to the logging",
        "interval: 500 steps in the HF Trainer, 50 in Lightning).",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, command: str) -> str:
    names = (getattr(args, "optimizers", None) or DEFAULT_OPTIMIZERS).split(",")
    total = int(getattr(args, "params", None) or DEFAULT_PARAMS)
    repeats = int(getattr(args, "repeats", None) or 10)
    times, ref_times, size, loads = measure(names, total, repeats)
    return markdown(names, times, ref_times, size, loads, command)
