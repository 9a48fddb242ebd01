"""Token masking of legal_bert's training batches (`data.augment`; off by default, as LexGLUE's
fine-tuning has none). Not masked-LM adaptation (data.mlm_probability, model=legal_bert_mlm): the
labels stay the clause's, and the classifier learns not to hang on any one word."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

DEFAULTS = {"token_mask_probability": 0.1}


class TokenMasking:
    """Wraps a collator: in each batch, each attended, non-special token becomes [MASK] with probability
    `probability`, drawn from the global torch RNG (reseeded per batch in loader workers). The attention
    mask is kept: the model attends to [MASK] where the word was, as BERT did in pre-training."""

    def __init__(self, collate: Callable[[list], dict[str, Any]], mask_token_id: int, special_ids: Iterable[int],
                 probability: float) -> None:
        self.collate, self.mask_token_id, self.probability = collate, int(mask_token_id), float(probability)
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def __call__(self, items: list) -> dict[str, Any]:
        batch = self.collate(items)
        ids = batch["input_ids"]
        words = batch["attention_mask"].bool() & ~torch.isin(ids, self.special)
        batch["input_ids"] = ids.masked_fill(words & (torch.rand(ids.shape) < self.probability), self.mask_token_id)
        return batch


def token_masking(collate: Callable, tokenizer, probability: float) -> TokenMasking:
    if tokenizer.mask_token_id is None:
        raise ValueError(f"data.augment masks tokens with [MASK], and the tokenizer of {tokenizer.name_or_path!r} "
                         "has no mask token; set data.augment.enabled=false")
    return TokenMasking(collate, tokenizer.mask_token_id, tokenizer.all_special_ids, probability)
