"""A Lightning module whose optimizer and schedule come from optim_plugins, by name or from hparams.

    python examples/lightning_module.py                     # 2 epochs of a tiny regression on CPU
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml

``configure_optimizers`` returns the schedule with ``interval="step"`` and
``num_training_steps = trainer.estimated_stepping_batches`` (accumulation and max_steps included).
Everything (model, data) is made in code: no downloads.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
import optim_plugins.integrations.lightning as opl


class TinyRegressor(pl.LightningModule):
    """A two-layer MLP; every optimizer/schedule hparam is passed to ``opl.configure_optimizers``.

    Args:
        optimizer: a registry name (``op.list_optimizers()``) or a dict ``{name: ..., lr: ..., ...}``.
        lr: learning rate.
        weight_decay: decay of weights (biases and norms get none); None: the optimizer's default.
        scheduler: a registry name (``op.list_schedulers()``) or None.
        num_warmup_steps: optimizer steps of warmup, or a fraction < 1 of the total.
        hidden: width of the hidden layer.
    """

    def __init__(self, optimizer: str | dict = "adamw", lr: float = 1e-2, weight_decay: float | None = None,
                 scheduler: str | None = "warmup_cosine", num_warmup_steps: int | float = 0.1, hidden: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("train_loss", loss, prog_bar=False)
        self.train_losses.append(loss.item())
        return loss

    def on_fit_start(self) -> None:
        self.train_losses: list[float] = []

    def on_fit_end(self) -> None:
        k = min(4, len(self.train_losses))
        if k:
            first, last = sum(self.train_losses[:k]) / k, sum(self.train_losses[-k:]) / k
            print(f"train loss {first:.4f} -> {last:.4f} (mean of the first/last {k} batches)")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y))

    def configure_optimizers(self):
        # optimizer, lr, weight_decay, scheduler, num_warmup_steps all come from self.hparams
        return opl.configure_optimizers(self)


class TinyData(pl.LightningDataModule):
    """Random linear-regression data made in code."""

    def __init__(self, n: int = 64, batch_size: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


if __name__ == "__main__":
    model = TinyRegressor(optimizer="adamw", lr=3e-2, scheduler="warmup_cosine", num_warmup_steps=0.1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1.0,
                         accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False)
    trainer.fit(model, TinyData())
    print("optimizer steps:", trainer.global_step, "final lr:", trainer.optimizers[0].param_groups[0]["lr"])
