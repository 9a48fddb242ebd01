"""Every documented switch does what it says on every task, or refuses in one clear line.

Each cell is a short CPU run of one task with one switch, asserting an effect a user would see: a
file that exists, a count of optimizer steps, weights that differ, a batch that changed, or a
refusal naming the key. The cheapest task carries each switch in `make test`; the other tasks'
cells are `slow` (`make test-all`).
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from suite.train import run
from tests.clinical.test_run import SMALL as CLINICAL
from tests.conftest import compose_config
from tests.diffusion.conftest import TINY_OVERRIDES as DIFFUSION
from tests.legal_bert.conftest import minilm_dir, tiny_bert_dir  # noqa: F401  (fixtures)
from tests.license_plate.helpers import SMALL as PLATES
from tests.nerf.test_train import TINY_CLI as NERF

TINY = {"nerf": [*NERF, "data.steps_per_epoch=4"], "license_plate": [*PLATES], "clinical": [*CLINICAL],
        "diffusion": [*DIFFUSION, "callbacks.sample_quality=null", "monitor.metric=val/loss", "monitor.mode=min"],
        "legal_bert": ["data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8"]}
TASKS = list(TINY)
FAST = "clinical"   # the task whose cells run in `make test`
BATCHES = ["max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
           "trainer.limit_test_batches=1"]


def cells(fast: str = FAST, tasks=TASKS):
    return [pytest.param(t, marks=() if t == fast else pytest.mark.slow) for t in tasks]


def fit(root: Path, task: str, *switches: str, request=None) -> Path:
    extra = [f"model.pretrained_path={request.getfixturevalue('tiny_bert_dir')}"] if task == "legal_bert" else []
    run(compose_config(root, f"model={task}", *TINY[task], *extra, *BATCHES, *switches))
    return root / "run"


def rows(run_dir: Path) -> list[dict]:
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("task", cells())
def test_gradient_accumulation_takes_one_optimizer_step_per_two_batches(tmp_path, task, request):
    out = fit(tmp_path, task, "trainer.accumulate_grad_batches=2", request=request)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize("task", cells())
def test_periodic_checkpoints_are_written_every_n_steps(tmp_path, task, request):
    out = fit(tmp_path, task, "callbacks.periodic_checkpoint.every_n_train_steps=2", request=request)
    steps = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    expected = [f"step{s:07d}.ckpt" for s in range(2, steps + 1, 2)][-3:]   # the newest save_top_k (3) kept
    assert expected and sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt")) == expected


@pytest.mark.parametrize("task", cells(fast="nerf"))
def test_gradient_checkpointing_recomputes_activations_in_backward(tmp_path, task, request, monkeypatch):
    import torch.utils.checkpoint as tuc
    import transformers.modeling_utils as hf_models

    from lightning_modules.clinical import network as clinical_net
    from lightning_modules.license_plate import module as plate_module
    from lightning_modules.nerf import network as nerf_net

    calls = []
    real = tuc.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for where in (tuc, hf_models, clinical_net, nerf_net, plate_module):
        monkeypatch.setattr(where, "checkpoint", counting)
    fit(tmp_path, task, "model.gradient_checkpointing=true", request=request)
    assert calls, "model.gradient_checkpointing=true checkpointed nothing"


@pytest.mark.parametrize("task", cells())
def test_an_ema_of_the_weights_is_kept_in_every_checkpoint(tmp_path, task, request):
    switch = [] if task == "diffusion" else ["+callbacks.ema._target_=callbacks.ema.EMA", "+callbacks.ema.decay=0.5"]
    out = fit(tmp_path, task, *switch, request=request)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    (ema_state,) = [v for k, v in checkpoint["callbacks"].items() if "EMA" in k]
    assert ema_state, "the EMA callback saved nothing"


@pytest.mark.parametrize("logger", [pytest.param("csv", marks=pytest.mark.slow),
                                    pytest.param("tensorboard", marks=pytest.mark.slow), "wandb", "none"])
def test_each_logger_writes_where_the_readme_says(tmp_path, logger, request, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # W&B offline, as run_cli runs it: never online from a test
    out = fit(tmp_path, FAST, f"logger={logger}", request=request)
    found = {"csv": list(out.rglob("metrics.csv")), "tensorboard": list(out.rglob("events.out.tfevents*")),
             "wandb": list(out.rglob("offline-run-*")), "none": []}[logger]
    assert bool(found) == (logger != "none")
    if logger == "none":
        assert not list(out.rglob("metrics.csv")) and not list(out.rglob("offline-run-*"))


@pytest.mark.parametrize("task", [t for t in TASKS if t != "legal_bert"])
def test_label_smoothing_where_the_task_has_none_is_refused_naming_the_key(make_config, task):
    with pytest.raises(ConfigCompositionException, match="label_smoothing"):
        make_config(f"model={task}", "model.label_smoothing=0.1")


@pytest.mark.slow
def test_label_smoothing_changes_the_legal_bert_loss(tmp_path, request):
    losses = []
    for i, value in enumerate((0.0, 0.3)):
        out = fit(tmp_path / str(i), "legal_bert", f"model.label_smoothing={value}", "trainer.log_every_n_steps=1",
                  request=request)
        losses.append([float(r["train/loss"]) for r in rows(out) if r.get("train/loss")])
    assert losses[0] and losses[0] != losses[1]
