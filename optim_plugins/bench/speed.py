"""Step-speed benchmark: ours (every backend) side by side with torch.optim, pytorch_optimizer and bitsandbytes.

``optim-plugins bench --suite speed --optimizers elementwise --params 2e7`` writes
``benchmarks/results.md``. For each optimizer the variants (ours per backend, torch's
implementations, pytorch_optimizer's, bitsandbytes' 8-bit ones, and torch's fused AdamW as the baseline) are built on
the same tensors (a transformer-like mix of 2-D weights and 1-D biases/norms) and timed
*interleaved*, one step of each in turn, so that a busy machine slows them alike; each row
reports the median step time, the ratio to the fused-AdamW steps measured in the same
rounds, and the per-byte ratio: the time per byte this optimizer must move (BYTES_PER_PARAM,
DESIGN.md "Speed is bandwidth") over the time per byte of fused AdamW (28 B/param).
The compiled backend's first step (the build of its C++ loop, or Inductor's compile) is reported
separately; compiled rows are measured from 1M parameters (below that, build time is the whole story).
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

# Bytes a step must read + write per fp32 parameter (p r+w, g r, each state r+w; read-only states r).
BYTES_PER_PARAM = {
    "adamw": 28, "adam": 28, "fused_adamw": 28, "adabelief": 28, "nadam": 28, "radam": 28, "adamax": 28,
    "adopt": 28, "schedulefree_adamw": 28, "ademamix": 36, "adan": 44, "sgd": 20, "lion": 20, "rmsprop": 20,
    "adagrad": 20, "schedulefree_sgd": 20, "signsgd": 20, "sophiag": 24, "sophiah": 24,
    "adam8bit": 16, "adamw8bit": 16, "lion8bit": 14, "adam4bit": 14, "adamw4bit": 14,
}
BASELINE = "torch AdamW fused=True"
# pytorch_optimizer's class for the same algorithm (where it has one).
PYTORCH_OPTIMIZER = {
    "adabelief": "AdaBelief", "adan": "Adan", "lion": "Lion", "radam": "RAdam", "nadam": "NAdam",
    "ademamix": "AdEMAMix", "adopt": "ADOPT", "signsgd": "SignSGD", "schedulefree_adamw": "ScheduleFreeAdamW",
    "schedulefree_sgd": "ScheduleFreeSGD", "adamax": "AdaMax", "sophiah": "SophiaH",
}
# bitsandbytes' class for the 8-bit optimizers (it runs them on CPU too; same block-wise format)
BITSANDBYTES = {"adam8bit": "Adam8bit", "adamw8bit": "AdamW8bit", "lion8bit": "Lion8bit"}
TORCH = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop", "adagrad": "Adagrad",
         "nadam": "NAdam", "radam": "RAdam", "adamax": "Adamax"}
COMPILED_FROM = 1_000_000
TORCH_FUSED_AUTO = ("adam", "adamw", "fused_adamw", "sgd", "adagrad")  # backend="auto": torch._fused_*_ on CPU


@dataclass
class Row:
    name: str
    variant: str
    ms_per_step: float
    state_bytes_per_param: float
    bytes_per_param: int | None
    baseline_ms: float | None = None
    first_step_s: float | None = None
    error: str = ""

    def bandwidth(self, n: int) -> float | None:
        if self.bytes_per_param is None or not self.ms_per_step:
            return None
        return self.bytes_per_param * n / (self.ms_per_step * 1e-3) / 1e9

    @property
    def ratio(self) -> float | None:
        return self.ms_per_step / self.baseline_ms if self.baseline_ms and self.ms_per_step else None

    @property
    def per_byte_ratio(self) -> float | None:
        if self.ratio is None or self.bytes_per_param is None:
            return None
        return self.ratio * BYTES_PER_PARAM["adamw"] / self.bytes_per_param


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


def _state_bytes(optimizer: torch.optim.Optimizer, numel: int) -> float:
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return state / numel


def interleaved(optimizers: Mapping[str, Any], repeats: int) -> dict[str, list[float]]:
    """ms per step of each optimizer over ``repeats`` rounds of one step each in turn (a busy machine
    slows them alike, so ratios within a round hold)."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


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
    return 1e3 * statistics.median(times), _state_bytes(optimizer, sum(p.numel() for p in params))


