"""legal_bert through the shared machinery: fit, plots, checkpoint, then mode=predict on a text file."""
from __future__ import annotations

import json

import pytest
import torch

from suite.train import run
from tests.conftest import SHARED_DATA, compose_config

SMALL = ("data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8")


def test_task_config_values(make_config):
    cfg = make_config("model=legal_bert")
    assert cfg.task_name == "legal_bert"
    assert cfg.monitor.metric == "val/micro_f1" and cfg.monitor.mode == "max"
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.optimizer.lr == 2.0e-5 and cfg.optimizer.weight_decay == 0.01
    assert cfg.scheduler.builder._target_ == "suite.schedules.linear" and cfg.scheduler.builder.warmup > 0
    assert cfg.data.max_sequence_length == 512 and cfg.data.format == "auto" and cfg.data.data_dir is None
    assert cfg.model.pretrained_path is None and cfg.data.tokenizer_path is None


def test_fit_then_predict_through_run(make_config, tmp_path, tiny_bert_dir):
    model = f"model.pretrained_path={tiny_bert_dir}"
    cfg = make_config("model=legal_bert", "debug=fast_dev_run", model, *SMALL)
    run(cfg)
    out = tmp_path / "run"
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert any(p.startswith("val_class_f1") for p in plots) and any(p.startswith("val_attention_0") for p in plots)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    texts = tmp_path / "clauses.txt"
    texts.write_text("In no event shall the Company be liable for lost profits.\n\nThis Agreement is governed by the "
                     "laws of Ireland.\n", encoding="utf-8")
    # a second run dir: the evaluation must not collide with the training run's
    cfg = compose_config(tmp_path / "predict", "model=legal_bert", "mode=predict", f"ckpt_path={ckpt}",
                         f"data.predict_file={texts}", "debug=default")
    run(cfg)
    found = tmp_path / "predict" / "run" / "predictions.jsonl"
    assert found.is_file()
    rows = [json.loads(line) for line in found.read_text().splitlines()]
    assert [r["text"][:8] for r in rows] == ["In no ev", "This Agr"]  # input order, empty line skipped
    assert isinstance(rows[0]["labels"], list) and len(rows[0]["probabilities"]) == 6


@pytest.mark.skipif(not (SHARED_DATA / "legal" / "claudette_ToS_50").is_dir(), reason="no shared CLAUDETTE data")
def test_unfair_tos_experiment_reads_the_real_corpus(make_config):
    from hydra.utils import instantiate

    cfg = make_config("experiment=unfair_tos", f"data.data_dir={SHARED_DATA / 'legal' / 'claudette_ToS_50'}")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.multi_label and dm.label_names == ["LTD", "TER", "CH", "CR", "USE", "LAW", "J", "A"]
    assert len(dm.split_documents["test"]) == 21
    assert not set(dm.split_documents["test"]) & set(dm.split_documents["train"] + dm.split_documents["validation"])
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 9414 - dm.skipped_empty
    assert int(dm.train_set.targets.sum() + dm.val_set.targets.sum() + dm.test_set.targets.sum()) > 1000


@pytest.mark.skipif(not (SHARED_DATA / "legal" / "legalbench_unfair_tos").is_dir(), reason="no shared LegalBench data")
def test_legalbench_experiment_fixes_permuted_label_names(make_config):
    from hydra.utils import instantiate

    cfg = make_config("experiment=legalbench_unfair_tos",
                      f"data.data_dir={SHARED_DATA / 'legal' / 'legalbench_unfair_tos'}")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    counts = {}
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        for i in ds.targets.tolist():
            counts[dm.label_names[i]] = counts.get(dm.label_names[i], 0) + 1
    # true counts from PROVENANCE.md (matched back to CLAUDETTE's Labels_* files)
    assert counts["Limitation of liability"] == 99 and counts["Arbitration"] == 16
    assert counts["Unilateral termination"] == 72 and counts["Other"] == 3480
    texts = dm.train_set.texts + dm.val_set.texts + dm.test_set.texts
    labels = [dm.label_names[i] for ds in (dm.train_set, dm.val_set, dm.test_set) for i in ds.targets.tolist()]
    arbitration = [t for t, lab in zip(texts, labels, strict=True) if lab == "Arbitration"]
    assert sum("arbitrat" in t for t in arbitration) >= len(arbitration) * 0.8


def test_hf_trainer_peer_trains_the_same_module_under_the_bench_timer(tmp_path):
    """legal_bert's peer in `make bench`: the Hugging Face Trainer runs the suite's module and data
    for the harness's steps and reports through the same timer."""
    from bench import harness

    rows = harness.main(["--tasks", "legal_bert", "--impls", "peer", "--warmup", "1", "--steps", "1", "--windows", "1",
                         "-o", "legal_bert:batch_size=4", "-o", "legal_bert:data.max_sequence_length=32",
                         "--out", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["impl"] == "peer: HF Trainer" and "error" not in rows[0]
    assert rows[0]["items_per_sec"] > 0 and rows[0]["precision"] == "32-true"


def test_hf_trainer_peer_compiles_the_whole_model_once(tmp_path, monkeypatch):
    """Under compile, the Trainer compiles the model itself; the module's own compiled encoder is
    dropped first (both at once failed in dynamo on the H100)."""
    import importlib

    from bench.harness import prepare_task
    from common.timing import Windows
    from lightning_modules.legal_bert import benchmark

    seen = {}

    class Capture:
        def __init__(self, model, args, **kw):
            seen["inner"], seen["compile"] = model.inner, args.torch_compile

        def train(self):
            pass

    overrides = ["model=legal_bert", "device=cpu", "num_workers=0", "model.compile=true", "batch_size=4",
                 "data.max_sequence_length=32"]
    assert "_compiled_encoder" in vars(prepare_task(tmp_path / "a", overrides, torch.device("cpu"))[2])
    # the transformers module as the peer will import it (another test may have re-imported it)
    monkeypatch.setattr(importlib.import_module("transformers"), "Trainer", Capture)
    prepared = prepare_task(tmp_path / "b", overrides, torch.device("cpu"))
    benchmark.peer(tmp_path / "b", prepared, Windows(1, 1, 1, torch.device("cpu")))
    assert seen["compile"] is True and "_compiled_encoder" not in vars(seen["inner"])


def test_bench_profile_pads_every_batch_to_512(make_config):
    from hydra.utils import instantiate

    cfg = make_config("model=legal_bert", "experiment=bench_legal_bert")
    assert cfg.batch_size == 32 and cfg.data.max_sequence_length == 512
    dm = instantiate(cfg.data)
    assert dm.pad_to_multiple_of == dm.max_sequence_length == 512
