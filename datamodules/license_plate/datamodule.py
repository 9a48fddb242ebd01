"""Licence-plate detection data: any supported annotation format -> torchvision detection targets.

A batch is `(images, targets)`: a list of float CHW tensors in [0, 1] and a list of dicts with
`boxes` (N x 4, xyxy pixels of the returned image; N may be 0 for images without plates),
`labels` (N, 1-based: 0 is the detector's background), `image_id`, `scale` (returned size /
original size) and `path`. Prediction batches are the same with empty boxes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from common.task_data import TaskData
from datamodules.base import BaseDataModule
from datamodules.builtin import builtin_folder, user_folder
from datamodules.license_plate.formats import Sample, list_images, read_dataset
from datamodules.license_plate.synthetic import VERSION as SYNTHETIC_VERSION
from datamodules.license_plate.synthetic import generate

PLATE_DATA = "plate images with labels (YOLO, COCO, VOC, CCPD file names or OpenALPR)"

log = logging.getLogger(__name__)


def collate(batch):
    """Variable box counts: keep images and targets as lists (what torchvision detectors take)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:
        raise ValueError(f"Cannot decode image {path}: {err} (truncated or corrupt file?). "
                         "Remove it, or set data.check_images=full to find and skip every such file at setup.") from None


def build_transforms(train: bool, image_size: int, resize: str, augment: dict | None) -> v2.Compose:
    """Plate-friendly augmentation (no horizontal flip by default: it mirrors characters) and resize."""
    a = dict(augment or {})
    steps = []
    if train and a.get("enabled", True):
        steps += [
            v2.RandomPhotometricDistort(p=a.get("photometric_p", 0.5)),
            v2.RandomAffine(degrees=a.get("rotate_degrees", 5.0), translate=(a.get("translate", 0.1),) * 2,
                            scale=tuple(a.get("scale", (0.75, 1.25)))),
            v2.RandomPerspective(distortion_scale=a.get("perspective", 0.15), p=a.get("perspective_p", 0.3)),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=a.get("blur_p", 0.2)),
        ]
        if a.get("hflip_p", 0.0) > 0:
            steps.append(v2.RandomHorizontalFlip(p=a["hflip_p"]))
    if resize in ("keep_ratio", "letterbox"):
        steps.append(v2.Resize(size=None, max_size=image_size, antialias=True))  # longest side = image_size
    if resize == "letterbox":
        steps.append(_PadTo(image_size))
    elif resize not in ("keep_ratio", "none"):
        raise ValueError(f"data.resize={resize!r} must be keep_ratio, letterbox or none")
    steps += [v2.SanitizeBoundingBoxes(min_size=2.0), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


class _PadTo(v2.Transform):
    """Pad bottom/right to a square `size` (boxes keep their coordinates)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def transform(self, inpt, params):
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes)):
            h, w = inpt.canvas_size if isinstance(inpt, tv_tensors.BoundingBoxes) else inpt.shape[-2:]
            return v2.functional.pad(inpt, [0, 0, max(0, self.size - w), max(0, self.size - h)])
        return inpt


class PlateDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], transforms: v2.Compose) -> None:
        self.samples = list(samples)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.image)
        width, height = image.size
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(sample.boxes), format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(sample.labels) + 1,
        }
        image, target = self.transforms(tv_tensors.Image(v2.functional.pil_to_tensor(image)), target)
        new_h, new_w = image.shape[-2:]
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
            "labels": target["labels"].long(),
            "image_id": index,
            "scale": torch.tensor([new_w / width, new_h / height]),
            "path": str(sample.image),
        }


def split_sorted(samples: list[Sample], split: Sequence[float]) -> tuple[list, list, list]:
    """Split by sorted file name. Entries < 1 (all of them) are fractions, else counts; -1 = the rest."""
    samples = sorted(samples, key=lambda s: s.image.name)
    n = len(samples)
    values = list(split)
    if len(values) != 3:
        raise ValueError(f"data.split must be [train, val, test], got {values}")
    if all(0 <= v <= 1 for v in values) and any(0 < v < 1 for v in values):
        counts = [int(round(v * n)) for v in values]
        counts[0] = n - counts[1] - counts[2]
    else:
        counts = [int(v) for v in values]
        if -1 in counts:
            counts[counts.index(-1)] = n - sum(c for c in counts if c != -1)
    if sum(counts) > n or min(counts) < 0:
        raise ValueError(f"data.split={values} asks for {counts} images but the data has {n}")
    a, b = counts[0], counts[0] + counts[1]
    return samples[:a], samples[a:b], samples[b:b + counts[2]]


class LicensePlateDataModule(BaseDataModule):
    """Plates in YOLO / COCO / VOC / CCPD / OpenALPR format, or synthetic ones by default.

    data_dir: your dataset (only read); null: synthetic plates, generated into cache_dir on first use.
    format: auto | yolo | coco | voc | ccpd | openalpr.
    split: [train, val, test] by sorted file name when the data has no splits of its own;
        counts or fractions. val = 0 validates on the test images (state it when you report).
    """

    def __init__(
        self,
        loader=None,
        data_dir: str | None = None,
        cache_dir: str = "data/license_plate",
        format: str = "auto",
        synthetic_counts: dict | None = None,
        synthetic_size: Sequence[int] = (256, 320),
        class_names: Sequence[str] = ("plate",),
        split: Sequence[float] = (0.8, 0.1, 0.1),
        image_size: int = 320,
        resize: str = "keep_ratio",
        augment: dict | None = None,
        check_images: str = "header",
        predict_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(loader)
        self.user_data_dir, self.cache_dir = data_dir, cache_dir
        self.data_dir: Path | None = None  # set by `dataset_folder`
        self.synthetic = data_dir is None
        self.format = format
        self.synthetic_counts = dict(synthetic_counts or {"train": 320, "val": 64, "test": 64})
        self.synthetic_size = tuple(synthetic_size)
        self.class_names = list(class_names)
        self.split = list(split)
        self.image_size = int(image_size)
        self.resize = resize
        self.augment = dict(augment or {})
        if check_images not in ("header", "full"):
            raise ValueError(f"data.check_images must be header or full, got {check_images!r}")
        self.check_images = check_images
        self.predict_dir = predict_dir
        self.seed = seed
        self.splits: dict[str, list[Sample]] | None = None

    def dataset_folder(self) -> Path:
        """The user's data folder (read only), or the synthetic set, generated into cache_dir on first use."""
        if self.data_dir is None:
            if self.synthetic:
                settings = {"version": SYNTHETIC_VERSION, "counts": self.synthetic_counts,
                            "size": list(self.synthetic_size), "seed": self.seed}
                self.data_dir = builtin_folder(self.cache_dir, "plates", settings, lambda folder: generate(
                    folder, self.synthetic_counts, self.synthetic_size, seed=self.seed))
            else:
                self.data_dir = user_folder(self.user_data_dir, PLATE_DATA)
        return self.data_dir

    def prepare_data(self) -> None:
        self.dataset_folder()

    def _read(self) -> dict[str, list[Sample]]:
        splits = read_dataset(self.dataset_folder(), "yolo" if self.synthetic else self.format, self.class_names)
        if self.check_images == "full":
            splits = {k: self._decodable(v) for k, v in splits.items()}
        if "all" in splits:
            train, val, test = split_sorted(splits.pop("all"), self.split)
            splits = {"train": train, "val": val, "test": test, **splits}
        if not splits.get("train"):
            raise ValueError(f"{self.data_dir}: the training split is empty (data.split={self.split})")
        if not splits.get("val"):
            if not splits.get("test"):
                raise ValueError(f"{self.data_dir}: no validation or test images (data.split={self.split})")
            log.warning("No validation split: validating on the %d test images (choose checkpoints with that in mind)",
                        len(splits["test"]))
            splits["val"] = splits["test"]
        return splits

    @staticmethod
    def _decodable(samples: list[Sample]) -> list[Sample]:
        good = []
        for s in samples:
            try:
                with Image.open(s.image) as im:
                    im.load()
                good.append(s)
            except Exception as err:
                log.warning("Skipping %s: cannot decode it (%s)", s.image, err)
        if len(good) < len(samples):
            log.warning("Skipped %d undecodable images", len(samples) - len(good))
        return good

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_dir:
            return
        if self.splits is None:
            self.splits = self._read()

    def task_data(self) -> TaskData:
        """The suite reads `validation_is_test`: without a test split, the test scores the validation images."""
        if self.splits is None:
            self.setup()
        return TaskData(validation_is_test=not self.splits.get("test"))

    def dataset(self, split: str) -> PlateDataset:
        if self.splits is None:
            self.setup()
        train = split == "train"
        return PlateDataset(self.splits.get(split) or [], build_transforms(train, self.image_size, self.resize, self.augment))

    def train_dataloader(self):
        return self.make_loader(self.dataset("train"), shuffle=True, collate_fn=collate, drop_last=False)

    def val_dataloader(self):
        return self.make_loader(self.dataset("val"), collate_fn=collate)

    def test_dataloader(self):
        return self.make_loader(self.dataset("test") if self.splits.get("test") else self.dataset("val"), collate_fn=collate)

    def predict_dataloader(self):
        if self.predict_dir:
            folder = Path(str(self.predict_dir)).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"data.predict_dir={folder} is not a folder of images")
            images = list_images(folder)
            if not images:
                raise FileNotFoundError(f"data.predict_dir={folder} holds no images ({', '.join(('jpg', 'png', 'bmp', 'webp'))})")
            samples = [Sample(p, [], []) for p in images]
        else:
            samples = self.splits.get("test") or self.splits["val"]
        return self.make_loader(PlateDataset(samples, build_transforms(False, self.image_size, self.resize, None)),
                                collate_fn=collate)
