"""The built-in scene: a few shaded, textured objects ray-traced analytically and written in
Blender format (RGBA PNGs + transforms_{train,val,test}.json), so the task runs with nothing
from outside the repo. Colours are view-independent (Lambert shading under a fixed light),
images are point-sampled at pixel centres: the views are exactly consistent, so a NeRF can fit
them to high PSNR.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

CAMERA_RADIUS = 4.0
CAMERA_ANGLE_X = 0.6911112070083618  # the Blender synthetic scenes' field of view
LIGHT = np.array([0.5, 0.3, 0.8]) / np.linalg.norm([0.5, 0.3, 0.8])
VERSION = 1  # bump when the scene changes, so cached copies are regenerated


def _look_at(position: np.ndarray) -> np.ndarray:
    z = position / np.linalg.norm(position)
    up = np.array([0.0, 0.0, 1.0])
    x = np.cross(up, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, position
    return c2w


def camera_poses(count: int, seed: int) -> np.ndarray:
    """Cameras on the upper hemisphere at radius 4, looking at the origin (z is up)."""
    rng = np.random.default_rng(seed)
    poses = []
    for k in range(count):
        azimuth = 2 * math.pi * (k + rng.uniform(0, 1)) / count
        elevation = rng.uniform(math.radians(10), math.radians(65))
        pos = CAMERA_RADIUS * np.array([math.cos(elevation) * math.cos(azimuth),
                                        math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
        poses.append(_look_at(pos))
    return np.stack(poses)


def _spheres(o, d, t_best, color, normal):
    # (center, radius, base colour, texture)
    for center, radius, base, stripes in (
        (np.array([0.0, 0.0, 0.0]), 0.7, np.array([0.85, 0.25, 0.2]), True),
        (np.array([0.55, -0.75, -0.2]), 0.45, np.array([0.2, 0.45, 0.9]), False),
        (np.array([-0.6, 0.7, -0.35]), 0.35, np.array([0.95, 0.8, 0.2]), False),
    ):
        oc = o - center
        a = (d * d).sum(-1)
        b = 2 * (oc * d).sum(-1)
        c = (oc * oc).sum(-1) - radius**2
        disc = b * b - 4 * a * c
        hit = disc > 0
        t = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
        closer = hit & (t > 0) & (t < t_best)
        if not closer.any():
            continue
        t_safe = np.where(closer, t, 0.0)
        p = o + t_safe[:, None] * d
        n = (p - center) / radius
        col = np.broadcast_to(base, p.shape).copy()
        if stripes:  # latitude stripes: texture the field has to place in 3D
            band = (np.floor((n[:, 2] + 1) * 4) % 2)[:, None]
            col = col * (0.55 + 0.45 * band) + np.array([0.1, 0.3, 0.1]) * (1 - band)
        t_best = np.where(closer, t, t_best)
        color[closer], normal[closer] = col[closer], n[closer]
    return t_best


def _box(o, d, t_best, color, normal):
    lo, hi = np.array([-0.9, -0.9, -1.1]), np.array([0.9, 0.9, -0.75])  # a slab the spheres rest on
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    tmin, tmax = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
    closer = (tmax > np.maximum(tmin, 0)) & (tmin > 0) & (tmin < t_best)
    if closer.any():
        p = o + np.where(closer, tmin, 0.0)[:, None] * d
        n = np.zeros_like(p)
        n[np.abs(p - lo) < 1e-4] = -1.0
        n[np.abs(p - hi) < 1e-4] = 1.0
        checker = ((np.floor(p[:, 0] * 2.5) + np.floor(p[:, 1] * 2.5)) % 2)[:, None]
        col = checker * np.array([0.9, 0.9, 0.85]) + (1 - checker) * np.array([0.3, 0.6, 0.35])
        t_best = np.where(closer, tmin, t_best)
        color[closer], normal[closer] = col[closer], n[closer]
    return t_best


def render_view(c2w: np.ndarray, size: int) -> np.ndarray:
    """RGBA float image (size, size, 4) of the scene from camera-to-world `c2w` (OpenGL)."""
    focal = 0.5 * size / math.tan(0.5 * CAMERA_ANGLE_X)
    v, u = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    dirs = np.stack([(u - size / 2) / focal, -(v - size / 2) / focal, -np.ones_like(u)], -1).reshape(-1, 3)
    d = dirs @ c2w[:3, :3].T
    o = np.broadcast_to(c2w[:3, 3], d.shape)
    t = np.full(len(d), np.inf)
    color, normal = np.zeros_like(d), np.zeros_like(d)
    t = _spheres(o, d, t, color, normal)
    t = _box(o, d, t, color, normal)
    hit = np.isfinite(t)
    shade = 0.35 + 0.65 * np.clip((normal * LIGHT).sum(-1), 0, 1)
    rgb = np.clip(color * shade[:, None], 0, 1)
    rgba = np.concatenate([rgb * hit[:, None], hit[:, None].astype(float)], -1)
    return rgba.reshape(size, size, 4)


def generate(root: str | Path, size: int = 64, views: tuple[int, int, int] = (40, 8, 8), seed: int = 0) -> Path:
    """Write the scene under `root` in Blender format; returns root."""
    root = Path(root)
    all_poses = camera_poses(sum(views), seed)
    order = np.random.default_rng(seed + 1).permutation(len(all_poses))
    start = 0
    for split, count in zip(("train", "val", "test"), views, strict=True):
        (root / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for k, index in enumerate(sorted(order[start:start + count])):
            rgba = render_view(all_poses[index], size)
            Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(root / split / f"r_{k}.png")
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": all_poses[index].tolist()})
        start += count
        meta = {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}
        (root / f"transforms_{split}.json").write_text(json.dumps(meta, indent=1))
    return root
