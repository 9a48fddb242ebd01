"""Step timing shared by the suite's callbacks and the benchmark: the GPU is synchronised only at
window boundaries, so timing does not change what it measures."""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (no-op elsewhere): timing windows start and end with this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Windows:
    """Per-step time over `windows` windows of `steps` steps each, after `warmup` steps."""

    def __init__(self, warmup: int, steps: int, windows: int, device: torch.device) -> None:
        self.warmup, self.steps, self.windows, self.device = warmup, steps, windows, device
        self.step_times: list[float] = []  # mean step time of each window
        self.cpu_times: list[float] = []  # the main thread's CPU time a step, per window
        self.items = 0
        self.wait = 0.0  # host time between the end of one step and the start of the next
        self.fetch: float | None = None  # the part spent getting the batch (loader next(), move to the device); None: untimed
        self._t0 = None
        self._count = 0

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps * self.windows

    def before_step(self, step: int, between: float = 0.0, fetch: float | None = None) -> None:
        if step >= self.warmup:
            self.wait += between
            if fetch is not None:
                self.fetch = (self.fetch or 0.0) + fetch
        if step >= self.warmup and (step - self.warmup) % self.steps == 0:
            synchronize(self.device)
            self._t0, self._cpu0, self._count = time.perf_counter(), time.thread_time(), 0

    def after_step(self, step: int, items: int) -> None:
        if step < self.warmup or self._t0 is None:
            return
        self.items += items
        self._count += 1
        if self._count == self.steps:
            synchronize(self.device)
            self.step_times.append((time.perf_counter() - self._t0) / self.steps)
            self.cpu_times.append((time.thread_time() - self._cpu0) / self.steps)

    def summary(self) -> dict:
        if not self.step_times:
            return {}
        median = statistics.median(self.step_times)
        measured = self.steps * len(self.step_times)
        per_step_items = float(self.items) / measured  # a device count (items_trained) is read here, once
        return {"median_step_ms": 1e3 * median, "spread_ms": 1e3 * (max(self.step_times) - min(self.step_times)),
                "items_per_sec": per_step_items / median,
                "wait_share": self.wait / (sum(self.step_times) * self.steps),
                **({} if self.fetch is None else {"fetch_share": self.fetch / (sum(self.step_times) * self.steps)}),
                "window_ms": [1e3 * t for t in self.step_times], "items_per_step": per_step_items,
                # Host-bound steps (a small model on a big GPU) take about this long; it is blind to
                # time the host lost to other processes, which makes wall-clock windows noisy.
                "host_cpu_ms": 1e3 * statistics.median(self.cpu_times), "cpu_window_ms": [1e3 * t for t in self.cpu_times]}

