"""Never fail silently: what a run is given (run dir, checkpoint, settings) is checked, and a bad input
stops the run with a message naming it and what was expected."""
from __future__ import annotations

import csv
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from suite.train import run

TINY = ("model=tiny", "max_epochs=1", "logger=csv")


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root, with the size and hash of each file."""
    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""

    return {str(p.relative_to(root)): (p.stat().st_size, digest(p)) for p in sorted(root.rglob("*"))}


def _train(tmp_path: Path, make_config, *overrides: str, to: str = "given.ckpt") -> Path:
    """A run's last.ckpt, moved out of the run dir (in-process runs all write to tmp_path/run)."""
    run(make_config("model=tiny", *overrides))
    ckpt = (tmp_path / "run" / "checkpoints" / "last.ckpt").rename(tmp_path / to)
    shutil.rmtree(tmp_path / "run")
    return ckpt


# ---- the run dir ----------------------------------------------------------------------------------
def test_a_second_fresh_run_into_a_run_dir_is_refused_and_leaves_the_first_run_as_it_was(make_config, tmp_path):
    from suite.rundir import RunDirTaken

    run(make_config(*TINY))
    run_dir = tmp_path / "run"
    before = _snapshot(run_dir)
    with pytest.raises(RunDirTaken, match=re.escape(f"{run_dir} already holds run 'run'") + ".*nothing was overwritten"):
        run(make_config(*TINY))
    assert _snapshot(run_dir) == before


@pytest.mark.slow  # two processes; the refusal itself is checked in-process above
def test_a_fresh_run_refused_because_its_name_exists_touches_nothing_of_that_run(cli, tmp_path):
    first = cli(*TINY, "run_name=a")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "logs" / "tiny" / "a"
    (run_dir / "error.log").write_text("the first run's own error log\n")
    before = _snapshot(run_dir)
    again = cli(*TINY, "run_name=a")
    assert again.returncode != 0
    assert f"{run_dir} already holds run 'a'" in again.stderr
    assert _snapshot(run_dir) == before, "the refused run wrote into the run it refused to overwrite"


# ---- checkpoints given as input -------------------------------------------------------------------
def test_evaluating_a_checkpoint_while_choosing_another_task_is_refused_naming_both(make_config, tmp_path):
    ckpt = _train(tmp_path, make_config, "max_epochs=2")
    with pytest.raises(ValueError, match=rf"{ckpt} is a checkpoint of task 'tiny'.*model=clinical.*task 'clinical'"):
        run(make_config("mode=test", "model=clinical", f"ckpt_path={ckpt}"))
    # naming the checkpoint's own task still evaluates it (naming none: test_run.py)
    run(make_config("mode=test", "model=tiny", f"ckpt_path={ckpt}"))
    assert "test/loss" in (tmp_path / "run" / "result.json").read_text()


def test_fit_from_a_missing_checkpoint_fails_naming_it(make_config, tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=f"Checkpoint {missing} does not exist"):
        run(make_config("model=tiny", "max_epochs=1", f"ckpt_path={missing}"))
    assert not (tmp_path / "run").exists(), "nothing is trained or written"


def test_fit_from_a_corrupt_checkpoint_fails_naming_it(make_config, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=f"Checkpoint {bad} is corrupt"):
        run(make_config("model=tiny", "max_epochs=1", f"ckpt_path={bad}"))


def test_fit_from_a_checkpoint_resumes_exactly_from_that_file(make_config, tmp_path):
    exact = ("model=tiny", "deterministic=true", "model.dropout=0.2", "trainer.log_every_n_steps=1")
    uninterrupted = torch.load(_train(tmp_path, make_config, *exact, "max_epochs=3", to="3.ckpt"), weights_only=True)
    start = _train(tmp_path, make_config, *exact, "max_epochs=1", to="1.ckpt")
    start_bytes = start.read_bytes()
    run(make_config(*exact, "max_epochs=3", f"ckpt_path={start}", "run_name=second"))
    with open(tmp_path / "run" / "csv" / "metrics.csv") as rows:
        trained = sorted({int(r["epoch"]) for r in csv.DictReader(rows) if r.get("train/loss")})
    assert trained == [1, 2], "training goes on from the checkpoint's epoch, not from scratch"
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (uninterrupted["epoch"], uninterrupted["global_step"])
    for name, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), f"{name} differs from the uninterrupted run"
    assert start.read_bytes() == start_bytes, "the checkpoint given is read, never written"


