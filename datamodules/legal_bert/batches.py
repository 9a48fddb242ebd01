"""legal_bert batches: the tokenised dataset, its collators and the orders it is read in (grouped by
length for training, longest first for evaluation)."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from datamodules.base import EpochSampler


class TokenizedDataset(Dataset):
    """Token ids stored flat (int32) with offsets; targets are class ids or multi-hot rows."""

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, targets: torch.Tensor | None,
                 texts: list[str], docs: list[str | None]) -> None:
        self.ids, self.offsets, self.targets, self.texts, self.docs = ids, offsets, targets, texts, docs
        self.lengths = (offsets[1:] - offsets[:-1]).tolist()

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input_ids": self.ids[self.offsets[index]:self.offsets[index + 1]], "index": index}
        if self.targets is not None:
            item["labels"] = self.targets[index]
        return item


class Collator:
    """Pads each batch to its own longest sequence (rounded up to a multiple for tensor cores)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, with_text: Sequence[str] | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of or 1
        self.with_text = with_text

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(item["input_ids"]) for item in items)
        length = int(math.ceil(longest / self.multiple) * self.multiple)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}
        if "labels" in items[0]:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        if self.with_text is not None:
            batch["text"] = [self.with_text[item["index"]] for item in items]
        return batch


class LengthGroupedSampler(EpochSampler):
    """Random order in which each run of `batch_size` indices has similar lengths, on every rank.

    Shuffle, cut into mega-batches of `mega_batches` global batches, sort each by length, cut into global
    batches (`batch_size` x ranks), shuffle them. Each rank takes every N-th index (EpochSampler), so its
    share of a global batch is one batch of neighbours in length. Under several ranks a short last batch
    goes last, where it cannot shift the ranks' batches out of step. The order changes every epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batches: int = 50,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(len(lengths), seed, num_replicas, rank)
        self.lengths, self.batch_size, self.mega = list(lengths), batch_size, mega_batches

    def __iter__(self):
        order = super().__iter__()
        self.epoch += 1  # a fresh order on the next pass even where no one calls set_epoch
        return order

    def epoch_order(self) -> list[int]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.num_replicas
        span = self.mega * size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i], reverse=True)
            batches.extend(chunk[i:i + size] for i in range(0, len(chunk), size))
        # the longest batch first: an out-of-memory error shows at step one, not at the end
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]]) if batches else 0
        first = batches.pop(longest) if batches else []
        short = [b for b in batches if len(b) < size] if self.num_replicas > 1 else []
        batches = [b for b in batches if len(b) == size] if short else batches
        rng.shuffle(batches)
        return [i for batch in [first, *batches, *short] for i in batch]


class SortedSampler(Sampler[int]):
    """Evaluation order: longest first, so batches carry little padding. Results keep `index`."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


class MaskedLMCollator:
    """For masked-LM adaptation (lightning_modules/legal_bert/adapt.py): transformers' collator pads
    each batch and masks a fraction of its non-special tokens (80% [MASK], 10% random, 10% kept);
    `labels` hold the original ids there and -100 everywhere else."""

    def __init__(self, tokenizer, probability: float, pad_to_multiple_of: int | None = 8):
        from transformers import DataCollatorForLanguageModeling

        self.collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability,
                                                       pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.collate([{"input_ids": item["input_ids"].tolist()} for item in items]))
