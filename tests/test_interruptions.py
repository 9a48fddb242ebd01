"""Interrupted and failing runs: with loader workers a stopped run resumes bit for bit and a failing one
exits at once; what a killed checkpoint write leaves is removed on the next start."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset

from tests.conftest import run_cli
from tests.tiny_task import TinyDataModule, TinyModule

WORKERS = ("model=tiny", "deterministic=true", "model.dropout=0.2", "trainer.log_every_n_steps=1", "logger=csv",
           "device=cpu", "num_workers=2", "data._target_=tests.test_interruptions.NoisyTinyDataModule")


class NoisyTinyDataModule(TinyDataModule):
    """The tiny task with a random augmentation drawn in the loader workers, as image tasks draw theirs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_set = _Noisy(self.train_set)


class _Noisy(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        return x + 0.1 * torch.randn_like(x), y


class KillAt(L.Callback):
    def __init__(self, step: int, signame: str) -> None:
        self.step, self.signame = step, signame

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signame))


def _fail(trainer, step: int, stamp: str) -> None:
    if trainer.global_step >= step:
        Path(stamp).write_text(repr(time.time()))
        raise RuntimeError("injected failure")


class FailIn(L.Callback):
    """Raises in `hook` once `step` is reached, first noting the time in the file `stamp`."""

    def __init__(self, hook: str, stamp: str, step: int = 0) -> None:
        setattr(self, hook, lambda trainer, *args, **kwargs: _fail(trainer, step, stamp))


