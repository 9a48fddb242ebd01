"""Readers for the camera formats users bring. Each returns `Views` per split.

- Blender synthetic: transforms_{train,val,test}.json (`camera_angle_x`, `frames[].file_path`
  without extension, 4x4 `transform_matrix`), RGBA PNGs composited onto a background.
- instant-ngp / nerfstudio: transforms.json (`fl_x fl_y cx cy w h`, optional `k1 k2 p1 p2`,
  `aabb_scale`, `file_path` with extension); every 8th view is held out when there is no split.
- LLFF: poses_bounds.npy + images_<N>/ (forward-facing; the module renders NDC rays).

Every problem with the files raises NerfDataError naming the file and the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPG", ".JPEG", ".PNG", ".exr")


class NerfDataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and field."""


@dataclass
class Views:
    """Posed images of one split. Intrinsics are per view, in pixels of the (downscaled) images."""

    images: Tensor        # (N, H, W, 3) float32 in [0, 1], composited onto the background
    c2w: Tensor           # (N, 4, 4) OpenGL camera-to-world
    intrinsics: Tensor    # (N, 4) fx, fy, cx, cy
    distortion: Tensor | None = None  # (4,) k1 k2 p1 p2 (OpenCV), shared by all views
    names: list[str] = field(default_factory=list)
    alpha: Tensor | None = None  # (N, H, W, 1) opacity when the images have it (RGBA); RGB images among them: 1

    def __len__(self) -> int:
        return len(self.images)

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def subset(self, indices) -> Views:
        indices = list(indices)
        return Views(self.images[indices], self.c2w[indices], self.intrinsics[indices], self.distortion,
                     [self.names[i] for i in indices], self.alpha[indices] if self.alpha is not None else None)


@dataclass
class Scene:
    splits: dict[str, Views]
    near: float
    far: float
    aabb: list[float]          # xmin ymin zmin xmax ymax zmax: where the occupancy grid lives
    ndc: bool = False
    format: str = "blender"


# ---- helpers -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise NerfDataError(f"{path}: file not found")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise NerfDataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(meta, dict):
        raise NerfDataError(f"{path}: expected a JSON object at the top level")
    return meta


