"""Training engineering shared by every task: schedules, exact resume, NaN recovery, checkpoints, monitoring."""
from __future__ import annotations

import csv
import functools
import math
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.nan_recovery import NaNRecovery, NonFiniteTrainingError
from common.host_copy import copy_to_host
from suite import schedules
from suite.checkpoint import AtomicCheckpointIO, check_checkpoint
from suite.train import run
from tests.tiny_task import TinyModule

EXACT = ("model=tiny", "deterministic=true", "model.dropout=0.2", "max_epochs=3", "trainer.log_every_n_steps=1")


# ---- test-only callbacks, injected with +callbacks.<name>=... -------------------------------------
class SignalAt(L.Callback):
    def __init__(self, step: int, signame: str = "SIGTERM") -> None:
        self.step, self.signame = step, signame

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signame))


class RecordLR(L.Callback):
    seen: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordLR.seen[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


class PoisonGradients(L.Callback):
    def __init__(self, steps: list[int], from_step: int | None = None) -> None:
        self.steps, self.from_step = set(steps), from_step

    def on_after_backward(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step in self.steps or (self.from_step is not None and step >= self.from_step):
            for p in pl_module.parameters():
                p.grad.fill_(float("nan"))


class GradNormSpy(L.Callback):
    """Records the true global gradient norm of every optimizer step."""
    seen: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        GradNormSpy.seen.append(float(torch.cat(grads).norm()))


class LandsLater:
    """Stands in for a CUDA event on the CPU: not done when first asked, done when asked again."""

    def __init__(self) -> None:
        self.asked = False

    def query(self) -> bool:
        done, self.asked = self.asked, True
        return done

    def synchronize(self) -> None:
        pass


class FailAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("injected failure")


def _params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _rows(out: Path) -> list[dict]:
    with open(out / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- schedules ----------------------------------------------------------------------------------
def _lrs(make, total=100, lr=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_shape():
    lrs = _lrs(lambda o, t: schedules.cosine(o, t, warmup=0.1, min_lr_ratio=0.1))
    assert lrs[0] == pytest.approx(1 / 11)            # ramp starts low
    assert lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)              # peak at the end of warmup
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)    # floor at min_lr_ratio


def test_cosine_linear_warmup_step_exponential_one_cycle_shapes():
    cos = _lrs(lambda o, t: schedules.cosine(o, t))
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.5) and cos[-1] < 1e-3
    lin = _lrs(lambda o, t: schedules.linear(o, t, warmup=10))
    assert lin[10] == pytest.approx(1.0) and lin[55] == pytest.approx(0.5) and lin[-1] < 0.02
    warm = _lrs(lambda o, t: schedules.warmup(o, t, warmup=0.2))
    assert warm[0] < 0.1 and warm[20] == 1.0 and warm[-1] == 1.0
    step = _lrs(lambda o, t: schedules.step(o, t, step_size=0.3, gamma=0.1))
    assert step[29] == 1.0 and step[30] == pytest.approx(0.1) and step[60] == pytest.approx(0.01)
    exp = _lrs(lambda o, t: schedules.exponential(o, t, final_lr_ratio=0.1))
    assert exp[0] == 1.0 and exp[50] == pytest.approx(0.1 ** 0.5) and exp[99] == pytest.approx(0.1 ** 0.99)
    cyc = _lrs(lambda o, t: schedules.one_cycle(o, t, pct_start=0.3))
    assert cyc[0] == pytest.approx(1 / 25) and max(cyc) == pytest.approx(1.0, abs=1e-3)
    assert cyc.index(max(cyc)) in (29, 30) and cyc[-1] < 1e-3


def test_schedule_length_follows_accumulation(make_config, tmp_path):
    # 6 batches per epoch, accumulation 2 -> 3 optimizer steps per epoch, 4 epochs -> 12 steps.
    run(make_config("model=tiny", "max_epochs=4", "scheduler=cosine", "trainer.accumulate_grad_batches=2",
                    "callbacks.training_curves.every_n_steps=1"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 12
    lr = dict(next(v for k, v in state["callbacks"].items() if k.startswith("TrainingCurves"))["lr"])
    base = 1e-2
    assert lr[6] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 6 / 12)), rel=1e-5)
    assert lr[12] == pytest.approx(0.0, abs=1e-9), "the cosine reaches its floor exactly at the last step"
    # losses are read from the device in batches, yet every step's loss is in the history, in order
    losses = next(v for k, v in state["callbacks"].items() if k.startswith("TrainingCurves"))["train/loss"]
    steps = [s for s, _ in losses]
    assert len(losses) == 24 and steps == sorted(steps) and set(steps) == set(range(13))  # one per micro-batch
    assert all(math.isfinite(v) and v > 0 for _, v in losses)


