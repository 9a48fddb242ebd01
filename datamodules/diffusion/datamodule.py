"""Images (and class labels when the data has them) for the diffusion task.

Formats: an image folder (class subfolders = labels, flat = unlabelled), MNIST-style IDX files
(`.gz` or not), or a `.npz` with `images` and optional `labels`, all read from `data_dir` and never
written. With `data_dir` unset the task trains on scikit-learn's bundled handwritten digits, which are
written into the suite's `cache_dir` on first use (`format=digits` names them explicitly).
Images are decoded once into a uint8 tensor at the configured size (pad, resize shorter side,
centre crop, channel conversion); batches are float in [-1, 1] with labels (-1 when unlabelled).
`augment` (off: a mirrored digit is no digit) flips training images, never held-out ones.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from common.task_data import TaskData
from datamodules.augment import augment_settings, non_negative
from datamodules.base import BaseDataModule
from datamodules.builtin import builtin_folder, user_folder
from datamodules.diffusion import formats

log = logging.getLogger(__name__)

FORMATS = ("digits", "auto", "folder", "idx", "npz")
AUGMENT_DEFAULTS = {"hflip_p": 0.5}  # DDPM's CIFAR-10 recipe: a random horizontal flip


class ImageTensorDataset(Dataset):
    """uint8 N,C,H,W images -> (float image in [-1, 1], label); each mirrored left-right with probability
    `hflip_p`, drawn from the global torch RNG (loader workers reseed it per batch: resumable)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, hflip_p: float = 0.0) -> None:
        self.images = images
        self.labels = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)
        self.hflip_p = float(hflip_p)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        x = self.images[index].float().div_(127.5).sub_(1.0)
        if self.hflip_p and torch.rand(()) < self.hflip_p:
            x = x.flip(-1)
        return x, self.labels[index]


