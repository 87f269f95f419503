"""A plain PyTorch loop with optim_plugins: parameter groups, an optimizer and a schedule by name,
gradient clipping, and a checkpoint you can resume from.

    python examples/plain_loop.py                              # 300 steps, a checkpoint every 100
    python examples/plain_loop.py --optimizer lion --lr 3e-4   # any registered name (optim-plugins list)
    python examples/plain_loop.py --stop-after 150             # stop early, as if interrupted...
    python examples/plain_loop.py --resume                     # ...and continue from the last checkpoint

The checkpoint holds the model, the optimizer's and the schedule's state dicts, the step and the
random state, so a resumed run continues exactly where it stopped (same losses, same lrs). The model
is a small MLP with LayerNorm learning a fixed random function; the data is made here.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import optim_plugins as op


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def batch(step: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of an endless stream: the same batch for the same step (resuming needs no data state)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 16, generator=g)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.5 * x[:, 4:8].prod(dim=1, keepdim=True)
    return x, y


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--scheduler", default="warmup_cosine")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the whole run")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this step (to try --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--out", default="runs/plain_loop", help="where checkpoint.pt goes")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = make_model()
    # Parameter groups: no decay on biases and LayerNorm weights; the last layer at half the lr.
    groups = op.param_groups(model, weight_decay=args.weight_decay, lr=args.lr, optimizer=args.optimizer,
                             overrides=[(r"^5\.", {"lr_scale": 0.5})])
    optimizer = op.create_optimizer(args.optimizer, groups)
    scheduler = op.create_scheduler(args.scheduler, optimizer, num_training_steps=args.steps,
                                    num_warmup_steps=max(1, args.steps // 20))
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    start, losses = 0, []
    if args.resume:
        if not checkpoint.is_file():
            parser.error(f"--resume: no checkpoint at {checkpoint}")
        saved = torch.load(checkpoint, weights_only=True)  # state dicts hold tensors and plain values only
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        start, losses = saved["step"], saved["losses"]
        print(f"resumed from {checkpoint} at step {start}")

    for step in range(start, args.steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == args.steps:
            print(f"step {done:4d}  loss {loss.item():.4f}  grad norm {grad_norm:.3f}  lr {scheduler.get_last_lr()[0]:.2e}")
        if done % args.save_every == 0 or done == args.steps or done == args.stop_after:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": done,
                        "losses": losses}, checkpoint)
        if done == args.stop_after:
            print(f"stopped after step {done}; continue with --resume")
            break
    first = sum(losses[:10]) / min(10, len(losses))
    last = sum(losses[-10:]) / min(10, len(losses))
    if len(losses) == args.steps:
        print(f"loss fell from {first:.4f} to {last:.4f} (mean of the first/last 10 steps); checkpoint {checkpoint}")
    assert all(math.isfinite(v) for v in losses), "the loss became NaN/Inf"
    return {"losses": losses, "lrs": [g["lr"] for g in optimizer.param_groups], "checkpoint": str(checkpoint)}


if __name__ == "__main__":
    main()