def test_resuming_with_more_epochs_continues_the_schedule_without_a_jump(make_config):
    """The schedule's length came from max_epochs: recomputed for a larger one at resume, a cosine 9
    steps into 18 restarted 9 steps into 36, at a far higher lr. It goes on from where it was instead,
    stretched over the steps now left, and still ends at its floor."""
    RecordLR.seen = {}
    record = ("scheduler=cosine", "run_name=x", "+callbacks.record_lr._target_=tests.test_training.RecordLR")
    with pytest.raises(SystemExit):
        run(make_config("model=tiny", "max_epochs=3", *record, "+callbacks.stop._target_=tests.test_training.SignalAt",
                        "+callbacks.stop.step=8"))  # 6 steps an epoch: last.ckpt holds step 9 of 18
    run(make_config("model=tiny", "max_epochs=6", *record, "resume=true"))
    lrs = [RecordLR.seen[step] for step in range(36)]
    assert all(later <= earlier for earlier, later in zip(lrs, lrs[1:])), "no jump back up after the resume"
    assert lrs[10] > 0.9 * lrs[9], "what was left of the decay, spread over three times as many steps"
    assert lrs[-1] < 0.01 * lrs[0], "and the floor is reached at the end of the longer run"


# ---- exact resume -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.conftest import compose_config

    tmp = tmp_path_factory.mktemp("uninterrupted")
    run(compose_config(tmp, *EXACT))
    return _params(tmp / "run" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_and_resume_is_bit_exact(make_config, tmp_path, uninterrupted, signame):
    stop = ("+callbacks.stop._target_=tests.test_training.SignalAt", "+callbacks.stop.step=8",
            f"+callbacks.stop.signame={signame}")
    with pytest.raises(SystemExit) as exit_info:
        run(make_config(*EXACT, "run_name=x", *stop))
    assert not exit_info.value.code, "a signal means a clean exit"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 9 and saved["epoch"] == 1, "stopped mid-epoch, after the current batch"

    run(make_config(*EXACT, "run_name=x", "resume=true"))
    resumed = _params(last)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), f"{name} differs from the uninterrupted run"


def test_sigkill_then_resume_from_last_checkpoint_is_bit_exact(cli, tmp_path):
    # The reference runs as the same kind of process (thread count included), so only resuming differs.
    reference = cli(*EXACT, "logger=csv", "run_name=ref", "num_workers=0", "device=cpu")
    assert reference.returncode == 0, reference.stderr[-3000:]
    uninterrupted = _params(tmp_path / "logs" / "tiny" / "ref" / "checkpoints" / "last.ckpt")
    killed = cli(*EXACT, "logger=csv", "run_name=k", "num_workers=0", "device=cpu",
                 "+callbacks.stop._target_=tests.test_training.SignalAt", "+callbacks.stop.step=8",
                 "+callbacks.stop.signame=SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "logs" / "tiny" / "k" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6, "the last checkpoint is the epoch-end one"
    resumed = cli(*EXACT, "logger=csv", "run_name=k", "num_workers=0", "device=cpu", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params = _params(last)
    for name in params:
        assert torch.equal(params[name], uninterrupted[name]), name


# ---- NaN recovery -------------------------------------------------------------------------------
def _poisoned_run(make_config, tmp_path, caplog, steps: str, epochs: int, snapshot_every: int = 1
                  ) -> tuple[dict, dict]:
    """Train the tiny task with NaN gradients at `steps`; (last checkpoint, NaN recovery's saved state)."""
    poison = ("+callbacks.poison._target_=tests.test_training.PoisonGradients", f"+callbacks.poison.steps={steps}",
              f"callbacks.nan_recovery.snapshot_every_n_steps={snapshot_every}")
    with caplog.at_level("WARNING"):
        run(make_config("model=tiny", f"max_epochs={epochs}", *poison))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    return state, next(v for k, v in state["callbacks"].items() if k.startswith("NaNRecovery"))


def test_nan_steps_are_skipped_then_state_restored_with_lower_lr(make_config, tmp_path, caplog):
    state, nan_state = _poisoned_run(make_config, tmp_path, caplog, "[3,4,5,10]", epochs=3)
    assert nan_state == {"skipped_total": 4, "diverged_total": 0, "restores": 1}
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.5e-2)
    assert "net.0.weight" in caplog.text, "parameters with non-finite gradients are named"


def test_nan_flags_read_late_skip_every_bad_step_and_name_parameters_from_the_second(
        make_config, tmp_path, caplog, monkeypatch):
    """On the GPU the step's flag is copied to the host and read a step or two later, and per-parameter
    flags are gathered only once steps go bad: the skip itself never waits, the first bad step of a run
    of them is reported without names, the next ones with them, and the restore still comes after three."""
    from callbacks import nan_recovery

    calls = []
    real = nan_recovery.finite_per_tensor
    monkeypatch.setattr(nan_recovery, "finite_per_tensor", lambda grads: calls.append(1) or real(grads))
    monkeypatch.setattr(nan_recovery, "_lands_later", lambda flag: True)
    monkeypatch.setattr(nan_recovery, "_recorded_event", lambda device: LandsLater())
    # a snapshot's step is read at once, so snapshots (steps 0 and 1 here) are kept off the bad steps
    state, nan_state = _poisoned_run(make_config, tmp_path, caplog, "[2,3,4]", epochs=2, snapshot_every=100)
    assert nan_state == {"skipped_total": 3, "diverged_total": 0, "restores": 1}
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values()), "no bad step was applied"
    warnings = [r.getMessage() for r in caplog.records if "Non-finite gradient at step" in r.getMessage()]
    assert [w.split(",")[0] for w in warnings] == [f"Non-finite gradient at step {s}" for s in (2, 3, 4)]
    assert "not named" in warnings[0] and "net.0.weight" in warnings[2]
    assert 0 < len(calls) <= 4, "per-parameter flags only around the bad steps"


