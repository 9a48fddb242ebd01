"""The clinical task through the suite's run(): fit, test, checkpoint, predict."""
from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch

from suite.train import run
from tests.conftest import SHARED_DATA, compose_config

SMALL = ("data.simulate.num_patients=4", "data.simulate.days=2", "data.sequence_length=192",
         "data.min_context_length=96", "data.train_stride=12", "model.net.patch_len=24",
         "model.net.d_model=16", "model.net.d_ff=32", "batch_size=16")


def test_fast_dev_run(make_config):
    cfg = make_config("model=clinical", "debug=fast_dev_run", *SMALL)
    run(cfg)


class LogCalls(L.Callback):
    """Counts the module's self.log calls of train/ values, per optimizer step."""

    steps: list = []

    def on_fit_start(self, trainer, pl_module):
        LogCalls.steps = []
        plain = pl_module.log

        def counting(name, *args, **kwargs):
            if name.startswith("train/"):
                LogCalls.steps.append(trainer.global_step)
            return plain(name, *args, **kwargs)
        pl_module.log = counting


def test_training_loss_is_logged_only_at_the_steps_lightning_writes(make_config, tmp_path):
    """A self.log call costs host time every step (~0.4 ms on the CI CPU): at the other steps it is never written."""
    cfg = make_config("model=clinical", "debug=limit", *SMALL, "trainer.log_every_n_steps=3", "callbacks.monitor=null",
                      "+callbacks.spy._target_=tests.clinical.test_run.LogCalls")
    run(cfg)
    assert set(LogCalls.steps) == {2, 5}  # of the 8 steps (2 epochs of 4), the 3rd and 6th; lr and loss each
    logged = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv"))).dropna(subset=["train/loss"])
    assert logged["step"].tolist() == [2, 5]


def test_fit_then_predict_from_checkpoint(make_config, tmp_path):
    cfg = make_config("model=clinical", "debug=limit", *SMALL, "data.covariate_columns=[carbs,insulin]",
                      "model.net.causal=true", "callbacks.forecast_plots.every_n_epochs=1")
    metric = run(cfg)
    assert metric is not None and metric > 0
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state["fitted"].tolist() == [True, True] and "value_mean" in state
    assert not any(k.startswith("_compiled") or "_orig_mod" in k for k in state)
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert {"attention_epoch000.png", "forecast_epoch000.png"} <= set(plots)
    metrics = pd.read_csv(next(run_dir.rglob("metrics.csv")))
    for key in ("val/rmse", "val/persistence/rmse", "val/ridge/rmse", "val/rmse_30min", "val/rmse_60min",
                "val/clarke_ab", "val/mape", "test/rmse", "test/ridge/mae"):
        assert key in metrics.columns, key

    # a CSV of new records, forecast by the checkpoint alone
    records = pd.read_csv(next((tmp_path / "data" / "clinical").glob("cohort-*/cohort.csv")))
    records[records["id"] == "virtual_001"].to_csv(tmp_path / "new.csv", index=False)
    pcfg = compose_config(tmp_path / "p", "model=clinical", "mode=predict", f"ckpt_path={ckpt}",
                          f"data.predict_files={tmp_path / 'new.csv'}")
    run(pcfg)
    out = pd.read_csv(next(tmp_path.rglob("predictions.csv")))
    assert list(out.columns) == ["id", "origin_time", "time", "step", "minutes_ahead", "prediction", "actual"]
    assert set(out["id"]) == {"virtual_001"} and out["step"].max() == 12
    assert out["prediction"].between(20, 600).all()
    last = out[out["origin_time"] == out["origin_time"].max()]
    assert last["actual"].isna().all()  # the final forecast looks past the end of the record


@pytest.mark.skipif(not (SHARED_DATA / "clinical").is_dir(), reason="needs ../shared/data/clinical")
def test_glucobench_experiment_composes_and_runs(make_config):
    path = SHARED_DATA / "clinical" / "iglu_example_data" / "example_data_5_subject.csv"
    cfg = make_config("model=clinical", "experiment=glucobench_iglu", "debug=fast_dev_run", f"data.files={path}",
                      "model.net.d_model=16", "model.net.d_ff=32")
    run(cfg)


def test_real_data_experiment_without_files_is_an_error(make_config):
    cfg = make_config("model=clinical", "experiment=glucobench_iglu", "debug=fast_dev_run")
    with pytest.raises(Exception, match="needs real data: pass data.files=<path to example_data_5_subject.csv>"):
        run(cfg)
