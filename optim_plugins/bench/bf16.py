"""Step time with bfloat16 parameters (``optim-plugins bench --suite bf16``).

bf16 weights keep learning here through Kahan compensation (``compensation="auto"``, the default
for bf16 parameters) or without it (``compensation=None``). Each optimizer of ``--optimizers`` is
timed on bf16 copies of one transformer-like parameter set, per backend, interleaved one step
each per round with torch's fused AdamW on the fp32 parameters and on bf16 copies (which keeps no
compensation). Inductor's code for the compiled backend (what it ran before the C++ loops) is timed
beside the loop from 1M parameters on (its compile is seconds per program).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any, Callable

import torch

from .speed import COMPILED_FROM, _OnInductor, _trained, interleaved, make_params

BASELINES = ("torch AdamW fused=True, fp32", "torch AdamW fused=True, bf16")


def variants(name: str, numel: int) -> dict[str, tuple[torch.dtype, Callable[[list], Any]]]:
    """Ours on bf16 parameters per backend and compensation (dtype of the parameters, factory)."""
    import optim_plugins as op

    def ours(backend: str, compensation: str | None = "auto") -> Callable[[list], Any]:
        return lambda ps: _trained(op.create_optimizer(name, ps, lr=1e-4, backend=backend, compensation=compensation))

    found = {
        f"{name} Kahan, backend=auto": (torch.bfloat16, ours("auto")),
        f"{name} Kahan, backend=compiled": (torch.bfloat16, ours("compiled")),
        f"{name} Kahan, backend=foreach": (torch.bfloat16, ours("foreach")),
        f"{name} no compensation, backend=compiled": (torch.bfloat16, ours("compiled", None)),
    }
    if numel >= COMPILED_FROM:
        found[f"{name} Kahan, backend=compiled (Inductor)"] = (torch.bfloat16, lambda ps: _OnInductor(ours("compiled")(ps)))
    return found


def _copies(params: list, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    out = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    for p, source in zip(out, params):
        p.grad = source.grad.to(dtype)
    return out


def run(names: list[str], total: int, repeats: int, warmup: int = 2) -> tuple[dict, dict, int]:
    """``({variant: median ms}, {variant: first step s}, numel)``, every variant interleaved."""
    params = make_params(total)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    numel = sum(p.numel() for p in params)
    makers = {BASELINES[0]: (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
              BASELINES[1]: (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True))}
    for name in names:
        makers.update(variants(name, numel))
    built, first = {}, {}
    for variant, (dtype, make) in makers.items():
        optimizer = make(_copies(params, dtype))
        start = time.perf_counter()
        optimizer.step()
        first[variant] = time.perf_counter() - start
        for _ in range(warmup):
            optimizer.step()
        built[variant] = optimizer
    return {v: statistics.median(t) for v, t in interleaved(built, repeats).items()}, first, numel


def markdown(ms: dict[str, float], first: dict[str, float], numel: int, command: str) -> str:
    fp32, bf16 = (ms[b] for b in BASELINES)
    lines = [
        "# Step time with bf16 parameters",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only  ",
        f"Parameters: {numel:,} in transformer-like tensors; median ms per step, every variant interleaved one step "
        "each per round. Kahan: `compensation=\"auto\"` (the default for bf16 parameters: a bf16 compensation per "
        "parameter, 2 more bytes read and written per parameter); torch's fused AdamW keeps none.",
        "",
        "| variant | ms / step | x torch fused AdamW fp32 | x torch fused AdamW bf16 | first step s |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, value in ms.items():
        lines.append(f"| {variant} | {value:.2f} | {value / fp32:.2f} | {value / bf16:.2f} | {first[variant]:.1f} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, command: str) -> str:
    names = [n for n in args.optimizers.split(",") if n]
    ms, first, numel = run(names, int(float(args.params)), args.repeats)
    return markdown(ms, first, numel, command)
