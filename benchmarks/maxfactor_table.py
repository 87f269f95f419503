"""The MaxFactor seed's comparison table, reproduced on scikit-learn's digits (CPU, < 2 min).

    .venv/bin/python benchmarks/maxfactor_table.py            # writes benchmarks/maxfactor_table.md

For each optimizer: test accuracy after EPOCHS epochs, the first epoch reaching 90 %,
seconds per epoch, the mean norm of one step's parameter update ||delta theta||_2, and
the optimizer state (``optim_plugins.memory.state_bytes``) of the MLP and of one
1024 x 1024 weight. Same model, data split, seed and batches for every optimizer.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import optim_plugins as op
from optim_plugins.memory import state_bytes

EPOCHS, BATCH, SEED = 15, 64, 0
OPTIMIZERS = {  # name: options (the test database's recommended settings; MaxFactor's are the seed's defaults)
    "maxfactor": dict(lr=0.01),
    "adam": dict(lr=3e-3),
    "adamw": dict(lr=3e-3, weight_decay=0.01),
    "sgd": dict(lr=0.1, momentum=0.9),
    "adafactor": dict(lr=1e-2, relative_step=False, scale_parameter=False),
    "came": dict(lr=2e-3, weight_decay=0.01),
}


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    f, i = torch.float32, torch.long
    return torch.tensor(xtr, dtype=f), torch.tensor(ytr, dtype=i), torch.tensor(xte, dtype=f), torch.tensor(yte, dtype=i)


def run(name: str, options: dict, data) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    opt = op.create_optimizer(name, model, **options)
    params = [p for p in model.parameters()]
    generator = torch.Generator().manual_seed(SEED)
    norms, first_90, seconds = [], None, 0.0
    for epoch in range(1, EPOCHS + 1):
        start = time.perf_counter()
        order = torch.randperm(len(xtr), generator=generator)
        for i in range(0, len(order), BATCH):
            batch = order[i:i + BATCH]
            before = [p.detach().clone() for p in params]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[batch]), ytr[batch]).backward()
            opt.step()
            norms.append(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before))).item())
        seconds += time.perf_counter() - start
        with torch.no_grad():
            accuracy = (model(xte).argmax(1) == yte).float().mean().item()
        if first_90 is None and accuracy >= 0.9:
            first_90 = epoch
    big = torch.nn.Parameter(torch.randn(1024, 1024))
    big_opt = op.create_optimizer(name, [big], **options)
    big.grad = torch.randn_like(big)
    big_opt.step()
    return dict(name=name, accuracy=accuracy, first_90=first_90, seconds=seconds / EPOCHS,
                update_norm=sum(norms) / len(norms), mlp_state=state_bytes(opt), big_state=state_bytes(big_opt))


def main() -> None:
    data = digits()
    rows = [run(name, options, data) for name, options in OPTIMIZERS.items()]
    lines = [
        "# MaxFactor vs Adam / AdamW / SGD on scikit-learn digits",
        "",
        f"Made by `.venv/bin/python benchmarks/maxfactor_table.py` (torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads). MLP 64-64-LayerNorm-GELU-10 (4,810 parameters), "
        f"{EPOCHS} epochs, batch {BATCH}, seed {SEED}; options as in the table's script.",
        "",
        "| optimizer | options | test accuracy | first epoch >= 90 % | s / epoch | mean update norm | state bytes (MLP) | state bytes (1024x1024 weight) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in OPTIMIZERS[r["name"]].items())
        lines.append(f"| {r['name']} | {opts} | {r['accuracy']:.4f} | {r['first_90'] or '-'} | {r['seconds']:.3f} | "
                     f"{r['update_norm']:.4f} | {r['mlp_state']:,} | {r['big_state']:,} |")
    lines += ["", "Timings are of a shared 2-core CPU and vary between runs; accuracies and bytes are deterministic."]
    out = Path(__file__).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
