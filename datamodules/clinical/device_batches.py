"""Training batches cut where the windows live (`data.window_device`). On a GPU the training set's flat
tensors sit in its memory and batches are cut there by gathers (`WindowDataset.gather`), so the step never
waits for loader workers cutting windows on the CPU; the loader has no workers, as they cannot touch CUDA
tensors. Each gather and draw is a few dozen kernel launches of host time whatever its size, so several
consecutive batches are cut at once (a chunk) and handed out as slices of it."""
from __future__ import annotations

import math

import torch

from datamodules.base import EpochSampler, ResumableSampler
from datamodules.clinical.windows import Batched
from datamodules.workers import key_seed

# what a chunk's batches may take on the device: bench_clinical's 7.4 MB batches come 9 to a chunk
CHUNK_BYTES = 64 * 2**20


class DeviceWindowBatches(torch.utils.data.Dataset):
    """This rank's training batches, item (epoch, number) -> a whole batch cut by `windows.cut` on the device
    of its dataset's windows table (`WindowDataset.to`).

    An epoch's order is this rank's share of the windows as the worker loader's ResumableSampler deals it
    (`passes` permutations drawn from (seed, epoch), every num_replicas-th, padded to a multiple of the
    ranks), moved to the device once an epoch, so each rank trains on its own share; then cut into batches of
    `batch_size`, a short last one dropped with `drop_last`. Its length is the windows: what the batch-size
    finder measures a batch against.

    Batches are cut `chunk_batches` at a time (by default as many as fit in CHUNK_BYTES): batch `number`
    is a slice of chunk number // chunk_batches, cut by one `windows.cut` whose augmentations draw from a
    generator keyed by (seed, epoch, rank, chunk), so ranks draw apart and a run resumed anywhere in a chunk
    cuts the whole chunk again and draws what the uninterrupted run drew. The chunk is kept until its last
    batch is handed out.
    """

    def __init__(self, windows: Batched, batch_size: int, drop_last: bool, seed: int, passes: int = 1,
                 num_replicas: int = 1, rank: int = 0, chunk_batches: int | None = None) -> None:
        self.windows, self.table = windows, torch.as_tensor(windows.dataset.windows)
        self.device = self.table.device
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        # drawn on the CPU, as the worker loader draws it: CUDA's randperm orders a seed differently, and a
        # resumed or device-switched epoch must skip the same windows
        self.sampler = ResumableSampler(len(self.table), seed, passes=passes, num_replicas=num_replicas, rank=rank)
        per_rank = len(self.sampler)
        self.num_batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if chunk_batches is None:
            chunk_batches = CHUNK_BYTES // max(self.window_bytes() * batch_size, 1)
        self.chunk_batches = max(1, min(int(chunk_batches), self.num_batches))
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, this rank's rows of the table)
        self._chunk: tuple[int, int, list[dict]] | None = None  # (epoch, chunk, its batches)

    def __len__(self) -> int:
        return len(self.table)

    def window_bytes(self) -> int:
        """The device memory one training window takes, measured on the first (0 without windows)."""
        if not len(self.table):
            return 0
        return sum(v.nbytes for v in self.windows.dataset.gather(*self.table[:1].unbind(1)).values())

    def rank_order(self, epoch: int) -> torch.Tensor:
        """The rows of the windows table this rank trains on in `epoch`, in order (drawn once an epoch)."""
        if self._order is None or self._order[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._order = (epoch, torch.tensor(list(self.sampler), dtype=torch.int64, device=self.device))
        return self._order[1]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, number = key
        chunk, at = divmod(number, self.chunk_batches)
        if self._chunk is None or self._chunk[:2] != (epoch, chunk):
            self._chunk = None  # a chunk left part-used (a new epoch) is let go before the next is cut
            self._chunk = (epoch, chunk, self.cut_chunk(epoch, chunk))
        batches = self._chunk[2]
        if at == len(batches) - 1:
            self._chunk = None  # the epoch moves on to the next chunk: only the step's batch keeps this one
        return batches[at]

    def cut_chunk(self, epoch: int, chunk: int) -> list[dict]:
        """Batches chunk * chunk_batches onwards of `epoch` (up to chunk_batches of them), by one cut."""
        first = chunk * self.chunk_batches
        count = min(self.chunk_batches, self.num_batches - first)
        # not the windows a drop_last drops: they would only take memory and draws
        rows = self.rank_order(epoch)[first * self.batch_size:(first + count) * self.batch_size]
        cut = self.windows.cut(*self.table[rows].unbind(1), self.draws(epoch, chunk))
        # one split a field, into views: a batch is a slice of the chunk's tensors, copied nowhere
        fields = {key: value.split(self.batch_size) for key, value in cut.items()}
        return [{key: parts[n] for key, parts in fields.items()} for n in range(count)]

    def draws(self, epoch: int, chunk: int) -> torch.Generator:
        """The generator chunk `chunk` of `epoch` augments with on this rank."""
        return torch.Generator(device=self.device).manual_seed(key_seed((self.seed, epoch, self.rank, chunk)))


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