def test_nan_that_never_stops_ends_with_a_checkpoint_and_clear_error(make_config, tmp_path):
    poison = ("+callbacks.poison._target_=tests.test_training.PoisonGradients", "+callbacks.poison.steps=[]",
              "+callbacks.poison.from_step=2", "callbacks.nan_recovery.max_restores=1")
    with pytest.raises(NonFiniteTrainingError, match="non-finite gradients.*nonfinite-stop.ckpt"):
        run(make_config("model=tiny", "max_epochs=3", *poison))
    assert (tmp_path / "run" / "checkpoints" / "nonfinite-stop.ckpt").is_file()
    assert "Resume with" in (tmp_path / "run" / "error.log").read_text()


def test_nan_snapshot_is_the_state_of_its_step_and_reuses_its_buffers(tmp_path):
    """The snapshot is copied into the same buffers each time (no allocation, no GPU stall), restoring
    gives back exactly the state of the snapshot's step, and the live optimizer never adopts the
    snapshot's tensors (on the CPU it would, and the next snapshot would then rewrite its state)."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision

    module = L.LightningModule()
    module.net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    trainer = SimpleNamespace(global_step=0, optimizers=[optimizer], precision_plugin=Precision(),
                              lr_scheduler_configs=[], default_root_dir=str(tmp_path))

    def train(steps: int) -> None:
        for _ in range(steps):
            module.net(torch.randn(4, 3)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            trainer.global_step += 1

    recovery = NaNRecovery(snapshot_every_n_steps=5)
    recovery._good_step(trainer, module)  # step 0: before the optimizer has any state
    assert recovery._snapshot["optimizers"][0]["state"] == {}
    train(1)
    recovery._good_step(trainer, module)
    assert recovery._snapshot["step"] == 1 and recovery._snapshot["optimizers"][0]["state"], "retaken with the state"
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    buffer = recovery._snapshot["model"]["net.weight"]
    train(1)
    recovery._good_step(trainer, module)
    assert recovery._snapshot["step"] == 1, "then only every snapshot_every_n_steps"
    train(2)
    recovery._restore(trainer, module)
    for name, value in module.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05), "the learning rate is lowered on restore"

    train(6)  # the live state moves on; the snapshot must not move with it
    assert torch.equal(recovery._snapshot["optimizers"][0]["state"][0]["exp_avg"], moments)
    recovery._good_step(trainer, module)  # a new snapshot, into the same buffers
    assert recovery._snapshot["model"]["net.weight"].data_ptr() == buffer.data_ptr()
    assert torch.equal(recovery._snapshot["model"]["net.weight"], module.net.weight)


def test_copy_to_host_copies_nested_state_without_sharing_memory():
    state = {"a": torch.arange(4.0), "b": [torch.ones(2, 2).t(), 3], "c": "text"}
    copied = copy_to_host(state)
    state["a"].add_(10)
    assert torch.equal(copied["a"], torch.arange(4.0)) and torch.equal(copied["b"][0], torch.ones(2, 2))
    assert copied["b"][1] == 3 and copied["c"] == "text"
    again = copy_to_host(state, into=copied)
    assert again["a"].data_ptr() == copied["a"].data_ptr() and torch.equal(again["a"], torch.arange(4.0) + 10)


# ---- checkpoints --------------------------------------------------------------------------------
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


# ---- monitoring, plots, tuning, failures ---------------------------------------------------------
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
                    "+callbacks.record_lr._target_=tests.test_training.RecordLR"))
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
                    "callbacks.monitor.every_n_steps=1", "+callbacks.spy._target_=tests.test_training.GradNormSpy"))
    logged = [float(r["train/grad_norm"]) for r in _rows(tmp_path / "run") if r.get("train/grad_norm")]
    assert len(logged) == len(GradNormSpy.seen) > 0
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(GradNormSpy.seen, logged))


def test_uncaught_error_writes_error_log_and_keeps_last_checkpoint(make_config, tmp_path):
    with pytest.raises(RuntimeError, match="injected failure"):
        run(make_config("model=tiny", "max_epochs=3", "run_name=f",
                        "+callbacks.fail._target_=tests.test_training.FailAt", "+callbacks.fail.step=8"))
    text = (tmp_path / "run" / "error.log").read_text()
    assert "injected failure" in text and "resume=true run_name=f" in text and "Traceback" in text
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_gradient_clipping_by_value_is_applied():
    model = TinyModule(optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    trainer = L.Trainer(gradient_clip_val=1e-4, gradient_clip_algorithm="value", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    seen = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # after clip and step
            seen.append(max(p.grad.abs().max().item() for p in pl_module.parameters()))

    trainer.callbacks.append(Grab())
    from tests.tiny_task import TinyDataModule

    trainer.fit(model, datamodule=TinyDataModule({"batch_size": 8}))
    assert seen and seen[0] <= 1e-4 + 1e-12


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


def test_run_stopped_by_max_steps_mid_epoch_resumes_to_the_uninterrupted_weights(cli, tmp_path):
    """last.ckpt of a max_steps stop is the mid-epoch state: the resumed run trains the rest of that
    epoch, then the next, and ends where a run never stopped ends. Saved when fit ended, it said the
    epoch was over, and the resumed run skipped its last batches."""
    reference = cli(*EXACT, "logger=csv", "run_name=ref", "num_workers=0", "device=cpu")
    assert reference.returncode == 0, reference.stderr[-3000:]
    cut = cli(*EXACT, "logger=csv", "run_name=cut", "num_workers=0", "device=cpu", "trainer.max_steps=8")
    assert cut.returncode == 0, cut.stderr[-3000:]
    last = tmp_path / "logs" / "tiny" / "cut" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert (state["global_step"], state["epoch"]) == (8, 1), "step 2 of the second 6-step epoch"
    resumed = cli(*EXACT, "logger=csv", "run_name=cut", "num_workers=0", "device=cpu", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params, uninterrupted = _params(last), _params(tmp_path / "logs" / "tiny" / "ref" / "checkpoints" / "last.ckpt")
    for name in params:
        assert torch.equal(params[name], uninterrupted[name]), name


def test_channels_last_applies_to_convolution_weights(make_config, monkeypatch):
    from suite import train

    seen = {}

    def spy(cfg, trainer, model, datamodule, resume_ckpt, logged):
        seen["model"] = model

    monkeypatch.setattr(train, "_dispatch", spy)
    run(make_config("model=tiny", "channels_last=true", "+model.conv=true"))
    conv = seen["model"].conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_resume_continues_from_the_newest_checkpoint_by_step(make_config, tmp_path):
    """A periodic step checkpoint written after last.ckpt (a kill mid-epoch) is where resume=true goes on;
    last.ckpt wins a tie, and an unreadable file is passed over."""
    from suite.rundir import last_checkpoint

    cfg = make_config("model=tiny")
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    assert last_checkpoint(cfg) == ckpts / "last.ckpt"  # nothing yet: the name the error message gives
    torch.save({"global_step": 12}, ckpts / "last.ckpt")
    torch.save({"global_step": 10}, ckpts / "step0000010.ckpt")
    assert last_checkpoint(cfg).name == "last.ckpt"
    torch.save({"global_step": 15}, ckpts / "step0000015.ckpt")
    (ckpts / "step0000099.ckpt").write_bytes(b"truncated")
    assert last_checkpoint(cfg).name == "step0000015.ckpt"
    torch.save({"global_step": 15}, ckpts / "last.ckpt")
    assert last_checkpoint(cfg).name == "last.ckpt"
