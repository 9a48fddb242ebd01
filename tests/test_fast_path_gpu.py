"""On a CUDA GPU (`make test-gpu`): model.compile=auto compiles each task that says it pays, with CUDA graphs,
trains to eager's metric, stops recompiling after the first epoch, and a second run starts from the
kept kernels; license_plate stays eager with channels-last weights."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from suite.train import run
from tests.clinical.test_run import SMALL as CLINICAL
from tests.conftest import compose_config
from tests.diffusion.conftest import TINY_OVERRIDES as DIFFUSION
from tests.legal_bert.conftest import minilm_dir, tiny_bert_dir  # noqa: F401  (fixtures)
from tests.license_plate.helpers import SMALL as PLATES
from tests.nerf.test_train import TINY_CLI as NERF

pytestmark = pytest.mark.gpu

GPU = ["device=cuda", "precision=bf16-mixed"]
TASKS = {"clinical": ["model=clinical", *CLINICAL],
         "diffusion": ["model=diffusion", *DIFFUSION, "callbacks.sample_quality=null", "monitor.metric=val/loss",
                       "monitor.mode=min"],
         "nerf": ["model=nerf", *NERF, "data.steps_per_epoch=8"],
         "legal_bert": ["model=legal_bert", "data.synthetic_docs=8", "batch_size=8", "data.max_sequence_length=32",
                        "data.pad_to_multiple_of=32"]}


def _fit(root: Path, caplog, *overrides: str) -> tuple[list[str], list[dict]]:
    """The run's log lines and its metrics.csv rows."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(compose_config(root, *overrides))
    with open(next((root / "run").rglob("metrics.csv"))) as f:
        return [r.getMessage() for r in caplog.records], list(csv.DictReader(f))


@pytest.mark.parametrize("task", list(TASKS))
def test_auto_compiles_with_cuda_graphs_and_recompiles_stop_after_the_first_epoch(task, tmp_path, caplog, request):
    extra = [f"model.pretrained_path={request.getfixturevalue('tiny_bert_dir')}"] if task == "legal_bert" else []
    lines, rows = _fit(tmp_path, caplog, *TASKS[task], *extra, *GPU, "max_epochs=3")
    assert any(line.startswith("compile: on, mode reduce-overhead") for line in lines), lines
    counts = [float(r["perf/recompiles"]) for r in rows if r.get("perf/recompiles")]
    assert len(counts) >= 3 and counts[1] == counts[2], f"recompiles per epoch: {counts}"
    assert any(line.startswith("compile: ") and "graphs" in line for line in lines)


def test_license_plate_stays_eager_with_channels_last_weights(tmp_path, caplog):
    lines, _ = _fit(tmp_path, caplog, "model=license_plate", *PLATES, *GPU, "max_epochs=1")
    assert any(line.startswith("compile: off (detection") for line in lines)
    assert "channels-last: on (the detector is convolutional)" in lines
    assert "TF32 matmuls: on (cuda.matmul_precision=high)" in lines and "precision: bf16-mixed" in lines


def test_clinical_under_cuda_graphs_matches_eager_and_a_second_run_reuses_the_kernels(tmp_path):
    same = ["model=clinical", *CLINICAL, "model.net.dropout=0.0", "optimizer.lr=3e-3", *GPU, "max_epochs=4",
            f"paths.compile_cache_dir={tmp_path / 'compile_cache'}"]
    results = {}
    for name, setting in (("eager", "false"), ("first", "auto"), ("second", "auto")):
        run(compose_config(tmp_path / name, *same, f"model.compile={setting}"))
        results[name] = json.loads((tmp_path / name / "run" / "result.json").read_text())["metrics"]
    assert results["first"]["val/rmse"] == pytest.approx(results["eager"]["val/rmse"], rel=2e-2)
    assert results["second"]["perf/time_to_first_step_s"] < results["first"]["perf/time_to_first_step_s"]


def test_gradient_accumulation_under_cuda_graphs_sums_each_micro_batchs_gradients_exactly():
    """Each replay writes its gradients where the last one did: the module copies them out after each backward
    (on_after_backward), so two micro-batches sum to eager's gradients exactly."""
    import functools

    import lightning as L
    import torch

    from common.fast_path import CUDA_GRAPHS, CompileDecision, compiled
    from tests.tiny_task import TinyModule

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # earlier runs in this process set TF32: eager and graphs alike
    torch.manual_seed(0)
    model = TinyModule(optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)).cuda()
    model._compile_decision = CompileDecision(True, "test", CUDA_GRAPHS)
    model.trainer = L.Trainer(accumulate_grad_batches=2, logger=False, enable_checkpointing=False)
    net = compiled(model.net, model._compile_decision)
    batches = [torch.randn(16, 8, device="cuda") for _ in range(2)]
    eager = [torch.autograd.grad(sum(model.net(x).square().mean() for x in batches), list(model.parameters()))]
    try:
        for step in range(3):  # the first replays record the graphs; the last two replay them
            model.optimizer_zero_grad(0, step, torch.optim.SGD(model.parameters(), lr=0.0))
            for x in batches:
                net(x).square().mean().backward()
                model.on_after_backward()
            for grad, param in zip(eager[0], model.parameters(), strict=True):
                torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    finally:
        torch.set_float32_matmul_precision(precision)


def test_gradient_accumulation_under_cuda_graphs_runs_and_trains_as_eager(tmp_path):
    """A user's run with accumulation under CUDA graphs: no overwritten-output error, eager's metric."""
    same = ["model=clinical", *CLINICAL, "model.net.dropout=0.0", "optimizer.lr=3e-3", *GPU, "max_epochs=4",
            "trainer.accumulate_grad_batches=2", "deterministic=false"]
    rmse = {}
    for setting in ("false", "auto"):
        run(compose_config(tmp_path / setting, *same, f"model.compile={setting}"))
        rmse[setting] = json.loads((tmp_path / setting / "run" / "result.json").read_text())["metrics"]["val/rmse"]
    assert rmse["auto"] == pytest.approx(rmse["false"], rel=2e-2), rmse


def test_nerf_with_gradient_accumulation_under_cuda_graphs_runs(tmp_path):
    """The compiled vanilla render with two micro-batches a step: no overwritten-output error."""
    run(compose_config(tmp_path, *TASKS["nerf"], *GPU, "max_epochs=1", "trainer.accumulate_grad_batches=2"))
    assert "val/psnr" in json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]
