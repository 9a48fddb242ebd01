"""Whole-run training throughput in the task's unit (rays, images, windows, sequences).

Logs `train/<unit>_per_sec` once, at the end of training (to the loggers, and among the trainer's
callback metrics, so run.py's result.json and `python -m bench.quality` carry it), over every optimizer step after
`warmup`: the GPU is synchronised twice in the whole run (at the start and the end of that span),
so the number includes everything the run did between, and measuring it costs nothing per step. It counts what
each step trained on (the module's `items_trained`: its batch, or fewer where the step says so, e.g. nerf's rays
that a sample budget did not cut short).
The experiments that promise a speed (nerf_builtin, nerf_fox, ...) add it; `TrainingMonitor`
gives the running per-window view instead.
"""
from __future__ import annotations

import logging
import time

import lightning as L
import torch

from common.parallel import data_parallel_size
from common.timing import synchronize

log = logging.getLogger(__name__)


class Throughput(L.Callback):
    def __init__(self, warmup: int = 50) -> None:
        self.warmup = warmup
        self.t0: float | None = None
        self.start_step = 0
        self.items = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is None and trainer.global_step >= self.warmup:
            synchronize(pl_module.device)
            self.t0, self.start_step, self.items = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is not None:  # what the step trained on: a device count is added on the device, read at the end
            self.items += pl_module.items_trained(batch)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.t0 is None or trainer.global_step <= self.start_step:
            log.warning("Throughput: fewer than warmup=%d steps ran; nothing measured", self.warmup)
            return
        synchronize(pl_module.device)
        elapsed = time.perf_counter() - self.t0
        # every rank counts its own batches; data-parallel ranks each read different ones (rank 0's count times
        # their number: exact where each trains its whole batch, an estimate where a step trains fewer)
        key, value = f"train/{pl_module.throughput_unit}_per_sec", float(self.items) * data_parallel_size(trainer) / elapsed
        log.info("%s=%.0f over %d steps (%.1f s)", key, value, trainer.global_step - self.start_step, elapsed)
        record_metrics(trainer, {key: value})


def record_metrics(trainer, metrics: dict[str, float]) -> None:
    """Values measured outside a step's self.log: into the trainer's callback metrics (sweepers, the run's
    summary) and straight to the loggers (which write on rank 0 only)."""
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(float(value))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
