"""Tiny fixtures for the licence-plate tests: small images and labels written in tmp_path."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

SMALL = ["data.image_size=128", "model.net.min_size=128", "model.net.max_size=160", "batch_size=2",
         "data.synthetic_counts={train: 6, val: 4, test: 4}", "data.synthetic_size=[96,128]"]


def write_image(path: Path, size=(40, 30), color=(120, 60, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path
