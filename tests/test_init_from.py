"""Starting from a checkpoint: `init_from=<ckpt>` is a fresh run from its weights only, on every task,
and evaluating a checkpoint takes its own task's settings without `model=` (issue 25, items 4 and 10)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

from suite.train import run
from tests.clinical.test_run import SMALL as CLINICAL
from tests.conftest import compose_config
from tests.diffusion.conftest import TINY_OVERRIDES as DIFFUSION
from tests.legal_bert.conftest import minilm_dir, tiny_bert_dir  # noqa: F401  (fixtures)
from tests.license_plate.test_end_to_end import FAST as LICENSE_PLATE
from tests.nerf.test_train import TINY_CLI as NERF

SPY = "+callbacks.start_state._target_=tests.test_init_from.StartState"


class StartState(L.Callback):
    """What a fit starts from: its step and epoch, its optimizer's state and the module's weights."""
    seen: dict = {}

    def on_train_start(self, trainer, pl_module):
        StartState.seen = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                           "optimizer_state": sum(len(o.state) for o in trainer.optimizers),
                           "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}}


def _checkpoint_weights(ckpt) -> dict[str, torch.Tensor]:
    """What init_from must start from: the checkpoint's weights, its EMA weights where it has them."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = dict(checkpoint["state_dict"])
    state.update(((checkpoint.get("callbacks") or {}).get("EMA") or {}).get("shadow") or {})
    return state


def _assert_starts_from(ckpt, skip=()) -> None:
    expected, started = _checkpoint_weights(ckpt), StartState.seen["state"]
    assert (StartState.seen["step"], StartState.seen["epoch"], StartState.seen["optimizer_state"]) == (0, 0, 0)
    assert set(expected) == set(started)
    for name, value in expected.items():
        if name not in skip:
            assert torch.equal(started[name], value.to(started[name].dtype)), f"{name} is not the checkpoint's"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    run(compose_config(root, "model=tiny", "max_epochs=2"))
    return root / "run" / "checkpoints" / "last.ckpt"


# ---- init_from: a fresh run from a checkpoint's weights ------------------------------------------
def test_init_from_starts_a_new_run_at_step_zero_with_the_checkpoints_weights_and_a_fresh_optimizer(
        tmp_path, tiny_ckpt):
    source_bytes = tiny_ckpt.read_bytes()
    source = torch.load(tiny_ckpt, weights_only=True)
    run(compose_config(tmp_path, "model=tiny", "max_epochs=1", f"init_from={tiny_ckpt}", SPY))
    _assert_starts_from(tiny_ckpt)
    out = tmp_path / "run"  # its own run dir; the checkpoint's run is only read
    assert tiny_ckpt.read_bytes() == source_bytes
    assert yaml.safe_load((out / "config.yaml").read_text())["init_from"] == str(tiny_ckpt)
    new = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    steps = source["global_step"] // 2  # one epoch of the two the source trained
    assert (new["epoch"], new["global_step"]) == (0, steps)
    assert all(s["step"] == steps for s in new["optimizer_states"][0]["state"].values()), "Adam starts afresh"


def test_init_from_prefers_the_checkpoints_ema_weights(tmp_path, make_config):
    ema = ("+callbacks.ema._target_=callbacks.ema.EMA", "+callbacks.ema.decay=0.5", "+callbacks.ema.warmup=false")
    run(make_config("model=tiny", "max_epochs=1", *ema))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    shadow = checkpoint["callbacks"]["EMA"]["shadow"]
    assert any(not torch.equal(v, checkpoint["state_dict"][k]) for k, v in shadow.items())
    run(compose_config(tmp_path / "fine", "model=tiny", "debug=fast_dev_run", f"init_from={ckpt}", SPY))
    _assert_starts_from(ckpt)


@pytest.mark.parametrize("overrides, match", [
    (("model=clinical",), r"{ckpt} is a checkpoint of task 'tiny', but this run trains task 'clinical'"),
    (("model=tiny", "model.hidden=24"),
     r"{ckpt} does not fit.*net\.0\.weight.*\[16, 8\].*\[24, 8\].*model\.hidden=16 there and 24 here"),
    (("model=tiny", "resume=true", "run_name=t"), r"init_from={ckpt} starts a fresh run.*resume=true.*one of them"),
    (("model=tiny", "ckpt_path={ckpt}"), r"init_from={ckpt} takes a checkpoint's weights only.*ckpt_path=.*one of them"),
    (("model=tiny", "mode=test"), r"init_from={ckpt} starts a new training run.*mode=test.*pass ckpt_path={ckpt}"),
], ids=["another_task", "another_shape", "resume", "ckpt_path", "eval_mode"])
def test_init_from_is_refused_where_it_cannot_apply(tmp_path, tiny_ckpt, overrides, match):
    overrides = [o.format(ckpt=tiny_ckpt) for o in overrides]
    with pytest.raises(ValueError, match=match.format(ckpt=tiny_ckpt)):
        run(compose_config(tmp_path, *overrides, f"init_from={tiny_ckpt}"))
    if "model.hidden=24" not in overrides:  # refused before the run dir is made
        assert not (tmp_path / "run").exists()


