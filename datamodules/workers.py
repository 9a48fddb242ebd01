"""Loader worker processes: when they start, what they draw, how they take signals and how they stop.

- A loader with workers starts them, and its sampler draws the epoch's order, at the first batch asked
  for, as a loader without workers does. Lightning makes the training iterator before it sets the
  sampler's epoch, and workers prefetch at once: a run resumed in epoch 1 or later read epoch 0's order.
- Random draws in a worker (augmentations, masking) are reseeded for each training batch from the
  seed, epoch, rank and position in the epoch, so a resumed run draws what the uninterrupted run drew,
  whichever worker gets the batch and however long the workers have lived.
- Workers ignore SIGTERM (the main process finishes its batch and saves), so neither torch's fallback
  nor multiprocessing's exit handler, which both send SIGTERM, can stop them: the exit handler then
  joins them for ever. `stop_all` shuts down every live pool and kills what does not stop; suite.train.run
  calls it when a job ends (a failed one leaves its workers alive), and it runs at exit before
  multiprocessing's handler.
"""
from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.worker import _worker_loop
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

log = logging.getLogger(__name__)


class DeferredLoader(DataLoader):
    """A DataLoader whose workers start at the first batch asked for, not when its iterator is made."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()  # already lazy: the sampler is read at the first batch
        _stop_at_exit()
        return _Deferred(super().__iter__)


class _Deferred:
    def __init__(self, start) -> None:
        self._start, self._iterator = start, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)


class KeyedIndex(int):
    """A sample index carrying what seeds its batch in a worker: (seed, epoch, rank, place in the epoch)."""

    def __new__(cls, index: int, key: tuple[int, int, int, int]):
        self = super().__new__(cls, index)
        self.key = key
        return self

    def __reduce__(self):
        return KeyedIndex, (int(self), self.key)


def worker_init(worker_id: int) -> None:
    """Leave SIGTERM to the main process (a worker killed by it would turn a clean preemption into a
    DataLoader error), and reseed each batch of keyed indices before its samples are read."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    dataset = get_worker_info().dataset
    if isinstance(dataset, IterableDataset):
        return
    read = getattr(dataset, "__getitems__", None)

    def getitems(batch):
        key = getattr(batch[0], "key", None) if len(batch) else None
        if key is not None:
            _reseed(key)
            batch = [int(i) for i in batch]
        return read(batch) if read else [dataset[i] for i in batch]

    try:  # the worker's own copy of the dataset; torch reads a batch through __getitems__ where there is one
        dataset.__getitems__ = getitems
    except AttributeError:
        log.warning("%s takes no attributes: random draws in its loader workers are not resumable",
                    type(dataset).__name__)


def key_seed(key: tuple[int, ...]) -> int:
    """A 64-bit seed from a batch's key, well mixed (nearby keys give unrelated streams)."""
    words = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def _reseed(key: tuple[int, ...]) -> None:
    seed = key_seed(key)
    torch.manual_seed(seed)
    random.seed(seed >> 32)
    np.random.seed(seed & 0xFFFFFFFF)


def stop_all() -> None:
    """Shut down every loader worker pool alive in this process; kill the workers that do not stop."""
    if not multiprocessing.active_children():
        return
    # type(), not isinstance(): that reads __class__, which warns on some deprecated torch objects
    pools = [o for o in gc.get_objects() if issubclass(type(o), _MultiProcessingDataLoaderIter)]
    for pool in pools:
        try:
            pool._shutdown_workers()  # tells the workers to stop and joins them (5 s each at most)
        except Exception as err:  # stopping must never hide the run's own error
            log.warning("Stopping loader workers failed: %s", err)
    # what did not stop, and workers of pools already collected (torch's own fallback sends SIGTERM)
    for worker in multiprocessing.active_children():
        if getattr(worker, "_target", None) is _worker_loop:
            worker.kill()
            worker.join(timeout=5)


_registered = False


def _stop_at_exit() -> None:
    """Stop live workers at exit, before multiprocessing's exit handler joins them (atexit runs last
    registered first, and multiprocessing registers when torch is imported)."""
    global _registered
    if not _registered:
        _registered = True
        atexit.register(stop_all)
