"""Tiny scenes in each format, written into a test's tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def pose(x: float = 0.0, z: float = 4.0) -> list:
    return [[1.0, 0, 0, x], [0, 1.0, 0, 0], [0, 0, 1.0, z], [0, 0, 0, 1.0]]


def write_blender(root: Path, size: int = 4, views=(2, 1, 1)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "val", "test"), views, strict=True):
        (root / split).mkdir(exist_ok=True)
        frames = []
        for k in range(count):
            rgba = np.zeros((size, size, 4), np.uint8)
            rgba[..., 0] = 255  # red, half transparent on the left half
            rgba[..., 3] = 255
            rgba[:, : size // 2, 3] = 0
            Image.fromarray(rgba, "RGBA").save(root / split / f"r_{k}.png")
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": pose(0.1 * k)})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": frames}))
    return root


def write_ngp(root: Path, count: int = 9, w: int = 8, h: int = 6, distortion: bool = True) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    frames = []
    for k in range(count):
        Image.fromarray(np.full((h, w, 3), 20 * k, np.uint8)).save(root / "images" / f"{k:04d}.jpg")
        frames.append({"file_path": f"images/{k:04d}.jpg", "transform_matrix": pose(0.2 * k)})
    meta = {"fl_x": 10.0, "fl_y": 11.0, "cx": 4.2, "cy": 2.9, "w": w, "h": h, "aabb_scale": 2, "frames": frames}
    if distortion:
        meta.update(k1=0.05, k2=-0.01, p1=0.001, p2=0.0)
    (root / "transforms.json").write_text(json.dumps(meta, indent=1))
    return root


def write_llff(root: Path, count: int = 5, factor: int = 8, w: int = 8, h: int = 6) -> Path:
    folder = root / f"images_{factor}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        Image.fromarray(np.full((h, w, 3), 30 * k, np.uint8)).save(folder / f"image{k:03d}.png")
        # LLFF columns: [down, right, back, translation, (h, w, focal)] at full resolution
        mat = np.array([[0, 1, 0, 0.1 * k, h * factor], [1, 0, 0, 0.05 * k, w * factor], [0, 0, -1, 0, 50.0]])
        rows.append(np.concatenate([mat.reshape(-1), [2.0, 20.0]]))
    np.save(root / "poses_bounds.npy", np.stack(rows))
    return root
