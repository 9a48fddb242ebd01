"""Non-finite gradients are skipped, a run of them is undone by restoring the last good state at a
lower learning rate, and one that never stops ends with a checkpoint and a clear error."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.nan_recovery import NaNRecovery, NonFiniteTrainingError
from common.host_copy import copy_to_host
from suite.train import run
from tests.training_helpers import LandsLater


def _poisoned_run(make_config, tmp_path, caplog, steps: str, epochs: int, snapshot_every: int = 1
                  ) -> tuple[dict, dict]:
    """Train the tiny task with NaN gradients at `steps`; (last checkpoint, NaN recovery's saved state)."""
    poison = ("+callbacks.poison._target_=tests.training_helpers.PoisonGradients", f"+callbacks.poison.steps={steps}",
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
    poison = ("+callbacks.poison._target_=tests.training_helpers.PoisonGradients", "+callbacks.poison.steps=[]",
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
