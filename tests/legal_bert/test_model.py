"""legal_bert module: loss and metric conventions, checkpoints, learning, offline loading."""
from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch

from datamodules.legal_bert import LegalTextDataModule
from lightning_modules.legal_bert import LegalBertClassifier
from tests.legal_bert.conftest import write_jsonl


def trainer(**kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**base, **kw})


def adamw(lr):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)


# ---- conventions ----------------------------------------------------------------------------------
def test_lexglue_none_column_metrics_hand_computed(tiny_bert_dir):
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["A", "B"], multi_label=True,
                                plot_every_n_epochs=0)
    preds = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0]])
    target = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 1]])
    assert model.with_none_column(preds).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]]
    metrics = model._metrics("val/")
    metrics.update(model.with_none_column(preds), model.with_none_column(target))
    values = metrics.compute()
    # columns A, B, none: TP 1/0/1, FP 0/1/1, FN 1/1/0
    # micro: TP=2, FP=2, FN=2 -> F1 = 2*2 / (2*2+2+2) = 0.5; per class F1: 2/3, 0, 2/3
    assert values["val/micro_f1"].item() == pytest.approx(0.5)
    assert values["val/class_f1"].tolist() == pytest.approx([2 / 3, 0.0, 2 / 3])
    assert values["val/macro_f1"].item() == pytest.approx(4 / 9)


def test_multilabel_thresholds_and_losses(tiny_bert_dir):
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["A", "B", "C"], multi_label=True,
                                thresholds=[0.5, 0.9, 0.1], label_smoothing=0.0)
    probs = torch.tensor([[0.6, 0.8, 0.2], [0.4, 0.95, 0.05]])
    assert model.decide(probs).tolist() == [[1, 0, 1], [0, 1, 0]]
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    expected = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(1 - torch.sigmoid(torch.tensor(-1.0)))
                 + torch.log(torch.tensor(0.5))) / 3
    assert model.loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    model.hparams.label_smoothing = 0.2   # multi-label too: targets 1 -> 0.9, 0 -> 0.1
    smoothed = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.9, 0.1, 0.9]]))
    assert model.loss(logits, labels).item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert smoothed.item() != pytest.approx(expected.item(), rel=1e-3)

    multiclass = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["x", "y"], multi_label=False,
                                     label_smoothing=0.2)
    logits = torch.tensor([[1.0, 0.0]])
    logp = torch.log_softmax(logits, -1)[0]
    expected = -(0.9 * logp[0] + 0.1 * logp[1])  # smoothing 0.2 over 2 classes: 0.9 / 0.1
    assert multiclass.loss(logits, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-5)
    assert multiclass.decide(torch.tensor([[0.3, 0.7]])).tolist() == [1]
    with pytest.raises(ValueError, match="thresholds has 2 values for 3 labels"):
        LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["A", "B", "C"], multi_label=True,
                            thresholds=[0.5, 0.5])


def test_balanced_class_weights_from_training_counts(tiny_bert_dir, tmp_path):
    rows = [{"text": f"t{i}", "labels": ["A"] if i < 2 else (["B"] if i < 8 else [])} for i in range(10)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", [{"text": "v", "labels": ["A"]}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "w", "labels": ["B"]}])
    dm = LegalTextDataModule(loader={"batch_size": 4}, format="jsonl", data_dir=str(tmp_path),
                             tokenizer_path=str(tiny_bert_dir), max_sequence_length=16, cache_dir=str(tmp_path / "c"))
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), class_weights="balanced", optimizer=adamw(1e-3))
    trainer(max_steps=1, limit_val_batches=0).fit(model, dm)
    # pos_weight = negatives / positives: A 8/2, B 4/6
    assert model.class_weight.tolist() == pytest.approx([4.0, 4 / 6])


