"""The checks every annotation reader of formats.py makes: label text, numbers, boxes and classes,
each error naming the file (and line)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("datamodules.license_plate.formats")  # the readers' logger, as before this split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class AnnotationError(ValueError):
    """A label that cannot be read; the message names the file (and line)."""


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header, or None when the file is not a readable image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None


def read_text(path: Path) -> str:
    """A label file's text; one that is not UTF-8 is an error naming it, not a bare UnicodeDecodeError."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); "
                              "save the label file as UTF-8") from None


def parse_float(value: str, what: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise AnnotationError(f"{where}: {what} must be a number, got {value!r}") from None
    if not np.isfinite(number):
        raise AnnotationError(f"{where}: {what} must be finite, got {value!r}")
    return number


def check_box(box, width: int, height: int, where: str) -> list[float]:
    """Clip a pixel xyxy box to the image with a warning; error when nothing of it is inside."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise AnnotationError(f"{where}: empty box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}); width and height must be > 0")
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise AnnotationError(
            f"{where}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) lies wholly outside the {width}x{height} image"
        )
    overshoot = max(cx1 - x1, cy1 - y1, x2 - cx2, y2 - cy2)
    if overshoot > 1.0:  # below a pixel is rounding in the label (normalised YOLO values), not an error
        log.warning("%s: box (%g, %g, %g, %g) extends outside the %dx%d image; clipped", where, x1, y1, x2, y2, width, height)
    return [cx1, cy1, cx2, cy2]


def class_index(name_or_id, class_names: list[str], where: str) -> int:
    """One class: everything is a plate. Several: ids must be in range, names must be listed."""
    if len(class_names) == 1:
        return 0
    if isinstance(name_or_id, int):
        if not 0 <= name_or_id < len(class_names):
            raise AnnotationError(f"{where}: class id {name_or_id} is not in 0..{len(class_names) - 1} ({class_names})")
        return name_or_id
    if name_or_id not in class_names:
        raise AnnotationError(f"{where}: class {name_or_id!r} is not one of data.class_names={class_names}")
    return class_names.index(name_or_id)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
