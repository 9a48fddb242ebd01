"""The benchmark's side of step timing: rounds merged into one row, `common.timing.Windows` that also
times a row's first step, and Windows driven by Lightning's batch hooks."""
from __future__ import annotations

import logging
import statistics
import time

import lightning as L
from lightning.pytorch.profilers import Profiler

from common.timing import Windows, synchronize

log = logging.getLogger("bench")


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
              "first_step_by_round": [r.get("first_step_s") for r in done],  # the table shows round 1's
              "host_cpu_ms": statistics.median(cpu) if cpu else None, "cpu_window_ms": cpu,
              "items_per_sec": done[0]["items_per_step"] / (median / 1e3), "window_ms": windows,
              "wait_share": statistics.mean(r["wait_share"] for r in done), "rounds": len(done)}
    fetched = [r["fetch_share"] for r in done if "fetch_share" in r]
    if fetched:
        merged["fetch_share"] = statistics.mean(fetched)
    if any("peak_mem_gb" in r for r in done):
        merged["peak_mem_gb"] = max(r.get("peak_mem_gb", 0.0) for r in done)
    failed = [r["error"] for r in results if r.get("error")]
    if failed:
        merged["error"] = f"{len(failed)} of {len(results)} rounds failed: {failed[0]}"
    return merged


class TimedWindows(Windows):
    """Windows that also time the row's first step: from this object's creation, just before the row
    starts setting up (config, data, model, Trainer), to the end of step 0 with its GPU work done, so
    compilation and autotuning are in it. The one extra synchronisation is in the warm-up."""

    def __init__(self, warmup: int, steps: int, windows: int, device) -> None:
        super().__init__(warmup, steps, windows, device)
        self.created = time.perf_counter()
        self.first_step_s: float | None = None

    def after_step(self, step: int, items: int) -> None:
        if step == 0 and self.first_step_s is None:
            synchronize(self.device)
            self.first_step_s = time.perf_counter() - self.created
        super().after_step(step, items)

    def summary(self) -> dict:
        result = super().summary()
        return {**result, "first_step_s": self.first_step_s} if result else result


class FetchProfiler(Profiler):
    """Times only what a training step waits on for its batch: Lightning's fetch of it from the loader and its move
    to the device (the profiler actions Lightning names `...train_dataloader_next` and `...batch_to_device`)."""

    ACTIONS = ("train_dataloader_next", "batch_to_device")

    def __init__(self, **user_profiler: object) -> None:
        super().__init__()
        if user_profiler:  # the bench's override merged into a configured profiler's settings (debug=profiler)
            log.warning("the bench times batch fetches with its own profiler: trainer.profiler (%s) is not used",
                        ", ".join(sorted(user_profiler)))
        self.total = 0.0
        self._started: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        if action_name.endswith(self.ACTIONS):
            self._started[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        started = self._started.pop(action_name, None)
        if started is not None:
            self.total += time.perf_counter() - started

    def summary(self) -> str:
        return ""  # the bench reports the share of each step (Windows.fetch_share)


class WindowTimer(L.Callback):
    """Windows, driven by Lightning's batch hooks (the suite's side of the benchmark). With a FetchProfiler as
    the Trainer's profiler, each step's time fetching its batch is counted apart from the rest between steps."""

    def __init__(self, windows: Windows) -> None:
        self.w = windows
        self._last_end: float | None = None
        self._fetched = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        between = time.perf_counter() - self._last_end if self._last_end is not None else 0.0
        if isinstance(trainer.profiler, FetchProfiler):
            self.w.before_step(trainer.global_step, between, trainer.profiler.total - self._fetched)
            self._fetched = trainer.profiler.total
        else:
            self.w.before_step(trainer.global_step, between)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.w.after_step(trainer.global_step - 1, pl_module.batch_size_of(batch))
        self._last_end = time.perf_counter()
