"""Model soups (suite/soup.py): averaging fine-tunes' weights, by hand and at the end of a seed sweep."""
from __future__ import annotations

import json

import pytest
import torch

from suite.soup import average_checkpoints, member_paths, write_soup


def _checkpoint(path, weight, labels=("a", "b"), extra=None):
    state = {"head.weight": torch.full((2, 3), float(weight)), "head.bias": torch.zeros(2, dtype=torch.bfloat16),
             "steps": torch.tensor(int(weight)), **(extra or {})}
    torch.save({"state_dict": state, "hyper_parameters": {"label_names": list(labels)}, "run_config": {"seed": weight},
                "optimizer_states": [{"state": {}}], "loops": {}, "pytorch-lightning_version": "2.6.0"}, path)
    return path


def test_soup_averages_float_weights_and_keeps_the_rest_of_the_first_member(tmp_path):
    paths = [_checkpoint(tmp_path / f"{w}.ckpt", w) for w in (1, 2, 6)]
    soup = average_checkpoints(paths)
    assert torch.equal(soup["state_dict"]["head.weight"], torch.full((2, 3), 3.0))
    assert soup["state_dict"]["head.bias"].dtype == torch.bfloat16, "each tensor keeps its dtype"
    assert soup["state_dict"]["steps"] == 1, "integer tensors come from the first member"
    assert soup["run_config"] == {"seed": 1} and soup["soup_members"] == [str(p) for p in paths]
    assert "optimizer_states" not in soup and "loops" not in soup, "a soup is not a state to resume from"


def test_soup_refuses_members_that_do_not_fit_together(tmp_path):
    a = _checkpoint(tmp_path / "a.ckpt", 1)
    other_labels = _checkpoint(tmp_path / "labels.ckpt", 2, labels=("b", "a"))
    with pytest.raises(ValueError, match="labels.ckpt predicts labels"):
        average_checkpoints([a, other_labels])
    extra = _checkpoint(tmp_path / "extra.ckpt", 2, extra={"more": torch.ones(1)})
    with pytest.raises(ValueError, match="extra.ckpt holds other weights.*more"):
        average_checkpoints([a, extra])
    with pytest.raises(ValueError, match="at least 2"):
        average_checkpoints([a])
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        member_paths([str(tmp_path / "nothing_here" / "*.ckpt")])


def test_soup_never_overwrites_a_file(tmp_path):
    paths = [str(_checkpoint(tmp_path / f"{w}.ckpt", w)) for w in (1, 2)]
    out = write_soup([str(tmp_path / "*.ckpt")], tmp_path / "soup" / "soup.ckpt")
    assert torch.load(out, weights_only=True)["soup_members"] == paths
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        write_soup(paths, out)


@pytest.mark.slow  # a CLI seed sweep of several trainings; the soup's own tests above run in make test
def test_seed_sweep_with_soup_writes_tests_and_reports_the_soup(cli, tmp_path):
    """The jobs side by side (joblib launcher), each with a loader worker (under loky, DataLoader once
    failed to start its workers: 'Process' object has no attribute 'env'), with no run_name (each
    worker process once named its own sweep dir), and one failing job (seed=-1 is out of range)."""
    result = cli("-m", "model=tiny", "max_epochs=1", "logger=csv", "seed=1,-1,2", "soup=true", "ignore_failures=true",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "num_workers=1")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    sweeps = list((tmp_path / "logs" / "tiny").iterdir())
    assert len(sweeps) == 1 and sweeps[0].name.startswith("multirun_"), "one sweep dir for all jobs"
    sweep = sweeps[0]
    assert (sweep / "multirun.yaml").is_file() and (sweep / "1" / "error.log").is_file()
    members = [next((sweep / j / "checkpoints").glob("best-*.ckpt")) for j in ("0", "2")]
    states = [torch.load(p, weights_only=True)["state_dict"] for p in members]
    soup = torch.load(sweep / "soup.ckpt", weights_only=True)
    for key, value in soup["state_dict"].items():
        torch.testing.assert_close(value, sum(s[key] for s in states) / 2)
    report = json.loads((sweep / "soup.json").read_text())
    assert set(report["members"]) == {str(p) for p in members}
    assert "test/loss" in report["soup"], "the soup was tested in its own run"
    assert (sweep / "soup_test" / "result.json").is_file()
    assert "left out: job 1" in out


@pytest.mark.slow  # a CLI sweep (12 s on 2 cores); the soup's own refusals above run in make test
def test_soup_of_fewer_than_two_finished_jobs_fails_saying_why(cli, tmp_path):
    result = cli("-m", "model=tiny", "max_epochs=1", "logger=csv", "num_workers=0", "seed=1,-1", "soup=true",
                 "ignore_failures=true", "run_name=s")
    assert result.returncode != 0, "soup=true made no soup"
    assert "1 of 2 jobs finished" in result.stderr and "a soup needs 2" in result.stderr
    assert not (tmp_path / "logs" / "tiny" / "multirun_s" / "soup.ckpt").exists()


@pytest.mark.slow
def test_soup_refuses_a_sweep_over_more_than_the_seed_before_training(cli, tmp_path):
    result = cli("-m", "model=tiny", "max_epochs=1", "logger=csv", "seed=1,2", "optimizer.lr=0.01,0.02", "soup=true",
                 "run_name=s")
    assert result.returncode != 0
    assert "not only the seed" in result.stderr and "optimizer.lr" in result.stderr
    assert not list((tmp_path / "logs" / "tiny" / "multirun_s").glob("*/config.yaml")), "no job ran"
