"""legal_bert data: formats, label maps, document splits, tokenisation, batching, bad input."""
from __future__ import annotations

import logging

import pytest
import torch

from datamodules.legal_bert import DataFormatError, LegalTextDataModule
from datamodules.legal_bert.datamodule import Collator, LengthGroupedSampler
from tests.legal_bert.conftest import write_claudette, write_jsonl


def make_dm(tmp_path, **kw) -> LegalTextDataModule:
    kw.setdefault("max_sequence_length", 32)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return LegalTextDataModule(loader={"batch_size": kw.pop("batch_size", 4), "num_workers": 0}, **kw)


def texts(dataset):
    return list(dataset.texts)


# ---- formats ---------------------------------------------------------------------------------------
def test_jsonl_multilabel_splits_and_targets(tmp_path):
    rows = [{"text": f"clause {i} about arbitration", "labels": ["A"] if i % 2 else [], "doc_id": f"d{i}"}
            for i in range(6)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "the courts of ireland", "labels": ["J"]}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "no label here", "labels": []}])
    dm = make_dm(tmp_path, format="auto", data_dir=str(tmp_path), label_names=["A", "J"])
    dm.setup("fit")
    assert dm.multi_label and dm.label_names == ["A", "J"]
    assert len(dm.train_set) == 6
    assert dm.val_set.targets.tolist() == [[0.0, 1.0]]
    assert dm.test_set.targets.tolist() == [[0.0, 0.0]]
    assert dm.train_set.targets[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert dm.label_counts.tolist() == [3.0, 0.0]


def test_jsonl_multiclass_integer_labels_index_label_names(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": 1}, {"text": "c d", "label": 0}])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "e", "label": 1}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "f", "label": 0}])
    dm = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path), label_names=["fair", "unfair"])
    dm.setup("fit")
    assert not dm.multi_label
    assert dm.train_set.targets.tolist() == [1, 0] and dm.val_set.targets.tolist() == [1]


def test_csv_with_quotes_and_multilabel_cells(tmp_path):
    (tmp_path / "train.csv").write_text(
        'text,labels,doc_id\n"a clause, with a comma",A|J,x\nplain text,"[""J""]",y\nnothing,,z\n', encoding="utf-8")
    (tmp_path / "test.csv").write_text("text,labels\nt,A\n", encoding="utf-8")
    (tmp_path / "val.csv").write_text("text,labels\nv,J\n", encoding="utf-8")
    dm = make_dm(tmp_path, format="auto", data_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.detected_format == "csv" and dm.multi_label
    assert texts(dm.train_set)[0] == "a clause, with a comma"
    assert dm.train_set.targets.tolist() == [[1, 1], [0, 1], [0, 0]]


def test_tsv_quote_none_and_label_map_fixes_permuted_names(tmp_path):
    # LegalBench's TSV: `` '' quote tokens, QUOTE_NONE, and label names to be renamed on load
    (tmp_path / "train.tsv").write_text(
        "text\tlabel\nyou agree to arbitration ( `` opt out '' ) \tContract by using\n"
        "we are not liable for damages \tArbitration\nwelcome to the site \tOther\n", encoding="utf-8")
    (tmp_path / "test.tsv").write_text("text\tlabel\nno liability \tArbitration\n", encoding="utf-8")
    (tmp_path / "validation.tsv").write_text("text\tlabel\nhello \tOther\n", encoding="utf-8")
    label_map = {"Contract by using": "Arbitration", "Arbitration": "Limitation of liability"}  # swapped at once
    dm = make_dm(tmp_path, format="tsv", data_dir=str(tmp_path), label_map=label_map)
    dm.setup("fit")
    assert texts(dm.train_set)[0] == "you agree to arbitration ( `` opt out '' ) "
    assert dm.label_names == ["Arbitration", "Limitation of liability", "Other"]
    names = [dm.label_names[i] for i in dm.train_set.targets.tolist()]
    assert names == ["Arbitration", "Limitation of liability", "Other"]
    assert dm.label_names[int(dm.test_set.targets[0])] == "Limitation of liability"


def test_claudette_layout_and_document_split(tmp_path):
    docs = {f"Doc{i}": [(f"sentence {i}.{j} arbitration", ["A"] if j == 0 else []) for j in range(4)]
            for i in range(8)}
    docs["Doc0"][1] = ("the courts of ireland and arbitration", ["A", "J"])
    write_claudette(tmp_path / "c", docs)
    dm = make_dm(tmp_path, format="auto", data_dir=str(tmp_path / "c"), categories=["A", "J"],
                 test_documents=["doc0", "Doc1"], val_fraction=0.25)
    dm.setup("fit")
    assert dm.detected_format == "claudette" and dm.multi_label and dm.label_names == ["A", "J"]
    assert dm.split_documents["test"] == ["Doc0", "Doc1"]
    all_docs = [set(v) for v in dm.split_documents.values()]
    assert sum(len(d) for d in all_docs) == 8 and set.union(*all_docs) == set(docs)  # no document in two splits
    assert len(dm.split_documents["validation"]) == 2
    i = texts(dm.test_set).index("the courts of ireland and arbitration")
    assert dm.test_set.targets[i].tolist() == [1.0, 1.0]


def test_missing_splits_cut_by_document_without_leakage(tmp_path):
    rows = [{"text": f"text {d} {k}", "label": "x" if k % 2 else "y", "doc_id": f"doc{d}"}
            for d in range(20) for k in range(5)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    dm = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    splits = {name: set(ds.docs) for name, ds in
              (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set))}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    assert not (splits["val"] & splits["test"])
    assert len(dm.val_set) == 20 and len(dm.test_set) == 20 and len(dm.train_set) == 60


def test_synthetic_default_is_generated_once_into_the_suites_cache(tmp_path):
    folder = make_dm(tmp_path, synthetic_docs=10)._source_dir()
    assert folder.parent == tmp_path / "cache"
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    assert make_dm(tmp_path, synthetic_docs=10)._source_dir() == folder
    assert (folder / "train.jsonl").stat().st_mtime_ns == stamp
    dm = make_dm(tmp_path, synthetic_docs=10)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.multi_label and len(dm.label_names) == 6
    assert (dm.train_set.targets.sum(1) == 2).any() and (dm.train_set.targets.sum(1) == 0).any()
    single = make_dm(tmp_path, synthetic_docs=10, multi_label=False)
    single.setup("fit")
    assert not single.multi_label and "other" in single.label_names


# ---- tokenisation and batching ---------------------------------------------------------------------
def test_truncation_padding_and_token_cache(tmp_path, monkeypatch):
    long = " ".join(["liability"] * 100)
    write_jsonl(tmp_path / "train.jsonl", [{"text": long, "label": "a"}, {"text": "short", "label": "b"},
                                           {"text": "a medium length clause here", "label": "a"}])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "a"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "y", "label": "b"}])
    dm = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path), max_sequence_length=16, pad_to_multiple_of=8)
    dm.setup("fit")
    tok = dm.tokenizer
    assert dm.train_set.lengths[0] == 16  # truncated
    first = dm.train_set[0]["input_ids"]
    assert first[0] == tok.cls_token_id and first[-1] == tok.sep_token_id
    batch = Collator(tok.pad_token_id, 8)([dm.train_set[1], dm.train_set[2]])
    n_short, n_mid = dm.train_set.lengths[1], dm.train_set.lengths[2]
    assert batch["input_ids"].shape == (2, 8)  # longest (7) rounded up to a multiple of 8
    assert batch["attention_mask"].sum(1).tolist() == [n_short, n_mid]
    assert (batch["input_ids"][0, n_short:] == tok.pad_token_id).all()
    # second setup reads the cache: the tokenizer is never called
    assert list((tmp_path / "cache").glob("tokens-*.pt"))
    again = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path), max_sequence_length=16)
    monkeypatch.setattr(type(again), "tokenizer", property(lambda self: pytest.fail("tokenizer was called")))
    again.setup("fit")
    assert torch.equal(again.train_set.ids, dm.train_set.ids)
    monkeypatch.undo()
    # a different max length is a different cache entry
    other = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path), max_sequence_length=8)
    other.setup("fit")
    assert other.train_set.lengths[0] == 8