def test_missing_pretrained_path_is_a_clear_error_without_network(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("tried to reach the network"))
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained_path=.*legal-bert-base-uncased does not exist"):
        LegalBertClassifier(pretrained_path=str(tmp_path / "legal-bert-base-uncased"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LegalBertClassifier(pretrained_path=str(tmp_path / "empty"))


def test_bundled_minilm_is_the_default_encoder():
    model = LegalBertClassifier(label_names=["a", "b"], multi_label=False)
    assert model.encoder.config.hidden_size == 384 and model.encoder.config.num_hidden_layers == 6
    assert model.encoder.config._attn_implementation == "sdpa"
    assert model.encoder.training  # dropout active when fine-tuning
    groups = model.parameter_groups()
    no_decay = {id(p) for p in groups[1]["params"]}
    ln = model.encoder.embeddings.LayerNorm
    assert id(ln.weight) in no_decay and id(ln.bias) in no_decay and id(model.head.bias) in no_decay
    assert id(model.head.weight) not in no_decay


# ---- checkpoints and learning ---------------------------------------------------------------------
def _separable(tmp_path, n=24):
    words = {"arbitration": "arbitration tribunal arbitrator binding", "liability": "liable damages losses harm"}
    rows = []
    for i in range(n):
        label = "arbitration" if i % 2 else "liability"
        rows.append({"text": f"clause {i}: " + words[label], "label": label, "doc_id": f"d{i}"})
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", rows[:8])
    write_jsonl(tmp_path / "test.jsonl", rows[8:12])


def test_save_and_reload_gives_identical_predictions(tiny_bert_dir, tmp_path):
    _separable(tmp_path)
    dm = LegalTextDataModule(loader={"batch_size": 8}, format="jsonl", data_dir=str(tmp_path),
                             tokenizer_path=str(tiny_bert_dir), max_sequence_length=32, cache_dir=str(tmp_path / "c"))
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), thresholds=0.5, optimizer=adamw(1e-3),
                                plot_every_n_epochs=0)
    t = trainer(max_steps=3, limit_val_batches=0)
    t.fit(model, dm)
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    reloaded = LegalBertClassifier.load_from_checkpoint(path, weights_only=False)
    assert reloaded.label_names == ["arbitration", "liability"] and reloaded.multi_label is False
    assert not any("_orig_mod" in k for k in torch.load(path, weights_only=False)["state_dict"])
    batch = next(iter(dm.val_dataloader()))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"])
        b = reloaded(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)


def test_f1_rises_on_a_tiny_separable_set(tmp_path):
    _separable(tmp_path, n=32)
    dm = LegalTextDataModule(loader={"batch_size": 8}, format="jsonl", data_dir=str(tmp_path),
                             max_sequence_length=32, cache_dir=str(tmp_path / "c"))
    torch.manual_seed(0)
    model = LegalBertClassifier(optimizer=adamw(1e-4), plot_every_n_epochs=0, label_smoothing=0.0, head_lr=1e-3)
    t = trainer(max_epochs=3)
    before = t.validate(model, dm, verbose=False)[0]["val/micro_f1"]
    t.fit(model, dm)
    after = t.callback_metrics["val/micro_f1"].item()
    assert after >= 0.95 and after > before


def test_gradient_checkpointing_and_compile_keep_plain_state_dict(tiny_bert_dir, tmp_path):
    _separable(tmp_path, n=12)
    dm = LegalTextDataModule(loader={"batch_size": 4}, format="jsonl", data_dir=str(tmp_path),
                             tokenizer_path=str(tiny_bert_dir), max_sequence_length=16, cache_dir=str(tmp_path / "c"))
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), gradient_checkpointing=True, compile=True,
                                optimizer=adamw(1e-3), plot_every_n_epochs=0)
    assert getattr(model.encoder, "is_activation_checkpointing", None) or model.encoder.is_gradient_checkpointing
    dm.setup("fit")
    model.trainer = None
    model._build_head(dm.label_names, dm.multi_label, None)
    model.__dict__["_compiled_encoder"] = torch.compile(model.encoder, dynamic=True)  # what setup does
    assert not any("_orig_mod" in k or "compiled" in k for k in model.state_dict())
    batch = next(iter(dm.train_dataloader()))
    del model.__dict__["_compiled_encoder"]  # compiling for real takes too long for a CPU unit test
    model.train()
    loss = model.loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    loss.backward()
    assert model.head.weight.grad is not None


