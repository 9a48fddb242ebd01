"""What starting costs, made visible: the time to the first optimizer step and, with compile on, the
graphs compiled and the recompilations.

`perf/time_to_first_step_s` is the wall time from the start of fit (after setup: the data is prepared
and the module built) to the end of the first optimizer step, the sanity check and any compiling
included; one log line says it. With compile on (common/fast_path.py), `perf/compiled_graphs` and
`perf/recompiles` are logged at every epoch end, so a run that recompiles each epoch shows a growing
count, and fit ends with one line: "compile: N graphs, M recompilations". The values go straight to
the loggers and the trainer's callback metrics (callbacks.throughput.record_metrics), so nothing is read
from the GPU but the one synchronisation that ends the first step's timing.
"""
from __future__ import annotations

import logging
import time

import lightning as L

from callbacks.throughput import record_metrics
from common.fast_path import CompileCounter
from common.timing import synchronize

log = logging.getLogger(__name__)


class CompileCost(L.Callback):
    def __init__(self) -> None:
        self._t0: float | None = None
        self._start_step = 0
        self._counter: CompileCounter | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0, self._start_step = time.perf_counter(), trainer.global_step
        decision = getattr(pl_module, "compile_decision", None)
        if decision is not None and decision.on:
            self._counter = CompileCounter().start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None or trainer.global_step <= self._start_step:
            return  # timed already, or the first optimizer step is still accumulating
        synchronize(trainer.strategy.root_device)
        took, self._t0 = time.perf_counter() - self._t0, None
        compiling = " (compiling included)" if self._counter is not None else ""
        if trainer.is_global_zero:
            log.info("first optimizer step %.1f s after fit started%s", took, compiling)
        record_metrics(trainer, {"perf/time_to_first_step_s": took})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._counter is not None:
            record_metrics(trainer, self._counts())

    def on_fit_end(self, trainer, pl_module) -> None:
        self._stop(trainer, report=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop(trainer, report=False)

    def _counts(self) -> dict[str, float]:
        graphs, recompiles = self._counter.counts()
        return {"perf/compiled_graphs": graphs, **({} if recompiles is None else {"perf/recompiles": recompiles})}

    def _stop(self, trainer, report: bool) -> None:
        if self._counter is None:
            return
        counts = self._counts()
        self._counter.stop()
        self._counter = None
        if not report:
            return
        record_metrics(trainer, counts)
        if trainer.is_global_zero:
            recompiles = counts.get("perf/recompiles")
            log.info("compile: %d graphs, %s recompilations", counts["perf/compiled_graphs"],
                     "uncounted (TORCH_LOGS is set without recompiles)" if recompiles is None else int(recompiles))
