"""legal_bert splits: by document wherever documents are known, so no document's sentences are on both
sides of a split; seeded by data.split_seed."""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from datamodules.legal_bert.formats import Example

log = logging.getLogger(__name__)

Splits = dict[str, list[Example]]


def capped(splits: Splits, max_examples: int | None, seed: int) -> Splits:
    """data.max_examples per split, drawn after the labels are known: a cap keeps every label."""
    if not max_examples:
        return splits
    rng = random.Random(seed)
    return {s: (rng.sample(ex, max_examples) if len(ex) > max_examples else ex) for s, ex in splits.items()}


def split_claudette(examples: list[Example], test_documents: Sequence[str] | None, val_documents: Sequence[str] | None,
                    test_fraction: float, val_fraction: float, seed: int) -> Splits:
    docs = sorted({ex.doc for ex in examples})
    lower = {d.lower(): d for d in docs}

    def resolve(names: Sequence[str], what: str) -> set[str]:
        unknown = [n for n in names if n.lower() not in lower]
        if unknown:
            raise ValueError(f"data.{what} names documents that are not in the corpus: {unknown}; "
                             f"documents: {docs}")
        return {lower[n.lower()] for n in names}

    test = resolve(test_documents, "test_documents") if test_documents else None
    val = resolve(val_documents, "val_documents") if val_documents else None
    if test is not None and val is not None and test & val:
        raise ValueError(f"Documents in both data.test_documents and data.val_documents: {sorted(test & val)}")
    by_doc = defaultdict(list)
    for ex in examples:
        by_doc[ex.doc].append(ex)
    return split_by_groups(by_doc, test, val, test_fraction, val_fraction, seed)


def split_by_groups(groups: dict[Any, list[Example]], test: set | None, val: set | None, test_fraction: float,
                    val_fraction: float, seed: int) -> Splits:
    keys = sorted(groups, key=str)
    rng = random.Random(seed)
    rng.shuffle(keys)
    total = sum(len(v) for v in groups.values())
    chosen = {"test": set(test) if test is not None else None, "validation": set(val) if val is not None else None}
    for split, fraction in (("test", test_fraction), ("validation", val_fraction)):
        if chosen[split] is not None:
            continue
        # test_fraction is of all examples; val_fraction of those left after the test split
        pool = total if split == "test" else total - sum(len(groups[k]) for k in chosen["test"] or ())
        taken, count = set(), 0
        for key in keys:
            if count >= fraction * pool:
                break
            if any(key in c for c in chosen.values() if c):
                continue
            taken.add(key)
            count += len(groups[key])
        chosen[split] = taken
    out = {"train": [], "validation": [], "test": []}
    for key in sorted(groups, key=str):
        split = "test" if key in chosen["test"] else "validation" if key in chosen["validation"] else "train"
        out[split].extend(groups[key])
    return out


def cut_missing_splits(splits: Splits, doc_field: str | None, test_fraction: float, val_fraction: float,
                       seed: int) -> Splits:
    """Validation and test splits that no file gives, cut from the training data (by document if it has them)."""
    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits
    train = splits["train"]
    have_docs = doc_field and all(ex.doc is not None for ex in train)
    groups = defaultdict(list)
    for i, ex in enumerate(train):
        groups[ex.doc if have_docs else i].append(ex)
    cut = split_by_groups(groups, None, None, test_fraction if "test" in missing else 0.0,
                          val_fraction if "validation" in missing else 0.0, seed)
    log.info("Cut %s from the training data %s.", " and ".join(missing),
             "by document" if have_docs else "by example (no document ids)")
    for split in ("validation", "test"):
        splits.setdefault(split, cut[split])
    splits["train"] = cut["train"]
    return splits