def variants(name: str, backends: tuple[str, ...] = ("reference", "foreach", "compiled")
             ) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """Ours per backend, torch's implementations, pytorch_optimizer's; the baseline comes first."""
    import optim_plugins as op

    found: dict[str, Callable[[list], torch.optim.Optimizer]] = {
        BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}
    extra = {"momentum": 0.9} if name in ("sgd", "schedulefree_sgd") else {}
    torch_cls = getattr(torch.optim, TORCH.get(name, ""), None)
    if torch_cls is not None:
        found["torch foreach=False"] = lambda ps: torch_cls(ps, lr=1e-3, foreach=False, **extra)
        found["torch foreach=True"] = lambda ps: torch_cls(ps, lr=1e-3, foreach=True, **extra)
        if name in ("adam", "sgd", "adagrad"):
            found["torch fused=True"] = lambda ps: torch_cls(ps, lr=1e-3, fused=True, **extra)
    if name in PYTORCH_OPTIMIZER:
        def external(ps, cls_name=PYTORCH_OPTIMIZER[name]):
            import pytorch_optimizer

            return _trained(getattr(pytorch_optimizer, cls_name)(ps, lr=1e-3, **extra))
        found[f"pytorch_optimizer {PYTORCH_OPTIMIZER[name]}"] = external
    if name in BITSANDBYTES and importlib.util.find_spec("bitsandbytes") is not None:
        def bnb(ps, cls_name=BITSANDBYTES[name]):
            import bitsandbytes

            return _trained(getattr(bitsandbytes.optim, cls_name)(ps, lr=1e-3))
        found[f"bitsandbytes {BITSANDBYTES[name]}"] = bnb
    elementwise = op.get_optimizer_spec(name).capabilities.elementwise
    for backend in backends if elementwise else ("reference",):
        found[f"optim_plugins backend={backend}"] = (
            lambda ps, b=backend: _trained(op.create_optimizer(name, ps, lr=1e-3, backend=b, **extra)))
    if elementwise and "compiled" in backends:  # the same programs on Inductor's code, side by side
        found["optim_plugins backend=compiled (Inductor)"] = (
            lambda ps: _OnInductor(_trained(op.create_optimizer(name, ps, lr=1e-3, backend="compiled", **extra))))
    if name in TORCH_FUSED_AUTO:  # auto differs from every explicit backend: it calls torch's fused kernel
        found["optim_plugins backend=auto (torch's fused kernel)"] = (
            lambda ps: op.create_optimizer(name, ps, lr=1e-3, **extra))
    return found


