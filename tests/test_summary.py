"""How a run ends and begins (suite/summary.py): a short summary at the end, the value a sweeper gets,
and the config tree only on request."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from suite.train import run
from tests.conftest import CONF, compose_config

# val/loss falls on the tiny task; monitored as `max`, the best checkpoint is the first epoch's and every
# later epoch is worse by that measure: the case where the last epoch's value and the best differ
BEST_IS_FIRST = ("model=tiny", "max_epochs=3", "monitor.mode=max")


def _best_score(ckpt_dir) -> tuple[str, float]:
    (best,) = ckpt_dir.glob("best-*.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)
    (callback,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor': 'val/loss'")]
    return str(best), float(callback["best_model_score"])


def test_the_sweeper_gets_the_best_checkpoints_score_not_the_last_epochs(make_config, tmp_path):
    value = run(make_config(*BEST_IS_FIRST))
    out = tmp_path / "run"
    _, best = _best_score(out / "checkpoints")
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["val/loss"] != pytest.approx(best), "the last epoch is not the best here"
    assert value == pytest.approx(best) and result["value"] == pytest.approx(best)


def test_a_run_ends_with_a_summary_of_best_metric_step_checkpoint_run_dir_and_time(make_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="run")
    run(make_config(*BEST_IS_FIRST))
    path, best = _best_score(tmp_path / "run" / "checkpoints")
    summary = caplog.text[caplog.text.index("Summary of fit"):]
    assert f"best val/loss: {best:.6g} at step 6 (epoch 0)" in summary  # 6 steps an epoch
    assert f"best checkpoint: {path}" in summary
    assert "its test/loss: " in summary, "fit tests the best checkpoint; its score is in the summary"
    assert f"run dir: {tmp_path / 'run'}" in summary
    assert re.search(r"time: \d+\.\d s", summary)


def test_the_config_tree_is_printed_only_on_request_and_always_saved(make_config, tmp_path, capsys):
    assert OmegaConf.load(CONF / "config.yaml").print_config is False
    run(make_config("model=tiny", "max_epochs=1"))
    assert "task_name" not in capsys.readouterr().out
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.task_name == "tiny" and saved.optimizer.lr == 1e-2
    run(compose_config(tmp_path / "printed", "model=tiny", "max_epochs=1", "print_config=true"))
    printed = capsys.readouterr().out
    assert "task_name" in printed and "optimizer" in printed
