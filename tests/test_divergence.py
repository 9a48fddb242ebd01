"""NaN recovery's divergence check: a loss that explodes and stays finite is a bad step too, and so are
weights whose norm explodes while the loss stays bounded; a restore goes back to a state from before the
first bad step, and a run that cannot recover stops with one line."""
from __future__ import annotations

import re
import statistics

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import nan_recovery
from callbacks.divergence import DivergenceJudge
from callbacks.nan_recovery import NaNRecovery, NonFiniteTrainingError, TrainingDivergedError
from suite.train import run
from tests.nerf.test_train import TINY_CLI as NERF_TINY
from tests.tiny_task import TinyModule
from tests.training_helpers import LandsLater


class BoundedTiny(TinyModule):
    """The tiny task with NeRF's kind of loss, an MSE of sigmoid outputs bounded by 1: wrecked weights
    saturate the sigmoid and the loss stays in range, so no loss ratio can tell them from good ones."""

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(torch.sigmoid(self(x)), torch.sigmoid(y))


# ---- test-only callbacks, injected with +callbacks.<name>=... -------------------------------------
class ScaleWeights(L.Callback):
    """Multiplies every weight by `factor` once, at the start of `step`: a blow-up that stays finite."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor, self.done = step, factor, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(self.factor)


class RecordWeights(L.Callback):
    """The weights each step starts from, and the learning rate of each step."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordWeights.seen[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        RecordWeights.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


class WeightNormSpy(L.Callback):
    """The weight norms NaN recovery read good, as (step, norm), when training ends."""
    readings: list[tuple[int, float]] = []

    def on_train_end(self, trainer, pl_module) -> None:
        recovery = next(c for c in trainer.callbacks if isinstance(c, NaNRecovery))
        WeightNormSpy.readings = list(recovery._judge.weight_norms)


BOUNDED = "model._target_=tests.test_divergence.BoundedTiny"


def _overrides(*extra: str) -> tuple[str, ...]:
    RecordWeights.seen, RecordWeights.lr = {}, {}
    return ("model=tiny", "+callbacks.record._target_=tests.test_divergence.RecordWeights", *extra)


def _blow_up(step: int, factor: float = 1e4) -> tuple[str, ...]:
    return ("+callbacks.blow_up._target_=tests.test_divergence.ScaleWeights", f"+callbacks.blow_up.step={step}",
            f"+callbacks.blow_up.factor={factor}")


def _restores(caplog) -> list[int]:
    """The step whose state each restore brought back, from the log."""
    restored = (re.match(r"Restored the state of step (\d+)", r.getMessage()) for r in caplog.records)
    return [int(m.group(1)) for m in restored if m]


def _assert_restored_to_before(first_bad: int, restored: list[int]) -> None:
    """Each restore brought back exactly the weights of a step before `first_bad`."""
    seen = RecordWeights.seen
    assert restored and all(step < first_bad for step in restored), restored
    for step in restored:
        # the steps after each restore start from the restored weights: find one that does
        after = [s for s in seen if s > first_bad and all(torch.equal(seen[s][k], v) for k, v in seen[step].items())]
        assert after, f"no step started from the weights of step {step} after the restore"


def _saved_state(tmp_path) -> dict:
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    return next(v for k, v in state["callbacks"].items() if k.startswith("NaNRecovery"))


# ---- the stories --------------------------------------------------------------------------------
def test_a_run_whose_loss_explodes_but_stays_finite_is_caught_and_restored(make_config, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        run(make_config(*_overrides("max_epochs=3", "callbacks.nan_recovery.snapshot_every_n_steps=1", *_blow_up(6))))
    assert _saved_state(tmp_path) == {"skipped_total": 0, "diverged_total": 3, "restores": 1}
    assert "Diverging loss at step 6: loss" in caplog.text
    _assert_restored_to_before(6, _restores(caplog))
    final = RecordWeights.seen[max(RecordWeights.seen)]
    assert max(v.abs().max().item() for v in final.values()) < 100, "training went on from the good state"


def test_recovery_never_restores_a_state_that_already_held_diverged_weights(make_config, tmp_path, caplog,
                                                                           monkeypatch):
    """The GPU's way: flags and losses read a step or two late. Weights blow up (finite) at step 6 and
    the gradients go NaN at steps 9-11: the restore goes back to before step 6, never to a snapshot
    taken after it whose gradients were still finite."""
    monkeypatch.setattr(nan_recovery, "_lands_later", lambda flag: True)
    monkeypatch.setattr(nan_recovery, "_recorded_event", lambda device: LandsLater())
    poison = ("+callbacks.poison._target_=tests.training_helpers.PoisonGradients", "+callbacks.poison.steps=[9,10,11]")
    with caplog.at_level("WARNING"):
        run(make_config(*_overrides("max_epochs=3", "callbacks.nan_recovery.snapshot_every_n_steps=2",
                                    *_blow_up(6), *poison)))
    restored = _restores(caplog)
    _assert_restored_to_before(6, restored)
    for step in restored:
        assert max(v.abs().max().item() for v in RecordWeights.seen[step].values()) < 100
    final = RecordWeights.seen[max(RecordWeights.seen)]
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in final.values())