class _OnInductor:
    """A ``backend="compiled"`` optimizer whose steps take Inductor's code, not the C++ loop."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def step(self) -> None:
        from ..kernels import compiled

        compiled.CPP_LOOPS = False
        try:
            self.optimizer.step()
        finally:
            compiled.CPP_LOOPS = True


def _trained(optimizer):
    if hasattr(optimizer, "train"):  # schedule-free optimizers step in train mode
        optimizer.train()
    return optimizer


def run(names: list[str], total: int = 4_000_000, warmup: int = 3, repeats: int = 10,
        backends: tuple[str, ...] | None = None) -> tuple[list[Row], int]:
    """Time every variant of every optimizer interleaved with the fused-AdamW baseline."""
    params = make_params(total)
    numel = sum(p.numel() for p in params)
    if backends is None:
        backends = ("reference", "foreach", "compiled") if numel >= COMPILED_FROM else ("reference", "foreach")
    rows = []
    for name in names:
        rows += time_variants(name, variants(name, backends), params, warmup, repeats)
        print(f"speed: {name} done", file=sys.stderr, flush=True)
    return rows, numel


def time_variants(name: str, found: Mapping[str, Callable[[list], Any]], params: list, warmup: int, repeats: int,
                  rounds: Callable[[Mapping[str, Any], int], dict[str, list[float]]] = interleaved) -> list[Row]:
    """One row per variant of optimizer ``name`` (``found``: variant -> builder, the baseline among them):
    each built on ``params`` (its first step timed), warmed, then all timed by ``rounds`` (interleaved);
    a variant that fails is a row with its error, not fatal."""
    numel = sum(p.numel() for p in params)
    built, first, errors = {}, {}, {}
    for variant, make in found.items():
        try:
            start = time.perf_counter()
            optimizer = make(params)
            optimizer.step()
            first[variant] = time.perf_counter() - start
            for _ in range(warmup):
                optimizer.step()
            built[variant] = optimizer
        except Exception as exc:  # a failing variant is reported, not fatal
            errors[variant] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    times = rounds(built, repeats)
    base = statistics.median(times[BASELINE]) if BASELINE in times else None
    rows = []
    for variant in found:
        if variant == BASELINE and name != "adamw":
            continue
        bpp = BYTES_PER_PARAM["adamw"] if variant.startswith("torch AdamW") else BYTES_PER_PARAM.get(name)
        if variant in errors:
            rows.append(Row(name, variant, 0.0, 0.0, bpp, base, error=errors[variant]))
            continue
        rows.append(Row(name, variant, statistics.median(times[variant]), _state_bytes(built[variant], numel), bpp,
                        base, first[variant] if "compiled" in variant else None))
    return rows


def markdown(rows: list[Row], numel: int, command: str) -> str:
    lines = [
        "# Optimizer step benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only  ",
        f"Parameters: {numel:,} fp32 in transformer-like tensors; median of the timed steps, every variant of an "
        "optimizer timed interleaved with torch's fused AdamW (the baseline of its ratios).",
        "",
        "x fused AdamW: step time over the fused-AdamW step time of the same rounds. per byte: that ratio times "
        "28 / (bytes this optimizer must move per parameter), i.e. <= 1 means it moves its bytes at least as fast "
        "as torch's fused AdamW moves its 28.",
        "",
        "| optimizer | implementation | ms / step | x fused AdamW (x fastest torch AdamW) | per byte | GB/s moved "
        "| state bytes / param | first step s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.variant} | failed: {r.error} | - | - | - | - | - |")
            continue
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        per_byte = "-" if r.per_byte_ratio is None else f"{r.per_byte_ratio:.2f}"
        bandwidth = r.bandwidth(numel)
        first = "-" if r.first_step_s is None else f"{r.first_step_s:.1f}"
        lines.append(f"| {r.name} | {r.variant} | {r.ms_per_step:.2f} | {ratio} | {per_byte} | "
                     f"{'-' if bandwidth is None else f'{bandwidth:.1f}'} | {r.state_bytes_per_param:.2f} | {first} |")
    lines += ["", *fastest_summary(rows), "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "## Notes",
    "",
    "- `backend=compiled`: the optimizer's own `update`, recorded once per program and printed as one C++ loop "
    "over the bucket (kernels/cpp/loops.py, fp32/bf16/fp64 buckets; one call per step); `backend=compiled (Inductor)`: "
    "the same program compiled by Inductor, one call per tensor (what fp16 buckets run). `first step s` includes "
    "the build (the loop: ~0.5 s; Inductor: seconds; both from an on-disk cache when the same program was built "
    "before on this machine). Later steps never rebuild (lr, step, betas enter as numbers).",
    "- `adam`, `adamw`, `fused_adamw`, `sgd` and `adagrad` with `backend=auto` (the default) call torch's fused kernel "
    "(`torch._fused_adamw_`, `_fused_sgd_`, ...) on CPU: for adam(w) the same kernel as the baseline, so their "
    "ratio is 1.0 up to noise and host overhead.",
    "- 8/4-bit optimizers: `backend=compiled` decodes, steps and codes block-wise states in its C++ loop, "
    "block by block in the cache (kernels/cpp/codec.h: one table read per coded value; the bytes of decoding, "
    "stepping and coding in turn); the per-byte ratio counts the compact states. The rank-1 4-bit second moment "
    "of a 2-D tensor (adam4bit/adamw4bit's default, a scale that spans the tensor) is coded in the same loop, "
    "whose first pass finds the new row and column maxima (the update up to that moment, nothing stored); n-D "
    "ones are decoded into fp32 temporaries before the loop and coded after it, a few tensors at a time, as the "
    "other backends decode every coded state. The coding is compute-bound here (a table read per value), so "
    "8/4-bit steps move their bytes 3-7x slower than the fused AdamW step moves its 28.",
    "- Timings on a shared machine are noisy; the ratios come from interleaved rounds, not from separate runs.",
]


def fastest_summary(rows: list[Row]) -> list[str]:
    """One line per optimizer: its fastest backend of ours and the per-byte ratio (target <= 1.2; adamw <= 1.0)."""
    out = ["## Fastest backend of ours per optimizer", "",
           "| optimizer | fastest of ours | x fused AdamW | per byte | target met |", "|---|---|---:|---:|---|"]
    for name in dict.fromkeys(r.name for r in rows):
        ours = [r for r in rows if r.name == name and r.variant.startswith("optim_plugins") and not r.error]
        if not ours:
            continue
        best = min(ours, key=lambda r: r.ms_per_step)
        target = 1.0 if name in ("adamw", "fused_adamw") else 1.2
        value = best.per_byte_ratio if name not in ("adamw", "fused_adamw") else best.ratio
        met = "-" if value is None else ("yes" if value <= target else "no")
        out.append(f"| {name} | {best.variant.replace('optim_plugins ', '')} | "
                   f"{'-' if best.ratio is None else f'{best.ratio:.2f}'} | "
                   f"{'-' if best.per_byte_ratio is None else f'{best.per_byte_ratio:.2f}'} | {met} (<= {target}) |")
    return out


def elementwise_names() -> list[str]:
    import optim_plugins as op

    # Sophia-H needs gradients that carry a graph (Hessian-vector products): not a plain step.
    return [n for n in op.list_optimizers() if op.get_optimizer_spec(n).capabilities.elementwise
            and not op.get_optimizer_spec(n).capabilities.needs_create_graph]


def main(args: argparse.Namespace, command: str) -> str:
    names = elementwise_names() if args.optimizers == "elementwise" else args.optimizers.split(",")
    rows, numel = run(names, total=int(args.params), warmup=1 if args.params >= 1e7 else 3, repeats=args.repeats)
    return markdown(rows, numel, command)