def test_length_grouped_sampler_groups_and_reshuffles():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47] * 4
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, mega_batches=8)
    sampler.set_epoch(0)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i:i + 4] for i in range(0, len(order), 4)]
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spread) <= 3  # each batch holds similar lengths
    assert lengths[batches[0][0]] == 50  # longest batch first
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_train_loader_batches_are_padded_per_batch(tmp_path):
    dm = make_dm(tmp_path, synthetic_docs=6, batch_size=8)
    dm.setup("fit")
    widths = {b["input_ids"].shape[1] for b in dm.train_dataloader()}
    assert len(widths) > 1 and max(widths) <= 32


# ---- bad input ------------------------------------------------------------------------------------
def _three(tmp_path, train_rows, ext="jsonl"):
    write_jsonl(tmp_path / f"train.{ext}", train_rows)
    write_jsonl(tmp_path / "val.jsonl", [{"text": "v", "label": "a"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t", "label": "a"}])


def test_empty_text_is_skipped_and_counted(tmp_path, caplog):
    _three(tmp_path, [{"text": "  ", "label": "a"}, {"text": "ok", "label": "a"}, {"text": "", "label": "b"},
                      {"text": "fine", "label": "b"}])
    dm = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 2 and dm.skipped_empty == 2
    assert "Skipped 2 examples" in caplog.text


def test_non_utf8_names_file_and_line(tmp_path):
    _three(tmp_path, [])
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "a"}\n')
    dm = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path))
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: not valid UTF-8"):
        dm.setup("fit")


def test_unknown_label_names_file_and_line(tmp_path):
    _three(tmp_path, [{"text": "a", "label": "a"}, {"text": "b", "label": "b"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t", "label": "a"}, {"text": "u", "label": "zzz"}])
    dm = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path))
    with pytest.raises(DataFormatError, match=r"test\.jsonl:2: unknown label 'zzz'"):
        dm.setup("fit")
    dm = make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path), label_names=["a", "c"])
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: unknown label 'b'"):
        dm.setup("fit")


