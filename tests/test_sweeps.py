"""Sweeps end to end with the tiny task: an Optuna search with a trial that fails.

tests/conf/hparams_search/tiny_optuna.yaml samples model.hidden=16, -3, 8: the second trial raises
(a layer of -3 units). Joblib sweeps and soups with a failing job: tests/test_soup.py.
"""
from __future__ import annotations

import json
import math

import pytest
import yaml
from omegaconf import OmegaConf

from suite import sweeps
from tests.conftest import CONF

TINY = ("model=tiny", "hparams_search=tiny_optuna", "logger=csv", "num_workers=0", "run_name=o")


def _jobs(sweep):
    return {int(p.name): p for p in sweep.iterdir() if p.name.isdigit()}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_every_optuna_search_goes_on_after_failed_trials_with_ignore_failures(make_config, name):
    task = name.removesuffix("_optuna")
    assert make_config(f"model={task}", f"hparams_search={name}").hydra.sweeper.max_failure_rate == 1.0
    strict = make_config(f"model={task}", f"hparams_search={name}", "ignore_failures=false")
    assert strict.hydra.sweeper.max_failure_rate == 0.0, "without ignore_failures the first failure ends it"


def test_optuna_failed_trial_is_told_failed_and_the_search_goes_on(cli, tmp_path):
    result = cli("-m", *TINY)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    sweep = tmp_path / "logs" / "tiny" / "multirun_o"
    jobs = _jobs(sweep)
    assert sorted(jobs) == [0, 1, 2], "every trial ran"
    failed = sorted(n for n, job in jobs.items() if (job / "error.log").is_file())
    assert failed == [1] and "negative dimension" in (jobs[1] / "error.log").read_text()
    assert (jobs[2] / "result.json").is_file(), "a trial after the failed one ran"
    # The sweeper logs this only for a trial it told Optuna as failed (not as a value).
    assert "Failed experiment: " in out and "Values were told" not in out
    values = [json.loads((jobs[n] / "result.json").read_text())["value"] for n in (0, 2)]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert best == min(values), "the best trial is a finished one"


@pytest.mark.slow
def test_optuna_without_ignore_failures_stops_at_the_failed_trial(cli, tmp_path):
    result = cli("-m", *TINY, "ignore_failures=false")
    assert result.returncode != 0
    assert "negative dimension" in result.stdout + result.stderr
    assert sorted(_jobs(tmp_path / "logs" / "tiny" / "multirun_o")) == [0, 1], "no trial after the failed one"


def test_a_grid_sweep_ends_at_its_first_failed_job(cli, tmp_path):
    """README: a failing job ends the sweep with its error (Hydra's launcher alone would run every job first)."""
    result = cli("-m", "model=tiny", "model.hidden=16,-3,8", "debug=limit", "logger=csv", "num_workers=0",
                 "run_name=g", "ignore_failures=false")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "negative dimension" in out
    jobs = _jobs(tmp_path / "logs" / "tiny" / "multirun_g")
    assert (jobs[0] / "result.json").is_file() and (jobs[1] / "error.log").is_file()
    assert 2 not in jobs or not (jobs[2] / "result.json").is_file(), "the job after the failed one did not train"
    assert "job 2 not run: job 1 of this sweep failed (InstantiationException" in out


def test_under_optuna_a_missing_or_nan_metric_fails_the_trial(monkeypatch):
    """Optuna refuses NaN as a trial's value (and the sweeper then ended the search): such a trial raises."""
    monkeypatch.setattr(sweeps, "_sweeper_records_failures", lambda: True)
    cfg = OmegaConf.create({"optimized_metric": "val/loss"})
    for value in (None, math.nan, math.inf):
        with pytest.raises(sweeps.TrialFailed, match="val/loss"):
            sweeps.value_for_sweeper(cfg, value)
    assert sweeps.value_for_sweeper(cfg, 0.5) == 0.5
