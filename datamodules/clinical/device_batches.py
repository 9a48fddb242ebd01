"""Training batches cut where the windows live (`data.window_device`). On a GPU the training set's flat
tensors sit in its memory and each batch is one gather there (`WindowDataset.gather`), so the step never
waits for loader workers cutting windows on the CPU; the loader has no workers, as they cannot touch CUDA
tensors."""
from __future__ import annotations

import math

import numpy as np
import torch

from datamodules.base import EpochSampler, ResumableSampler
from datamodules.clinical.windows import Batched


class DeviceWindowBatches(torch.utils.data.Dataset):
    """This rank's training batches, item (epoch, number) -> a whole batch cut by `windows.cut` on the device
    of its dataset's windows table (`WindowDataset.to`).

    An epoch's order is this rank's share of the windows as the worker loader's ResumableSampler deals it
    (`passes` permutations drawn from (seed, epoch), every num_replicas-th, padded to a multiple of the
    ranks), moved to the device once an epoch, so each rank trains on its own share; then cut into batches of
    `batch_size`, a short last one dropped with `drop_last`. Augmentations draw from a generator keyed by
    (seed, epoch, rank, number), as loader workers reseed, so ranks draw apart and a resumed epoch draws
    the same. Its length is the windows: what the batch-size finder measures a batch against.
    """

    def __init__(self, windows: Batched, batch_size: int, drop_last: bool, seed: int, passes: int = 1,
                 num_replicas: int = 1, rank: int = 0) -> None:
        self.windows, self.table = windows, torch.as_tensor(windows.dataset.windows)
        self.device = self.table.device
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        # drawn on the CPU, as the worker loader draws it: CUDA's randperm orders a seed differently, and a
        # resumed or device-switched epoch must skip the same windows
        self.sampler = ResumableSampler(len(self.table), seed, passes=passes, num_replicas=num_replicas, rank=rank)
        per_rank = len(self.sampler)
        self.num_batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, this rank's rows of the table)

    def __len__(self) -> int:
        return len(self.table)

    def rank_order(self, epoch: int) -> torch.Tensor:
        """The rows of the windows table this rank trains on in `epoch`, in order (drawn once an epoch)."""
        if self._order is None or self._order[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._order = (epoch, torch.tensor(list(self.sampler), dtype=torch.int64, device=self.device))
        return self._order[1]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, number = key
        rows = self.rank_order(epoch)[number * self.batch_size:(number + 1) * self.batch_size]
        k, start = self.table[rows].unbind(1)
        return self.windows.cut(k, start, self.draws(epoch, number))

    def draws(self, epoch: int, number: int) -> torch.Generator:
        """The generator batch `number` of `epoch` augments with on this rank."""
        words = np.random.SeedSequence([self.seed, epoch, self.rank, number]).generate_state(2, dtype=np.uint32)
        return torch.Generator(device=self.device).manual_seed(int(words[0]) << 32 | int(words[1]))


class BatchKeys(EpochSampler):
    """The sampler of a DeviceWindowBatches loader: (epoch, number) of each of this rank's batches. Being a
    DistributedSampler, Lightning leaves it unwrapped under DDP (the batches already deal the windows out);
    being an EpochSampler, a run resumed mid-epoch skips the batches it has trained on."""

    def __init__(self, batches: DeviceWindowBatches) -> None:
        super().__init__(batches.num_batches, batches.seed)  # one replica: ranks are dealt windows, not batches
        self.samples_per_step = batches.batch_size * batches.num_replicas

    def epoch_order(self) -> list[int]:
        return list(range(self.size))

    def resume_at(self, epoch: int, samples_done: int) -> None:
        super().resume_at(epoch, samples_done // self.samples_per_step)  # samples over all ranks -> batches

    def __iter__(self):
        # a generator, so the epoch is read at the first batch: Lightning makes the iterator before set_epoch
        epoch = self.epoch
        for number in super().__iter__():
            yield epoch, number
