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
    hooks = [r["hook_ms"] for r in done if r.get("hook_ms")]
    if hooks:  # each owner's mean over the rounds that timed it
        owners = {owner for h in hooks for owner in h}
        mean = {o: statistics.mean(h[o] for h in hooks if o in h) for o in owners}
        merged["hook_ms"] = dict(sorted(mean.items(), key=lambda item: -item[1]))
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


# Hooks Lightning calls on every training step: only callbacks with one of these can cost throughput.
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad")
HOOK_OWNERS = ("[Callback]", "[LightningModule]")  # how Lightning names a hook's profiler action: [Callback]<state key>.<hook>


def hook_owner(action_name: str) -> str | None:
    """The callback (its class, as a state key starts) or module whose per-step hook `action_name` times; else None."""
    if not (action_name.startswith(HOOK_OWNERS) and action_name.endswith(STEP_HOOKS)):
        return None
    owner = action_name.split("]", 1)[1].rsplit(".", 1)[0]
    return owner.split("{", 1)[0]  # ModelCheckpoint{'monitor': ...}: one name for every instance of a class


class FetchProfiler(Profiler):
    """Times what a training step waits on for its batch: Lightning's fetch of it from the loader and its move to the
    device (the profiler actions Lightning names `...train_dataloader_next` and `...batch_to_device`). With
    `time_hooks`, also the host time of each callback's per-step hooks (and the module's), which a removed callback's
    row only estimates within the windows' noise: `hooks` sums them by owner. Off in the measured rows: timing
    every hook (about 100 actions a step) costs host time the suite's users do not pay."""

    ACTIONS = ("train_dataloader_next", "batch_to_device")

    def __init__(self, time_hooks: bool = False, **user_profiler: object) -> None:
        super().__init__()
        if user_profiler:  # the bench's override merged into a configured profiler's settings (debug=profiler)
            log.warning("the bench times batch fetches with its own profiler: trainer.profiler (%s) is not used",
                        ", ".join(sorted(user_profiler)))
        self.total = 0.0
        self.time_hooks = time_hooks
        self.hooks: dict[str, float] = {}  # host seconds in each owner's per-step hooks
        self._started: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        if action_name.endswith(self.ACTIONS) or (self.time_hooks and hook_owner(action_name)):
            self._started[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        started = self._started.pop(action_name, None)
        if started is None:
            return
        took = time.perf_counter() - started
        owner = hook_owner(action_name)
        if owner is None:
            self.total += took
        else:
            self.hooks[owner] = self.hooks.get(owner, 0.0) + took

    def summary(self) -> str:
        return ""  # the bench reports the share of each step (Windows.fetch_share)


class WindowTimer(L.Callback):
    """Windows, driven by Lightning's batch hooks (the suite's side of the benchmark). With a FetchProfiler as
    the Trainer's profiler, each step's time fetching its batch is counted apart from the rest between steps."""

    def __init__(self, windows: Windows) -> None:
        self.w = windows
        self._last_end: float | None = None
        self._fetched = 0.0
        self._hooks_at: list[dict[str, float]] = []  # the profiler's hook sums where the windows start and end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        between = time.perf_counter() - self._last_end if self._last_end is not None else 0.0
        if isinstance(trainer.profiler, FetchProfiler):
            self.w.before_step(trainer.global_step, between, trainer.profiler.total - self._fetched)
            self._fetched = trainer.profiler.total
            if trainer.global_step == self.w.warmup:
                self._hooks_at = [dict(trainer.profiler.hooks)]
        else:
            self.w.before_step(trainer.global_step, between)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.w.after_step(trainer.global_step - 1, pl_module.items_trained(batch))
        if len(self._hooks_at) == 1 and trainer.global_step == self.w.total_steps:
            self._hooks_at.append(dict(trainer.profiler.hooks))
        self._last_end = time.perf_counter()

    def hook_ms(self) -> dict[str, float]:
        """Host ms a measured step in each owner's per-step hooks, largest first (from step `warmup` to the end;
        the hooks that run before this timer's in the first measured step, or after it in the last, fall outside)."""
        if len(self._hooks_at) < 2:
            return {}
        (start, end), steps = self._hooks_at, self.w.total_steps - self.w.warmup
        spent = {owner: 1e3 * (end[owner] - start.get(owner, 0.0)) / steps for owner in end
                 if owner != type(self).__name__}  # the bench's own timer is in every row alike
        return dict(sorted(spent.items(), key=lambda item: -item[1]))