class FailingTinyModule(TinyModule):
    """Raises in its training step: the tuners run their own callbacks, not the run's."""

    def __init__(self, stamp: str, fail_at: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stamp, self.fail_at = stamp, fail_at

    def training_step(self, batch, batch_idx):
        _fail(self.trainer, self.fail_at, self.stamp)
        return super().training_step(batch, batch_idx)


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    done = run_cli(tmp, *WORKERS, "max_epochs=3", "run_name=ref")
    assert done.returncode == 0, done.stderr[-3000:]
    return _weights(tmp / "logs" / "tiny" / "ref" / "checkpoints" / "last.ckpt")


# 6 batches an epoch: a kill at step 11 falls in epoch 1 (resumed from the step-10 checkpoint), and a
# SIGTERM at step 14 stops in epoch 2 after saving last.ckpt.
# Both are slow (make test-all): the fast suite keeps the sampler and worker-seeding unit tests below.
@pytest.mark.slow
@pytest.mark.parametrize("signame, step", [("SIGKILL", 11), ("SIGTERM", 14)])
def test_run_with_workers_stopped_in_a_later_epoch_resumes_bit_exact(tmp_path, reference, signame, step):
    stop = ("+callbacks.stop._target_=tests.test_interruptions.KillAt", f"+callbacks.stop.step={step}",
            f"+callbacks.stop.signame={signame}", "callbacks.periodic_checkpoint.every_n_train_steps=2")
    stopped = run_cli(tmp_path, *WORKERS, "max_epochs=3", "run_name=k", *stop)
    assert stopped.returncode == (-signal.SIGKILL if signame == "SIGKILL" else 0), stopped.stderr[-3000:]
    resumed = run_cli(tmp_path, *WORKERS, "max_epochs=3", "run_name=k", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    weights = _weights(tmp_path / "logs" / "tiny" / "k" / "checkpoints" / "last.ckpt")
    for name in reference:
        assert torch.equal(weights[name], reference[name]), f"{name} differs from the uninterrupted run"


def test_resumed_epoch_skip_waits_for_its_epoch():
    from datamodules.base import ResumableSampler

    reference = ResumableSampler(12, seed=0)
    reference.set_epoch(2)
    sampler = ResumableSampler(12, seed=0)
    sampler.resume_at(2, 5)
    assert len(list(sampler)) == 12, "an order drawn before the epoch is set skips nothing"
    sampler.set_epoch(2)
    assert list(sampler) == list(reference)[5:]
    assert list(sampler) == list(reference), "the skip is used once"


def test_loader_workers_read_the_epoch_set_after_the_iterator_is_made_and_draw_by_position():
    """As Lightning does: the iterator is made, then the epoch set. A loader resumed after one batch
    yields the rest of the epoch's batches and random draws, although other workers read them."""
    from torch.utils.data import TensorDataset

    from datamodules.base import BaseDataModule, ResumableSampler

    def epoch(skip: int) -> list:
        dm = BaseDataModule({"batch_size": 4, "num_workers": 2})
        loader = dm.make_loader(_Noisy(TensorDataset(torch.zeros(16, 1), torch.arange(16))), shuffle=True)
        loader.sampler.resume_at(3, skip)
        batches = iter(loader)
        loader.sampler.set_epoch(3)
        return [(x.flatten().tolist(), y.tolist()) for x, y in batches]

    whole, resumed = epoch(0), epoch(4)
    order = ResumableSampler(16, seed=torch.initial_seed())
    order.set_epoch(3)
    assert [i for _, y in whole for i in y] == list(order)
    assert resumed == whole[1:]


# ---- a failing run exits, whatever it has running -------------------------------------------------
slow = pytest.mark.slow


@pytest.mark.parametrize("where", [
    pytest.param(("fit", "setup", 0, True), marks=slow, id="setup"),  # before any worker starts
    pytest.param(("fit", "on_train_start", 0, True), marks=slow, id="train-start"),  # validation's workers are up
    pytest.param(("fit", "on_train_batch_start", 50, True), marks=slow, id="mid-epoch-1"),
    pytest.param(("fit", "on_train_batch_start", 50, False), marks=slow, id="mid-epoch-1-workers-per-epoch"),
    pytest.param(("tune_lr", "training_step", 3, True), id="tune-lr"),  # Lightning's teardown misses these
    pytest.param(("tune_batch_size", "training_step", 1, True), marks=slow, id="tune-batch-size"),
])
def test_failing_run_with_loader_workers_exits_within_seconds(tmp_path, where):
    mode, hook, step, persistent = where
    stamp = tmp_path / "raised_at"
    if hook == "training_step":
        fail = ("model._target_=tests.test_interruptions.FailingTinyModule", f"+model.fail_at={step}",
                f"+model.stamp={stamp}")
    else:
        fail = ("+callbacks.fail._target_=tests.test_interruptions.FailIn", f"+callbacks.fail.hook={hook}",
                f"+callbacks.fail.step={step}", f"+callbacks.fail.stamp={stamp}")
    done = run_cli(tmp_path, *WORKERS, "max_epochs=3", f"mode={mode}", "batch_size=8", "data.num_samples=512",
                   f"loader.persistent_workers={str(persistent).lower()}", *fail, timeout=120)
    exited = time.time()
    assert done.returncode != 0 and "injected failure" in done.stderr, done.stderr[-3000:]
    # communicate() returned, so every process holding the run's output (workers included) is gone
    assert exited - float(stamp.read_text()) < 10, "the run took too long to exit after its error"


# ---- what a killed checkpoint write leaves ---------------------------------------------------------
def test_checkpoint_write_stages_nothing_in_the_system_temp_folder(tmp_path, monkeypatch):
    import tempfile

    from suite.checkpoint import AtomicCheckpointIO

    staged = []
    make = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: staged.append(make(*a, **k)) or staged[-1])
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "c" / "last.ckpt")
    assert staged == [], "a kill during the write would leave this file in the system temp folder"
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["last.ckpt"]


def test_resume_removes_the_temporary_files_of_a_killed_write(make_config, tmp_path):
    from suite.train import run

    run(make_config("model=tiny", "max_epochs=1", "run_name=r"))
    checkpoints = tmp_path / "run" / "checkpoints"
    dead = checkpoints / "last.ckpt.tmp-999999999"  # above any pid Linux gives out
    live = checkpoints / f"step0000099.ckpt.tmp-{os.getpid()}"  # a write still going on
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    run(make_config("model=tiny", "max_epochs=2", "run_name=r", "resume=true"))
    assert not dead.exists() and live.exists()
