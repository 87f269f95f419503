"""Memory-lean AdamW modes side by side: ``optim-plugins bench --suite lean``.

One small LLaMA-style causal LM (``transformers.LlamaConfig``, built in code, ~``--params``
parameters) is trained ``--repeats`` steps from the same initial weights on the same generated
token data in each mode: AdamW with fp32 weights, fp32 weights with bf16 states, bf16 weights
with Kahan compensation (the default), with fp32 states, with stochastic rounding, without
compensation, 8-bit and 4-bit states, GaLore, and gradient release (fp32 and bf16 + Kahan).

Memory is counted as tensor bytes on CPU: weights (every parameter), optimizer state (every
tensor in ``optimizer.state``, after the step) and the peak of the gradients alive at once,
tracked by hooks around each parameter's gradient accumulation (with gradient release a
gradient is freed inside backward right after its step). Not counted: activations, and the
step's short-lived temporaries (fp32 working copies of bf16 weights, 8/4-bit states decoded
for one bucket of tensors), which exist only inside ``step``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

LR = 1e-4  # Adam's per-step change (~lr) is near bf16's spacing for weights of 0.02-0.05: rounding matters
BATCH, SEQUENCE, VOCAB = 8, 32, 256


@dataclass
class Mode:
    name: str
    dtype: torch.dtype
    optimizer: str
    options: dict[str, Any]
    release: bool = False


def modes(rank: int) -> list[Mode]:
    bf16 = torch.bfloat16
    return [
        Mode("AdamW fp32", torch.float32, "adamw", {}),
        Mode("fp32 weights, bf16 states (state_dtype='bf16')", torch.float32, "adamw", {"state_dtype": "bf16"}),
        Mode("bf16 weights + Kahan (default)", bf16, "adamw", {}),
        Mode("bf16 weights + Kahan, fp32 states", bf16, "adamw", {"state_dtype": "fp32"}),
        Mode("bf16 weights, stochastic rounding", bf16, "adamw", {"compensation": "stochastic"}),
        Mode("bf16 weights, no compensation", bf16, "adamw", {"compensation": None}),
        Mode("8-bit states (adamw8bit)", torch.float32, "adamw8bit", {}),
        Mode("4-bit states (adamw4bit)", torch.float32, "adamw4bit", {}),
        Mode(f"GaLore (galore_adamw, rank {rank})", torch.float32, "galore_adamw",
             {"rank": rank, "update_proj_gap": 50, "scale": 1.0, "optim_target_modules": "all-linear"}),
        Mode("gradient release (AdamW fp32)", torch.float32, "adamw", {}, release=True),
        Mode("gradient release, bf16 weights + Kahan", bf16, "adamw", {}, release=True),
    ]


def hidden_size(params: int) -> int:
    """Hidden size h of the 2-layer model with ~``params`` parameters (24 h^2 + 2 * 256 h), a multiple of 32."""
    h = (-2 * VOCAB + math.sqrt(4 * VOCAB**2 + 96 * params)) / 48
    return max(32, int(round(h / 32)) * 32)


def make_model(hidden: int, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQUENCE)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype)


def make_batches(steps: int) -> list[torch.Tensor]:
    """Arithmetic token sequences (start, stride random per row): learnable, made here."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
        stride = torch.randint(1, 4, (BATCH, 1), generator=generator)
        out.append((start + stride * torch.arange(SEQUENCE)) % VOCAB)
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class GradientMeter:
    """The peak bytes of gradients alive at once: + when a gradient is accumulated, - when it is freed
    (by the release hook, registered between the two hooks here, or by ``zero_grad``)."""

    def __init__(self, model: nn.Module, optimizer_hooks: Callable[[], Any]):
        self.live = self.peak = 0
        params = [p for p in model.parameters() if p.requires_grad]
        self.handles = [p.register_post_accumulate_grad_hook(self._added) for p in params]
        self.release = optimizer_hooks()  # the release hooks run after _added ...
        self.handles += [p.register_post_accumulate_grad_hook(self._maybe_freed) for p in params]  # ... and before this

    def _added(self, p: torch.Tensor) -> None:
        self.live += nbytes(p.grad)
        self.peak = max(self.peak, self.live)

    def _maybe_freed(self, p: torch.Tensor) -> None:
        if p.grad is None:
            self.live -= nbytes(p)

    def zeroed(self) -> None:
        self.live = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.release is not None:
            self.release.remove()


@dataclass
class Result:
    mode: Mode
    numel: int
    weights: int
    state: int
    grads: int
    ms: float
    losses: list[float]

    @property
    def peak(self) -> int:
        return self.weights + self.state + self.grads

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def run_mode(mode: Mode, hidden: int, batches: list[torch.Tensor]) -> Result:
    import optim_plugins as op

    model = make_model(hidden, mode.dtype)
    optimizer = op.create_optimizer(mode.optimizer, model, lr=LR, **mode.options)
    meter = GradientMeter(model, lambda: op.release_gradients(model, optimizer) if mode.release else None)
    losses, times, state = [], [], 0
    torch.manual_seed(0)  # stochastic rounding draws
    try:
        for tokens in batches:
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            meter.zeroed() if not mode.release else None
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
            state = max(state, op.state_bytes(optimizer))
    finally:
        meter.remove()
    params = list(model.parameters())
    timed = times[2:] if len(times) > 3 else times
    return Result(mode, sum(p.numel() for p in params), sum(nbytes(p) for p in params), state, meter.peak,
                  1e3 * statistics.median(timed), losses)


def run(params: int, steps: int) -> tuple[list[Result], int]:
    hidden = hidden_size(params)
    batches = make_batches(steps)
    return [run_mode(mode, hidden, batches) for mode in modes(rank=max(4, hidden // 4))], hidden


def markdown(results: list[Result], hidden: int, steps: int, command: str) -> str:
    base = results[0]
    numel = base.numel
    mib = lambda b: b / 2**20
    lines = [
        "# Memory-lean training modes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only, "
        f"load average {os.getloadavg()[0]:.1f} at the end of the run  ",
        f"Model: LLaMA-style causal LM from a `LlamaConfig` (2 layers, hidden {hidden}, vocab {VOCAB}), "
        f"{numel:,} parameters; batch {BATCH} x {SEQUENCE} generated tokens; lr {LR}, {steps} steps from the same "
        "initial weights in every mode.",
        "",
        "Bytes are tensor bytes counted on CPU: weights + optimizer state (after the step) + the peak of "
        "gradients alive at once (hooks around each gradient's accumulation). Activations and the step's "
        "temporaries are not counted. Step time: median of forward + backward + optimizer step, measured side "
        "by side in this run. Final loss: mean of the last 10% of steps.",
        "",
        "| mode | weights B/param | grads B/param (peak) | state B/param | peak MiB | peak B/param | "
        "x AdamW fp32 | ms / step | final loss | loss - fp32 loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode.name} | {r.weights / numel:.2f} | {r.grads / numel:.2f} | {r.state / numel:.2f} | "
            f"{mib(r.peak):.2f} | {r.peak / numel:.2f} | {r.peak / base.peak:.2f} | {r.ms:.1f} | "
            f"{r.final_loss:.4f} | {r.final_loss - base.final_loss:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, command: str) -> str:
    params = int(args.params)
    steps = max(1, int(args.repeats))
    results, hidden = run(params, steps)
    return markdown(results, hidden, steps, command)
