"""While a run trains, its loss, learning rate, gradient norm and throughput reach the loggers, the
progress lines and the plots, read from the device only at the steps that are written."""
from __future__ import annotations

import math

import pytest
import torch

from suite.train import run
from tests.training_helpers import GradNormSpy, RecordLR, _rows


def test_monitoring_metrics_and_plots(make_config, tmp_path):
    run(make_config("model=tiny", "max_epochs=2", "trainer.log_every_n_steps=2"))
    rows = _rows(tmp_path / "run")
    for key in ("train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/samples_per_sec"):
        assert any(r.get(key) for r in rows), f"{key} is logged"
    for name in ("loss_curves", "lr_schedule"):
        assert (tmp_path / "run" / "plots" / f"{name}.png").stat().st_size > 1000


def test_lr_is_logged_at_every_step_the_loggers_write(make_config, tmp_path):
    """train/lr is logged only at the steps Lightning writes (each self.log costs host time), and at
    every one of them, with the lr the optimizer used in that step (not a stale earlier value)."""
    RecordLR.seen = {}
    run(make_config("model=tiny", "max_epochs=2", "trainer.log_every_n_steps=3", "scheduler=warmup",
                    "scheduler.builder.warmup=0.9", "optimizer.lr=0.01",
                    "+callbacks.record_lr._target_=tests.training_helpers.RecordLR"))
    rows = [r for r in _rows(tmp_path / "run") if r.get("train/loss")]
    assert len(rows) >= 3
    for row in rows:  # a row is written at the end of the step it names
        assert float(row["train/lr"]) == pytest.approx(RecordLR.seen[int(row["step"])], rel=1e-6), row


def test_progress_lines_show_the_training_values_read_from_the_device(make_config, tmp_path, caplog):
    """Training values are not prog_bar metrics (a GPU sync per step); the progress display reads them.
    Tasks log them only at the steps Lightning writes, and each line shows the values written at its
    step, also when epochs (6 steps) do not divide into the logging interval (4)."""
    with caplog.at_level("INFO", logger="progress"):
        run(make_config("model=tiny", "max_epochs=3", "trainer.log_every_n_steps=4", "logger=csv"))
    steps = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    assert len(steps) == 4 and all("train/loss=" in line and "train/lr=" in line for line in steps)
    shown = [float(line.split("train/loss=")[1].split()[0]) for line in steps]
    written = [float(r["train/loss"]) for r in _rows(tmp_path / "run") if r.get("train/loss")]
    assert len(written) == 4 and shown == pytest.approx(written, rel=1e-3)


def test_rich_bar_reads_training_values_every_n_steps():
    from types import SimpleNamespace

    from callbacks.progress import RichProgress

    bar = RichProgress(every=5)
    trainer = SimpleNamespace(global_step=0, loggers=[], progress_bar_metrics={"val/loss": 0.5},
                              callback_metrics={"train/loss": torch.tensor(1.0), "val/loss": torch.tensor(0.5)})
    shown = lambda step: (setattr(trainer, "global_step", step), bar.get_metrics(trainer, None))[1]
    assert shown(0) == {"val/loss": 0.5, "train/loss": 1.0}
    trainer.callback_metrics["train/loss"] = torch.tensor(2.0)
    assert shown(3)["train/loss"] == 1.0  # not read again before 5 steps have passed
    assert shown(5)["train/loss"] == 2.0


def test_whole_run_throughput_reaches_the_loggers_and_result_json(make_config, tmp_path):
    """callbacks/throughput.py: one number in the task's unit, in metrics.csv and in result.json
    (which `python -m bench.quality` reads)."""
    import json

    run(make_config("model=tiny", "max_epochs=2", "+callbacks.throughput._target_=callbacks.throughput.Throughput",
                    "+callbacks.throughput.warmup=1"))
    result = json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]
    assert result["train/samples_per_sec"] > 0
    assert [float(r["train/samples_per_sec"]) for r in _rows(tmp_path / "run") if r.get("train/samples_per_sec")] \
        == [pytest.approx(result["train/samples_per_sec"])]


def test_monitor_logs_the_true_global_gradient_norm(make_config, tmp_path):
    GradNormSpy.seen.clear()
    run(make_config("model=tiny", "max_epochs=1", "data.num_samples=40", "trainer.log_every_n_steps=1",
                    "callbacks.monitor.every_n_steps=1", "+callbacks.spy._target_=tests.training_helpers.GradNormSpy"))
    logged = [float(r["train/grad_norm"]) for r in _rows(tmp_path / "run") if r.get("train/grad_norm")]
    assert len(logged) == len(GradNormSpy.seen) > 0
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(GradNormSpy.seen, logged, strict=True))


def test_gradient_norm_and_throughput_are_written_at_every_logging_step_of_every_epoch(make_config, tmp_path):
    """Epochs of 6 steps, logs every 4: the monitor picks its steps by optimizer step, not by batch index, so
    later epochs keep their telemetry, and each written grad norm is that step's, not a stale earlier one."""
    GradNormSpy.seen.clear()
    run(make_config("model=tiny", "max_epochs=3", "trainer.log_every_n_steps=4", "logger=csv",
                    "+callbacks.spy._target_=tests.training_helpers.GradNormSpy"))
    rows = [r for r in _rows(tmp_path / "run") if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [3, 7, 11, 15]
    for row in rows:
        assert float(row["perf/samples_per_sec"]) > 0, row
        assert float(row["train/grad_norm"]) == pytest.approx(GradNormSpy.seen[int(row["step"])], rel=1e-5), row


def test_whole_run_throughput_counts_what_each_step_trained_on(monkeypatch):
    """A step that trains on fewer items than its batch holds (nerf's rays that a sample budget cut short) says so
    in `trained_in_step`; the whole-run throughput counts those, added on the device and read once at the end."""
    import functools

    import lightning as L

    from callbacks.throughput import Throughput
    from tests.tiny_task import TinyDataModule, TinyModule

    def counted(partial: bool) -> float:
        model = TinyModule(optimizer=functools.partial(torch.optim.SGD, lr=0.01))
        if partial:  # step i trains on i + 1 items: a count read before its step would be the last step's
            real = model.training_step
            monkeypatch.setattr(model, "training_step", lambda batch, *index: (
                setattr(model, "trained_in_step", torch.tensor(model.global_step + 1)), real(batch, 0))[1])
        throughput = Throughput(warmup=1)
        L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[throughput]).fit(
            model, datamodule=TinyDataModule({"batch_size": 8}))
        return float(throughput.items)

    assert counted(partial=False) == 4 * 8 and counted(partial=True) == 2 + 3 + 4 + 5  # steps 1-4 after the warm-up
