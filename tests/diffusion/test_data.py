"""Format readers on tiny fixtures, the preprocessing pipeline, and every bad-input case."""
import gzip
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.diffusion import DiffusionDataModule, formats
from tests.conftest import SHARED_DATA


def make_dm(path, **kw):
    kw.setdefault("format", "auto")
    kw.setdefault("image_size", 8)
    kw.setdefault("val_size", 2)
    return DiffusionDataModule(loader={"batch_size": 4}, data_dir=str(path), **kw)


def write_folder(root, classes=("cat", "dog"), per_class=3, size=(10, 12), mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, size, color=(40 * i,) * len(mode) if mode != "P" else i).save(root / c / f"{i}.png")


def write_idx(path, array, magic_dims, gz):
    header = bytes([0, 0, 8, magic_dims]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


# ---- formats -----------------------------------------------------------------------------------
def test_default_digits_are_generated_into_the_suites_cache_and_upsampled(tmp_path):
    dm = DiffusionDataModule(loader={"batch_size": 4}, cache_dir=str(tmp_path / "d"), image_size=16, val_size=0.2)
    dm.prepare_data()
    assert len(list((tmp_path / "d").glob("digits-*/digits.npz"))) == 1
    dm.setup("fit")
    assert dm.class_names == [str(i) for i in range(10)]
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 359
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.long
    assert x.min() == -1  # digits have black background
    # the test scores the validation images: the suite tests the final weights, not the checkpoint chosen on them
    assert dm.task_data().validation_is_test is True


def test_class_folder_gives_labels_and_channel_conversion(tmp_path):
    write_folder(tmp_path / "data", mode="RGBA")
    dm = make_dm(tmp_path / "data", channels=3)
    dm.setup("fit")
    assert dm.class_names == ["cat", "dog"]
    assert len(dm.train_set) == 4 and len(dm.val_set) == 2
    assert dm.train_set.images.shape[1:] == (3, 8, 8)
    gray = make_dm(tmp_path / "data", channels=1)
    gray.setup("fit")
    assert gray.train_set.images.shape[1:] == (1, 8, 8)


def test_palette_grayscale_and_flat_folder_unlabelled(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    img = Image.new("P", (8, 8))
    img.putpalette([255, 0, 0] * 256)
    img.save(root / "p.png")
    Image.new("L", (8, 8), 128).save(root / "l.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "rgb.jpg")
    raw = formats.read_folder(root)
    assert raw.labels is None and raw.class_names == []
    x = formats.to_tensor(raw, 8, 3)
    names = [n.split("/")[-1] for n in raw.names]
    assert x[names.index("p.png"), :, 0, 0].tolist() == [255, 0, 0]  # palette expanded to its colour
    assert x[names.index("l.png"), :, 0, 0].tolist() == [128, 128, 128]
    y = formats.to_tensor(raw, 8, 1)
    assert y[names.index("p.png"), 0, 0, 0].item() == round(0.299 * 255)  # luma of pure red
    dm = make_dm(root, val_size=1)
    dm.setup("fit")
    assert dm.num_classes == 0 and (dm.train_set.labels == -1).all()


def test_alpha_composites_over_black():
    raw = formats.RawImages(np.array([[[[200, 100, 50, 0]]], [[[200, 100, 50, 255]]]], np.uint8), None, [], ["a", "b"])
    x = formats.to_tensor(raw, 1, 3)
    assert x[0].flatten().tolist() == [0, 0, 0] and x[1].flatten().tolist() == [200, 100, 50]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader(tmp_path, gz):
    images = np.arange(5 * 4 * 4).reshape(5, 4, 4) % 256
    labels = np.array([3, 1, 3, 7, 1])
    ext = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images, 3, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels, 1, gz)
    raw = formats.read_idx(tmp_path)
    assert raw.class_names == ["1", "3", "7"] and raw.labels.tolist() == [1, 0, 1, 2, 0]
    assert np.array_equal(raw.images[..., 0], images)
    dm = make_dm(tmp_path, image_size=8, resize=False, pad=2, val_size=1)
    dm.setup("fit")
    assert dm.train_set.images.shape[1:] == (1, 8, 8)
    full = torch.cat([dm.train_set.images, dm.val_set.images])
    assert (full[:, :, :2] == 0).all() and (full[:, :, :, -2:] == 0).all()  # the padding


def test_npz_reader_layouts(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.random.rand(6, 3, 5, 5).astype(np.float32), labels=np.array([0, 1] * 3))
    raw = formats.read_npz(tmp_path / "a.npz")
    assert raw.images.shape == (6, 5, 5, 3) and raw.images.dtype == np.uint8 and raw.class_names == ["0", "1"]
    dm = make_dm(tmp_path, image_size=4, channels=3, resize=False)
    dm.setup("fit")
    assert dm.train_set.images.shape == (4, 3, 4, 4)


def test_resize_shorter_side_then_centre_crop():
    img = np.zeros((4, 8, 1), np.uint8)
    img[:, 3:5] = 255  # a bright vertical band in the middle
    raw = formats.RawImages([img], None, [], ["x"])
    out = formats.to_tensor(raw, 8, 1)
    assert out.shape == (1, 1, 8, 8)  # 4x8 -> 8x16 -> centre 8x8
    assert out[0, 0, :, 3:5].float().mean() > 200 and out[0, 0, :, 0].float().mean() < 30


def test_predict_dataloader_per_class(tmp_path):
    write_folder(tmp_path / "data")
    dm = make_dm(tmp_path / "data", predict_samples=3)
    dm.setup("predict")
    labels = torch.cat(list(dm.predict_dataloader()))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


# ---- bad input ---------------------------------------------------------------------------------
def test_missing_path_is_named(tmp_path):
    dm = make_dm(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        dm.prepare_data()


def test_truncated_and_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    write_folder(tmp_path / "data")
    good = (tmp_path / "data" / "cat" / "0.png").read_bytes()
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "data" / "dog" / "junk.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        raw = formats.read_folder(tmp_path / "data")
    assert len(raw.names) == 6
    assert "Skipped 2 unreadable image(s)" in caplog.text and "broken.png" in caplog.text


def test_empty_folder_and_empty_class(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        formats.read_folder(tmp_path / "empty")
    write_folder(tmp_path / "data")
    (tmp_path / "data" / "bird").mkdir()
    with pytest.raises(ValueError, match="Class folder .*bird has no images"):
        formats.read_folder(tmp_path / "data")


def test_class_with_only_unreadable_images(tmp_path):
    write_folder(tmp_path / "data")
    (tmp_path / "data" / "bird").mkdir()
    (tmp_path / "data" / "bird" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bird: none of its 1 images could be read"):
        formats.read_folder(tmp_path / "data")


def test_idx_counts_disagree(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 4, 4)), 3, False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4), 1, False)
    with pytest.raises(ValueError, match="IDX counts disagree.*5 images.*4 labels"):
        formats.read_idx(tmp_path)


def test_idx_truncated_and_bad_magic(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 4, 4)), 3, False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        formats.read_idx_file(path)
    path.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="not an IDX file"):
        formats.read_idx_file(path)
    gz = tmp_path / "x-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 30)[:-8])
    with pytest.raises(ValueError, match="x-images-idx3-ubyte.gz"):
        formats.read_idx_file(gz)


