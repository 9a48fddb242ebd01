"""Annotation formats users bring, all read into one list of `Sample`s (pixel xyxy boxes).

Supported: YOLO txt (`images/`, `labels/`, optional `data.yaml`), COCO json, Pascal VOC xml,
CCPD (box in the file name) and OpenALPR benchmark txt (`name<TAB>x<TAB>y<TAB>w<TAB>h<TAB>text`).
`detect_format` picks one from the folder's layout. Every reader checks its input the same way:
a malformed line or field is an error naming the file and line; a box partly outside the image
is clipped with a warning; a box wholly outside (or empty) is an error; label files whose image
is missing, and images that cannot be opened, are skipped and counted in one warning.
"""
from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.license_plate.checks import (  # noqa: F401 (re-exported)
    IMAGE_EXTENSIONS,
    AnnotationError,
    check_box,
    class_index,
    image_size,
    list_images,
    parse_float,
    read_text,
)

log = logging.getLogger(__name__)

FORMATS = ("yolo", "coco", "voc", "ccpd", "openalpr")


@dataclass
class Sample:
    image: Path
    boxes: np.ndarray                      # (N, 4) float32, xyxy in pixels of the original image
    labels: np.ndarray                     # (N,) int64, 0-based class index (background excluded)
    texts: list[str] = field(default_factory=list)   # plate strings when the format has them

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)


