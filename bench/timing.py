"""Step timing shared by the suite run and the plain loop: the GPU is synchronised only at window
boundaries, so timing does not change what it measures."""
from __future__ import annotations

import statistics
import time

import lightning as L
import torch

from suite.hardware import synchronize


class Windows:
    """Per-step time over `windows` windows of `steps` steps each, after `warmup` steps."""

    def __init__(self, warmup: int, steps: int, windows: int, device: torch.device) -> None:
        self.warmup, self.steps, self.windows, self.device = warmup, steps, windows, device
        self.step_times: list[float] = []  # mean step time of each window
        self.cpu_times: list[float] = []  # the main thread's CPU time a step, per window
        self.items = 0
        self.wait = 0.0  # host time between the end of one step and the start of the next
        self._t0 = None
        self._count = 0

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps * self.windows

    def before_step(self, step: int, between: float = 0.0) -> None:
        if step >= self.warmup:
            self.wait += between
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
        per_step_items = self.items / measured
        return {"median_step_ms": 1e3 * median, "spread_ms": 1e3 * (max(self.step_times) - min(self.step_times)),
                "items_per_sec": per_step_items / median,
                "wait_share": self.wait / (sum(self.step_times) * self.steps),
                "window_ms": [1e3 * t for t in self.step_times], "items_per_step": per_step_items,
                # Host-bound steps (a small model on a big GPU) take about this long; it is blind to
                # time the host lost to other processes, which makes wall-clock windows noisy.
                "host_cpu_ms": 1e3 * statistics.median(self.cpu_times), "cpu_window_ms": [1e3 * t for t in self.cpu_times]}


def merge_rounds(results: list[dict]) -> dict:
    """One row from several rounds of the same measurement: the median and spread over all their
    windows. Rounds alternate between implementations, so a drift in the machine's speed (clocks,
    neighbours on the host) lands on every implementation instead of on whichever ran last."""
    done = [r for r in results if r.get("window_ms")]
    if len(results) == 1 or not done:
        return results[0]
    windows = [t for r in done for t in r["window_ms"]]
    median = statistics.median(windows)
    cpu = [t for r in done for t in r.get("cpu_window_ms", [])]
    merged = {**done[0], "median_step_ms": median, "spread_ms": max(windows) - min(windows),
              "host_cpu_ms": statistics.median(cpu) if cpu else None, "cpu_window_ms": cpu,
              "items_per_sec": done[0]["items_per_step"] / (median / 1e3), "window_ms": windows,
              "wait_share": statistics.mean(r["wait_share"] for r in done), "rounds": len(done)}
    if any("peak_mem_gb" in r for r in done):
        merged["peak_mem_gb"] = max(r.get("peak_mem_gb", 0.0) for r in done)
    failed = [r["error"] for r in results if r.get("error")]
    if failed:
        merged["error"] = f"{len(failed)} of {len(results)} rounds failed: {failed[0]}"
    return merged


class WindowTimer(L.Callback):
    """Windows, driven by Lightning's batch hooks (the suite's side of the benchmark)."""

    def __init__(self, windows: Windows) -> None:
        self.w = windows
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        between = time.perf_counter() - self._last_end if self._last_end is not None else 0.0
        self.w.before_step(trainer.global_step, between)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.w.after_step(trainer.global_step - 1, pl_module.batch_size_of(batch))
        self._last_end = time.perf_counter()
