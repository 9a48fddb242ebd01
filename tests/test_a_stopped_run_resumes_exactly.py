"""A run stopped by a signal, a kill or max_steps resumes from its newest checkpoint to the very
weights of a run that was never stopped."""
from __future__ import annotations

import signal

import pytest
import torch

from suite.train import run
from tests.legal_bert.conftest import minilm_dir, tiny_bert_dir  # noqa: F401  (fixtures)
from tests.nerf.test_train import TINY_DATA_CLI, TINY_NET_CLI
from tests.training_helpers import EXACT, _params, stopped_and_resumed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.conftest import compose_config

    tmp = tmp_path_factory.mktemp("uninterrupted")
    run(compose_config(tmp, *EXACT))
    return _params(tmp / "run" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_and_resume_is_bit_exact(make_config, tmp_path, uninterrupted, signame):
    stop = ("+callbacks.stop._target_=tests.training_helpers.SignalAt", "+callbacks.stop.step=8",
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


@pytest.mark.parametrize("stop", [("+callbacks.stop._target_=tests.training_helpers.SignalAt", "+callbacks.stop.step=4",
                                   "+callbacks.stop.signame=SIGUSR1"), ("trainer.max_steps=4",)], ids=["SIGUSR1", "max_steps"])
def test_a_run_with_an_ema_and_accumulation_resumes_to_the_uninterrupted_weights_and_average(tmp_path, stop):
    """The signal comes on a window's first micro-batch: the run finishes that optimizer step, so no accumulated
    gradient is lost, and stops before the next batch, after the EMA has averaged it (and not again on resume)."""
    settings = (*EXACT, "trainer.accumulate_grad_batches=2", "+callbacks.ema._target_=callbacks.ema.EMA",
                "+callbacks.ema.decay=0.5")
    signalled = stop[0].startswith("+callbacks")
    resumed, reference, stopped_at = stopped_and_resumed(tmp_path, settings, stop, signal_stop=signalled)
    assert stopped_at == (5 if signalled else 4), "at a window's end (the signal's window is the one after step 4's start)"
    for name, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    ours, theirs = resumed["callbacks"]["EMA"], reference["callbacks"]["EMA"]
    assert ours["num_updates"] == theirs["num_updates"]
    for name, value in theirs["shadow"].items():
        assert torch.equal(ours["shadow"][name], value), f"EMA of {name}"


def test_a_run_that_died_after_an_epochs_checkpoint_resumes_to_the_uninterrupted_weights(make_config, tmp_path, uninterrupted):
    """What a SIGKILL leaves (the slow tier kills a process): the last.ckpt written after the first epoch's
    validation, the epoch not yet marked processed, resumed in place. A failure writes no checkpoint either."""
    with pytest.raises(RuntimeError, match="injected failure"):
        run(make_config(*EXACT, "run_name=x", "+callbacks.fail._target_=tests.training_helpers.FailAt",
                        "+callbacks.fail.step=8"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 6 and saved["epoch"] == 0, "6-step epochs: the first one's end, after validation"
    run(make_config(*EXACT, "run_name=x", "resume=true"))
    resumed = _params(last)
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), f"{name} differs from the uninterrupted run"


# three processes, ~30 s on the CI machine: the slow tier's; the in-process test above resumes the same checkpoint
@pytest.mark.slow
def test_sigkill_then_resume_from_last_checkpoint_is_bit_exact(cli, tmp_path):
    # The reference runs as the same kind of process (thread count included), so only resuming differs.
    reference = cli(*EXACT, "logger=csv", "run_name=ref", "num_workers=0", "device=cpu")
    assert reference.returncode == 0, reference.stderr[-3000:]
    uninterrupted = _params(tmp_path / "logs" / "tiny" / "ref" / "checkpoints" / "last.ckpt")
    killed = cli(*EXACT, "logger=csv", "run_name=k", "num_workers=0", "device=cpu",
                 "+callbacks.stop._target_=tests.training_helpers.SignalAt", "+callbacks.stop.step=8",
                 "+callbacks.stop.signame=SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "logs" / "tiny" / "k" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6, "the last checkpoint is the epoch-end one"
    resumed = cli(*EXACT, "logger=csv", "run_name=k", "num_workers=0", "device=cpu", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params = _params(last)
    for name in params:
        assert torch.equal(params[name], uninterrupted[name]), name


# on an epoch's last batch with no validation at its end: last.ckpt is written when fit ends, after the epoch counter moved
# 23-33 s each on the CI machine: the slow tier's; make test keeps the in-process epoch-end resume above
@pytest.mark.slow
@pytest.mark.parametrize("stop", [("trainer.max_steps=8",), ("trainer.max_steps=6", "trainer.check_val_every_n_epoch=5")],
                         ids=["mid_epoch", "on_the_epochs_last_batch"])
def test_run_stopped_by_max_steps_resumes_to_the_uninterrupted_weights(cli, tmp_path, stop):
    """last.ckpt of a max_steps stop is the mid-epoch state: the resumed run trains the rest of that
    epoch, then the next, and ends where a run never stopped ends. Saved when fit ended, it said the
    epoch was over, and the resumed run skipped its last batches; stopped on an epoch's last batch, it
    gave the next epoch the finished one's batch count, and the resumed run skipped that whole epoch."""
    reference = cli(*EXACT, "logger=csv", "run_name=ref", "num_workers=0", "device=cpu")
    assert reference.returncode == 0, reference.stderr[-3000:]
    cut = cli(*EXACT, "logger=csv", "run_name=cut", "num_workers=0", "device=cpu", *stop)
    assert cut.returncode == 0, cut.stderr[-3000:]
    last = tmp_path / "logs" / "tiny" / "cut" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == int(stop[0].split("=")[1])  # 6-step epochs: step 2 of the second, or the first's end
    resumed = cli(*EXACT, "logger=csv", "run_name=cut", "num_workers=0", "device=cpu", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params, uninterrupted = _params(last), _params(tmp_path / "logs" / "tiny" / "ref" / "checkpoints" / "last.ckpt")
    for name in params:
        assert torch.equal(params[name], uninterrupted[name]), name


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


# each task (and each nerf renderer with a schedule of its own) at test size: 4 steps an epoch, stopped in the second
RENDERERS = {"nerf-occupancy": [*TINY_NET_CLI, "model.renderer=occupancy", "model.march_samples=32",
                                "model.grid_resolution=16", "model.grid_warmup_steps=2", "model.grid_update_every=3"],
             "nerf-proposal": ["nerf_net=hashgrid", "model.net.levels=2", "model.net.log2_table_size=8",
                               "model.net.finest_resolution=16", "model.net.hidden=16", "model.net.color_hidden=16",
                               "model.net.contraction=l2", "model.renderer=proposal", "model.proposal_update_every=2",
                               "model.proposal_update_warmup=2", "model.proposal_samples=[16,8]", "model.num_samples=8",
                               "model.proposal_net.levels=2", "model.proposal_net.log2_table_size=8",
                               "model.proposal_net.base_resolution=4", "model.proposal_net.finest_resolution=[8,16]",
                               "model.net.base_resolution=4"]}


# the slow tier's (10-100 s each on 2 cores); make test resumes the tiny task and nerf's auto-budget grid exactly
@pytest.mark.slow
@pytest.mark.parametrize("cell", ["clinical", "nerf", "license_plate", "diffusion", "legal_bert", *RENDERERS])
def test_every_task_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, cell, request):
    from tests.test_switches import TINY

    task = cell.split("-")[0]
    extra = [f"model.pretrained_path={request.getfixturevalue('tiny_bert_dir')}"] if task == "legal_bert" else []
    cell_settings = [*TINY_DATA_CLI, "data.steps_per_epoch=4", *RENDERERS[cell]] if cell in RENDERERS else TINY[task]
    if task == "license_plate":  # 8 training images: 4 batches of 2 an epoch, as the others have
        cell_settings = [*cell_settings, "data.synthetic_counts={train: 8, val: 2, test: 2}"]
    settings = (f"model={task}", *cell_settings, *extra, "deterministic=true", "max_epochs=2",
                "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    stop = ("+callbacks.stop._target_=tests.training_helpers.SignalAt", "+callbacks.stop.step=6")
    resumed, uninterrupted, stopped_at = stopped_and_resumed(tmp_path, settings, stop)
    assert stopped_at == 7, "stopped in the second epoch, after its batch"
    resumed, uninterrupted = resumed["state_dict"], uninterrupted["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), f"{cell}: {name} differs from the uninterrupted run"
