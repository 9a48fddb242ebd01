"""Fixtures for legal_bert tests: tiny data files and a tiny local BERT (same tokenizer as MiniLM)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from common.pretrained import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT in Hugging Face format: a user's own `pretrained_path`. Its tokenizer is
    MiniLM's: the bundled package's, else the copy `python -m bench.hf_shapes` exports (a GPU machine without it)."""
    from transformers import BertConfig, BertModel

    from bench.hf_shapes import minilm_files

    path = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_files() / name, path / name)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_claudette(root: Path, docs: dict[str, list[tuple[str, list[str]]]], tags=("A", "J")) -> Path:
    """root/ToS/Sentences/<doc>.txt and Labels_<tag>/<doc>.txt (1 / -1), line-aligned."""
    tos = root / "ToS"
    (tos / "Sentences").mkdir(parents=True, exist_ok=True)
    for tag in tags:
        (tos / f"Labels_{tag}").mkdir(parents=True, exist_ok=True)
    for doc, rows in docs.items():
        (tos / "Sentences" / f"{doc}.txt").write_text("".join(text + " \n" for text, _ in rows), encoding="utf-8")
        for tag in tags:
            values = "".join(("1" if tag in labels else "-1") + "\n" for _, labels in rows)
            (tos / f"Labels_{tag}" / f"{doc}.txt").write_text(values, encoding="utf-8")
    return root