def test_predictions_file_holds_labels_and_probabilities(tiny_bert_dir, tmp_path):
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["A", "B"], multi_label=True,
                                thresholds=[0.5, 0.5])
    preds = [{"index": torch.tensor([1, 0]), "probs": torch.tensor([[0.9, 0.2], [0.1, 0.6]]), "text": ["y", "x"]}]
    path = model.save_predictions(preds, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["x", "y"]
    assert rows[0]["labels"] == ["B"] and rows[1]["labels"] == ["A"]
    assert rows[1]["probabilities"] == {"A": pytest.approx(0.9), "B": pytest.approx(0.2)}


def test_thresholds_tuned_on_validation_per_label(tiny_bert_dir):
    from types import SimpleNamespace

    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["A", "B"], multi_label=True,
                                tune_thresholds=True)
    model.trainer = SimpleNamespace(world_size=1)
    probs = torch.tensor([[0.30, 0.9], [0.35, 0.8], [0.10, 0.1], [0.20, 0.7]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    model._val_outputs = [(probs[:2], labels[:2]), (probs[2:], labels[2:])]
    model._tune_thresholds()
    # A: any threshold in (0.20, 0.30] separates perfectly; of 0.25 and 0.30 the one nearer 0.5 wins.
    # B: no positives on validation, so its threshold stays 0.5
    assert model.thresholds.tolist() == pytest.approx([0.30, 0.5])
    assert model.decide(torch.tensor([[0.31, 0.6]])).tolist() == [[1, 1]]


def test_validation_f1_is_scored_with_the_thresholds_it_tunes(tiny_bert_dir, monkeypatch):
    """The checkpoint picked by val F1 is saved with this pass's thresholds, so val F1 must use them."""
    from types import SimpleNamespace

    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["A", "B"], multi_label=True,
                                tune_thresholds=True, plot_every_n_epochs=0)
    model.trainer = SimpleNamespace(world_size=1, sanity_checking=False, state=SimpleNamespace(fn="fit"))
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(model, "log_dict", lambda values, **_: logged.update({k: float(v) for k, v in values.items()}))
    model.on_validation_epoch_start()
    # A's positives score 0.3 to 0.4: missed at 0.5, all caught once A's threshold is tuned on this pass
    probs = torch.tensor([[0.30, 0.9], [0.40, 0.1], [0.10, 0.8], [0.05, 0.2]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    model._val_outputs = [(probs, labels)]
    model.on_validation_epoch_end()
    assert model.thresholds[0].item() == pytest.approx(0.30)
    assert logged["val/micro_f1"] == pytest.approx(1.0) and logged["val/f1/A"] == pytest.approx(1.0)
    assert model._val_outputs == []


def test_head_bias_starts_at_the_label_prior(tiny_bert_dir):
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir))
    model._build_head(["A", "B"], True, torch.tensor([10.0, 50.0]), 100)
    assert model.head.bias.tolist() == pytest.approx([torch.log(torch.tensor(0.1 / 0.9)).item(), 0.0], abs=1e-6)
    single = LegalBertClassifier(pretrained_path=str(tiny_bert_dir))
    single._build_head(["x", "y"], False, torch.tensor([25.0, 75.0]), 100)
    assert torch.softmax(single.head.bias, 0).tolist() == pytest.approx([0.25, 0.75], abs=1e-6)


def test_pooling_auto_follows_the_checkpoint_and_head_lr_group(tiny_bert_dir):
    assert LegalBertClassifier(pretrained_path=str(tiny_bert_dir)).pooling == "pooler"  # plain BERT directory
    model = LegalBertClassifier(label_names=["a", "b"], multi_label=False, head_lr=1e-3)
    assert model.pooling == "mean"  # all-MiniLM-L6-v2: sentence-transformers mean pooling
    groups = model.parameter_groups()
    head = [g for g in groups if any(p is model.head.weight or p is model.head.bias for p in g["params"])]
    assert all(g.get("lr") == 1e-3 for g in head) and sum(len(g["params"]) for g in head) == 2
    assert {g.get("weight_decay") for g in head} == {None, 0.0}  # head weight decays, head bias does not
    rest = [g for g in groups if g not in head]
    assert all("lr" not in g for g in rest)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert len(trainable) == len(list(model.parameters())) - 2  # the unused BERT pooler is frozen
