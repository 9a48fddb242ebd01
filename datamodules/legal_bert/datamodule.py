"""Legal text classification data: read, label, split by document, tokenise (cached), batch by length.

`format` picks the reader:
  synthetic  generated contract clauses under data_dir (the default; needs nothing from outside)
  auto       jsonl / csv / tsv files or a CLAUDETTE corpus, detected from data_dir's contents
  jsonl | csv | tsv | claudette   the same, named explicitly

File layouts: `data_dir/{train,validation,test}.<ext>` (`val`/`dev` also accepted for validation),
or explicit `train_file` / `val_file` / `test_file`. Splits that are not given are cut from the
training data by document (`doc_field`) when documents exist, else by example. `augment` masks words of
training batches (legal_bert/augment.py); batching and orders are in batches.py, splitting in splits.py.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_write, remove_stale_temporaries
from common.pretrained import load_tokenizer, resolve_pretrained_path, tokenizer_fingerprint
from common.task_data import TaskData
from datamodules.augment import augment_settings, non_negative
from datamodules.base import BaseDataModule
from datamodules.builtin import builtin_folder, user_folder
from datamodules.legal_bert import formats
from datamodules.legal_bert import splits as splitting
from datamodules.legal_bert.augment import DEFAULTS as AUGMENT_DEFAULTS
from datamodules.legal_bert.augment import token_masking
from datamodules.legal_bert.batches import (  # noqa: F401 (re-exported)
    Collator,
    LengthGroupedSampler,
    MaskedLMCollator,
    SortedSampler,
    TokenizedDataset,
)
from datamodules.legal_bert.formats import DataFormatError, Example, ReadReport
from datamodules.legal_bert.synthetic import VERSION as SYNTHETIC_VERSION
from datamodules.legal_bert.synthetic import write_synthetic

log = logging.getLogger(__name__)

FORMATS = ("synthetic", "auto", "jsonl", "csv", "tsv", "claudette")


# ---- the datamodule -------------------------------------------------------------------------------
class LegalTextDataModule(BaseDataModule):
    def __init__(
        self,
        loader: Mapping[str, Any] | None = None,
        format: str = "auto",
        data_dir: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        text_field: str = "text",
        label_field: str | None = None,
        doc_field: str | None = "doc_id",
        multi_label: bool | None = None,
        label_names: Sequence[str] | None = None,
        label_map: Mapping[str, str] | None = None,
        label_separator: str = "|",
        quoting: str = "auto",
        categories: Sequence[str] = formats.UNFAIR_TOS_CATEGORIES,
        test_documents: Sequence[str] | None = None,
        val_documents: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        synthetic_docs: int = 100,
        max_examples: int | None = None,
        tokenizer_path: str | None = None,
        max_sequence_length: int = 512,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        cache_dir: str | None = None,
        mlm_probability: float | None = None,
        augment: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(loader)
        if mlm_probability is not None and not 0 < mlm_probability < 1:
            raise ValueError(f"data.mlm_probability={mlm_probability}; expected a fraction in (0, 1), e.g. 0.15")
        self.mlm_probability = mlm_probability
        self.augment = augment_settings(augment, AUGMENT_DEFAULTS, "legal_bert")
        non_negative(self.augment, "token_mask_probability", at_most=1)
        if self.augment["enabled"] and mlm_probability is not None:
            raise ValueError("data.augment.enabled=true masks tokens of classification batches, but "
                             f"data.mlm_probability={mlm_probability} asks for masked-LM adaptation "
                             "(model=legal_bert_mlm), whose task is masking: set data.augment.enabled=false with it")
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r}; choose one of {', '.join(FORMATS)}")
        if max_sequence_length < 8:
            raise ValueError(f"data.max_sequence_length={max_sequence_length} is too short (at least 8)")
        self.files = {"train": train_file, "validation": val_file, "test": test_file}
        builtin = data_dir is None and not any(self.files.values())
        if builtin and format not in ("auto", "synthetic"):
            raise ValueError(f"data.format={format} reads data.data_dir or data.train_file, and neither is set")
        if not builtin and format == "synthetic":
            raise ValueError("data.format=synthetic is the built-in dataset and reads no data.data_dir or data files; "
                             "use data.format=auto for yours")
        self.format = "synthetic" if builtin else format
        self.data_dir = Path(str(data_dir)).expanduser() if data_dir is not None else None
        self.predict_file = predict_file
        self.text_field, self.label_field, self.doc_field = text_field, label_field, doc_field
        self.multi_label_setting = multi_label
        self.label_names_setting = list(label_names) if label_names else None
        self.label_map = {str(k): str(v) for k, v in (label_map or {}).items()}
        self.label_separator, self.quoting = label_separator, quoting
        self.categories = list(categories)
        self.test_documents = list(test_documents) if test_documents else None
        self.val_documents = list(val_documents) if val_documents else None
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.synthetic_docs = synthetic_docs
        self.max_examples = max_examples
        self.tokenizer_path = tokenizer_path
        self.max_sequence_length = max_sequence_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.eval_batch_size = eval_batch_size
        self.drop_last = drop_last
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None  # the suite's own, never data_dir
        self._tokenizer = None
        self.label_names: list[str] | None = None
        self.multi_label: bool | None = None
        self.label_counts: torch.Tensor | None = None
        self.train_set = self.val_set = self.test_set = self.predict_set = None

    # ---- preparation ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._source_dir()
        resolve_pretrained_path(self.tokenizer_path)  # a clear error before any work

    def _synthetic_multi_label(self) -> bool:
        return True if self.multi_label_setting is None else bool(self.multi_label_setting)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    # ---- reading ---------------------------------------------------------------------------------
    def _source_dir(self) -> Path:
        """The user's data folder (only read; the working directory when only files are named), or the
        generated clauses, written into cache_dir on first use."""
        if self.format == "synthetic":
            if self.cache_dir is None:
                raise ValueError("The built-in clauses are generated into data.cache_dir, which is not set")
            multi_label, docs = self._synthetic_multi_label(), self.synthetic_docs
            return builtin_folder(self.cache_dir, "clauses", {"version": SYNTHETIC_VERSION, "docs": docs,
                                                              "multi_label": multi_label},
                                  lambda folder: write_synthetic(folder, multi_label, num_docs=docs))
        if self.data_dir is None:
            return Path.cwd()
        return user_folder(self.data_dir, "train/validation/test .jsonl, .csv or .tsv files or a CLAUDETTE corpus")

    def _read_file(self, path: Path, fmt: str, report: ReadReport, require_labels: bool = True) -> list[Example]:
        if fmt == "jsonl":
            label_field = self.label_field
            if label_field is None and require_labels:
                label_field = formats.detect_label_field(path, formats.jsonl_fields(path))
            self._seen_label_field = label_field or getattr(self, "_seen_label_field", None)
            return formats.read_jsonl(path, self.text_field, label_field, self.doc_field, report, require_labels)
        delimiter = "\t" if fmt == "tsv" else ","
        examples, header = formats.read_table(path, delimiter, self.text_field, self.label_field, self.doc_field,
                                              report, self.quoting, require_labels)
        if require_labels:
            self._seen_label_field = self.label_field or formats.detect_label_field(path, header)
        return examples

    def read_splits(self) -> dict[str, list[Example]]:
        """Examples per split with raw labels, splits cut by document where needed."""
        folder = self._source_dir()
        fmt = formats.detect_format(folder, self.format, self.files)
        report = ReadReport()
        if fmt == "claudette":
            self._seen_label_field = "labels"
            examples = formats.read_claudette(folder, self.categories, report)
            splits = splitting.split_claudette(examples, self.test_documents, self.val_documents,
                                               self.test_fraction, self.val_fraction, self.split_seed)
        else:
            paths = formats.split_files(folder, fmt, self.files)
            splits = {split: self._read_file(path, fmt, report) for split, path in paths.items()}
            splits = splitting.cut_missing_splits(splits, self.doc_field, self.test_fraction, self.val_fraction,
                                                  self.split_seed)
        if report.skipped_empty:
            log.warning("Skipped %d examples with empty or whitespace-only text.", report.skipped_empty)
        self.skipped_empty = report.skipped_empty
        self.detected_format = fmt
        # data.val_fraction=0 with no validation file or documents asks for no validation split: every
        # non-test example trains, no validation loop runs and the test scores the final weights.
        no_validation_wanted = (self.val_fraction == 0 and not self.val_documents
                                and (fmt == "claudette" or "validation" not in paths))
        for split, examples in splits.items():
            if not examples and not (split == "validation" and no_validation_wanted):
                raise DataFormatError(f"The {split} split is empty (format {fmt}, data_dir {folder})")
        return splits

    # ---- labels ------------------------------------------------------------------------------
    def _resolve_labels(self, splits: dict[str, list[Example]]) -> None:
        multi = self.multi_label_setting
        if multi is None:
            multi = getattr(self, "_seen_label_field", "labels") == "labels"
        self.multi_label = bool(multi)
        for examples in splits.values():
            for ex in examples:
                parsed = formats.parse_label_cell(ex.labels, self.multi_label, self.label_separator, ex.where)
                if self.multi_label:
                    ex.labels = sorted({formats.normalise_label(v, self.label_map, self.label_names_setting, ex.where)
                                        for v in parsed})
                else:
                    ex.labels = formats.normalise_label(parsed, self.label_map, self.label_names_setting, ex.where)
        if self.detected_format == "claudette" and not self.label_names_setting:
            names = [self.label_map.get(c, c) for c in self.categories]
        else:
            names = self.label_names_setting or formats.infer_label_names(splits["train"], self.multi_label)
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate label names: {names}")
        if len(names) < (1 if self.multi_label else 2):
            raise DataFormatError(f"Found {len(names)} label(s) {names} in the training data; need at least "
                                  f"{1 if self.multi_label else 2} for {'multi-label' if self.multi_label else 'multi-class'}")
        self.label_names = list(names)

    def _targets(self, examples: list[Example]) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.label_names)}
        known = ", ".join(self.label_names)
        if self.multi_label:
            targets = torch.zeros(len(examples), len(index), dtype=torch.float32)
            for row, ex in enumerate(examples):
                for name in ex.labels:
                    if name not in index:
                        raise DataFormatError(f"{ex.where}: unknown label {name!r}; known labels: {known} "
                                              "(rename it with data.label_map or list it in data.label_names)")
                    targets[row, index[name]] = 1.0
            return targets
        targets = torch.empty(len(examples), dtype=torch.long)
        for row, ex in enumerate(examples):
            if ex.labels not in index:
                raise DataFormatError(f"{ex.where}: unknown label {ex.labels!r}; known labels: {known} "
                                      "(rename it with data.label_map or list it in data.label_names)")
            targets[row] = index[ex.labels]
        return targets

    # ---- tokenisation (cached) -------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat int32 token ids and offsets, from the on-disk cache when tokenizer and texts match."""
        if not texts:  # an empty split (data.val_fraction=0)
            return torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.long)
        key = hashlib.sha1()
        key.update(tokenizer_fingerprint(resolve_pretrained_path(self.tokenizer_path)).encode())
        key.update(str(self.max_sequence_length).encode())
        for text in texts:
            key.update(text.encode("utf-8", "surrogatepass"))
            key.update(b"\x00")
        path = self.cache_dir / f"tokens-{key.hexdigest()[:20]}.pt" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
                return cached["ids"], cached["offsets"]
            except Exception as err:  # a half-written or foreign file: tokenise again
                log.warning("Ignoring unreadable token cache %s: %s", path, err)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_sequence_length,
                                 add_special_tokens=True, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        offsets = torch.zeros(len(encoded) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        ids = torch.tensor([t for seq in encoded for t in seq], dtype=torch.int32)
        if path is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(self.cache_dir)
                atomic_write(path, lambda tmp: torch.save({"ids": ids, "offsets": offsets}, tmp))
            except OSError as err:
                log.warning("Could not cache tokens in %s: %s", self.cache_dir, err)
        return ids, offsets

    def _dataset(self, examples: list[Example], labelled: bool = True) -> TokenizedDataset:
        texts = [ex.text for ex in examples]
        ids, offsets = self.tokenize(texts)
        targets = self._targets(examples) if labelled else None
        return TokenizedDataset(ids, offsets, targets, texts, [ex.doc for ex in examples])

    # ---- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_file:
            examples = formats.read_predict_file(Path(str(self.predict_file)).expanduser(), self.text_field,
                                                 self.doc_field, self.quoting)
            self.predict_set = self._dataset(examples, labelled=False)
            return
        if self.train_set is not None:
            return
        splits = self.read_splits()
        self._resolve_labels(splits)
        splits = splitting.capped(splits, self.max_examples, self.split_seed)
        self.split_documents = {s: sorted({str(ex.doc) for ex in exs if ex.doc is not None})
                                for s, exs in splits.items()}
        train_docs = set(self.split_documents["train"])
        for split in ("validation", "test"):
            shared = train_docs & set(self.split_documents[split])
            if shared:  # the user's own files: report, do not move examples between their splits
                log.warning("%d document(s) appear in both train and %s, e.g. %s: their sentences leak across "
                            "the split", len(shared), split, sorted(shared)[:3])
        self.train_set = self._dataset(splits["train"])
        self.val_set = self._dataset(splits["validation"])
        self.test_set = self._dataset(splits["test"])
        targets = self.train_set.targets
        self.label_counts = (targets.sum(0) if self.multi_label
                             else torch.bincount(targets, minlength=len(self.label_names)).float())
        log.info("legal_bert data (%s, %s): train %d / validation %d / test %d examples, %d labels: %s",
                 self.detected_format, "multi-label" if self.multi_label else "multi-class", len(self.train_set),
                 len(self.val_set), len(self.test_set), len(self.label_names), ", ".join(self.label_names))
        if not len(self.val_set):
            log.info("No validation split (data.val_fraction=0): no validation runs, no checkpoint is 'best', "
                     "and the test scores the final weights.")

    def task_data(self) -> TaskData:
        """The classifier sizes its head by `label_names` and `multi_label` and weighs classes by `label_counts`
        and `num_train_examples`; its attention maps show `val_set` examples through `tokenizer`; it compiles
        with CUDA graphs when `padded_length` says every batch has one length."""
        train, multiple = self.train_set, self.pad_to_multiple_of or 0
        # texts are cut at max_sequence_length, so a multiple at least that long pads every batch to itself
        return TaskData(train_set=train, val_set=self.val_set, label_names=self.label_names,
                        multi_label=self.multi_label, label_counts=self.label_counts,
                        num_train_examples=len(train) if train is not None else None, tokenizer=self._tokenizer,
                        padded_length=multiple if multiple >= self.max_sequence_length else None)

    def _collator(self, dataset: TokenizedDataset, with_text: bool = False) -> Collator:
        if self.mlm_probability and not with_text:  # masked-LM batches: the labels are the masked tokens
            return MaskedLMCollator(self.tokenizer, self.mlm_probability, self.pad_to_multiple_of)
        pad = self.tokenizer.pad_token_id
        return Collator(0 if pad is None else pad, self.pad_to_multiple_of, dataset.texts if with_text else None)

    def train_dataloader(self):
        sampler = None
        if self.group_by_length:
            seed = int(getattr(self, "seed", self.split_seed)) % 2**31
            sampler = LengthGroupedSampler(self.train_set.lengths, self.per_device_batch_size, seed=seed,
                                           **self.data_parallel_ranks())  # make_loader resumes it mid-epoch
        collate = self._collator(self.train_set)
        if self.augment["enabled"]:  # training batches only: evaluation reads the clauses as written
            collate = token_masking(collate, self.tokenizer, self.augment["token_mask_probability"])
        return self.make_loader(self.train_set, shuffle=True, sampler=sampler, collate_fn=collate,
                                drop_last=self.drop_last)

    def _eval_loader(self, dataset: TokenizedDataset, with_text: bool = False):
        sampler = SortedSampler(dataset.lengths) if self.group_by_length else None
        return self.make_loader(dataset, sampler=sampler, batch_size=self.eval_batch_size,
                                collate_fn=self._collator(dataset, with_text))

    def val_dataloader(self):
        if not len(self.val_set):  # data.val_fraction=0: Lightning skips validation for an empty list
            return []
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        return self._eval_loader(self.test_set)

    def predict_dataloader(self):
        return self._eval_loader(self.predict_set if self.predict_set is not None else self.test_set, with_text=True)
