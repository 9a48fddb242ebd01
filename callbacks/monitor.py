"""Training telemetry every N steps: gradient norm, throughput in the task's unit, GPU memory and use.

Throughput is counted in the task's own unit: the module's `items_trained(batch)` (a batch's items) and
`throughput_unit` (rays for NeRF, images for detection and diffusion, windows for forecasting,
sequences for text). Timing synchronises the GPU
only at window boundaries, so it costs nothing between them.
"""
from __future__ import annotations

import logging
import time

import lightning as L
import torch

from common.parallel import data_parallel_size, shards_parameters
from common.timing import synchronize

log = logging.getLogger(__name__)


class TrainingMonitor(L.Callback):
    def __init__(self, every_n_steps: int = 50) -> None:
        self.every = max(1, every_n_steps)
        self._t0: float | None = None
        self._items = 0
        self._logged_at = -1
        self._gpu_util = False

    def on_fit_start(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            log.info("GPU utilisation and memory are logged on GPU runs; this run is on %s", device.type.upper())
            return
        try:
            torch.cuda.utilization(device)
            self._gpu_util = True
        except Exception as err:  # noqa: BLE001  (the driver's NVML library may be missing or refuse)
            log.warning("perf/gpu_util is not logged: NVML cannot be read (%s); GPU memory still is", err)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            synchronize(trainer.strategy.root_device)
            self._t0, self._items = time.perf_counter(), 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # this step's number counted from 1, as Lightning counts the steps its loggers write
        if (trainer.global_step + 1) % self.every == 0:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                squared = torch.nn.utils.get_total_norm(grads).float().square()
                if shards_parameters(trainer):  # each rank holds a shard of every gradient
                    squared = trainer.strategy.reduce(squared, reduce_op="sum")
                pl_module.log("train/grad_norm", squared.sqrt(), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._items += pl_module.items_trained(batch)  # a device count is read with the sync below
        # by optimizer steps, not batch_idx: an epoch's batch count need not be a multiple of `every`, and the
        # values of a step Lightning does not write are lost (global_step has counted this step already)
        if trainer.global_step % self.every or trainer.global_step == self._logged_at:
            return
        self._logged_at = trainer.global_step
        synchronize(trainer.strategy.root_device)
        elapsed = time.perf_counter() - self._t0
        per_device = float(self._items) / max(elapsed, 1e-9)
        unit = pl_module.throughput_unit
        metrics = {f"perf/{unit}_per_sec": per_device * data_parallel_size(trainer), f"perf/{unit}_per_sec_per_device": per_device}
        if trainer.strategy.root_device.type == "cuda":
            device = trainer.strategy.root_device
            metrics["perf/gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics["perf/gpu_mem_gb"] = torch.cuda.memory_allocated(device) / 2**30
            if self._gpu_util:
                metrics["perf/gpu_util"] = float(torch.cuda.utilization(device))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._t0, self._items = time.perf_counter(), 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._t0 = None  # validation time is not training throughput
