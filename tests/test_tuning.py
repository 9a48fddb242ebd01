"""mode=tune_lr and mode=tune_batch_size on every task (suite/tuning.py): each prints and saves its
suggestion, in the unit that task's batch is made of, or says in one line why it cannot apply."""
from __future__ import annotations

import json
import logging

import pytest

from suite.train import run
from suite.tuning import TuningNotApplicable
from tests.clinical.test_run import SMALL as CLINICAL
from tests.diffusion.conftest import TINY_OVERRIDES as DIFFUSION
from tests.legal_bert.conftest import minilm_dir, tiny_bert_dir  # noqa: F401  (fixtures)
from tests.license_plate.test_end_to_end import FAST as LICENSE_PLATE
from tests.nerf.test_train import TINY_CLI as NERF

# The other tasks' cells take a second or three each: left to `make test-all`, make test is near its budget.
slow = pytest.mark.slow

# A few steps: enough to run each tuner end to end, not to tune anything.
LR = ("tune.lr_steps=12",)
BATCH = ("tune.max_trials=2", "tune.steps_per_trial=1")
TASKS = {
    "tiny": ("model=tiny", "batch_size=8", "data.num_samples=512"),
    "nerf": ("model=nerf", *NERF, "data.steps_per_epoch=4"),
    "clinical": ("model=clinical", *CLINICAL),
    "diffusion": ("model=diffusion", *DIFFUSION),
    "license_plate": ("model=license_plate", *LICENSE_PLATE),
    "legal_bert": ("model=legal_bert", "data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8"),
}
# what mode=tune_batch_size scales on each task, and in which unit it reports it
BATCH_SETTING = {"nerf": ("data.num_rays", "rays"), "clinical": ("batch_size", "windows"),
                 "diffusion": ("batch_size", "images"), "license_plate": ("batch_size", "images"),
                 "legal_bert": ("batch_size", "sequences"), "tiny": ("batch_size", "samples")}


def _overrides(task: str, request) -> tuple[str, ...]:
    if task == "legal_bert":
        return (*TASKS[task], f"model.pretrained_path={request.getfixturevalue('tiny_bert_dir')}")
    return TASKS[task]


@pytest.mark.parametrize("task", [
    "tiny", "clinical",  # clinical: its scaling was built at fit start, after the tuner had run, and it stopped
    pytest.param("nerf", marks=slow), pytest.param("diffusion", marks=slow),
    pytest.param("license_plate", marks=slow), pytest.param("legal_bert", marks=slow),
])
def test_learning_rate_finder_prints_and_saves_its_suggestion_and_plot(task, make_config, tmp_path, caplog, request):
    caplog.set_level(logging.INFO, logger="run")
    suggestion = run(make_config("mode=tune_lr", *_overrides(task, request), *LR))
    assert suggestion is not None and 1e-8 <= suggestion <= 1
    out = tmp_path / "run"
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["suggestion"] == pytest.approx(suggestion) and saved["use"] == f"optimizer.lr={suggestion:.3g}"
    assert len(saved["lr"]) == len(saved["loss"]) > 2
    assert (out / "lr_finder.png").is_file()
    assert f"Suggested learning rate: {suggestion:.3g} (use optimizer.lr={suggestion:.3g})" in caplog.text


def test_the_learning_rate_sweep_runs_its_steps_whatever_the_epochs_allow(make_config, tmp_path):
    """debug=limit trains 2 epochs of 4 batches: the sweep's 20 steps still run, from lr_min to lr_max."""
    run(make_config("mode=tune_lr", *TASKS["tiny"], "debug=limit", "tune.lr_steps=20", "tune.lr_max=1e-3"))
    saved = json.loads((tmp_path / "run" / "tuning.json").read_text())
    assert len(saved["lr"]) == 20 and saved["lr"][-1] == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.parametrize("task", [
    "tiny", "nerf",  # nerf: the finder doubled a batch_size its ray loader never reads; a batch is data.num_rays
    pytest.param("clinical", marks=slow), pytest.param("diffusion", marks=slow),
    pytest.param("license_plate", marks=slow), pytest.param("legal_bert", marks=slow),
])
def test_batch_size_finder_scales_what_the_tasks_batch_is_made_of(task, make_config, tmp_path, caplog, request):
    caplog.set_level(logging.INFO, logger="run")
    cfg = make_config("mode=tune_batch_size", *_overrides(task, request), *BATCH)
    key, unit = BATCH_SETTING[task]
    start = cfg.data.num_rays if key == "data.num_rays" else cfg.batch_size
    size = run(cfg)
    assert size == 2 * start, "two trials from the configured size: it fits, and so does its double (a CPU)"
    saved = json.loads((tmp_path / "run" / "tuning.json").read_text())
    assert saved["use"] == f"{key}={int(size)}" and saved["unit"] == unit and saved["started_at"] == start
    assert f"Largest batch that fits: {int(size)} {unit} (use {key}={int(size)})" in caplog.text


@pytest.mark.parametrize("mode", ["tune_lr", "tune_batch_size"])
def test_a_tuner_that_cannot_apply_says_why_in_one_line(mode, make_config):
    with pytest.raises(TuningNotApplicable, match="debug=fast_dev_run runs one batch") as refused:
        run(make_config("model=tiny", f"mode={mode}", "debug=fast_dev_run"))
    assert "\n" not in str(refused.value)


def test_batch_size_finder_refuses_several_devices(make_config):
    with pytest.raises(TuningNotApplicable, match="runs on one device.*trainer.devices=1"):
        run(make_config("model=tiny", "mode=tune_batch_size", "trainer=ddp", "trainer.devices=2"))
