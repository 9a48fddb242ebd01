"""Synthetic licence plates: the task's default data, generated on first use and cached.

Each picture is a cluttered background (gradients, shapes, lines, noise, a 'car body' block) with
0-2 plates: plate text rendered with PIL on a white or yellow plate with a border, warped by a
random perspective, pasted, and the whole image then lit unevenly, blurred and noised. Output
is YOLO format (`images/<split>/`, `labels/<split>/`, `data.yaml`), so the same reader that
serves users' YOLO data serves this.
"""
from __future__ import annotations

import logging
import os
import string
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

log = logging.getLogger(__name__)

VERSION = 3
FONT_CANDIDATES = (
    "DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "DejaVuSansMono-Bold.ttf", "LiberationSans-Bold.ttf", "Arial Bold.ttf",
)


def _font(size: int) -> ImageFont.ImageFont:
    for name in FONT_CANDIDATES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)   # Pillow's bundled font: works with no system fonts


def _plate_text(rng: np.random.Generator) -> str:
    letters, digits = string.ascii_uppercase, string.digits
    pattern = rng.choice(["LL DDD LL", "LLL DDDD", "L DDD LLL", "LL DD DDDD", "DDD LLL"])
    return "".join(rng.choice(list(letters)) if c == "L" else rng.choice(list(digits)) if c == "D" else c for c in pattern)


def _render_plate(rng: np.random.Generator, width: int) -> Image.Image:
    height = max(6, int(width / rng.uniform(3.0, 5.0)))
    bg = (255, 255, 255) if rng.random() < 0.6 else (245, 200, 40)
    bg = tuple(int(c * rng.uniform(0.8, 1.0)) for c in bg)
    plate = Image.new("RGBA", (width, height), bg + (255,))
    draw = ImageDraw.Draw(plate)
    border = max(1, height // 12)
    draw.rectangle([0, 0, width - 1, height - 1], outline=(20, 20, 20, 255), width=border)
    if rng.random() < 0.5:  # EU-style blue band on the left
        draw.rectangle([border, border, border + width // 10, height - border - 1], fill=(30, 60, 170, 255))
    text = _plate_text(rng)
    font = _font(max(6, int(height * 0.7)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    scale_room = width * (0.8 if rng.random() < 0.5 else 0.9)
    if right - left > scale_room:  # shrink to fit
        font = _font(max(5, int(height * 0.7 * scale_room / (right - left))))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (width - (right - left)) // 2 - left + width // 20
    y = (height - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=(15, 15, 15, 255), font=font)
    return plate


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """PIL's PERSPECTIVE coefficients mapping output points dst back to input points src."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.asarray(rows, float), src.reshape(-1)).tolist()


def _warp(plate: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    w, h = plate.size
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    jitter = rng.uniform(-strength, strength, size=(4, 2)) * np.array([w, h])
    angle = np.deg2rad(rng.uniform(-8, 8))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = (src - [w / 2, h / 2]) @ rot.T + jitter
    dst -= dst.min(axis=0)
    out_w, out_h = int(np.ceil(dst[:, 0].max())) + 1, int(np.ceil(dst[:, 1].max())) + 1
    return plate.transform((out_w, out_h), Image.Transform.PERSPECTIVE, _perspective_coeffs(src, dst),
                           Image.Resampling.BILINEAR)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, height)[:, None, None]
    array = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # a car-body block, then clutter: boxes, ellipses, lines, and sometimes plate-like decoys
    x0, y0 = rng.integers(0, width // 3), rng.integers(height // 4, height // 2)
    draw.rounded_rectangle([x0, y0, x0 + rng.integers(width // 2, width), height + 10],
                           radius=int(rng.integers(5, 30)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(3, 10))):
        kind = rng.integers(0, 3)
        x1, x2 = (int(v) for v in sorted(rng.integers(0, width, 2)))
        y1, y2 = (int(v) for v in sorted(rng.integers(0, height, 2)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if kind == 0:
            draw.rectangle([x1, y1, x2, y2], fill=color)
        elif kind == 1:
            draw.ellipse([x1, y1, x2, y2], fill=color)
        else:
            draw.line([x1, y1, x2, y2], fill=color, width=int(rng.integers(1, 5)))
    if rng.random() < 0.3:  # text that is not a plate, so text alone is not the cue
        draw.text((int(rng.integers(0, width // 2)), int(rng.integers(0, height - 20))), _plate_text(rng),
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)), font=_font(int(rng.integers(10, 24))))
    return image


def make_image(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list[list[float]]]:
    """One picture and its plate boxes (pixel xyxy)."""
    image = _background(rng, width, height)
    count = rng.choice([0, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    boxes = []
    for _ in range(count):
        plate = _warp(_render_plate(rng, int(width * rng.uniform(0.08, 0.5))), rng, strength=rng.uniform(0.0, 0.12))
        pw, ph = plate.size
        if pw >= width or ph >= height:
            continue
        for _try in range(10):
            x, y = int(rng.integers(0, width - pw)), int(rng.integers(0, height - ph))
            alpha = np.asarray(plate.getchannel("A"))
            ys, xs = np.nonzero(alpha > 127)
            box = [x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1]
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes):
                image.paste(plate, (x, y), plate)
                boxes.append([float(v) for v in box])
                break
    # lighting, blur, noise
    array = np.asarray(image).astype(np.float32)
    gx, gy = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    light = 1.0 + rng.uniform(-0.4, 0.4) * gx + rng.uniform(-0.4, 0.4) * gy
    array = array * light[..., None] * rng.uniform(0.6, 1.3)
    array += rng.normal(0, rng.uniform(0, 12), array.shape)
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.6)))
    return image, boxes


def _write_one(job: tuple) -> None:
    """One image, seeded by (seed, split, index) so any number of processes give the same files."""
    root, split_index, split, i, size, seed = job
    rng = np.random.default_rng([seed, split_index, i])
    width = int(rng.integers(size[0], size[1] + 1))
    height = int(width * rng.uniform(0.65, 0.85))
    image, boxes = make_image(rng, width, height)
    name = f"{split}_{i:05d}"
    image.save(Path(root) / "images" / split / f"{name}.jpg", quality=int(rng.integers(60, 95)))
    lines = [f"0 {(b[0] + b[2]) / 2 / width:.6f} {(b[1] + b[3]) / 2 / height:.6f} "
             f"{(b[2] - b[0]) / width:.6f} {(b[3] - b[1]) / height:.6f}" for b in boxes]
    (Path(root) / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def generate(root: Path, counts: dict[str, int], size: tuple[int, int] = (256, 320), seed: int = 0,
             workers: int | None = None) -> Path:
    """Write YOLO data into the folder `root` (the datamodule hands it a fresh folder of its cache).
    Large sets are drawn by several processes (workers: default up to 8 of the CPU cores)."""
    root = Path(root)
    start = time.perf_counter()
    jobs = []
    for split_index, (split, n) in enumerate(counts.items()):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(str(root), split_index, split, i, tuple(size), seed) for i in range(n)]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) >= 500:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=32))
    else:
        for job in jobs:
            _write_one(job)
    (root / "data.yaml").write_text(
        "# Synthetic licence plates (datamodules/license_plate/synthetic.py)\npath: .\n"
        + "".join(f"{s}: images/{s}\n" for s in counts) + "names: [plate]\n"
    )
    log.info("Generated %d synthetic plate images in %s (%.1f s)", len(jobs), root, time.perf_counter() - start)
    return root
