"""Datamodule: synthetic default data, batches, splits, resize/letterbox, predict folders, real data."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from datamodules.license_plate import LicensePlateDataModule
from datamodules.license_plate.datamodule import build_transforms, split_sorted
from datamodules.license_plate.formats import Sample
from datamodules.license_plate.synthetic import generate
from tests.conftest import SHARED_DATA
from tests.license_plate.helpers import write_image

LOADER = {"batch_size": 3, "num_workers": 0}
OPENALPR_EU = SHARED_DATA / "license_plate" / "openalpr_benchmarks" / "endtoend" / "eu"


def test_synthetic_data_is_generated_once_into_the_suites_cache(tmp_path):
    settings = dict(cache_dir=str(tmp_path / "cache"), synthetic_counts={"train": 6, "val": 2, "test": 2},
                    synthetic_size=(96, 128))
    folder = LicensePlateDataModule(LOADER, **settings).dataset_folder()
    files = sorted((folder / "images" / "train").iterdir())
    assert len(files) == 6 and (folder / "data.yaml").is_file()
    stamp = files[0].stat().st_mtime_ns
    assert LicensePlateDataModule(LOADER, **settings).dataset_folder() == folder
    assert files[0].stat().st_mtime_ns == stamp      # cached: nothing rewritten
    other = LicensePlateDataModule(LOADER, **{**settings, "synthetic_size": (64, 96)}).dataset_folder()
    assert other != folder and files[0].stat().st_mtime_ns == stamp   # other settings: another folder


def test_generating_plates_is_quick(tmp_path):
    start = time.perf_counter()
    generate(tmp_path, {"train": 6, "val": 2}, (96, 128))
    assert time.perf_counter() - start < 10


def test_batches_hold_lists_of_images_and_targets(tmp_path):
    dm = LicensePlateDataModule(LOADER, cache_dir=str(tmp_path), synthetic_counts={"train": 6, "val": 3, "test": 3},
                                synthetic_size=(96, 128), image_size=160)
    dm.prepare_data()
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == len(targets) == 3
    for image, target in zip(images, targets, strict=True):
        assert image.dtype == torch.float32 and image.shape[0] == 3 and max(image.shape[1:]) == 160
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert target["boxes"].shape[1] == 4 and target["labels"].dtype == torch.long
        assert torch.all(target["labels"] == 1)          # 1-based: 0 is background
        boxes = target["boxes"]
        assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 2] <= image.shape[2] + 1e-3)
    images, targets = next(iter(dm.train_dataloader()))   # augmentation keeps the format
    assert all(t["boxes"].shape[-1] == 4 for t in targets)


def test_without_a_test_split_the_validation_images_are_declared_the_test_data(tmp_path):
    """The suite then tests the final weights after fit, not the checkpoint chosen on those very images."""
    def declared(counts):
        dm = LicensePlateDataModule(LOADER, cache_dir=str(tmp_path / str(len(counts))), synthetic_counts=counts,
                                    synthetic_size=(96, 128))
        dm.prepare_data()
        dm.setup("fit")
        return dm.task_data().validation_is_test
    assert declared({"train": 4, "val": 2}) is True
    assert declared({"train": 4, "val": 2, "test": 2}) is False


def test_resize_and_letterbox_scale_boxes(tmp_path):
    sample = Sample(write_image(tmp_path / "a.jpg", (200, 100)), [[20.0, 10.0, 60.0, 30.0]], [0])
    from datamodules.license_plate.datamodule import PlateDataset

    image, target = PlateDataset([sample], build_transforms(False, 100, "keep_ratio", None))[0]
    assert image.shape == (3, 50, 100)
    assert target["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0]] and target["scale"].tolist() == [0.5, 0.5]
    image, target = PlateDataset([sample], build_transforms(False, 100, "letterbox", None))[0]
    assert image.shape == (3, 100, 100) and target["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0]]


def test_no_horizontal_flip_by_default():
    names = [type(t).__name__ for t in build_transforms(True, 128, "keep_ratio", None).transforms]
    assert "RandomHorizontalFlip" not in names and "RandomPerspective" in names
    names = [type(t).__name__ for t in build_transforms(True, 128, "keep_ratio", {"hflip_p": 0.5}).transforms]
    assert "RandomHorizontalFlip" in names


def test_split_by_sorted_name_counts_fractions_and_rest():
    samples = [Sample(f"img{i:03d}.jpg", [], []) for i in range(10)][::-1]
    train, val, test = split_sorted(samples, [7, 0, 3])
    assert train[0].image.name == "img000.jpg" and [s.image.name for s in test] == ["img007.jpg", "img008.jpg", "img009.jpg"]
    assert [len(x) for x in split_sorted(samples, [0.8, 0.1, 0.1])] == [8, 1, 1]
    assert [len(x) for x in split_sorted(samples, [-1, 2, 2])] == [6, 2, 2]
    with pytest.raises(ValueError, match="asks for"):
        split_sorted(samples, [8, 2, 2])


def test_user_data_missing_is_named(tmp_path):
    dm = LicensePlateDataModule(LOADER, data_dir=str(tmp_path / "my_plates"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="my_plates.*YOLO"):
        dm.prepare_data()
    assert not (tmp_path / "my_plates").exists() and not (tmp_path / "cache").exists()


def test_predict_folder(tmp_path):
    write_image(tmp_path / "in" / "p.jpg", (64, 48))
    dm = LicensePlateDataModule(LOADER, data_dir=str(tmp_path / "unused"), predict_dir=str(tmp_path / "in"), image_size=128)
    dm.setup("predict")
    images, targets = next(iter(dm.predict_dataloader()))
    assert images[0].shape == (3, 96, 128) and targets[0]["path"].endswith("p.jpg")
    dm = LicensePlateDataModule(LOADER, data_dir=str(tmp_path / "unused"), predict_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="empty"):
        dm.predict_dataloader()


@pytest.mark.skipif(not OPENALPR_EU.is_dir(), reason="shared OpenALPR-EU data absent")
def test_real_openalpr_eu_benchmark_split(caplog):
    dm = LicensePlateDataModule(LOADER, data_dir=str(OPENALPR_EU), split=[72, 0, 36], image_size=320)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [72, 36, 36]
    assert dm.splits["val"] is dm.splits["test"] and "validating on the 36 test images" in caplog.text
    names = sorted(s.image.name for s in dm.splits["train"] + dm.splits["test"])
    assert [s.image.name for s in dm.splits["train"]] == names[:72]
    sample = next(s for s in dm.splits["train"] + dm.splits["test"] if s.image.name == "test_001.jpg")
    assert sample.boxes.tolist() == [[188.0, 209.0, 295.0, 233.0]] and sample.texts == ["PP587AO"]