def test_image_smaller_than_crop_names_the_file(tmp_path):
    write_folder(tmp_path / "data", size=(6, 6))
    dm = make_dm(tmp_path / "data", image_size=8, resize=False)
    with pytest.raises(ValueError, match=r"0\.png is 6x6.*smaller than the 8x8 crop"):
        dm.setup("fit")


def test_npz_with_nan_pixels_names_the_file_and_image(tmp_path):
    images = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    images[2, 3, 3] = np.nan
    np.savez(tmp_path / "x.npz", images=images)
    with pytest.raises(ValueError, match=r"x\.npz: 'images'\[2\] has non-finite pixels"):
        formats.read_npz(tmp_path / "x.npz")


def test_npz_bad_inputs(tmp_path):
    np.savez(tmp_path / "nokey.npz", pictures=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no image array.*pictures"):
        formats.read_npz(tmp_path / "nokey.npz")
    np.savez(tmp_path / "count.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, int))
    with pytest.raises(ValueError, match="'labels' has shape \\(2,\\) but there are 3 images"):
        formats.read_npz(tmp_path / "count.npz")
    np.savez(tmp_path / "range.npz", images=np.full((2, 4, 4), 3.0))
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        formats.read_npz(tmp_path / "range.npz")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.npz is not a readable .npz"):
        formats.read_npz(tmp_path / "bad.npz")


def test_bad_split_and_settings(tmp_path):
    write_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="val_size"):
        make_dm(tmp_path / "data", val_size=6).setup("fit")
    with pytest.raises(ValueError, match="data.format"):
        make_dm(tmp_path / "data", format="tfrecord")


@pytest.mark.skipif(not (SHARED_DATA / "diffusion" / "mnist").is_dir(), reason="shared MNIST not present")
def test_shared_mnist_split_8000_2000():
    dm = DiffusionDataModule(loader={"batch_size": 64}, data_dir=str(SHARED_DATA / "diffusion" / "mnist"),
                             format="auto", image_size=32, resize=False, pad=2, val_size=2000)
    dm.setup("fit")
    assert len(dm.train_set) == 8000 and len(dm.val_set) == 2000 and dm.num_classes == 10
    assert dm.train_set.images.shape[1:] == (1, 32, 32)