@dataclass
class Skips:
    """Counts of what was skipped, reported once per dataset."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, path: Path) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, str(path))

    def report(self, where: Path) -> None:
        for reason, n in self.counts.items():
            log.warning("%s: skipped %d %s (e.g. %s)", where, n, reason, self.examples[reason])


# ---- YOLO --------------------------------------------------------------------------------------
def read_yolo_label(path: Path, width: int, height: int, class_names: list[str]) -> tuple[list, list]:
    boxes, labels = [], []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise AnnotationError(f"{where}: expected 5 fields 'class cx cy w h' (normalised), got {len(fields)}: {line.strip()!r}")
        cls = parse_float(fields[0], "class", where)
        if cls != int(cls):
            raise AnnotationError(f"{where}: class must be an integer, got {fields[0]!r}")
        cx, cy, w, h = (parse_float(v, n, where) for v, n in zip(fields[1:], ("cx", "cy", "w", "h"), strict=True))
        if max(cx, cy, w, h) > 1.5:
            raise AnnotationError(f"{where}: YOLO values are normalised to [0, 1]; got cx={cx:g} cy={cy:g} w={w:g} h={h:g} (pixels?)")
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        boxes.append(check_box(box, width, height, where))
        labels.append(class_index(int(cls), class_names, where))
    return boxes, labels


def _yolo_label_dir(images: Path) -> Path:
    """Ultralytics convention: the last `images` path component becomes `labels`."""
    parts = list(images.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return images.parent / "labels"


def read_yolo_split(images: Path, class_names: list[str], skips: Skips) -> list[Sample]:
    if not images.is_dir():
        raise FileNotFoundError(f"YOLO image folder {images} does not exist")
    labels_dir = _yolo_label_dir(images)
    samples, stems = [], set()
    for image in list_images(images):
        stems.add(image.stem)
        size = image_size(image)
        if size is None:
            skips.add("unreadable images", image)
            continue
        label = labels_dir / f"{image.stem}.txt"
        boxes, labels = read_yolo_label(label, *size, class_names) if label.is_file() else ([], [])
        samples.append(Sample(image, boxes, labels))
    if labels_dir.is_dir():
        for label in sorted(labels_dir.glob("*.txt")):
            if label.stem not in stems and label.name != "classes.txt":
                skips.add("label files without an image", label)
    return samples


def read_yolo(root: Path, class_names: list[str], skips: Skips) -> dict[str, list[Sample]]:
    """`data.yaml` with train/val/test image folders, or a plain `images/` + `labels/` folder."""
    config = root / "data.yaml"
    if config.is_file():
        import yaml

        try:
            spec = yaml.safe_load(read_text(config)) or {}
        except yaml.YAMLError as err:
            raise AnnotationError(f"{config}: not valid YAML: {err}") from None
        base = Path(spec.get("path") or root)
        base = base if base.is_absolute() else root / base
        splits = {}
        for split in ("train", "val", "test"):
            if spec.get(split):
                folder = Path(spec[split])
                splits[split] = read_yolo_split(folder if folder.is_absolute() else base / folder, class_names, skips)
        if not splits:
            raise AnnotationError(f"{config}: names no train/val/test image folder")
        return splits
    return {"all": read_yolo_split(root / "images", class_names, skips)}


# ---- COCO --------------------------------------------------------------------------------------
def read_coco_file(path: Path, class_names: list[str], skips: Skips) -> list[Sample]:
    try:
        spec = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON: {err}") from None
    for key in ("images", "annotations"):
        if not isinstance(spec.get(key), list):
            raise AnnotationError(f"{path}: a COCO file needs a list '{key}'")
    categories = {c["id"]: c.get("name", str(c["id"])) for c in spec.get("categories", [])}
    by_image: dict = {}
    for i, ann in enumerate(spec["annotations"]):
        by_image.setdefault(ann.get("image_id"), []).append((i, ann))
    folders = [path.parent / "images", path.parent, path.parent.parent / "images"]
    samples = []
    for entry in spec["images"]:
        name = entry.get("file_name")
        image = next((f / name for f in folders if name and (f / name).is_file()), None)
        if image is None:
            skips.add("COCO images whose file is missing", path.parent / str(name))
            continue
        size = image_size(image)
        if size is None:
            skips.add("unreadable images", image)
            continue
        boxes, labels = [], []
        for i, ann in by_image.get(entry.get("id"), []):
            where = f"{path}: annotations[{i}] (image {name})"
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise AnnotationError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
            x, y, w, h = (parse_float(str(v), "bbox value", where) for v in bbox)
            boxes.append(check_box([x, y, x + w, y + h], *size, where))
            cat = categories.get(ann.get("category_id"), ann.get("category_id"))
            labels.append(class_index(cat, class_names, where))
        samples.append(Sample(image, boxes, labels))
    return samples


def read_coco(root: Path, class_names: list[str], skips: Skips) -> dict[str, list[Sample]]:
    """`root` is a json file, or a folder with train/val/test.json (or one json for everything)."""
    if root.is_file():
        return {"all": read_coco_file(root, class_names, skips)}
    for folder in (root, root / "annotations"):
        named = {s: folder / f"{s}.json" for s in ("train", "val", "test") if (folder / f"{s}.json").is_file()}
        named |= {s: folder / f"instances_{s}.json" for s in ("train", "val", "test")
                  if s not in named and (folder / f"instances_{s}.json").is_file()}
        if named:
            return {s: read_coco_file(p, class_names, skips) for s, p in named.items()}
    files = {p.stem: p for p in sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))}
    if len(files) != 1:
        raise AnnotationError(f"{root}: expected train/val/test.json or exactly one COCO json, found {sorted(files) or 'none'}")
    return {"all": read_coco_file(next(iter(files.values())), class_names, skips)}


# ---- Pascal VOC --------------------------------------------------------------------------------
def read_voc_file(path: Path, image_dirs: list[Path], class_names: list[str], skips: Skips) -> Sample | None:
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not valid XML: {err}") from None
    name = tree.findtext("filename") or ""
    candidates = [d / name for d in image_dirs if name] + [d / (path.stem + ext) for d in image_dirs for ext in IMAGE_EXTENSIONS]
    image = next((c for c in candidates if c.is_file()), None)
    if image is None:
        skips.add("label files without an image", path)
        return None
    size = image_size(image)
    if size is None:
        skips.add("unreadable images", image)
        return None
    boxes, labels = [], []
    for k, obj in enumerate(tree.iter("object")):
        where = f"{path}: object {k} (line {getattr(obj, 'sourceline', '?')})"
        bnd = obj.find("bndbox")
        if bnd is None:
            raise AnnotationError(f"{where}: has no <bndbox>")
        values = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = bnd.findtext(tag)
            if text is None:
                raise AnnotationError(f"{where}: <bndbox> has no <{tag}>")
            values.append(parse_float(text.strip(), tag, where))
        boxes.append(check_box(values, *size, where))
        labels.append(class_index((obj.findtext("name") or "").strip(), class_names, where))
    return Sample(image, boxes, labels)


def read_voc(root: Path, class_names: list[str], skips: Skips) -> dict[str, list[Sample]]:
    """`Annotations/*.xml` + `JPEGImages/` (VOC layout), or xml files beside/under `images/`."""
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else (root / "annotations" if (root / "annotations").is_dir() else root)
    image_dirs = [d for d in (root / "JPEGImages", root / "images", root) if d.is_dir()]
    samples = [s for p in sorted(ann_dir.glob("*.xml")) if (s := read_voc_file(p, image_dirs, class_names, skips))]
    # Images without an xml are negatives.
    labelled = {s.image.resolve() for s in samples}
    for folder in image_dirs:
        for image in list_images(folder):
            if image.resolve() not in labelled and not (ann_dir / f"{image.stem}.xml").is_file():
                if image_size(image) is None:
                    skips.add("unreadable images", image)
                else:
                    samples.append(Sample(image, [], []))
                labelled.add(image.resolve())
    return {"all": sorted(samples, key=lambda s: s.image.name)}


# ---- CCPD --------------------------------------------------------------------------------------
def parse_ccpd_name(path: Path) -> list[float] | None:
    """CCPD: `area-tilt-x1&y1_x2&y2-corners-plate-brightness-blur.jpg`; None for a name without '-' (a negative)."""
    fields = path.stem.split("-")
    if len(fields) == 1:
        return None
    if len(fields) < 3:
        raise AnnotationError(f"{path}: a CCPD file name has 7 '-'-separated fields with the box third ('x1&y1_x2&y2'), got {path.name!r}")
    corners = fields[2].split("_")
    try:
        (x1, y1), (x2, y2) = (tuple(float(v) for v in c.split("&")) for c in corners)
    except ValueError:
        raise AnnotationError(f"{path}: box field {fields[2]!r} is not 'x1&y1_x2&y2'") from None
    return [x1, y1, x2, y2]


def read_ccpd(root: Path, class_names: list[str], skips: Skips) -> dict[str, list[Sample]]:
    """Images in `root` (or its train/val/test subfolders, as CCPD2019's splits are laid out)."""
    def read(folder: Path) -> list[Sample]:
        samples = []
        for image in list_images(folder):
            box = parse_ccpd_name(image)
            size = image_size(image)
            if size is None:
                skips.add("unreadable images", image)
                continue
            if box is None:
                samples.append(Sample(image, [], []))
            else:
                samples.append(Sample(image, [check_box(box, *size, str(image))], [0]))
        return samples

    subs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    return {s: read(p) for s, p in subs.items()} if subs else {"all": read(root)}


# ---- OpenALPR benchmark ------------------------------------------------------------------------
def read_openalpr(root: Path, class_names: list[str], skips: Skips) -> dict[str, list[Sample]]:
    """One `name<TAB>x<TAB>y<TAB>w<TAB>h<TAB>text` line per plate, in a .txt beside each image."""
    entries: dict[Path, Sample] = {}
    for label in sorted(root.glob("*.txt")):
        for number, line in enumerate(read_text(label).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{label}:{number}"
            fields = line.rstrip("\n").split("\t")
            if len(fields) not in (5, 6):
                raise AnnotationError(f"{where}: expected 6 TAB-separated fields 'name x y w h text', got {len(fields)}: {line!r}")
            image = root / fields[0]
            if not image.is_file():
                skips.add("label files without an image", label)
                break
            size = image_size(image)
            if size is None:
                skips.add("unreadable images", image)
                break
            x, y, w, h = (parse_float(v, n, where) for v, n in zip(fields[1:5], ("x", "y", "w", "h"), strict=True))
            sample = entries.setdefault(image, Sample(image, [], []))
            boxes = sample.boxes.tolist() + [check_box([x, y, x + w, y + h], *size, where)]
            sample.boxes, sample.labels = np.asarray(boxes, np.float32), np.zeros(len(boxes), np.int64)
            sample.texts.append(fields[5] if len(fields) == 6 else "")
    for image in list_images(root):   # images without a line are negatives
        if image not in entries:
            if image_size(image) is None:
                skips.add("unreadable images", image)
            else:
                entries[image] = Sample(image, [], [])
    return {"all": sorted(entries.values(), key=lambda s: s.image.name)}


READERS = {"yolo": read_yolo, "coco": read_coco, "voc": read_voc, "ccpd": read_ccpd, "openalpr": read_openalpr}


def detect_format(root: Path) -> str:
    """Guess the format from a folder's layout; the error says what was looked for."""
    if root.is_file() and root.suffix == ".json":
        return "coco"
    if (root / "data.yaml").is_file() or (root / "labels").is_dir():
        return "yolo"
    if list(root.glob("*.json")) or (root / "annotations").is_dir() and list((root / "annotations").glob("*.json")):
        return "coco"
    if (root / "Annotations").is_dir() or list(root.glob("*.xml")):
        return "voc"
    txt = next(iter(sorted(root.glob("*.txt"))), None)
    if txt is not None and len(read_text(txt).split("\n", 1)[0].split("\t")) in (5, 6):
        return "openalpr"
    images = list_images(root) if root.is_dir() else []
    if not images and all((root / s).is_dir() for s in ("train",)):
        images = list_images(root / "train")
    if images and any(len(p.stem.split("-")) >= 3 and "&" in p.stem for p in images[:50]):
        return "ccpd"
    raise AnnotationError(
        f"Cannot tell the annotation format of {root}: expected data.yaml or labels/ (yolo), *.json (coco), "
        f"Annotations/ or *.xml (voc), TAB-separated *.txt (openalpr) or CCPD-named images. Set data.format to one of {FORMATS}."
    )


def read_dataset(root: Path, fmt: str, class_names: list[str]) -> dict[str, list[Sample]]:
    """{split: samples}; split is train/val/test when the data names them, else 'all'."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data.data_dir={root} does not exist; point it at your plate images and labels")
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise ValueError(f"data.format={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    skips = Skips()
    splits = READERS[fmt](root, list(class_names), skips)
    skips.report(root)
    total = sum(len(v) for v in splits.values())
    if total == 0:
        raise AnnotationError(f"{root}: no usable images found as format '{fmt}'")
    boxes = sum(len(s.boxes) for v in splits.values() for s in v)
    log.info("%s: %d images, %d boxes (%s format; splits: %s)", root, total, boxes, fmt,
             ", ".join(f"{k}={len(v)}" for k, v in splits.items()))
    return splits
