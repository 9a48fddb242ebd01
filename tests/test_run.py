"""run.py end to end on CPU with the test-only tiny task: fit, resume, evaluate, sweep, DDP, W&B."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from suite.train import run

TINY = ("model=tiny", "hydra.job.name=t")


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_fit_then_test_on_best_checkpoint(make_config, tmp_path):
    cfg = make_config("model=tiny", "max_epochs=3", "trainer.log_every_n_steps=1")
    value = run(cfg)
    out = tmp_path / "run"
    rows = _metrics(out)
    val_losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert value == pytest.approx(val_losses[-1])
    assert val_losses[-1] < val_losses[0], "validation loss should fall on a learnable task"
    assert any(r.get("test/loss") for r in rows), "fit must also run test when a test split exists"
    assert any(r.get("train/lr") for r in rows), "the learning rate is logged"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (out / "config.yaml").is_file()
    assert _ckpt(out / "checkpoints" / "last.ckpt")["run_config"]["task_name"] == "tiny"


def test_resume_continues_in_place_from_saved_step_and_epoch(make_config, tmp_path):
    run(make_config("model=tiny", "max_epochs=2", "run_name=r", "trainer.log_every_n_steps=1"))
    out = tmp_path / "run"
    first = _ckpt(out / "checkpoints" / "last.ckpt")
    steps_per_epoch = first["global_step"] // 2
    assert first["epoch"] == 1

    run(make_config("model=tiny", "max_epochs=4", "run_name=r", "resume=true", "trainer.log_every_n_steps=1"))
    last = _ckpt(out / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 3 and last["global_step"] == 4 * steps_per_epoch
    epochs = sorted({int(r["epoch"]) for r in _metrics(out) if r.get("train/loss")})
    assert epochs == [0, 1, 2, 3], "the resumed run logs into the same place and continues the epochs"
    assert (out / "config.yaml").is_file() and (out / "config.resume-1.yaml").is_file()


def test_resume_without_checkpoint_is_a_clear_error(make_config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt does not exist.*cannot be continued"):
        run(make_config("model=tiny", "run_name=nothing_here", "resume=true"))


def test_fresh_run_never_overwrites_an_existing_run(make_config, tmp_path):
    run(make_config("model=tiny", "max_epochs=1"))
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match="resume=true"):
        run(make_config("model=tiny", "max_epochs=1"))
    assert (tmp_path / "run" / "config.yaml").read_text() == before


@pytest.mark.slow  # about 20 s on 2 cores
def test_unique_run_names_in_one_second():
    import subprocess
    import sys

    code = "import suite.resolvers as r; print(r.run_name())"
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in range(3)}
    assert len(names) == 3


def test_test_from_a_checkpoint_takes_its_task_and_settings_without_repeating_them(make_config, tmp_path):
    from tests.conftest import compose_config

    run(make_config("model=tiny", "max_epochs=2", "model.hidden=24"))
    best = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    cfg = compose_config(tmp_path / "t", "mode=test", f"ckpt_path={best}")  # no model=tiny, no model.hidden=24
    assert cfg.task_name == "tiny"
    value = run(cfg)  # the model is built with the checkpoint's hidden=24, or its weights would not load
    (result,) = (tmp_path / "t").rglob("result.json")
    metrics = __import__("json").loads(result.read_text())["metrics"]
    assert value == pytest.approx(metrics["test/loss"]), "the test's monitored metric is the job's value"


# two processes (16 s on 2 cores): the slow tier's; the in-process test above keeps the checkpoint's settings check
@pytest.mark.slow
def test_cli_fit_then_test_from_checkpoint_without_repeating_overrides(cli, tmp_path):
    fit = cli(*TINY, "max_epochs=2", "model.hidden=24", "logger=csv", "run_name=a")
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "logs" / "tiny" / "a"
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    # No model=tiny, no model.hidden=24: both come from the checkpoint's stored config.
    test = cli("mode=test", f"ckpt_path={best}", "logger=csv")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/loss" in test.stdout + test.stderr
    eval_dirs = list(run_dir.glob("test_*"))
    assert len(eval_dirs) == 1, "evaluation output goes beside the run that made the checkpoint"
    # the test's value of the monitored metric is the job's value, with no warning that val/loss was not logged
    result = __import__("json").loads((eval_dirs[0] / "result.json").read_text())
    assert result["value"] == pytest.approx(result["metrics"]["test/loss"])
    assert "was not logged" not in test.stdout + test.stderr


@pytest.mark.slow  # a CLI sweep (12 s); test_sweeps.py's grid sweep keeps each job's own dir in make test
def test_cli_multirun_gives_each_job_its_own_dir(cli, tmp_path):
    result = cli("-m", *TINY, "max_epochs=1", "logger=csv", "optimizer.lr=0.01,0.02")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "tiny").glob("multirun_*"))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = {float(__import__("yaml").safe_load((j / "config.yaml").read_text())["optimizer"]["lr"]) for j in jobs}
    assert lrs == {0.01, 0.02}
    assert all((j / "checkpoints" / "last.ckpt").is_file() for j in jobs)


@pytest.mark.slow  # four CLI runs; tests/test_sweeps.py keeps a failed trial's story in make test
def test_cli_failing_trial_is_reported_and_the_sweep_goes_on(cli, tmp_path):
    args = ("-m", *TINY, "max_epochs=1", "logger=csv", "model.hidden=8,-3")
    failed = cli(*args)
    assert failed.returncode != 0, "without ignore_failures a failing trial stops the sweep"
    ok = cli(*args, "ignore_failures=true")
    assert ok.returncode == 0, ok.stderr[-3000:]
    sweep = sorted((tmp_path / "logs" / "tiny").glob("multirun_*"))[-1]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert "Trial failed" in ok.stdout + ok.stderr
    assert (sweep / "1" / "error.log").is_file()


@pytest.mark.slow  # DDP on two CPU processes is also trained and compared in tests/test_ddp.py
def test_cli_ddp_two_cpu_processes(cli, tmp_path):
    result = cli(*TINY, "trainer=ddp", "trainer.devices=2", "device=cpu", "max_epochs=2", "logger=csv",
                 "run_name=ddp", "batch_size=16", "batch_size_is_global=true")
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((tmp_path / "logs" / "tiny").iterdir())
    assert [r.name for r in runs] == ["ddp"], "all ranks share one run dir"
    ckpt = _ckpt(runs[0] / "checkpoints" / "last.ckpt")
    # 179 training samples, global batch 16 split as 8 per rank: ceil(179 / 2 / 8) = 12 steps per epoch.
    assert ckpt["global_step"] == 2 * 12
    assert "batch per device / global (x accumulation): 8 / 16" in result.stdout + result.stderr


def test_wandb_offline_writes_every_setting_and_a_resumed_run_reattaches_to_its_id(make_config, tmp_path, monkeypatch):
    from tests.wandb_offline import artifacts, config

    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # as run_cli does: never online from a test
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(make_config(*TINY, "max_epochs=1", "logger=wandb", "optimizer.lr=0.02"))
    run_dir = tmp_path / "run"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    recorded = config(next(offline.glob("*.wandb")))
    assert recorded["optimizer"]["lr"] == 0.02 and recorded["trainer"]["max_epochs"] == 1
    assert recorded["seed"] == 42 and recorded["batch_size"] == 32 and recorded["model"]["hidden"] == 16, "all, nested"
    assert (offline / "files" / run_dir.name / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    assert not artifacts(next(offline.glob("*.wandb"))), "checkpoints are uploaded only on request"

    run(make_config(*TINY, "max_epochs=2", "logger=wandb", "resume=true", "logger.wandb.log_model=true"))
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2, "resume reattaches to the same id"
    resumed = next(p for p in offline if (p / "files" / run_dir.name / "config.resume-1.yaml").exists())
    assert config(next(resumed.glob("*.wandb")))["max_epochs"] == 2
    assert {a.type for a in artifacts(next(resumed.glob("*.wandb")))} == {"model"}, "log_model=true uploads, offline too"


# two processes, ~25 s on the CI machine: the slow tier's; the in-process test above keeps the same checks in make test
@pytest.mark.slow
def test_cli_wandb_offline_writes_run_files_and_resumes_same_run(cli, tmp_path):
    from tests.wandb_offline import artifacts, config

    first = cli(*TINY, "max_epochs=1", "logger=wandb", "run_name=w", "optimizer.lr=0.02", "num_workers=0")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "logs" / "tiny" / "w"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "offline run files are written"
    recorded = config(next(offline[0].glob("*.wandb")))
    assert recorded["optimizer"]["lr"] == 0.02 and recorded["seed"] == 42 and recorded["batch_size"] == 32
    assert recorded["trainer"]["max_epochs"] == 1 and recorded["model"]["hidden"] == 16, "every group, nested"
    for name in ("config.yaml", "overrides.txt"):  # attached under the run dir's name (W&B has its own config.yaml)
        assert (offline[0] / "files" / "w" / name).read_text() == (run_dir / name).read_text()
    assert not artifacts(next(offline[0].glob("*.wandb"))), "checkpoints are uploaded only on request"

    second = cli(*TINY, "max_epochs=2", "logger=wandb", "run_name=w", "resume=true", "num_workers=0",
                 "logger.wandb.log_model=true")
    assert second.returncode == 0, second.stderr[-3000:]
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2, "resume reattaches to the same id"
    resumed = next(p for p in offline if (p / "files" / "w" / "config.resume-1.yaml").exists())
    assert config(next(resumed.glob("*.wandb")))["max_epochs"] == 2
    models = artifacts(next(resumed.glob("*.wandb")))
    assert models and {a.type for a in models} == {"model"}, "log_model=true uploads checkpoints, offline too"


@pytest.mark.parametrize(
    "args,expected",
    [
        (("model=tiny", "trainer.max_epochz=3"), "max_epochz"),
        # a process each (~7 s on the CI machine): the rest run in the slow tier, the checks also in-process
        pytest.param(("model=no_such_task",), "Available options in 'model'", marks=pytest.mark.slow),
        pytest.param(("model=tiny", "mode=bogus"), "mode='bogus' is not valid; choose one of fit", marks=pytest.mark.slow),
        pytest.param(("model=tiny", "device=quantum"), "device='quantum' is not valid", marks=pytest.mark.slow),
    ],
)
def test_cli_bad_input_gives_a_clear_error(cli, args, expected):
    result = cli(*args, "logger=csv", "max_epochs=1")
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "site-packages/torch" not in result.stderr, "no traceback from deep inside torch"


@pytest.mark.slow
def test_cli_multirun_with_ddp_jobs_completes(cli, tmp_path):
    result = cli("-m", *TINY, "trainer=ddp", "trainer.devices=2", "device=cpu", "max_epochs=1", "logger=csv",
                 "optimizer.lr=0.01,0.02", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = next((tmp_path / "logs" / "tiny").glob("multirun_*"))
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert __import__("json").loads((sweep / job / "result.json").read_text())["value"] is not None


@pytest.mark.slow  # a multirun's job dirs are also checked by test_cli_multirun_gives_each_job_its_own_dir
def test_cli_multirun_with_default_paths_from_any_directory(tmp_path):
    """No paths.root_dir override: logs go under the directory the user runs from."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, TEST_CONF

    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", f"hydra.searchpath=[file://{TEST_CONF}]",
                             "model=tiny", "max_epochs=1", "logger=csv", "num_workers=0", "seed=1,2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "tiny").glob("multirun_*"))
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
