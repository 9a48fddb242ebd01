"""The LightningDataModule every task derives from.

It turns the global loader settings into DataLoaders, so tasks only build datasets. The batch
size is per device by default; with `batch_size_is_global=true` it is split across the
Trainer's world size, and must divide evenly.

Training loaders shuffle with a generator seeded by (seed, epoch) rather than the global one, and
the datamodule's checkpoint state records how far into the epoch training got, so a run resumed
mid-epoch sees exactly the batches the uninterrupted run would have seen; with loader workers too
(datamodules/workers.py: when they start, and what they draw).

What the task's module and callbacks learn from the data is declared once, by `task_data()`: a
`common.task_data.TaskData` a task fills with what its module and callbacks read.
"""
from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from common.parallel import data_parallel_size
from common.task_data import TaskData
from datamodules.workers import DeferredLoader, KeyedIndex, worker_init


def _worker_start_method() -> str | None:
    """How loader workers start when the default (fork) is unusable or unsafe:
    - a job of Hydra's joblib launcher runs in a loky worker, whose "loky" start method DataLoader cannot use;
    - under a process group (DDP, FSDP) the rank runs communication and queue-feeder threads, and a forked
      worker can inherit one of their locks held and hang before its first batch: workers start from a clean
      single-threaded forkserver instead, which ignores the stop signals a scheduler sends the whole job
      (datamodules/forkserver_signals.py): its workers would die with it."""
    methods = multiprocessing.get_all_start_methods()
    if multiprocessing.get_start_method(allow_none=True) not in (None, *methods):
        return methods[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and "forkserver" in methods:
        multiprocessing.set_forkserver_preload(["datamodules.forkserver_signals"])  # before the server starts
        return "forkserver"
    return None


class EpochSampler(DistributedSampler):
    """Base of the suite's training samplers: the subclass gives each epoch's order (`epoch_order`); this
    deals it out to the data-parallel ranks and, after a mid-epoch resume, skips what was already used.

    Each rank takes every `num_replicas`-th index of the order, padded to a multiple of the ranks by
    repeating its start: what Lightning's DistributedSamplerWrapper gives, so single-device and DDP
    orders are unchanged. Being a DistributedSampler, it is used as it is: the wrapper indexed the full
    epoch and crashed (IndexError) on the shorter order of a resumed one.

    With `keyed`, the indices carry their place in the epoch, by which loader workers seed each batch.
    """

    keyed = False

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ is not called: it wants a dataset and a process group
        self.size, self.seed, self.num_replicas, self.rank = size, seed, num_replicas, rank
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.shuffle, self.drop_last = 0, True, False
        self._skip: tuple[int, int] | None = None

    def epoch_order(self) -> list[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch
        if self._skip and epoch > self._skip[0]:
            self._skip = None  # the resumed epoch is over

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """After a mid-epoch resume: `samples_done` samples of that epoch, over all ranks, are used."""
        self._skip = (epoch, samples_done)

    def __iter__(self):
        skip = 0
        if self._skip and self._skip[0] == self.epoch:  # an order drawn for another epoch leaves it
            skip, self._skip = self._skip[1] // self.num_replicas, None
        order = self.epoch_order()
        if order and len(order) < self.total_size:
            order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        mine = order[self.rank:self.total_size:self.num_replicas][skip:]
        if not self.keyed:
            return iter(mine)
        key = (self.seed, self.epoch, self.rank)  # read now: a subclass may move self.epoch on after this
        return (KeyedIndex(i, (*key, skip + n)) for n, i in enumerate(mine))

    def __len__(self) -> int:
        return self.num_samples


class ResumableSampler(EpochSampler):
    """Epoch-seeded order. With `passes` > 1 an epoch is that many passes over the data, each in its own order."""

    def __init__(self, dataset_size: int, seed: int, shuffle: bool = True, passes: int = 1,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset_size * passes, seed, num_replicas, rank)
        self.dataset_size, self.shuffle, self.passes = dataset_size, shuffle, passes

    def epoch_order(self) -> list[int]:
        if not self.shuffle:
            return torch.arange(self.dataset_size).repeat(self.passes).tolist()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.cat([torch.randperm(self.dataset_size, generator=generator) for _ in range(self.passes)]).tolist()


class BaseDataModule(L.LightningDataModule):
    # The setting a training batch's size comes from, which mode=tune_batch_size scales: `batch_size`, or a
    # datamodule hyperparameter (nerf: num_rays); None when nothing can be scaled. Read before setup.
    batch_setting: str | None = "batch_size"

    def __init__(self, loader: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        loader = dict(loader or {})
        self.batch_size = int(loader.pop("batch_size", 32))
        self.batch_size_is_global = bool(loader.pop("batch_size_is_global", False))
        self.num_workers = int(loader.pop("num_workers", 0))
        self.pin_memory = bool(loader.pop("pin_memory", True))
        self.persistent_workers = bool(loader.pop("persistent_workers", True))
        self.prefetch_factor = loader.pop("prefetch_factor", 2)
        self.passes_per_epoch = int(loader.pop("passes_per_epoch", 1))
        if loader:
            raise ValueError(f"Unknown loader settings: {sorted(loader)}; see `loader` in conf/config.yaml")
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.passes_per_epoch < 1:
            raise ValueError(f"loader.passes_per_epoch must be >= 1, got {self.passes_per_epoch}")
        self.seed = torch.initial_seed()  # set by seed_everything before the datamodule is built
        self._resume_position: dict | None = None

    def task_data(self) -> TaskData:
        """What the module (`bind_data`) and callbacks learn from this data, once it is set up. A task fills
        the fields its module and callbacks read (common/task_data.py says who reads which); this one
        tells them nothing."""
        return TaskData()

    @property
    def world_size(self) -> int:
        """Ranks that read different batches (all of them, except under pipeline stages)."""
        trainer = getattr(self, "trainer", None)
        return data_parallel_size(trainer) if trainer is not None else 1

    def data_parallel_ranks(self) -> dict[str, int]:
        """{num_replicas, rank} among the ranks that read different batches, for an EpochSampler."""
        trainer = getattr(self, "trainer", None)
        world = self.world_size
        rank = int(trainer.strategy.distributed_sampler_kwargs["rank"]) if world > 1 else 0
        return {"num_replicas": world, "rank": rank}

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
        if shuffle and sampler is not None and self.passes_per_epoch > 1:
            raise ValueError(f"loader.passes_per_epoch={self.passes_per_epoch}: {type(self).__name__} draws training "
                             f"batches with its own {type(sampler).__name__}, which makes one pass per epoch; set it to 1")
        if shuffle and sampler is None:
            sampler = ResumableSampler(len(dataset), self.seed, passes=self.passes_per_epoch, **self.data_parallel_ranks())
        if shuffle and isinstance(sampler, EpochSampler):  # a task's own EpochSampler too
            self.resume_sampler(sampler)
        if isinstance(sampler, EpochSampler):
            # without workers, draws come from the main process's restored RNG; a sampler class whose batches are
            # always seeded by their keys (nerf's RayBatchKeys) keeps them
            sampler.keyed = type(sampler).keyed or workers > 0
        pin = self.pin_memory and trainer is not None and trainer.accelerator.__class__.__name__ != "CPUAccelerator"
        return DeferredLoader(
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
            worker_init_fn=worker_init if workers > 0 else None,
            multiprocessing_context=_worker_start_method() if workers > 0 else None,
            # its own generator, so creating an iterator never draws from the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    # ---- position within the epoch, saved in every checkpoint -------------------------------------
    def resume_sampler(self, sampler: EpochSampler) -> None:
        """Start a training sampler where the checkpoint this run resumed from stopped in its epoch; only the
        first loader made after loading it, later ones start their epochs whole."""
        position, self._resume_position = self._resume_position, None
        if position:
            sampler.resume_at(position["epoch"], position["batches"] * position["samples_per_batch"])

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # the epoch in progress, or once it is processed (a max_steps stop on its last batch) the next one, from its
        # start: the finished epoch's batch count would make the resumed run skip the whole next epoch
        epochs = trainer.fit_loop.epoch_progress.current
        in_epoch = epochs.started > epochs.processed
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if in_epoch else 0
        return {"epoch": epochs.processed, "batches": done, "samples_per_batch": self.sampler_items_per_step()}

    def sampler_items_per_step(self) -> int:
        """Indices a training step takes from the sampler, over all ranks (a task whose sampler yields whole
        batches says one a rank)."""
        return self.per_device_batch_size * self.world_size

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_position = dict(state_dict) or None