def test_a_run_that_cannot_recover_stops_with_one_line_naming_the_divergence(make_config, tmp_path, caplog):
    """lr=1e6 with a backoff that barely lowers it: every restore goes back to the initial weights (the
    only state before the first bad step), the lr is lowered at each restore, then the run stops."""
    overrides = _overrides("max_epochs=3", "optimizer.lr=1e6", "callbacks.nan_recovery.lr_factor=0.9",
                           "callbacks.nan_recovery.max_restores=2", "callbacks.nan_recovery.snapshot_every_n_steps=1")
    with caplog.at_level("WARNING"), pytest.raises(TrainingDivergedError) as failure:
        run(make_config(*overrides))
    message = str(failure.value)
    assert "\n" not in message
    assert re.search(r"^Training diverged: loss \S+ above 100x the median .* at step \d+; 3 bad steps in a row from "
                     r"step \d+ to step \d+, after 2 restores .*lr multiplied by 0.9.*diverged-stop.ckpt", message)
    assert isinstance(failure.value, NonFiniteTrainingError), "callers catching the older error still do"
    assert (tmp_path / "run" / "checkpoints" / "diverged-stop.ckpt").is_file()
    assert "TrainingDivergedError: Training diverged" in (tmp_path / "run" / "error.log").read_text()
    restored = _restores(caplog)
    assert len(restored) == 2
    initial = RecordWeights.seen[0]
    for step in restored:
        assert all(torch.equal(RecordWeights.seen[step][k], v) for k, v in initial.items())
    assert sorted(set(RecordWeights.lr.values()), reverse=True) == pytest.approx([1e6, 0.9e6, 0.81e6]), \
        "each restore lowers the lr again"


def test_a_divergence_that_turns_into_nan_is_reported_as_the_divergence(make_config, tmp_path):
    """As clinical at lr=1e6: the loss explodes first, the gradients go NaN after; the line names the loss."""
    poison = ("+callbacks.poison._target_=tests.training_helpers.PoisonGradients", "+callbacks.poison.steps=[]",
              "+callbacks.poison.from_step=4")
    with pytest.raises(TrainingDivergedError, match=r"^Training diverged: loss \S+ above 100x the median \S+ of the "
                       r"last 3 good steps at step 3, then non-finite gradients; 3 bad steps in a row from step 3 to "
                       r"step 5, with restores turned off \(max_restores=0\)"):
        run(make_config(*_overrides("max_epochs=2", "callbacks.nan_recovery.max_restores=0", *_blow_up(3), *poison)))


def test_a_lone_loss_spike_or_a_noisy_loss_is_not_a_divergence():
    """Only a loss far above the median of the recent good ones counts, and never before the warm-up."""
    judge = DivergenceJudge(loss_factor=100, window=5, warmup_steps=3)
    for loss in (0.0, 1.0, 1.2, 0.9, 1.1, 8.0):  # a few x above the median is normal
        assert judge(10, loss) is None
        judge.good(10, loss)
    assert judge(10, 50.0) is None
    assert "above 100x the median 1.1" in judge(10, 200.0)
    assert judge(2, 200.0) is None, "not judged during the warm-up"
    assert judge(2, float("nan")) == "loss nan", "a non-finite loss always is"
    assert DivergenceJudge(loss_factor=None)(10, 1e30) is None, "null turns it off"


def test_weights_growing_steadily_even_from_zero_are_not_a_divergence_but_a_blow_up_is():
    """The weight norm is judged against the median of recent good ones: steady growth (even from zero
    weights, a ratio of about 2 to a trailing median) passes, a 10x jump or a non-finite norm does not,
    and after a restore only readings up to the restored step are the reference."""
    judge = DivergenceJudge(weight_norm_factor=10, window=100)
    for step in range(300):
        assert judge(step, None, 0.01 * step) is None, step
        judge.good(step, None, 0.01 * step)
    assert judge(300, None, 14.0) is None
    expected = "parameter norm 30, 12x the median 2.495 of the last 100 good steps (limit 10x)"
    assert judge(300, None, 30.0) == expected
    assert judge(300, None, float("inf")) == "parameter norm inf"
    assert judge(300, None, 22.0) is None
    judge.forget_after(210)  # a restore to step 210: the reference is what led up to it
    assert judge.weight_norms[-1][0] == 210 and "2.05 of the last 11 good steps" in judge(300, None, 22.0)
    assert DivergenceJudge(weight_norm_factor=None)(10, None, 1e30) is None, "null turns it off"


