"""The learning-rate schedule has the shape asked for and the length of the run as it really is:
accumulated batches count once, and a resumed, longer run goes on without a jump."""
from __future__ import annotations

import math

import pytest
import torch

from suite import schedules
from suite.train import run
from tests.training_helpers import RecordLR


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
    record = ("scheduler=cosine", "run_name=x", "+callbacks.record_lr._target_=tests.training_helpers.RecordLR")
    with pytest.raises(SystemExit):
        run(make_config("model=tiny", "max_epochs=3", *record, "+callbacks.stop._target_=tests.training_helpers.SignalAt",
                        "+callbacks.stop.step=8"))  # 6 steps an epoch: last.ckpt holds step 9 of 18
    run(make_config("model=tiny", "max_epochs=6", *record, "resume=true"))
    lrs = [RecordLR.seen[step] for step in range(36)]
    assert all(later <= earlier for earlier, later in zip(lrs, lrs[1:], strict=False)), "no jump back up after the resume"
    assert lrs[10] > 0.9 * lrs[9], "what was left of the decay, spread over three times as many steps"
    assert lrs[-1] < 0.01 * lrs[0], "and the floor is reached at the end of the longer run"
