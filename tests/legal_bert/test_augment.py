"""data.augment of legal_bert: training batches get words masked; evaluation batches never; masked-LM
adaptation refuses it."""
from __future__ import annotations

import pytest
import torch

from datamodules.legal_bert import LegalTextDataModule


def make_dm(tmp_path, augment=None, **kw) -> LegalTextDataModule:
    dm = LegalTextDataModule(loader={"batch_size": 8, "num_workers": 0}, synthetic_docs=6, max_sequence_length=32,
                             cache_dir=str(tmp_path / "cache"), augment=augment, **kw)
    dm.setup("fit")
    return dm


def batches(loader) -> list[dict]:
    torch.manual_seed(0)
    return list(loader)


def test_token_masking_puts_mask_on_training_words_only_and_keeps_attention(tmp_path):
    plain = make_dm(tmp_path)
    masked = make_dm(tmp_path, augment={"enabled": True, "token_mask_probability": 0.3})
    mask_id = masked.tokenizer.mask_token_id
    special = torch.tensor(masked.tokenizer.all_special_ids)
    seen = 0
    for a, b in zip(batches(plain.train_dataloader()), batches(masked.train_dataloader()), strict=True):
        assert torch.equal(a["attention_mask"], b["attention_mask"]) and torch.equal(a["labels"], b["labels"])
        changed = a["input_ids"] != b["input_ids"]
        assert (b["input_ids"][changed] == mask_id).all()
        assert not torch.isin(a["input_ids"][changed], special).any(), "[CLS], [SEP] and padding are never masked"
        seen += int(changed.sum())
    words = sum(int(((b["attention_mask"] == 1) & ~torch.isin(b["input_ids"], special)).sum())
                for b in batches(plain.train_dataloader()))
    assert 0.2 < seen / words < 0.4, f"{seen} of {words} words masked at probability 0.3"
    for a, b in zip(batches(plain.val_dataloader()), batches(masked.val_dataloader()), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and not (b["input_ids"] == mask_id).any()


def test_augment_with_masked_lm_adaptation_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data.augment.enabled=true .* data.mlm_probability=0.15 .*model=legal_bert_mlm"):
        LegalTextDataModule(augment={"enabled": True}, mlm_probability=0.15)
    LegalTextDataModule(augment={"enabled": False, "token_mask_probability": 0.1}, mlm_probability=0.15)


def test_bad_token_mask_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data.augment.token_mask_probability=1.5"):
        LegalTextDataModule(augment={"enabled": True, "token_mask_probability": 1.5})
    with pytest.raises(ValueError, match="no augmentation setting 'hflip'"):
        LegalTextDataModule(augment={"hflip": True})
