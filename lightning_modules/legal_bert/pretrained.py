"""The pretrained encoder of legal_bert, loaded offline from the directory `common.pretrained`
resolves (`model.pretrained_path`, default: the bundled MiniLM), and how it was trained to pool."""
from __future__ import annotations

import os

from common.pretrained import resolve_pretrained_path  # also keeps transformers offline


def trained_pooling(path: str | os.PathLike | None) -> str:
    """How the checkpoint was trained to pool: `mean` or `cls` for sentence-transformers models
    (their 1_Pooling/config.json), else `pooler` (BERT's trained pooler over [CLS])."""
    import json

    config = resolve_pretrained_path(path) / "1_Pooling" / "config.json"
    if config.is_file():
        try:
            settings = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            return "pooler"
        if settings.get("pooling_mode_mean_tokens"):
            return "mean"
        if settings.get("pooling_mode_cls_token"):
            return "cls"
    return "pooler"


def load_encoder(path: str | os.PathLike | None, attn_implementation: str = "sdpa", dropout: float | None = None,
                 masked_lm: bool = False):
    """The pretrained encoder (AutoModel), offline, with the attention implementation asked for.
    masked_lm=True: the encoder with its masked-LM head (AutoModelForMaskedLM; a checkpoint without
    one gets a head tied to its word embeddings)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    resolved = resolve_pretrained_path(path)
    config = AutoConfig.from_pretrained(str(resolved), local_files_only=True)
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # fp32 master weights whatever the stored dtype (transformers 5 keeps a fp16 checkpoint in fp16);
        # mixed precision is the Trainer's job.
        auto = AutoModelForMaskedLM if masked_lm else AutoModel
        return auto.from_pretrained(str(resolved), config=config, local_files_only=True,
                                    attn_implementation=attn_implementation, torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