@pytest.mark.parametrize(("labels", "match"), [
    (3, r"train\.jsonl:2: labels is the number 3; multi-label data lists its labels"),
    (["A", {"x": 1}], r"train\.jsonl:2: label \{'x': 1\} is a dict"),
    ([0.5], r"train\.jsonl:2: label 0.5 is a float"),
    (True, r"train\.jsonl:2: label True is a bool"),
])
def test_a_multi_label_value_of_the_wrong_type_names_the_line(tmp_path, labels, match):
    _three(tmp_path, [{"text": "a", "labels": ["A"]}, {"text": "b", "labels": labels}])
    for split in ("val", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"text": "t", "labels": ["A"]}])
    with pytest.raises(DataFormatError, match=match):
        make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path)).setup("fit")


def test_capping_examples_keeps_every_label_of_the_data(tmp_path):
    full = make_dm(tmp_path, synthetic_docs=10)
    full.setup("fit")
    capped = make_dm(tmp_path, synthetic_docs=10, max_examples=3)
    capped.setup("fit")
    assert capped.label_names == full.label_names
    assert len(capped.train_set) == len(capped.val_set) == len(capped.test_set) == 3


def test_label_file_line_count_mismatch(tmp_path):
    docs = {"Doc0": [("one", ["A"]), ("two", [])], "Doc1": [("three", [])]}
    write_claudette(tmp_path, docs)
    (tmp_path / "ToS" / "Labels_J" / "Doc0.txt").write_text("-1\n-1\n-1\n")
    dm = make_dm(tmp_path, format="claudette", data_dir=str(tmp_path), categories=["A", "J"])
    with pytest.raises(DataFormatError, match=r"Labels_J/Doc0\.txt has 3 lines but .*Sentences/Doc0\.txt has 2"):
        dm.setup("fit")


def test_missing_column_and_missing_paths(tmp_path):
    (tmp_path / "train.csv").write_text("body,label\nx,a\n")
    dm = make_dm(tmp_path, format="csv", data_dir=str(tmp_path))
    with pytest.raises(DataFormatError, match=r"train\.csv:1: missing column 'text'"):
        dm.setup("fit")
    (tmp_path / "train.csv").write_text("text,category\nx,a\n")
    with pytest.raises(DataFormatError, match=r"no 'label' .* or 'labels'"):
        make_dm(tmp_path, format="csv", data_dir=str(tmp_path)).setup("fit")
    write_jsonl(tmp_path / "j" / "train.jsonl", [{"text": "x", "label": "a"}, {"body": "y", "label": "a"}])
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: missing field 'text'"):
        make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path / "j")).setup("fit")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dm(tmp_path, format="auto", data_dir=str(tmp_path / "nowhere")).setup("fit")
    with pytest.raises(FileNotFoundError, match="pretrained_path=.*no_model"):
        make_dm(tmp_path, tokenizer_path=str(tmp_path / "no_model")).prepare_data()
    with pytest.raises(ValueError, match="not in the corpus"):
        write_claudette(tmp_path / "c", {"Doc0": [("one", [])]})
        make_dm(tmp_path, format="claudette", data_dir=str(tmp_path / "c"), categories=["A", "J"],
                test_documents=["Nope"]).setup("fit")


def test_length_grouped_sampler_keeps_each_ranks_batches_grouped():
    """Under 2 ranks each rank's batches hold similar lengths too (rank r takes every 2nd index of the
    order, so the order is grouped by global batches of 2 x batch_size), and the ranks share the data."""
    lengths = [5, 50, 6, 49, 7, 48, 8, 47] * 8 + [50, 50, 50]  # 67: a short last global batch
    streams = []
    for rank in (0, 1):
        sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, mega_batches=8, num_replicas=2, rank=rank)
        sampler.set_epoch(0)
        streams.append(list(sampler))
        batches = [streams[-1][i:i + 4] for i in range(0, len(streams[-1]), 4)]
        spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
        assert max(spread[:-1]) <= 3, spread  # the last holds the short global batch and the ranks' padding
        assert lengths[batches[0][0]] == 50  # longest batch first on every rank
    assert len(streams[0]) == len(streams[1]) == 34
    assert set(streams[0]) | set(streams[1]) == set(range(len(lengths)))


def test_length_grouped_sampler_resumes_mid_epoch():
    lengths = list(range(40))
    full = LengthGroupedSampler(lengths, batch_size=4, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = LengthGroupedSampler(lengths, batch_size=4, seed=3)
    resumed.resume_at(2, 12)
    resumed.set_epoch(2)
    assert list(resumed) == order[12:]


def test_documents_shared_between_given_files_are_reported(tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x", "doc_id": "D1"},
                                           {"text": "b", "label": "y", "doc_id": "D2"}])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "x", "doc_id": "D1"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "d", "label": "y", "doc_id": "D3"}])
    with caplog.at_level(logging.WARNING):
        make_dm(tmp_path, format="jsonl", data_dir=str(tmp_path)).setup("fit")
    assert "1 document(s) appear in both train and validation" in caplog.text
    assert "train and test" not in caplog.text
