"""State memory per parameter of every optimizer: ``optim-plugins bench --suite memory``."""
from __future__ import annotations

import argparse

import torch


def state_bytes_after_one_step(name: str, size: int = 1024, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """``(state bytes, weights + grads bytes)`` per parameter of optimizer ``name`` after one step
    on a ``size x size`` weight and a ``size`` bias of ``dtype`` (closure, train mode and
    ``create_graph`` as the optimizer needs them)."""
    import optim_plugins as op

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, size, generator=generator).to(dtype) * 0.02),
              torch.nn.Parameter(torch.zeros(size, dtype=dtype))]
    optimizer = op.create_optimizer(name, params)
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    graph = bool(getattr(getattr(optimizer, "capabilities", None), "needs_create_graph", False))

    def closure():
        optimizer.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward(create_graph=graph)
        return loss

    optimizer.step(closure)
    numel = sum(p.numel() for p in params)
    return op.state_bytes(optimizer) / numel, sum(2 * p.numel() * p.element_size() for p in params) / numel


def state_memory(names: list[str], dtype: torch.dtype = torch.float32) -> list[tuple[str, float, float]]:
    """``(name, bytes of state per parameter, bytes of weights+grads+state per parameter)`` after one step.

    The model is one 1024 x 1024 weight plus a 1024 bias (1,049,600 parameters), so 8-bit
    states are used (tensors >= 4096 elements) and factored states show their saving.
    """
    rows = []
    for name in names:
        state, weights_and_grads = state_bytes_after_one_step(name, 1024, dtype)
        rows.append((name, state, state + weights_and_grads))
    return rows


def memory_markdown(rows: list[tuple[str, float, float]], dtype: torch.dtype, command: str) -> str:
    lines = [
        f"Command: `{command}`; parameters in {str(dtype).replace('torch.', '')}: a 1024x1024 weight and a 1024 bias, after one step.",
        "",
        "| optimizer | state bytes / param | weights + grads + state bytes / param |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {state:.2f} | {total:.2f} |" for name, state, total in rows]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, command: str) -> str:
    import optim_plugins as op

    names = op.list_optimizers() if args.optimizers == "all" else args.optimizers.split(",")
    dtype = getattr(torch, args.dtype)
    return memory_markdown(state_memory(names, dtype), dtype, command)
