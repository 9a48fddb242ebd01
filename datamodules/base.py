"""The LightningDataModule every task derives from.

It turns the global loader settings into DataLoaders, so tasks only build datasets. The batch
size is per device by default; with `batch_size_is_global=true` it is split across the
Trainer's world size, and must divide evenly.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler


class BaseDataModule(L.LightningDataModule):
    def __init__(self, loader: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        loader = dict(loader or {})
        self.batch_size = int(loader.pop("batch_size", 32))
        self.batch_size_is_global = bool(loader.pop("batch_size_is_global", False))
        self.num_workers = int(loader.pop("num_workers", 0))
        self.pin_memory = bool(loader.pop("pin_memory", True))
        self.persistent_workers = bool(loader.pop("persistent_workers", True))
        self.prefetch_factor = loader.pop("prefetch_factor", 2)
        if loader:
            raise ValueError(f"Unknown loader settings: {sorted(loader)}; see `loader` in conf/config.yaml")
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1, got {self.batch_size}")

    @property
    def world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    @property
    def per_device_batch_size(self) -> int:
        if not self.batch_size_is_global:
            return self.batch_size
        world = self.world_size
        if self.batch_size % world:
            raise ValueError(
                f"batch_size={self.batch_size} is global (batch_size_is_global=true) but does not divide "
                f"across {world} devices; choose a multiple of {world}."
            )
        return self.batch_size // world

    def make_loader(
        self,
        dataset: Dataset,
        shuffle: bool = False,
        collate_fn: Callable | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        workers = self.num_workers
        trainer = getattr(self, "trainer", None)
        pin = self.pin_memory and trainer is not None and trainer.accelerator.__class__.__name__ != "CPUAccelerator"
        return DataLoader(
            dataset,
            batch_size=batch_size or self.per_device_batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            collate_fn=collate_fn,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