def test_a_divergence_whose_loss_stays_bounded_stops_with_one_line_naming_the_parameter_norm(
        make_config, tmp_path, caplog):
    """Issue 24 in small: at lr=1e6 the first update wrecks the network and the sigmoid's bounded loss
    stays in range; the weights' norm tells. Every restore goes back to the initial weights, the only
    state from before the first bad step, and the run stops with one line."""
    overrides = _overrides(BOUNDED, "max_epochs=3", "optimizer.lr=1e6",
                           "callbacks.nan_recovery.max_restores=2")
    with caplog.at_level("WARNING"), pytest.raises(TrainingDivergedError) as failure:
        run(make_config(*overrides))
    message = str(failure.value)
    assert "\n" not in message
    assert re.search(r"^Training diverged: parameter norm \S+, \S+x the median \S+ of the last \d+ good "
                     r"steps? \(limit 10x\) at step \d+; 3 bad steps in a row .* after 2 restores "
                     r".*diverged-stop.ckpt", message), message
    assert "Diverging weights at step 1: parameter norm" in caplog.text
    assert "Diverging loss" not in caplog.text, "the loss alone never told"
    restored = _restores(caplog)
    assert len(restored) == 2
    initial = RecordWeights.seen[0]
    for step in restored:  # the initial weights are retaken as a snapshot at the first step after a restore
        assert all(torch.equal(RecordWeights.seen[step][k], v) for k, v in initial.items())


def test_weights_that_blow_up_under_a_bounded_loss_are_restored_from_before_even_read_late(
        make_config, tmp_path, caplog, monkeypatch):
    """The GPU's way, readings a step or two late: the weights blow up at step 6 and the loss stays in
    range; the restore goes back to before step 6 and training goes on from there."""
    monkeypatch.setattr(nan_recovery, "_lands_later", lambda flag: True)
    monkeypatch.setattr(nan_recovery, "_recorded_event", lambda device: LandsLater())
    with caplog.at_level("WARNING"):
        run(make_config(*_overrides(BOUNDED, "max_epochs=3", *_blow_up(6),
                                    "callbacks.nan_recovery.snapshot_every_n_steps=2")))
    assert _saved_state(tmp_path) == {"skipped_total": 0, "diverged_total": 3, "restores": 1}
    assert "Diverging weights at step 6: parameter norm" in caplog.text
    _assert_restored_to_before(6, _restores(caplog))
    final = RecordWeights.seen[max(RecordWeights.seen)]
    assert max(v.abs().max().item() for v in final.values()) < 100, "training went on from the good state"


def test_nerf_at_a_huge_learning_rate_stops_instead_of_ending_well(make_config):
    """Issue 24 itself: nerf at lr=1e6 ended with exit 0, no skipped step and a PSNR of 7.7."""
    overrides = ("model=nerf", *NERF_TINY, "optimizer.lr=1e6", "max_epochs=1", "data.steps_per_epoch=16")
    with pytest.raises(TrainingDivergedError, match=r"^Training diverged: parameter norm \S+, \S+x the "):
        run(make_config(*overrides))


def test_healthy_training_is_never_flagged_and_its_weight_norm_stays_far_from_the_limit(make_config, tmp_path,
                                                                                          caplog):
    """At ten times the tiny task's learning rate the weight norm still moves slowly: every step is read
    good, and no reading comes near 10x the median of the ones before it."""
    spy = "+callbacks.spy._target_=tests.test_divergence.WeightNormSpy"
    with caplog.at_level("WARNING"):
        run(make_config(*_overrides(spy, "max_epochs=20", "optimizer.lr=0.1")))
    assert _saved_state(tmp_path) == {"skipped_total": 0, "diverged_total": 0, "restores": 0}
    assert "Diverging" not in caplog.text
    norms = [norm for _, norm in WeightNormSpy.readings]
    assert len(norms) == 100, "every step's weight norm was read and judged"
    worst = max(norms[i] / statistics.median(norms[:i]) for i in range(1, len(norms)))
    assert worst < 2, worst


def test_a_run_that_cannot_recover_exits_non_zero_with_the_cause_on_one_line(cli, tmp_path):
    result = cli("model=tiny", "logger=csv", "max_epochs=3", "optimizer.lr=1e6", "device=cpu", "num_workers=0",
                 "callbacks.nan_recovery.max_restores=0")
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "Training diverged" in line]
    assert lines and all("max_restores=0" in line and "diverged-stop.ckpt" in line for line in lines), lines
