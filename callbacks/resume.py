"""Exact resume and preemption.

RandomState saves every random generator with each checkpoint and restores them when training
starts again, so a resumed run draws the same dropout masks and noise as an uninterrupted one.
Preemption turns SIGTERM (Lightning's own handling), SIGINT and SIGUSR1 into "finish this batch,
save last.ckpt, exit cleanly"; `resume=true` then continues mid-epoch. Under SLURM, Lightning's
own SIGUSR1 handler saves and requeues, and a requeued job resumes in place (suite/rundir.py).
A harder stop (SIGKILL) can cut a checkpoint write short: its temporary file goes at the next start.
"""
from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from common.files import remove_stale_temporaries

log = logging.getLogger(__name__)


def _numpy_state_to_tensors(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(s: dict):
    return (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"])


class RandomState(L.Callback):
    """Every generator's state in the checkpoint (weights_only-loadable), restored at train start."""

    def __init__(self) -> None:
        self._to_restore: dict | None = None

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_tensors(np.random.get_state()),
                 "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        # Restored here, not at load time: sanity checks and loader setup between the two would
        # otherwise consume draws that the uninterrupted run never made.
        s, self._to_restore = self._to_restore, None
        if not s:
            return
        torch.set_rng_state(s["torch"])
        np.random.set_state(_numpy_state_from_tensors(s["numpy"]))
        random.setstate((s["python_version"], tuple(s["python"]), None))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])


class Preemption(L.Callback):
    """SIGINT / SIGUSR1 (SIGTERM via Lightning): save last.ckpt after the current optimizer step and exit cleanly."""

    def __init__(self, signals: tuple[str, ...] = ("SIGINT", "SIGUSR1")) -> None:
        self.signals = signals
        self._requested: str | None = None
        self._previous: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            for callback in trainer.checkpoint_callbacks:
                if callback.dirpath:
                    remove_stale_temporaries(Path(callback.dirpath))
        if stage != "fit" or os.name == "nt":
            return
        slurm = "SLURM_JOB_ID" in os.environ
        for name in self.signals:
            if name == "SIGUSR1" and slurm:
                continue  # Lightning's SLURM handler saves and requeues
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self._requested = name
        log.warning("%s received: finishing this optimizer step, then saving last.ckpt and stopping.", name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Stopped before the next batch, not at the end of the last one: every callback's batch-end work (an EMA
        # update, a periodic checkpoint) is done, and at a window's start no accumulated gradient is lost.
        if self._requested and batch_idx % trainer.accumulate_grad_batches == 0:
            raise SIGTERMException

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.state.fn != "fit":
            return
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return
        path = Path(callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning("Stopped at epoch %d, step %d; saved %s. Continue with resume=true run_name=%s",
                        trainer.current_epoch, trainer.global_step, path, Path(trainer.default_root_dir).name)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
