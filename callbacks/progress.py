"""Progress and model summary: rich on a terminal, plain log lines when output is piped.

Rich bars written to a file or a CI log are unreadable, so without a TTY progress is reported
as one log line every `log_every_n_steps` steps and one per epoch.

Tasks log training values without `prog_bar=True`: Lightning turns every progress-bar value into a
Python number after every training batch, a host sync per step that drains the GPU queue (about 5%
of a launch-bound U-Net step on an H100). Both displays here read the `train/*` values themselves,
from the device, only when they show them.
"""
from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

log = logging.getLogger("progress")


def _is_tty() -> bool:
    return sys.stdout.isatty()


def progress_bar(log_every_n_steps: int = 50):
    return RichProgress(log_every_n_steps) if _is_tty() else LogProgress(log_every_n_steps)


def model_summary(max_depth: int = 2):
    return RichModelSummary(max_depth=max_depth) if _is_tty() else ModelSummary(max_depth=max_depth)


def training_values(trainer) -> dict:
    """The `train/*` values logged at the latest step, still on the device."""
    return {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()) if k not in ("v_num",))


class RichProgress(RichProgressBar):
    """Lightning's rich bar, with the training values read to the host every `every` steps."""

    def __init__(self, every: int = 50) -> None:
        super().__init__()
        self.every = max(1, int(every))
        self._shown: dict[str, float] = {}
        self._read_at: int | None = None

    def get_metrics(self, trainer, pl_module) -> dict:
        step = trainer.global_step
        if self._read_at is None or step - self._read_at >= self.every or step < self._read_at:
            self._shown = {k: float(v) for k, v in training_values(trainer).items() if v.numel() == 1}
            self._read_at = step
        return {**super().get_metrics(trainer, pl_module), **self._shown}


class LogProgress(ProgressBar):
    """A progress 'bar' that writes plain log lines."""

    def __init__(self, log_every_n_steps: int = 50) -> None:
        super().__init__()
        self.every = max(1, int(log_every_n_steps))
        self._enabled = True
        self._epoch_start: float | None = None  # unset when a run resumes at an epoch's end
        self._shown_step: int | None = None  # with gradient accumulation a step spans several batches

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def get_metrics(self, trainer, pl_module) -> dict:  # called only when a line is written
        return {**super().get_metrics(trainer, pl_module), **training_values(trainer)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # every N optimizer steps, as Lightning writes (and tasks log) training values: the line then
        # shows the values of the step it names
        step = trainer.global_step
        if self._enabled and trainer.is_global_zero and step % self.every == 0 and step != self._shown_step:
            self._shown_step = step
            total = self.total_train_batches
            log.info("epoch %d step %d/%s %s", trainer.current_epoch, batch_idx + 1, total,
                     _fmt(self.get_metrics(trainer, pl_module)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero:
            took = "" if self._epoch_start is None else f" in {time.perf_counter() - self._epoch_start:.1f}s"
            log.info("epoch %d done%s %s", trainer.current_epoch, took, _fmt(self.get_metrics(trainer, pl_module)))
        self._epoch_start = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking and trainer.state.fn != "fit":
            log.info("validation %s", _fmt(trainer.callback_metrics))

    def on_test_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero:
            log.info("test %s", _fmt({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test")}))