# Camera values a scene cannot be trained with: a NaN focal length trains to garbage without an error.
POSITIVE = {"camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "w", "h"}
BELOW_PI = {"camera_angle_x", "camera_angle_y"}


def _number(meta: dict, key: str, where: str, default=None) -> float:
    if key not in meta:
        if default is not None:
            return default
        raise NerfDataError(f"{where}: missing field '{key}'")
    try:
        value = float(meta[key])
    except (TypeError, ValueError):
        raise NerfDataError(f"{where}: field '{key}' must be a number, got {meta[key]!r}") from None
    if not math.isfinite(value):
        raise NerfDataError(f"{where}: field '{key}' is {meta[key]!r}; expected a finite number")
    if key in POSITIVE and value <= 0 or key in BELOW_PI and value >= math.pi:
        expected = "an angle in radians in (0, pi)" if key in BELOW_PI else "a positive number"
        raise NerfDataError(f"{where}: field '{key}' is {value}; expected {expected}")
    return value


def _frames(meta: dict, where: str) -> list[dict]:
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise NerfDataError(f"{where}: missing or empty field 'frames'")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise NerfDataError(f"{where}: frames[{i}] must be an object")
    return frames


def _pose(frame: dict, index: int, where: str) -> np.ndarray:
    if "transform_matrix" not in frame:
        raise NerfDataError(f"{where}: frames[{index}] has no field 'transform_matrix'")
    try:
        matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        raise NerfDataError(f"{where}: frames[{index}].transform_matrix is not a numeric matrix") from None
    if matrix.shape != (4, 4):
        raise NerfDataError(f"{where}: frames[{index}].transform_matrix must be 4x4, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise NerfDataError(f"{where}: frames[{index}].transform_matrix has non-finite values")
    return matrix


def _resolve_image(root: Path, file_path, index: int, where: str, add_suffix: bool) -> Path:
    if not isinstance(file_path, str) or not file_path:
        raise NerfDataError(f"{where}: frames[{index}] has no valid field 'file_path'")
    path = (root / file_path)
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise NerfDataError(f"{where}: frames[{index}].file_path {file_path!r} points outside the dataset root {root}")
    if resolved.is_file():
        return resolved
    if add_suffix or not path.suffix:
        for suffix in IMAGE_SUFFIXES:
            candidate = resolved.with_name(resolved.name + suffix)
            if candidate.is_file():
                return candidate
    raise NerfDataError(f"{where}: frames[{index}].file_path {file_path!r}: image {resolved} not found")


def parse_background(background) -> Tensor:
    names = {"white": [1.0, 1.0, 1.0], "black": [0.0, 0.0, 0.0]}
    if isinstance(background, str):
        if background not in names:
            raise ValueError(f"data.background must be 'white', 'black' or [r, g, b] in [0, 1]; got {background!r}")
        return torch.tensor(names[background])
    values = [float(v) for v in background]
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"data.background must be 'white', 'black' or [r, g, b] in [0, 1]; got {background!r}")
    return torch.tensor(values)


def load_image(path: Path, background: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
    """(H, W, 3) float in [0, 1], resized with area averaging, and its (H, W, 1) alpha if it has one (RGBA):
    the image is composited onto `background` either way."""
    try:
        with Image.open(path) as img:
            img.load()
            # a palette image has alpha only with a transparent entry: opaque ones stay RGB (no alpha to keep)
            transparent = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
            img = img.convert("RGBA") if transparent else img.convert("RGB")
            if size is not None and img.size != size:
                img = img.resize(size, Image.Resampling.BOX)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise NerfDataError(f"{path}: cannot read image ({err})") from None
    image = torch.from_numpy(array.copy())
    if image.shape[-1] != 4:
        return image, None
    alpha = image[..., 3:]
    return image[..., :3] * alpha + background * (1 - alpha), alpha


def stack_images(loaded: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """load_image's results as (N, H, W, 3) images and (N, H, W, 1) alpha, or None when no image has one."""
    images = torch.stack([image for image, _ in loaded])
    if all(alpha is None for _, alpha in loaded):
        return images, None
    return images, torch.stack([alpha if alpha is not None else torch.ones_like(image[..., :1])
                                for image, alpha in loaded])


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size  # (W, H)
    except OSError as err:
        raise NerfDataError(f"{path}: cannot read image ({err})") from None


def _scaled(size: tuple[int, int], downscale: float) -> tuple[int, int]:
    return max(1, round(size[0] / downscale)), max(1, round(size[1] / downscale))


def _cube(half: float) -> list[float]:
    return [-half, -half, -half, half, half, half]


# ---- Blender --------------------------------------------------------------------------------------
def load_blender(root: Path, background: Tensor, downscale: float = 1.0, splits=("train", "val", "test"),
                 near: float | None = None, far: float | None = None, aabb=None) -> Scene:
    out: dict[str, Views] = {}
    for split in splits:
        path = root / f"transforms_{split}.json"
        if not path.is_file():
            continue
        meta = _read_json(path)
        frames = _frames(meta, str(path))
        angle = _number(meta, "camera_angle_x", str(path))
        images, poses, names = [], [], []
        full_size = None
        for i, frame in enumerate(frames):
            image_path = _resolve_image(root, frame.get("file_path"), i, str(path), add_suffix=True)
            poses.append(_pose(frame, i, str(path)))
            size = _image_size(image_path)
            if full_size is None:
                full_size = size
                for key, value in (("w", size[0]), ("h", size[1])):
                    if key in meta and round(_number(meta, key, str(path))) != value:
                        raise NerfDataError(f"{path}: field '{key}'={meta[key]} disagrees with image {image_path} "
                                            f"of size {size[0]}x{size[1]}")
            elif size != full_size:
                raise NerfDataError(f"{path}: frames[{i}] image {image_path} is {size[0]}x{size[1]}, but the "
                                    f"split's camera is {full_size[0]}x{full_size[1]}")
            images.append(load_image(image_path, background, _scaled(size, downscale)))
            names.append(str(frame["file_path"]))
        pixels, alpha = stack_images(images)
        h, w = pixels.shape[1:3]
        focal = 0.5 * w / math.tan(0.5 * angle)
        intr = torch.tensor([[focal, focal, w / 2, h / 2]]).repeat(len(images), 1)
        out[split] = Views(pixels, torch.from_numpy(np.stack(poses)).float(), intr, None, names, alpha)
    if "train" not in out:
        raise NerfDataError(f"{root / 'transforms_train.json'}: file not found (Blender format needs a train split)")
    return Scene(out, near if near is not None else 2.0, far if far is not None else 6.0,
                 list(aabb) if aabb is not None else _cube(1.5), False, "blender")


# ---- instant-ngp / nerfstudio -----------------------------------------------------------------------
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")


def _ngp_camera(meta: dict, frame: dict, where: str) -> dict:
    cam = {}
    merged = {**meta, **{k: v for k, v in frame.items() if k in INTRINSIC_KEYS + ("k1", "k2", "p1", "p2")}}
    if "w" not in merged or "h" not in merged:
        raise NerfDataError(f"{where}: missing field 'w' or 'h' (image size of the intrinsics)")
    cam["w"], cam["h"] = _number(merged, "w", where), _number(merged, "h", where)
    if "fl_x" not in merged and "camera_angle_x" in merged:
        merged["fl_x"] = 0.5 * cam["w"] / math.tan(0.5 * _number(merged, "camera_angle_x", where))
    cam["fl_x"] = _number(merged, "fl_x", where)
    cam["fl_y"] = _number(merged, "fl_y", where, default=cam["fl_x"])
    cam["cx"] = _number(merged, "cx", where, default=cam["w"] / 2)
    cam["cy"] = _number(merged, "cy", where, default=cam["h"] / 2)
    cam["dist"] = tuple(_number(merged, k, where, default=0.0) for k in ("k1", "k2", "p1", "p2"))
    model = str(meta.get("camera_model", "OPENCV")).upper()
    if model not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        raise NerfDataError(f"{where}: camera_model {model!r} is not supported (OpenCV radial-tangential "
                            "k1 k2 p1 p2 or pinhole only)")
    for key in ("k3", "k4", "k5", "k6"):
        if key in meta and _number(meta, key, where) != 0.0:
            raise NerfDataError(f"{where}: distortion coefficient '{key}' is not supported (only k1 k2 p1 p2); "
                                "undistort the images first")
    return cam


def load_ngp(root: Path, background: Tensor, downscale: float = 1.0, holdout_every: int = 8,
             transforms_file: str = "transforms.json", near: float | None = None, far: float | None = None,
             aabb=None) -> Scene:
    path = root / transforms_file
    meta = _read_json(path)
    frames = _frames(meta, str(path))
    images, poses, intr, names, dists, splits = [], [], [], [], set(), []
    for i, frame in enumerate(frames):
        where = f"{path}: frames[{i}]"
        cam = _ngp_camera(meta, frame, str(path))
        image_path = _resolve_image(root, frame.get("file_path"), i, str(path), add_suffix=False)
        size = _image_size(image_path)
        if size != (int(cam["w"]), int(cam["h"])):
            raise NerfDataError(f"{where}: image {image_path} is {size[0]}x{size[1]} but the intrinsics "
                                f"say w={cam['w']:g}, h={cam['h']:g}")
        poses.append(_pose(frame, i, str(path)))
        target = _scaled(size, downscale)
        sx, sy = target[0] / size[0], target[1] / size[1]
        images.append(load_image(image_path, background, target))
        intr.append([cam["fl_x"] * sx, cam["fl_y"] * sy, cam["cx"] * sx, cam["cy"] * sy])
        dists.add(cam["dist"])
        names.append(str(frame["file_path"]))
        splits.append(frame.get("split"))
    if len({tuple(im.shape) for im, _ in images}) > 1:
        raise NerfDataError(f"{path}: frames have different image sizes; this loader needs one camera size")
    if len(dists) > 1:
        raise NerfDataError(f"{path}: frames have different distortion coefficients (k1 k2 p1 p2); "
                            "this loader needs one lens")
    dist = torch.tensor(dists.pop(), dtype=torch.float32)
    pixels, alpha = stack_images(images)
    all_views = Views(pixels, torch.from_numpy(np.stack(poses)).float(), torch.tensor(intr),
                      dist if dist.abs().sum() > 0 else None, names, alpha)
    n = len(all_views)
    if any(s is not None for s in splits):
        index = {s: [i for i in range(n) if splits[i] == s] for s in ("train", "val", "test")}
    else:
        held = [i for i in range(n) if i % holdout_every == 0] if holdout_every > 0 else []
        index = {"train": [i for i in range(n) if i not in held], "test": held}
    out = {s: all_views.subset(ix) for s, ix in index.items() if ix}
    if "train" not in out:
        raise NerfDataError(f"{path}: no training frames")
    scale = _number(meta, "aabb_scale", str(path), default=1.0)
    half = 1.5 * scale  # instant-ngp's unit cube spans 3 scene units (scale 0.33); aabb_scale widens it
    centers = all_views.c2w[:, :3, 3]
    reach = float(centers.norm(dim=-1).max()) + math.sqrt(3) * half
    return Scene(out, near if near is not None else 0.05, far if far is not None else reach,
                 list(aabb) if aabb is not None else _cube(half), False, "ngp")


# ---- LLFF -----------------------------------------------------------------------------------------
def load_llff(root: Path, factor: int = 8, holdout_every: int = 8, ndc: bool = True, near=None, far=None,
              aabb=None) -> Scene:
    path = root / "poses_bounds.npy"
    if not path.is_file():
        raise NerfDataError(f"{path}: file not found")
    try:
        data = np.load(path)
    except (OSError, ValueError, EOFError) as err:  # what numpy raises for a corrupt or pickled file
        raise NerfDataError(f"{path}: cannot read ({err})") from None
    if data.ndim != 2 or data.shape[1] != 17:
        raise NerfDataError(f"{path}: expected an array of shape (N, 17) (3x5 pose + 2 bounds), got {data.shape}")
    bad = np.flatnonzero(~np.isfinite(data).all(1) | (data[:, 15:] <= 0).any(1) | (data[:, [4, 9, 14]] <= 0).any(1))
    if len(bad):
        raise NerfDataError(f"{path}: row {bad[0]} (of {len(bad)} such rows) has a non-finite value, or a height, "
                            f"width, focal length or depth bound that is not positive: {data[bad[0]].tolist()}")
    folder = root / (f"images_{factor}" if factor > 1 else "images")
    if not folder.is_dir():
        raise NerfDataError(f"{folder}: image folder not found (data.llff_factor={factor})")
    files = sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)
    if len(files) != len(data):
        raise NerfDataError(f"{folder}: has {len(files)} images but {path} has {len(data)} poses")
    poses = data[:, :15].reshape(-1, 3, 5)
    bounds = data[:, 15:]
    h_full, w_full, focal_full = poses[0, :, 4]
    # LLFF stores [down, right, back]; OpenGL wants [right, up, back].
    rot = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:3]], axis=2)
    centers = poses[:, :, 3]
    scale = 1.0 / (bounds.min() * 0.75)  # as the NeRF code: nearest bound lands at 1/0.75
    centers = centers * scale
    bounds = bounds * scale
    c2w = np.tile(np.eye(4), (len(poses), 1, 1))
    c2w[:, :3, :3], c2w[:, :3, 3] = rot, centers
    # recentre on the average camera, so NDC's z axis is the mean viewing direction
    mean_z = c2w[:, :3, 2].mean(0)
    mean_z /= np.linalg.norm(mean_z)
    mean_y = c2w[:, :3, 1].mean(0)
    mean_x = np.cross(mean_y, mean_z)
    mean_x /= np.linalg.norm(mean_x)
    mean_y = np.cross(mean_z, mean_x)
    avg = np.eye(4)
    avg[:3, 0], avg[:3, 1], avg[:3, 2], avg[:3, 3] = mean_x, mean_y, mean_z, centers.mean(0)
    c2w = np.linalg.inv(avg) @ c2w
    background = torch.zeros(3)
    images, intr = [], []
    for f in files:
        image, _ = load_image(f, background)  # forward-facing photos: no background to see
        h, w = image.shape[:2]
        if abs(w / h - w_full / h_full) > 0.02:
            raise NerfDataError(f"{f}: image is {w}x{h}, which does not match the aspect ratio of "
                                f"{path} (h={h_full:g}, w={w_full:g})")
        images.append(image)
        f_px = focal_full * w / w_full
        intr.append([f_px, f_px, w / 2, h / 2])
    if len({tuple(im.shape) for im in images}) > 1:
        raise NerfDataError(f"{folder}: images have different sizes")
    views = Views(torch.stack(images), torch.from_numpy(c2w).float(), torch.tensor(intr, dtype=torch.float32),
                  None, [f.name for f in files])
    held = [i for i in range(len(views)) if holdout_every > 0 and i % holdout_every == 0]
    out = {"train": views.subset([i for i in range(len(views)) if i not in held])}
    if held:
        out["test"] = views.subset(held)
    if ndc:
        return Scene(out, 0.0, 1.0, aabb if aabb is not None else [-1.5, -1.5, -1.0, 1.5, 1.5, 1.0], True, "llff")
    return Scene(out, near if near is not None else float(bounds.min() * 0.9),
                 far if far is not None else float(bounds.max()), list(aabb) if aabb is not None else _cube(
                     float(np.abs(centers).max() + bounds.max())), False, "llff")


def detect_format(root: Path) -> str:
    if (root / "transforms_train.json").is_file():
        return "blender"
    if (root / "transforms.json").is_file():
        return "ngp"
    if (root / "poses_bounds.npy").is_file():
        return "llff"
    raise NerfDataError(f"{root}: no transforms_train.json (Blender), transforms.json (instant-ngp/nerfstudio) "
                        "or poses_bounds.npy (LLFF) found")
