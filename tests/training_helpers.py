"""Test-only callbacks and readers the training tests share; the callbacks are injected into runs
with +callbacks.<name>._target_=tests.training_helpers.<Class>."""
from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import lightning as L
import torch

EXACT = ("model=tiny", "deterministic=true", "model.dropout=0.2", "max_epochs=3", "trainer.log_every_n_steps=1")


class SignalAt(L.Callback):
    def __init__(self, step: int, signame: str = "SIGTERM") -> None:
        self.step, self.signame = step, signame

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signame))


class RecordLR(L.Callback):
    seen: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordLR.seen[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


class PoisonGradients(L.Callback):
    def __init__(self, steps: list[int], from_step: int | None = None) -> None:
        self.steps, self.from_step = set(steps), from_step

    def on_after_backward(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step in self.steps or (self.from_step is not None and step >= self.from_step):
            for p in pl_module.parameters():
                p.grad.fill_(float("nan"))


class GradNormSpy(L.Callback):
    """Records the true global gradient norm of every optimizer step."""
    seen: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        GradNormSpy.seen.append(float(torch.cat(grads).norm()))


class LandsLater:
    """Stands in for a CUDA event on the CPU: not done when first asked, done when asked again."""

    def __init__(self) -> None:
        self.asked = False

    def query(self) -> bool:
        done, self.asked = self.asked, True
        return done

    def synchronize(self) -> None:
        pass


class FailAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("injected failure")


def _params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _rows(out: Path) -> list[dict]:
    with open(out / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def stopped_and_resumed(root: Path, settings, stop, signal_stop: bool = True) -> tuple[dict, dict, int]:
    """The last checkpoints of a run never stopped (root/ref) and of the same run stopped by the `stop` overrides
    (a signal: SystemExit), then resumed in place (root/cut): (resumed, uninterrupted, the step it stopped at)."""
    import pytest

    from suite.train import run
    from tests.conftest import compose_config

    run(compose_config(root / "ref", *settings))
    if signal_stop:
        with pytest.raises(SystemExit):
            run(compose_config(root / "cut", *settings, *stop))
    else:
        run(compose_config(root / "cut", *settings, *stop))
    stopped_at = torch.load(root / "cut" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    run(compose_config(root / "cut", *settings, "resume=true"))
    resumed, uninterrupted = (torch.load(root / r / "run" / "checkpoints" / "last.ckpt", weights_only=True)
                              for r in ("cut", "ref"))
    return resumed, uninterrupted, stopped_at