def test_license_plate_pretrained_names_init_from_for_a_suite_checkpoint(tmp_path, tiny_ckpt):
    from suite.config_checks import ConfigError

    with pytest.raises(ConfigError, match=f"model.pretrained={tiny_ckpt} is a Lightning checkpoint.*init_from={tiny_ckpt}"):
        run(compose_config(tmp_path, "model=license_plate", f"model.pretrained={tiny_ckpt}", *LICENSE_PLATE))


# One cell per task: a short fit, then a fit from its last.ckpt that must start from its weights.
TASKS = {
    "nerf": ("model=nerf", "data.steps_per_epoch=4", *NERF),
    "clinical": ("model=clinical", *CLINICAL),
    "license_plate": ("model=license_plate", *LICENSE_PLATE),
    "legal_bert": ("model=legal_bert", "data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8"),
    "legal_bert_mlm": ("model=legal_bert_mlm", "data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8"),
    "diffusion": ("model=diffusion", *DIFFUSION, "callbacks.sample_quality=null", "monitor.metric=val/loss",
                  "monitor.mode=min"),
}
SLOW = {"license_plate", "legal_bert", "legal_bert_mlm", "diffusion"}


@pytest.mark.parametrize("task", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in TASKS])
def test_init_from_works_on_every_task(tmp_path, request, task):
    overrides = list(TASKS[task])
    if task.startswith("legal_bert"):
        overrides.append(f"model.pretrained_path={request.getfixturevalue('tiny_bert_dir')}")
    run(compose_config(tmp_path, *overrides, "debug=limit", "max_epochs=1"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run(compose_config(tmp_path / "fine", *overrides, "debug=fast_dev_run", f"init_from={ckpt}", SPY))
    # clinical refits its ridge baseline to this run's data (the same data here); the skip layer and
    # the scaling stay the checkpoint's, and so does everything else of every task
    _assert_starts_from(ckpt, skip={"ridge_weight"} if task == "clinical" else ())


# ---- evaluating a checkpoint with its own task's settings -----------------------------------------
def test_predict_from_a_nerf_checkpoint_takes_nerf_settings_without_naming_the_task(tmp_path, make_config, cli):
    run(make_config("model=nerf", "debug=limit", "max_epochs=1", "data.steps_per_epoch=4", *NERF))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # in-process, as the tests and the benchmark compose
    cfg = compose_config(tmp_path / "p", "mode=predict", f"ckpt_path={ckpt}", "data.path_frames=2")
    assert cfg.task_name == "nerf" and cfg.data.path_frames == 2
    # through run.py, as the nerf page documents it
    result = cli("mode=predict", f"ckpt_path={ckpt}", "data.path_frames=2", "logger=csv", "num_workers=0",
                 "device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (tmp_path / "run").glob("predict_*")
    assert len(list((out / "render").glob("frame_*.png"))) == 2


def test_init_from_an_occupancy_run_starts_the_grids_warm_up_and_auto_budgets_afresh(tmp_path):
    """The grid's schedule is the finished run's, not the weights': the new run warms up and sizes its own budgets
    (for its own batch), while the grid's densities come along with the weights."""
    from omegaconf import OmegaConf

    from suite.checkpoint import load_init_from
    from tests.nerf.test_sample_budget import _module

    finished = _module("auto")
    finished.grid.steps, finished.grid._sized = 5000, (2048, 1024)
    finished.grid._counted.append((1800, 900))
    finished.grid.density.fill_(3.0)
    torch.save({"state_dict": finished.state_dict(), "run_config": {"task_name": "nerf"}}, tmp_path / "old.ckpt")
    fresh = _module("auto")
    load_init_from(fresh, tmp_path / "old.ckpt", OmegaConf.create({"task_name": "nerf", "model": {}}))
    assert fresh.grid.steps == 0 and fresh.grid.budgets is None and not fresh.grid._counted
    assert torch.equal(fresh.grid.density, finished.grid.density), "what the grid learned of the scene comes along"
