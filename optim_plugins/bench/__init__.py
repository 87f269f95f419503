"""Benchmarks run by ``optim-plugins bench --suite NAME``; each suite writes a Markdown table.

A suite is a module here with ``main(args, command) -> str`` (the table); ``args`` carries the
``bench`` command's options (``--optimizers``, ``--params``, ``--repeats``, ``--dtype``, ...).
Speed and memory are measured here, side by side in one run, never asserted in tests.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

SUITES = {
    "speed": "step time per optimizer and backend, as a ratio to torch's fastest AdamW",
    "memory": "optimizer-state bytes per parameter of every optimizer",
    "scale": "step time vs parameter count and vs number of tensors (writes a PNG)",
    "lean": "peak memory and step time of memory-lean AdamW modes (bf16+Kahan, 8/4-bit, GaLore, release)",
    "telemetry": "step-time overhead of op.telemetry recording every step",
    "bf16": "step time with bf16 parameters (Kahan compensation or none) per backend, vs torch's fused AdamW",
    "sharded": "optimizer-state bytes per rank under ShardedOptimizer, 2 and 4 gloo processes",
    "gpu": "step time and achieved bandwidth of the Triton kernels vs torch's fused AdamW (needs a CUDA GPU)",
}
DEFAULT_OUTPUT = {"speed": "benchmarks/results.md", "memory": "benchmarks/state_memory.md",
                  "sharded": "benchmarks/sharded_state.md"}
# Options a suite gets when the command line leaves them out (None).
COMMON_DEFAULTS = {"optimizers": "adamw,sgd,rmsprop", "params": 4e6}
SUITE_DEFAULTS = {"telemetry": {"optimizers": "adamw,adamw@foreach,adafactor,adam8bit", "params": 2e7},
                  "bf16": {"optimizers": "adamw,lion", "params": 2e7},
                  "gpu": {"optimizers": "adamw,adam,lion,adabelief,sgd,adan,rmsprop,adam8bit,adamw8bit,lion8bit",
                          "params": 1e8}}


def run_suite(name: str, args: argparse.Namespace, command: str) -> str:
    """Run suite ``name`` and write its table to ``args.output`` (unless empty); return the table."""
    if name not in SUITES:
        raise ValueError(f"invalid suite: {name!r} (choose from {', '.join(SUITES)})")
    for key, value in {**COMMON_DEFAULTS, **SUITE_DEFAULTS.get(name, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    table = importlib.import_module(f"{__name__}.{name}").main(args, command)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table)
    return table
