"""The default job until the recipes land: a small classifier trained on generated spirals."""
from __future__ import annotations

import math

import torch


def spirals(n: int = 1024, turns: float = 1.5, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals in 2-D: a task a linear model cannot solve."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=generator) * turns * 2 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    angle = t + math.pi * label
    radius = t / (turns * 2 * math.pi)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    return x + noise * torch.randn(x.shape, generator=generator), label


def run_demo(optimizer: str = "adamw", lr: float = 1e-2, steps: int = 300, schedule: str = "constant",
             log_every: int = 30, seed: int = 0, **options) -> list[float]:
    """Train a 2-64-64-2 MLP full-batch; print and return the loss every ``log_every`` steps."""
    import optim_plugins as op

    torch.manual_seed(seed)
    x, y = spirals(seed=seed)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                                torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 2))
    opt = op.create_optimizer(optimizer, model, lr=lr, **options)
    sched = op.create_scheduler(schedule, opt, num_training_steps=steps)
    print(f"demo: {optimizer} (lr={lr}) with schedule {schedule!r} on two spirals, {steps} steps")
    losses = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % log_every == 0 or step == steps:
            accuracy = (model(x).argmax(1) == y).float().mean().item()
            print(f"  step {step:4d}  loss {loss.item():.4f}  accuracy {accuracy:.3f}  lr {sched.get_last_lr()[0]:.2e}")
            losses.append(loss.item())
    return losses
