"""Checkpoints are written whole or not at all, a bad one is named, last.ckpt is always the newest
state, old periodic ones are pruned, and a failed run leaves its last checkpoint and an error log."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from suite.checkpoint import AtomicCheckpointIO, check_checkpoint
from suite.train import run
from tests.tiny_task import TinyModule


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def crash(checkpoint, path):  # dies half-way through writing
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left behind"


def test_corrupt_or_foreign_checkpoint_is_named(make_config, tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.ckpt is corrupt"):
        check_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(ValueError, match="foreign.ckpt is not a Lightning checkpoint"):
        check_checkpoint(foreign)
    run(make_config("model=tiny", "max_epochs=1", "run_name=c"))
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"last\.ckpt is corrupt"):
        run(make_config("model=tiny", "max_epochs=2", "run_name=c", "resume=true"))


def test_checkpoint_of_a_compiled_model_loads_into_a_plain_one():
    compiled = TinyModule()
    compiled.net = torch.compile(compiled.net)  # wraps as net._orig_mod; nothing is compiled until called
    checkpoint = {"state_dict": compiled.state_dict()}
    compiled.on_save_checkpoint(checkpoint)
    assert all("_orig_mod" not in k for k in checkpoint["state_dict"])
    plain = TinyModule()
    plain.load_state_dict(checkpoint["state_dict"])
    back = {"state_dict": dict(checkpoint["state_dict"])}
    compiled.on_load_checkpoint(back)
    compiled.load_state_dict(back["state_dict"])


def test_periodic_checkpoints_keep_only_the_newest(make_config, tmp_path):
    run(make_config("model=tiny", "max_epochs=3", "callbacks.periodic_checkpoint.every_n_train_steps=2",
                    "callbacks.periodic_checkpoint.save_top_k=2"))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*.ckpt"))
    assert kept == ["step0000016.ckpt", "step0000018.ckpt"], "older periodic checkpoints are deleted"


def test_last_checkpoint_is_the_final_state_even_when_the_best_is_earlier(make_config, tmp_path):
    """Lightning's save_last refreshes last.ckpt only when a best checkpoint is saved; resume=true
    would then go back to the best epoch. The suite writes last.ckpt after every validation."""
    run(make_config("model=tiny", "max_epochs=3", "monitor.mode=max"))  # val loss falls: epoch 0 stays best
    ckpts = tmp_path / "run" / "checkpoints"
    best = [p.name for p in ckpts.glob("best-*.ckpt")]
    assert best == ["best-epoch000-step0000006.ckpt"]  # 6 steps an epoch
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 18 and last["epoch"] == 2


def test_last_checkpoint_holds_a_stop_at_max_steps_between_validations(make_config, tmp_path):
    run(make_config("model=tiny", "max_epochs=5", "trainer.max_steps=10"))  # 6 steps an epoch: validated at 6
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 10


def test_uncaught_error_writes_error_log_and_keeps_last_checkpoint(make_config, tmp_path):
    with pytest.raises(RuntimeError, match="injected failure"):
        run(make_config("model=tiny", "max_epochs=3", "run_name=f",
                        "+callbacks.fail._target_=tests.training_helpers.FailAt", "+callbacks.fail.step=8"))
    text = (tmp_path / "run" / "error.log").read_text()
    assert "injected failure" in text and "resume=true run_name=f" in text and "Traceback" in text
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