def test_fit_from_a_checkpoint_of_another_task_is_refused_naming_both(make_config, tmp_path):
    ckpt = _train(tmp_path, make_config, "max_epochs=2")
    with pytest.raises(ValueError, match=rf"{ckpt} is a checkpoint of task 'tiny'.*task 'clinical'"):
        run(make_config("model=clinical", f"ckpt_path={ckpt}", "run_name=other"))


@pytest.mark.parametrize("mode", ["fit", "test"])
def test_a_checkpoint_of_another_architecture_is_refused_naming_both_shapes(make_config, tmp_path, mode):
    ckpt = _train(tmp_path, make_config, "max_epochs=2")
    with pytest.raises(ValueError, match=rf"{ckpt} does not fit.*net\.0\.weight.*\[16, 8\].*\[24, 8\]") as err:
        run(make_config("model=tiny", "model.hidden=24", f"mode={mode}", f"ckpt_path={ckpt}", "run_name=wide"))
    assert "model.hidden=16 there and 24 here" in str(err.value)


def test_resume_and_a_checkpoint_together_are_refused(make_config, tmp_path):
    ckpt = _train(tmp_path, make_config, "max_epochs=2")
    with pytest.raises(ValueError, match="resume=true.*ckpt_path"):
        run(make_config("model=tiny", "max_epochs=3", "run_name=t", "resume=true", f"ckpt_path={ckpt}"))


# ---- settings of the wrong type or range ----------------------------------------------------------
@pytest.mark.slow  # a process (~9 s on the CI machine); the same check runs in-process below (batch_size=abc)
def test_a_wrong_typed_batch_size_on_the_command_line_is_named(cli):
    result = cli(*TINY, "batch_size=abc")
    assert result.returncode != 0
    assert "batch_size='abc': expected a positive integer (your override batch_size=abc)" in result.stderr


@pytest.mark.parametrize("override,expected", [
    ("batch_size=abc", "batch_size='abc': expected a positive integer"),
    ("batch_size=0", "batch_size=0: expected a positive integer"),
    ("batch_size=true", "batch_size=True: expected a positive integer"),
    ("num_workers=-1", "num_workers=-1: expected an integer >= 0"),
    ("max_epochs=1.5", "max_epochs=1.5: expected an integer >= -1"),
    ("seed=abc", "seed='abc': expected an integer"),
    ("precision=17", "precision=17 is not valid; choose one of auto, "),
    ("gradient_clip_val=-1", "gradient_clip_val=-1: expected a number >= 0 or null"),
    ("resume=yes", "resume='yes': expected true or false"),
    ("deterministic=maybe", "deterministic='maybe': expected true, false or warn"),
    ("loader.prefetch_factor=0", "loader.prefetch_factor=0: expected a positive integer or null"),
    ("device=quantum", "device='quantum' is not valid; choose one of auto"),
])
def test_a_setting_of_the_wrong_type_or_range_names_the_key_and_what_it_expects(make_config, override, expected):
    short = () if override.startswith("max_epochs") else ("max_epochs=1", "trainer.limit_train_batches=2")
    with pytest.raises(ValueError) as err:
        run(make_config("model=tiny", *short, override))
    assert expected in str(err.value)
    assert f"your override {override}" in str(err.value)


def test_a_wrong_value_set_in_a_config_file_says_where_to_look(make_config):
    from suite.config_checks import check_settings

    cfg = make_config("model=tiny")
    cfg.batch_size = "abc"  # as if an experiment said so
    with pytest.raises(ValueError, match=r"batch_size='abc': expected a positive integer \(set in conf/"):
        check_settings(cfg)


@pytest.mark.parametrize("override,expected", [
    ("model.hidden=abc", "model.hidden='abc': expected int (argument hidden of tests.tiny_task.TinyModule)"),
    ("data.num_samples=many", "data.num_samples='many': expected int"),
    ("model.dropout=2", "model.dropout: dropout probability has to be between 0 and 1"),
])
def test_a_wrong_model_or_data_setting_names_its_key(make_config, override, expected):
    with pytest.raises(ValueError) as err:
        run(make_config("model=tiny", "max_epochs=1", "trainer.limit_train_batches=2", override))
    assert expected in str(err.value)


def test_every_shipped_config_passes_the_checks(make_config):
    """The checks refuse only what is wrong: every task and experiment as shipped passes them."""
    from suite.config_checks import check_arguments, check_settings
    from tests.test_config import options

    for choice in [f"model={t}" for t in options("model")] + [f"experiment={e}" for e in options("experiment")]:
        cfg = make_config(choice, "++data.data_dir=/data/elsewhere", test_conf=False)
        check_settings(cfg)
        check_arguments(cfg, "model", "data")
