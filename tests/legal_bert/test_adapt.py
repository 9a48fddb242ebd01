"""Training on every non-test document (data.val_fraction=0) and masked-LM adaptation (legal_bert_mlm)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from datamodules.legal_bert import LegalTextDataModule
from suite.train import run
from tests.legal_bert.conftest import write_claudette

SENTENCES = [
    ("Any dispute shall be resolved by binding arbitration in London.", ["A"]),
    ("The courts of Ireland have exclusive jurisdiction over any claim.", ["J"]),
    ("We may update these terms at any time without notice.", []),
    ("You can delete your account from the settings page.", []),
]


def corpus(root, docs=6):
    """docs documents of the same four sentences, each sentence varied by its document's name."""
    return write_claudette(root, {f"doc{d}": [(f"{text} ({d})", labels) for text, labels in SENTENCES]
                                  for d in range(docs)})


def datamodule(root, tokenizer_dir, **overrides):
    settings = dict(format="claudette", data_dir=str(root), test_documents=["doc0"], categories=["A", "J"],
                    tokenizer_path=str(tokenizer_dir), loader={"batch_size": 4, "num_workers": 0},
                    cache_dir=str(root / "cache"))
    dm = LegalTextDataModule(**{**settings, **overrides})
    dm.setup("fit")
    return dm


def test_val_fraction_zero_trains_on_every_non_test_document(tmp_path, tiny_bert_dir):
    dm = datamodule(corpus(tmp_path), tiny_bert_dir, val_fraction=0.0)
    assert len(dm.val_set) == 0 and dm.val_dataloader() == []  # Lightning skips validation
    assert dm.split_documents["train"] == [f"doc{d}" for d in range(1, 6)]
    assert dm.split_documents["test"] == ["doc0"]
    # naming validation documents still gives a validation split
    dm = datamodule(corpus(tmp_path / "named"), tiny_bert_dir, val_fraction=0.0, val_documents=["doc5"])
    assert dm.split_documents["validation"] == ["doc5"] and len(dm.val_set) == 4


def test_an_empty_validation_file_is_an_error_even_with_val_fraction_zero(tmp_path, tiny_bert_dir):
    from datamodules.legal_bert.formats import DataFormatError
    from tests.legal_bert.conftest import write_jsonl

    rows = [{"text": text, "labels": labels} for text, labels in SENTENCES]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "   ", "labels": []}])  # only a blank example: skipped
    with pytest.raises(DataFormatError, match="The validation split is empty"):
        LegalTextDataModule(format="jsonl", data_dir=str(tmp_path), val_fraction=0.0, tokenizer_path=str(tiny_bert_dir),
                            cache_dir=str(tmp_path / "cache")).setup("fit")


def test_masked_lm_batches_mask_only_real_tokens_and_label_only_the_masked(tmp_path, tiny_bert_dir):
    plain = datamodule(corpus(tmp_path), tiny_bert_dir, val_fraction=0.0, group_by_length=False)
    masked = datamodule(corpus(tmp_path), tiny_bert_dir, val_fraction=0.0, group_by_length=False,
                        mlm_probability=0.3)
    items = [plain.train_set[i] for i in range(len(plain.train_set))]
    torch.manual_seed(0)
    batch = masked._collator(masked.train_set)(items)
    original = plain._collator(plain.train_set)(items)["input_ids"]
    labels, special = batch["labels"], torch.tensor(masked.tokenizer.all_special_ids)
    chosen = labels != -100
    assert torch.equal(labels[chosen], original[chosen])              # the label is the token that was there
    assert not torch.isin(original[chosen], special).any()            # [CLS], [SEP], [PAD] are never chosen
    assert torch.equal(batch["attention_mask"].sum(1), (original != masked.tokenizer.pad_token_id).sum(1))
    real = ~torch.isin(original, special)
    assert 0.15 < chosen.sum() / real.sum() < 0.45                    # about 30% of real tokens
    replaced = batch["input_ids"][chosen] == masked.tokenizer.mask_token_id
    assert 0.5 < replaced.float().mean() < 0.95                       # most chosen tokens become [MASK] (80%)
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    with pytest.raises(ValueError, match="data.mlm_probability=1.5"):
        LegalTextDataModule(mlm_probability=1.5)


def test_adaptation_lowers_the_masked_lm_loss_and_exports_an_encoder_legal_bert_loads(make_config, tmp_path,
                                                                                       tiny_bert_dir):
    from lightning_modules.legal_bert import LegalBertClassifier
    from lightning_modules.legal_bert.adapt import LegalBertMaskedLM

    root = corpus(tmp_path / "corpus")
    cfg = make_config("model=legal_bert_mlm", f"model.pretrained_path={tiny_bert_dir}", "data.format=claudette",
                      f"data.data_dir={root}", "data.test_documents=[doc0]", "data.categories=[A,J]",
                      "data.val_fraction=0", "max_epochs=40", "batch_size=20", "optimizer.lr=1e-2",
                      "trainer.log_every_n_steps=1", "data.mlm_probability=0.3")
    run(cfg)
    out = tmp_path / "run"
    rows = [r for r in csv.DictReader(open(out / "csv" / "metrics.csv")) if r.get("train/loss")]
    first, last = float(rows[0]["train/loss"]), sum(float(r["train/loss"]) for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)                          # it learns the sentences' words

    encoder = out / "encoder"
    note = json.loads((encoder / "adaptation.json").read_text())
    assert note["adapted_from"] == str(tiny_bert_dir) and note["optimizer_steps"] == 40
    assert (encoder / "config.json").is_file() and (encoder / "tokenizer.json").is_file()
    adapted = LegalBertMaskedLM.load_from_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=True)
    classifier = LegalBertClassifier(pretrained_path=str(encoder), label_names=["A", "J"], multi_label=True)
    for name, weight in adapted.model.base_model.state_dict().items():
        assert torch.equal(classifier.encoder.state_dict()[name], weight), name  # the adapted weights, not the source's
    source = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=["A", "J"], multi_label=True)
    assert not torch.equal(source.encoder.embeddings.word_embeddings.weight,
                           classifier.encoder.embeddings.word_embeddings.weight)


def test_unfair_tos_experiments_share_one_split_and_the_adapted_encoder_keeps_mean_pooling(make_config, minilm_dir,
                                                                                           tmp_path):
    from lightning_modules.legal_bert.pretrained import trained_pooling

    fine_tune = make_config("experiment=unfair_tos", "data.data_dir=/corpus")
    adapt = make_config("experiment=unfair_tos_adapt", "data.data_dir=/corpus")
    assert fine_tune.task_name == "legal_bert" and adapt.task_name == "legal_bert_mlm"
    for key in ("format", "test_documents", "categories", "val_fraction"):
        assert fine_tune.data[key] == adapt.data[key], key
    assert len(fine_tune.data.test_documents) == 21 and fine_tune.data.val_fraction == 0
    assert fine_tune.data.mlm_probability is None and adapt.data.mlm_probability == 0.15
    assert fine_tune.model.tune_thresholds is False and fine_tune.model.thresholds == 0.5
    # the MiniLM was trained with mean pooling; its adapted copy says so too (1_Pooling travels with it)
    from lightning_modules.legal_bert.adapt import LegalBertMaskedLM

    module = LegalBertMaskedLM(pretrained_path=str(minilm_dir))
    module.export(tmp_path / "encoder")
    assert trained_pooling(minilm_dir) == "mean" and trained_pooling(tmp_path / "encoder") == "mean"
