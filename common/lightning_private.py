"""Every use of Lightning's private API in the suite, in one place.

Everything else uses Lightning's public API only. What is here has no public equivalent in the
Lightning tested (LIGHTNING_TESTED; pyproject caps lightning below 2.7): each entry says what it
reaches, why, and the upstream issue. `PRIVATE_NAMES` lists every private name touched, and
tests/test_lightning_private.py fails naming the one that moved when a Lightning release moves it.
"""
from __future__ import annotations

import csv
from collections.abc import Callable

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

LIGHTNING_TESTED = "2.6.6"

# (object, private attribute) for every name below: the test resolves each one.
PRIVATE_NAMES = [
    ("lightning.pytorch.strategies.FSDPStrategy", "_setup_model"),
    ("lightning.pytorch.strategies.FSDPStrategy", "_activation_checkpointing_kwargs"),
    ("lightning.fabric.strategies.fsdp", "_setup_activation_checkpointing"),
    ("lightning.fabric.strategies.launchers.subprocess_script", "_ChildProcessObserver"),
    ("lightning.fabric.strategies.launchers.subprocess_script._ChildProcessObserver", "_terminate_all"),
    ("lightning.fabric.strategies.launchers.subprocess_script._ChildProcessObserver", "_child_processes"),
    ("lightning.fabric.strategies.launchers.subprocess_script._ChildProcessObserver", "_run"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_none_monitor_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_last_global_step_saved"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_check_log_dir_exists"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_fs"),
    ("lightning.pytorch.loggers.CSVLogger", "_experiment"),
    ("lightning.pytorch.loggers.CSVLogger", "_fs"),
    ("lightning.pytorch.trainer.connectors.logger_connector.result", "_ResultCollection"),
]


# ---- FSDP: wrapping the module ---------------------------------------------------------------------
# Lightning 2.6.6. FSDPStrategy.setup wraps the module in its private `_setup_model`; the suite must
# wrap it itself: an auto-wrap policy from the task's own blocks, the same root again for the test
# after fit (Lightning's method finds the blocks wrapped, skips the root, and loading the best
# checkpoint then fails: upstream issue Lightning-AI/pytorch-lightning#19015), and the device itself
# as device_id on CPU. Activation checkpointing after wrapping has no public function either (it came
# with PR #15826; no upstream issue found asking to make it public).
class FSDPWrapping(FSDPStrategy):
    """Lightning's FSDPStrategy whose wrapping step is `wrap(model)`: override it, not the private hook."""

    def _setup_model(self, model):
        return self.wrap(model)

    def wrap(self, model):
        """Lightning's own wrapping."""
        return super()._setup_model(model)

    def checkpoint_activations(self, model) -> None:
        """Apply the strategy's `activation_checkpointing_policy` to the wrapped model, as Lightning does."""
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)


# ---- the launcher's kill after a rank dies ---------------------------------------------------------
# Lightning 2.6.6. SubprocessScriptLauncher watches the ranks it started from a thread
# (`_ChildProcessObserver`, added by Lightning-AI/pytorch-lightning PR #18218 "Monitor subprocesses to
# avoid zombies"); when one exits non-zero it SIGKILLs every process (`_terminate_all`) with no hook to
# run first. No upstream issue found asking for such a hook.
ChildProcessObserver = _ChildProcessObserver  # for tests that drive the watcher


def before_the_launcher_kills(report: Callable[[list[tuple[int, int]]], None]) -> None:
    """Make the launcher's watcher call `report([(rank, exit code) of each failed rank])` before its
    kill. Installing again replaces the previous report; the kill itself always happens."""
    observer = _ChildProcessObserver
    original = getattr(observer, "_suite_original_terminate_all", observer._terminate_all)

    def terminate_all(self) -> None:
        try:
            report([(i + 1, p.returncode) for i, p in enumerate(self._child_processes) if p.returncode])
        finally:
            original(self)

    observer._suite_original_terminate_all = original
    observer._terminate_all = terminate_all


# ---- ModelCheckpoint: a save outside its own schedule ----------------------------------------------
# Lightning 2.6.6. ModelCheckpoint saves only from its own hooks; a subclass that must also save at
# another moment (callbacks/checkpoint.py: a stop at max_steps in mid-epoch, the end of fit) calls
# the method those hooks call, and reads the step it last saved at so it does not save twice. No
# upstream issue found for a public "save now".
def save_checkpoint_now(callback: ModelCheckpoint, trainer) -> None:
    """Save `callback`'s (unmonitored) checkpoint now, as its own hooks would: file name, state, loggers."""
    callback._save_none_monitor_checkpoint(trainer, callback._monitor_candidates(trainer))


def step_last_saved(callback: ModelCheckpoint) -> int:
    """The global step at which `callback` last saved a checkpoint."""
    return callback._last_global_step_saved


# ---- CSV metrics that survive a resume -------------------------------------------------------------
# Lightning 2.6.6. CSVLogger's writer deletes an existing metrics.csv when it is created (in its private
# `_check_log_dir_exists`), and the logger keeps its writer in the private `_experiment`, which its
# `finalize` reads to decide whether rows are left to write. No option appends. No upstream issue found.
class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one continues it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose metrics.csv is continued, not replaced, by a new writer."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# ---- tests: every value a module logs --------------------------------------------------------------
# Lightning 2.6.6. tests/test_smoke.py wraps the collection's `log` to catch per-step values logged with
# prog_bar=True, after Lightning has resolved on_step's default for the hook: LightningModule.log sees
# on_step=None. No upstream issue found.
ResultCollection = _ResultCollection
