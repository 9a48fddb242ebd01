"""The fast path: model.compile=auto decides per device and per task, each start-up setting is printed
once with its reason, compiled kernels are kept between runs, and recompilations are counted.

The GPU side (CUDA graphs, TF32, bf16, channels-last on a GPU) is decided here with a mocked device;
what it does to speed is measured on a GPU (bench/), not in these CPU tests.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from callbacks.compile_cost import CompileCost
from common.fast_path import (
    CompileCounter,
    CompilePlan,
    compile_setting,
    compiled,
    graphs_compiled,
    resolve_compile,
)
from common.task_data import TaskData
from suite.config_checks import ConfigError, check_settings
from suite.train import run
from tests.clinical.test_run import SMALL as CLINICAL
from tests.legal_bert.conftest import minilm_dir, tiny_bert_dir  # noqa: F401  (fixtures)

STATIC = CompilePlan(True, "fixed-size windows: static shapes", mode="reduce-overhead")
CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


# ---- the decision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_is_off_off_a_gpu_and_says_so(device):
    decision = resolve_compile("auto", device, STATIC)
    assert not decision.on and decision.line() == f"compile: off ({device})"


def test_true_compiles_on_cpu_because_it_was_asked_without_cuda_graphs():
    decision = resolve_compile(True, "cpu", STATIC)
    assert decision.on and decision.mode is None
    assert decision.line() == "compile: on (model.compile=true; no reduce-overhead (CUDA graphs) on cpu)"


def test_auto_on_a_gpu_follows_the_tasks_plan():
    on = resolve_compile("auto", "cuda", STATIC)
    assert on.on and on.kwargs() == {"mode": "reduce-overhead"}
    assert on.line() == "compile: on, mode reduce-overhead (fixed-size windows: static shapes)"
    eager = resolve_compile("auto", "cuda", CompilePlan(False, "shapes change every step", dynamic=True))
    assert eager.line() == "compile: off (shapes change every step)"
    assert resolve_compile(True, "cuda", CompilePlan(False, "x", dynamic=True)).kwargs() == {"dynamic": True}
    assert resolve_compile(False, "cuda", STATIC).line() == "compile: off (model.compile=false)"
    assert not resolve_compile(True, "cuda", None).on  # a task with nothing to compile
    assert resolve_compile("auto", "cuda", STATIC, refusal="mode=tune_batch_size").line() == \
        "compile: off (mode=tune_batch_size)"


def test_a_compile_setting_other_than_auto_true_false_is_refused_naming_the_key(make_config):
    assert [compile_setting(v) for v in ("auto", True, "false", None)] == ["auto", True, False, False]
    with pytest.raises(ValueError, match="model.compile='fast'"):
        compile_setting("fast")
    with pytest.raises(ConfigError, match="model.compile='fast': expected auto, true or false"):
        check_settings(make_config("model=clinical", "model.compile=fast"))
    with pytest.raises(ConfigError, match="channels_last=2"):
        check_settings(make_config("model=clinical", "channels_last=2"))


def _module(task: str, request):
    if task == "clinical":
        from lightning_modules.clinical import ClinicalForecaster
        return ClinicalForecaster(sequence_length=96, patch_len=24, d_model=16, d_ff=32)
    if task in ("nerf", "nerf_occupancy"):
        from lightning_modules.nerf import NerfModule
        return NerfModule(depth=2, width=16, renderer="occupancy" if task == "nerf_occupancy" else "vanilla")
    if task == "diffusion":
        from lightning_modules.diffusion import DiffusionModule
        from tests.diffusion.conftest import TINY_MODEL
        return DiffusionModule(**TINY_MODEL, compile_mode="reduce-overhead")
    from lightning_modules.legal_bert import LegalBertClassifier
    model = LegalBertClassifier(pretrained_path=str(request.getfixturevalue("tiny_bert_dir")), label_names=["a", "b"])
    model.bind_data(TaskData(padded_length=64 if task == "legal_bert_padded" else None))
    return model


@pytest.mark.parametrize("task, on, mode", [
    ("clinical", True, "reduce-overhead"), ("nerf", True, "reduce-overhead"), ("nerf_occupancy", False, None),
    ("diffusion", True, "reduce-overhead"), ("legal_bert", False, None),
    ("legal_bert_padded", True, "reduce-overhead")])
def test_each_task_declares_whether_compile_pays_on_a_gpu(task, on, mode, request):  # license_plate: below
    decision = resolve_compile("auto", "cuda", _module(task, request).compile_plan())
    assert (decision.on, decision.mode) == (on, mode) and decision.reason


def test_a_task_where_compile_does_not_pay_stays_eager_under_auto_on_a_gpu(caplog):
    from lightning_modules.license_plate import LicensePlateModule

    module = LicensePlateModule(min_size=128, max_size=160)
    module.trainer = SimpleNamespace(datamodule=None, strategy=SimpleNamespace(root_device=torch.device("cuda")),
                                     is_global_zero=True)
    with caplog.at_level(logging.INFO):
        module.setup("fit")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile:")]
    assert lines == ["compile: off (detection: per-image sizes and data-dependent proposal counts (NMS, box "
                     "sampling) recompile and break graphs, so it stays eager)"]
    assert not module.compile_decision.on


def test_the_batch_size_finder_and_sharded_parameters_keep_auto_eager(make_config):
    from common.parallel import PipelineStages
    from lightning_modules.clinical import ClinicalForecaster
    from suite import fast_path as suite_fast_path

    module = ClinicalForecaster(sequence_length=96, patch_len=24, d_model=16, d_ff=32)
    suite_fast_path.prepare(make_config("model=clinical", "mode=tune_batch_size"), module)
    assert resolve_compile("auto", "cuda", module.compile_plan(), module.compile_refusal).line() == \
        "compile: off (mode=tune_batch_size: every trial is a new batch shape)"
    sharded = ClinicalForecaster(sequence_length=96, patch_len=24, d_model=16, d_ff=32)
    stages = type("Stages", (PipelineStages,), {"root_device": torch.device("cuda")})()
    sharded.trainer = SimpleNamespace(datamodule=None, strategy=stages)
    sharded.setup("validate")
    assert not sharded.compile_decision.on and "FSDP" in sharded.compile_decision.reason


def test_channels_last_auto_is_on_for_a_convolutional_network_on_a_gpu_only():
    from suite.fast_path import channels_last

    conv, mlp = SimpleNamespace(convolutional="the U-Net"), SimpleNamespace(convolutional=None)
    assert channels_last("auto", "cuda", conv) == (True, "the U-Net is convolutional")
    assert channels_last("auto", "cpu", conv) == (False, "cpu")
    assert channels_last("auto", "cuda", mlp) == (False, "no convolutional network")
    assert channels_last(True, "cpu", mlp) == (True, "channels_last=true")  # asked for: applied anywhere


def test_channels_last_auto_leaves_the_diffusion_unet_alone_and_says_why_but_not_the_detector():
    from lightning_modules.diffusion.module import DiffusionModule
    from lightning_modules.license_plate.module import LicensePlateModule
    from suite.fast_path import channels_last

    on, why = channels_last("auto", "cuda", DiffusionModule)
    assert not on and "GroupNorm" in why  # measured slower on NHWC weights (BENCHMARKS.md)
    assert channels_last("auto", "cuda", LicensePlateModule) == (True, "the detector is convolutional")
    assert channels_last(True, "cuda", DiffusionModule) == (True, "channels_last=true")


# ---- what a run prints and logs -------------------------------------------------------------------
def test_the_start_up_lines_list_each_setting_once_and_time_to_first_step_is_logged(make_config, tmp_path, caplog,
                                                                                    monkeypatch):
    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO):
        run(make_config("model=clinical", *CLINICAL, "max_epochs=1", "trainer.limit_train_batches=2",
                        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"))
    lines = [r.getMessage() for r in caplog.records]
    for start in ("compile: off (cpu)", "fused optimizer: on (Adam, optimizer.fused=true)", "TF32 matmuls: off (cpu)",
                  "precision: 32-true (precision=auto)", "channels-last: off (cpu)", "attention: sdpa",
                  "loaders: in the main process", "first optimizer step"):
        assert len([line for line in lines if line.startswith(start)]) == 1, start
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # compile is off: no cache set up
    with open(next((tmp_path / "run").rglob("metrics.csv"))) as f:
        first = [float(r["perf/time_to_first_step_s"]) for r in csv.DictReader(f) if r.get("perf/time_to_first_step_s")]
    assert len(first) == 1 and first[0] > 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]["perf/time_to_first_step_s"] > 0


@pytest.mark.parametrize("setting", [True, False])
def test_the_compile_cache_is_set_up_only_when_compile_is_on(setting, tmp_path, monkeypatch):
    from lightning_modules.clinical import ClinicalForecaster

    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    module = ClinicalForecaster(sequence_length=96, patch_len=24, d_model=16, d_ff=32, compile=setting)
    module.compile_cache_dir = str(tmp_path / "compile_cache")
    module.trainer = SimpleNamespace(datamodule=None, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module.setup("validate")
    assert module.compile_decision.on == setting
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == (str(tmp_path / "compile_cache") if setting else None)
    assert (tmp_path / "compile_cache").is_dir() == setting


# ---- compiling ------------------------------------------------------------------------------------
def test_under_cuda_graphs_outputs_are_copied_out_of_the_replayed_memory(monkeypatch):
    kept = torch.ones(3)
    Pair = namedtuple("Pair", "a b")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the wrapper alone: replays need a GPU
    cuda_graphs = resolve_compile("auto", "cuda", STATIC)
    for output, parts in ((kept, lambda o: [o]), ((kept, [kept]), lambda o: [o[0], o[1][0]]),
                          (Pair(kept, kept), lambda o: [o.a, o.b]), ({"x": kept}, lambda o: [o["x"]])):
        result = compiled(lambda output=output: output, cuda_graphs)()
        assert all(p.data_ptr() != kept.data_ptr() and torch.equal(p, kept) for p in parts(result))
    plain = compiled(lambda: kept, resolve_compile(True, "cuda", CompilePlan(True, "x")))()
    assert plain is kept


def test_the_graph_counter_reads_torchs_dynamo_counters():
    before = graphs_compiled()
    torch.compile(lambda x: x * 3 + 1, backend="eager")(torch.ones(2))
    assert graphs_compiled() == before + 1, "torch._dynamo.utils.counters['stats']['unique_graphs'] moved"


def test_recompilations_are_counted_and_grow_when_each_epoch_recompiles(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", False)  # a new size: a recompile
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    logged = []
    trainer = SimpleNamespace(global_step=0, callback_metrics={}, is_global_zero=True,
                              loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(dict(m)))],
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module = SimpleNamespace(compile_decision=resolve_compile(True, "cpu", STATIC))
    callback = CompileCost()
    callback.on_fit_start(trainer, module)
    fn = torch.compile(lambda x: x.sin() * 2, backend="eager")
    for size in (2, 3, 4):  # one "epoch" each, each with a new shape
        fn(torch.ones(size))
        callback.on_train_epoch_end(trainer, module)
    callback.on_fit_end(trainer, module)
    assert [m["perf/recompiles"] for m in logged] == [0, 1, 2, 2]
    assert logged[-1]["perf/compiled_graphs"] == 3 and float(trainer.callback_metrics["perf/recompiles"]) == 2
    counter = CompileCounter().start()  # and stopped again: torch's log settings are its defaults
    counter.stop()


@pytest.mark.slow
def test_compiled_clinical_reaches_the_eager_validation_rmse(tmp_path):
    """model.compile=true on CPU (inductor) trains to the eager run's val/rmse within 0.5%, after 4 epochs at
    a learning rate that moves it (dropout off: compiled dropout draws other random numbers)."""
    from tests.conftest import compose_config

    scores = []
    for setting in ("false", "true"):
        out = tmp_path / setting
        run(compose_config(out, "model=clinical", *CLINICAL, "model.net.dropout=0.0", "optimizer.lr=3e-3", "max_epochs=4",
                           f"model.compile={setting}"))
        scores.append(json.loads((out / "run" / "result.json").read_text())["metrics"]["val/rmse"])
    eager, compiled_rmse = scores
    assert compiled_rmse == pytest.approx(eager, rel=5e-3)
