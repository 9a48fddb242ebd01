"""A tiny regression task that exercises the shared machinery in seconds on a CPU."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.task_data import TaskData
from datamodules.base import BaseDataModule
from lightning_modules.base import BaseTaskModule


class TinyDataModule(BaseDataModule):
    def __init__(self, loader=None, num_samples: int = 256, dim: int = 8, seed: int = 0) -> None:
        super().__init__(loader)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(num_samples, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        y = x @ w + 0.01 * torch.randn(num_samples, 1, generator=g)
        n_train, n_val = int(0.7 * num_samples), int(0.15 * num_samples)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val])
        self.test_set = TensorDataset(x[n_train + n_val:], y[n_train + n_val:])

    def task_data(self) -> TaskData:
        # the contract every task keeps: its splits, for callbacks that draw examples (the module reads nothing)
        return TaskData(train_set=self.train_set, val_set=self.val_set)

    def train_dataloader(self):
        return self.make_loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self.make_loader(self.val_set)

    def test_dataloader(self):
        return self.make_loader(self.test_set)

    def predict_dataloader(self):
        return self.make_loader(TensorDataset(self.test_set.tensors[0]))


class TinyModule(BaseTaskModule):
    def __init__(self, dim: int = 8, hidden: int = 16, dropout: float = 0.0, conv: bool = False, optimizer=None,
                 scheduler=None) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.conv = nn.Conv2d(3, 4, 3) if conv else None  # only to check memory-format handling
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

    def sharded_blocks(self):
        return {nn.Linear}  # each linear layer its own FSDP unit, as a task's blocks would be

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log_train_step({"train/loss": loss})
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def save_predictions(self, predictions, output_dir):
        torch.save(torch.cat(predictions), output_dir / "predictions.pt")
