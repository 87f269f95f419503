"""A plain accelerate loop with optim_plugins: accumulate(), clip_grad_norm_, a schedule per optimizer step.

    python examples/accelerate_loop.py                       # one process, CPU
    accelerate launch --num_processes 2 examples/accelerate_loop.py

``num_training_steps`` counts optimizer steps of the whole run (after accumulation), whatever
the number of processes; ``opa.prepare_scheduler`` makes the prepared schedule step once per
optimizer step (accelerate's default is ``num_processes`` times) and not on skipped fp16 steps.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optim_plugins as op
import optim_plugins.integrations.accelerate as opa


def main(optimizer: str = "adamw", scheduler: str = "warmup_cosine", steps_per_epoch_batches: int = 64,
         batch_size: int = 4, accumulation: int = 2, epochs: int = 1, max_grad_norm: float = 1.0,
         cpu: bool = True) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=cpu)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(steps_per_epoch_batches * batch_size, 4)
    y = x.sum(dim=1, keepdim=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    opt = op.create_optimizer(optimizer, model, lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    # optimizer steps of the whole run: batches per process / accumulation, per epoch
    num_training_steps = epochs * math.ceil(len(loader) / accumulation)
    sched = op.create_scheduler(scheduler, opt, num_training_steps=num_training_steps,
                                num_warmup_steps=max(1, num_training_steps // 10))
    sched = opa.prepare_scheduler(accelerator, sched)
    lrs, steps, first_loss = [], 0, None
    for _ in range(epochs):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad()
            first_loss = loss.item() if first_loss is None else first_loss
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                steps += 1
                lrs.append(sched.get_last_lr()[0])
    accelerator.print(f"{steps} optimizer steps of {num_training_steps}, loss {first_loss:.4f} -> {loss.item():.4f}, "
                      f"lr {lrs[-1]:.2e}")
    return {"steps": steps, "num_training_steps": num_training_steps, "lrs": lrs, "loss": loss.item(), "first_loss": first_loss,
            "schedule": sched.scheduler, "num_processes": accelerator.num_processes}


if __name__ == "__main__":
    main()
