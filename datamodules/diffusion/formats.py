"""Readers for the image formats users bring, each returning uint8 images and optional labels.

Every reader returns a `RawImages`: a list of HxWxC uint8 arrays (C in 1, 3, 4) or one NxHxWxC
array, integer labels (or None for unlabelled data) and the class names. `to_tensor` then pads,
resizes, centre-crops and converts channels, so all formats share one pipeline.
"""
from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class RawImages:
    images: list[np.ndarray] | np.ndarray  # HxWxC uint8 each (or NxHxWxC)
    labels: np.ndarray | None               # int64, 0..K-1, or None when unlabelled
    class_names: list[str]
    names: list[str]                       # where each image came from, for error messages


# ---- default data --------------------------------------------------------------------------------
def write_digits(path: Path) -> Path:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real scans, 10 classes) as a .npz."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    np.savez_compressed(path, images=images, labels=digits.target.astype(np.int64),
                        class_names=np.array([str(c) for c in digits.target_names]))
    return path


# ---- labels --------------------------------------------------------------------------------------
def _index_labels(values: np.ndarray, names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map arbitrary integer labels to 0..K-1 (sorted), keeping the original values as names."""
    uniques, index = np.unique(values, return_inverse=True)
    if names is not None and len(names) == len(uniques) and np.array_equal(uniques, np.arange(len(uniques))):
        return index.astype(np.int64), [str(n) for n in names]
    return index.astype(np.int64), [str(u) for u in uniques]


# ---- image folders -------------------------------------------------------------------------------
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_pil(path: Path) -> np.ndarray:
    """HxWxC uint8 with C in (1, 3, 4); palette and odd modes are expanded, alpha kept for later."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decodes now: a truncated or corrupt file fails here
        if img.mode in ("P", "PA", "LA") or (img.mode == "RGB" and "transparency" in img.info):
            img = img.convert("RGBA")
        elif img.mode in ("I", "I;16", "F"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            return np.round(np.clip(arr / top, 0, 1) * 255).astype(np.uint8)[..., None]
        elif img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGB")
        arr = np.array(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def read_folder(root: Path) -> RawImages:
    """Class subfolders give labels; a flat folder of images is unlabelled. Unreadable files are skipped."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = sorted(p for p in root.iterdir() if _is_image(p))
    if subdirs and flat:
        raise ValueError(
            f"{root} holds both images ({flat[0].name}, ...) and subfolders ({subdirs[0].name}, ...). "
            "Use class subfolders only (labelled) or images only (unlabelled)."
        )
    if subdirs:
        groups = [(d.name, sorted(p for p in d.rglob("*") if _is_image(p))) for d in subdirs]
        empty = [name for name, files in groups if not files]
        if empty:
            raise ValueError(f"Class folder {root / empty[0]} has no images ({len(empty)} empty class folder(s): "
                             f"{', '.join(empty[:5])}). Remove it or add images.")
    elif flat:
        groups = [(None, flat)]
    else:
        raise ValueError(f"{root} has no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}) and no class subfolders.")

    images, labels, names, skipped = [], [], [], []
    class_names = [g[0] for g in groups if g[0] is not None]
    for label, (cls, files) in enumerate(groups):
        kept = 0
        for path in files:
            try:
                images.append(_read_pil(path))
            except Exception as err:  # noqa: BLE001 (unreadable / truncated / not an image: skip and count)
                skipped.append(f"{path} ({type(err).__name__}: {err})")
                continue
            labels.append(label)
            names.append(str(path))
            kept += 1
        if cls is not None and kept == 0:
            raise ValueError(f"Class folder {root / cls}: none of its {len(files)} images could be read, e.g. {skipped[-1]}")
    if skipped:
        log.warning("Skipped %d unreadable image(s) under %s, e.g. %s", len(skipped), root, "; ".join(skipped[:3]))
    if not images:
        raise ValueError(f"{root}: none of the images could be read, e.g. {skipped[0]}")
    return RawImages(images, np.asarray(labels, np.int64) if class_names else None, class_names, names)


# ---- MNIST-style IDX -----------------------------------------------------------------------------
def _open(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} cannot be read ({err}); is it a complete gzip/IDX file?") from err


def read_idx_file(path: Path) -> np.ndarray:
    """An IDX array of unsigned bytes (magic 0x0000 08 <ndim>), checked against its header."""
    data = _open(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: its header needs {header} bytes, the file has {len(data)}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes, "
                         f"but the file has {len(data)} ({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_prefix(path: Path, kind: str) -> str:
    return path.name.split(f"-{kind}")[0]


def read_idx(root: Path) -> RawImages:
    """Every `<prefix>-images-idx3-ubyte[.gz]` under root, with `<prefix>-labels-idx1-ubyte[.gz]` if present."""
    image_files = sorted(p for p in root.iterdir() if "images-idx3-ubyte" in p.name)
    if not image_files:
        raise ValueError(f"{root} has no '*-images-idx3-ubyte[.gz]' file")
    label_files = {_idx_prefix(p, "labels"): p for p in root.iterdir() if "labels-idx1-ubyte" in p.name}
    all_images, all_labels, names = [], [], []
    for image_file in image_files:
        images = read_idx_file(image_file)
        if images.ndim != 3:
            raise ValueError(f"{image_file}: expected N x rows x cols images, got shape {images.shape}")
        label_file = label_files.get(_idx_prefix(image_file, "images"))
        if label_files and label_file is None:
            raise ValueError(f"{image_file} has no matching labels file among {sorted(p.name for p in label_files.values())}")
        if label_file is not None:
            labels = read_idx_file(label_file)
            if labels.ndim != 1 or len(labels) != len(images):
                raise ValueError(f"IDX counts disagree: {image_file} holds {len(images)} images but "
                                 f"{label_file} holds {labels.shape[0] if labels.ndim else 0} labels")
            all_labels.append(labels.astype(np.int64))
        all_images.append(images[..., None])
        names += [f"{image_file}[{i}]" for i in range(len(images))]
    images = np.concatenate(all_images)
    if all_labels:
        labels, class_names = _index_labels(np.concatenate(all_labels))
        return RawImages(images, labels, class_names, names)
    return RawImages(images, None, [], names)


# ---- .npz ----------------------------------------------------------------------------------------
IMAGE_KEYS = ("images", "x", "x_train", "data", "arr_0")
LABEL_KEYS = ("labels", "y", "y_train", "targets", "arr_1")


def read_npz(path: Path) -> RawImages:
    """Arrays `images` (N,H,W | N,H,W,C | N,C,H,W; uint8, or float in [0, 1]) and optional `labels`."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable .npz file: {err}") from err
    with archive:
        keys = list(archive.keys())
        image_key = next((k for k in IMAGE_KEYS if k in keys), None)
        if image_key is None:
            raise ValueError(f"{path} has no image array: expected one of {IMAGE_KEYS}, found {keys}")
        images = archive[image_key]
        label_key = next((k for k in LABEL_KEYS if k in keys and k != image_key), None)
        labels = archive[label_key] if label_key else None
        names_array = archive["class_names"] if "class_names" in keys else None
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4:
        if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
            images = images.transpose(0, 2, 3, 1)
        if images.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{path}: '{image_key}' has shape {images.shape}; channels must be 1, 3 or 4")
    else:
        raise ValueError(f"{path}: '{image_key}' has shape {images.shape}; expected N,H,W or N,H,W,C or N,C,H,W")
    if len(images) == 0:
        raise ValueError(f"{path}: '{image_key}' holds no images")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            if np.issubdtype(images.dtype, np.integer) and images.min() >= 0 and images.max() <= 255:
                images = images.astype(np.uint8)
            else:
                raise ValueError(f"{path}: '{image_key}' has dtype {images.dtype}; use uint8 0-255 or float in [0, 1]")
        else:
            finite = np.isfinite(images).reshape(len(images), -1).all(1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise ValueError(f"{path}: '{image_key}'[{bad[0]}] has non-finite pixels (NaN or inf), as do "
                                 f"{len(bad)} images in all; expected values in [0, 1]")
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"{path}: float '{image_key}' ranges over [{lo:.3g}, {hi:.3g}]; expected [0, 1] "
                                 "(or store uint8 0-255)")
            images = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    names = [f"{path}[{i}]" for i in range(len(images))]
    if labels is None:
        return RawImages(images, None, [], names)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{path}: '{label_key}' has shape {labels.shape} but there are {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: '{label_key}' has dtype {labels.dtype}; labels must be integers")
    index, class_names = _index_labels(labels, None if names_array is None else list(names_array))
    return RawImages(images, index, class_names, names)


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".npz":
            return "npz"
        if "idx3-ubyte" in path.name:
            return "idx"
        raise ValueError(f"{path} is a file but not a .npz or IDX file; point data.data_dir at a folder or a .npz")
    names = [p.name for p in path.iterdir()]
    if any("images-idx3-ubyte" in n for n in names):
        return "idx"
    npz = [n for n in names if n.endswith(".npz")]
    if len(npz) == 1 and not any(Path(path, n).is_dir() for n in names):
        return "npz"
    return "folder"


# ---- one pipeline for every format ---------------------------------------------------------------
def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x: N,C,H,W float in [0, 255] with C in (1, 3, 4) -> N,channels,H,W. Alpha composites over black."""
    if x.shape[1] == 4:
        x = x[:, :3] * (x[:, 3:] / 255.0)
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    if channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    raise ValueError(f"data.channels must be 1 or 3, got {channels}")


def _process(x: torch.Tensor, size: int, channels: int, resize: bool, pad: int, name: str) -> torch.Tensor:
    """x: N,C,H,W uint8 of one size -> N,channels,size,size uint8."""
    x = _to_channels(x.float(), channels)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    if resize and min(h, w) != size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=scale < 1)
        h, w = new
    if h < size or w < size:
        raise ValueError(f"{name} is {h}x{w} (after padding {pad}), smaller than the {size}x{size} crop; "
                         "set data.resize=true to scale it, or data.pad to pad it")
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8)


def to_tensor(raw: RawImages, size: int, channels: int, resize: bool = True, pad: int = 0) -> torch.Tensor:
    """All images as one N,channels,size,size uint8 tensor: pad, resize the shorter side, centre crop."""
    if isinstance(raw.images, np.ndarray):
        x = torch.from_numpy(np.array(raw.images, copy=True)).permute(0, 3, 1, 2)
        out = []
        for start in range(0, len(x), 1024):
            out.append(_process(x[start:start + 1024], size, channels, resize, pad, raw.names[start].split("[")[0]
                                + " images"))
        return torch.cat(out)
    return torch.stack([
        _process(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None], size, channels, resize, pad, name)[0]
        for img, name in zip(raw.images, raw.names, strict=True)
    ])