class LabelDataset(Dataset):
    """What `mode=predict` iterates: one class label per image to generate (-1 = unconditional)."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.labels[index]


class DiffusionDataModule(BaseDataModule):
    def __init__(
        self,
        loader=None,
        data_dir: str | None = None,
        cache_dir: str = "data/diffusion",
        format: str = "auto",
        image_size: int = 32,
        channels: int = 1,
        resize: bool = True,
        pad: int = 0,
        val_size: float = 0.2,
        train_size: int | None = None,
        split_seed: int = 0,
        predict_samples: int = 8,
        drop_last: bool = True,
        augment: Mapping[str, Any] | None = None,
        random_flip: bool | None = None,
    ) -> None:
        super().__init__(loader)
        if random_flip is not None:  # the setting data.augment replaced: configs stored in older checkpoints have it
            if augment is not None:
                raise ValueError("data.random_flip is now data.augment.enabled (with data.augment.hflip_p); "
                                 "set only data.augment")
            augment = {"enabled": bool(random_flip)}
        self.augment = augment_settings(augment, AUGMENT_DEFAULTS, "diffusion")
        non_negative(self.augment, "hflip_p", at_most=1)
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r}; choose one of {', '.join(FORMATS)}")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}")
        builtin = data_dir is None
        if builtin and format not in ("auto", "digits"):
            raise ValueError(f"data.format={format} reads data.data_dir, which is not set; name your images there")
        if not builtin and format == "digits":
            raise ValueError(f"data.format=digits is the built-in dataset and reads no data.data_dir ({data_dir}); "
                             "use data.format=auto for your files")
        self.format = "digits" if builtin else format
        self.data_dir = None if builtin else Path(str(data_dir)).expanduser()
        self.cache_dir = cache_dir
        self.image_size = int(image_size)
        self.channels = channels
        self.resize = resize
        self.pad = int(pad)
        self.val_size = val_size
        self.train_size = train_size
        self.split_seed = split_seed
        self.predict_samples = int(predict_samples)
        self.drop_last = drop_last
        self.class_names: list[str] = []
        self.train_set = self.val_set = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- data on disk --------------------------------------------------------------------------
    def source(self) -> Path:
        """The user's images (read only), or the digits, written into cache_dir on first use."""
        if self.format == "digits":
            return builtin_folder(self.cache_dir, "digits", {"version": 1},
                                  lambda folder: formats.write_digits(folder / "digits.npz")) / "digits.npz"
        return user_folder(self.data_dir, "an image folder, a folder of MNIST IDX files or a .npz file", file_ok=True)

    def prepare_data(self) -> None:
        self.source()

    def read(self) -> formats.RawImages:
        path = self.source()
        fmt = "npz" if self.format == "digits" else self.format
        if fmt == "auto":
            fmt = formats.detect_format(path)
        if fmt == "npz" and path.is_dir():
            found = sorted(path.glob("*.npz"))
            if len(found) != 1:
                raise ValueError(f"data.format=npz: {path} holds {len(found)} .npz files; name one in data.data_dir")
            path = found[0]
        if fmt in ("folder", "idx") and not path.is_dir():
            raise ValueError(f"data.format={fmt} needs a folder, but data.data_dir={path} is a file")
        reader = {"folder": formats.read_folder, "idx": formats.read_idx, "npz": formats.read_npz}[fmt]
        raw = reader(path)
        log.info("Read %d images (%s) from %s", len(raw.names),
                 f"{len(raw.class_names)} classes" if raw.labels is not None else "unlabelled", path)
        return raw

    # ---- splits --------------------------------------------------------------------------------
    def _split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_val = round(self.val_size * n) if isinstance(self.val_size, float) and self.val_size < 1 else int(self.val_size)
        if not 0 < n_val < n:
            raise ValueError(f"data.val_size={self.val_size} leaves {n - n_val} of {n} images for training; "
                             "use a fraction in (0, 1) or a count below the number of images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val, train = perm[:n_val], perm[n_val:]
        if self.train_size is not None:
            if self.train_size > len(train):
                raise ValueError(f"data.train_size={self.train_size} but only {len(train)} images remain after "
                                 f"the {n_val} held out")
            train = train[: self.train_size]
        return train.sort().values, val.sort().values

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        raw = self.read()
        self.class_names = list(raw.class_names)
        if stage == "predict":
            return
        images = formats.to_tensor(raw, self.image_size, self.channels, self.resize, self.pad)
        labels = torch.from_numpy(raw.labels) if raw.labels is not None else None
        train, val = self._split(len(images))
        hflip_p = self.augment["hflip_p"] if self.augment["enabled"] else 0.0
        self.train_set = ImageTensorDataset(images[train], None if labels is None else labels[train], hflip_p)
        self.val_set = ImageTensorDataset(images[val], None if labels is None else labels[val])
        log.info("Diffusion data: %d train / %d held-out images, %dx%dx%d, %s", len(train), len(val),
                 self.channels, self.image_size, self.image_size,
                 f"{self.num_classes} classes" if self.num_classes else "unconditional")

    def task_data(self) -> TaskData:
        """The module checks `image_size`, `channels` and `class_names` against its U-Net and names its samples
        by class; callbacks.fid trains its feature classifier on `train_set`. The test scores the validation set."""
        return TaskData(train_set=self.train_set, val_set=self.val_set, class_names=self.class_names,
                        image_size=self.image_size, channels=self.channels, validation_is_test=True)

    # ---- loaders -------------------------------------------------------------------------------
    def train_dataloader(self):
        drop = self.drop_last and len(self.train_set) >= self.per_device_batch_size
        return self.make_loader(self.train_set, shuffle=True, drop_last=drop)

    def val_dataloader(self):
        return self.make_loader(self.val_set)

    def test_dataloader(self):
        return self.make_loader(self.val_set)

    def predict_dataloader(self):
        if self.num_classes:
            labels = torch.arange(self.num_classes).repeat_interleave(self.predict_samples)
        else:
            labels = torch.full((self.predict_samples,), -1, dtype=torch.long)
        return self.make_loader(LabelDataset(labels))
