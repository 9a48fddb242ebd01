"""Format readers on tiny fixtures, the datamodule's batches, and every bad-input case."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.nerf import NerfDataError, NerfDataModule, formats
from datamodules.nerf.datamodule import RayBatches, RayBatchKeys, view_rays
from tests.nerf.fixtures import write_blender, write_llff, write_ngp


def test_blender_loader_composites_alpha_and_sets_focal(tmp_path):
    root = write_blender(tmp_path / "scene")
    scene = formats.load_blender(root, torch.ones(3))
    train = scene.splits["train"]
    assert len(train) == 2 and set(scene.splits) == {"train", "val", "test"}
    assert train.images.shape == (2, 4, 4, 3)
    assert torch.allclose(train.images[0, 0, 0], torch.ones(3))            # transparent -> white
    assert torch.allclose(train.images[0, 0, 3], torch.tensor([1.0, 0, 0]))  # opaque red
    focal = float(0.5 * 4 / np.tan(0.35))
    assert torch.allclose(train.intrinsics[0], torch.tensor([focal, focal, 2.0, 2.0]))
    black = formats.load_blender(root, torch.zeros(3)).splits["train"]
    assert torch.allclose(black.images[0, 0, 0], torch.zeros(3))
    assert (scene.near, scene.far) == (2.0, 6.0)


def test_blender_downscale_scales_intrinsics(tmp_path):
    root = write_blender(tmp_path / "scene", size=8)
    train = formats.load_blender(root, torch.ones(3), downscale=2).splits["train"]
    full = formats.load_blender(root, torch.ones(3)).splits["train"]
    assert train.images.shape[1:3] == (4, 4)
    assert torch.allclose(train.intrinsics, full.intrinsics / 2)


def test_ngp_loader_holds_out_every_eighth_and_keeps_distortion(tmp_path):
    root = write_ngp(tmp_path / "fox", count=9)
    scene = formats.load_ngp(root, torch.ones(3), holdout_every=8)
    assert len(scene.splits["train"]) == 7 and len(scene.splits["test"]) == 2
    assert scene.splits["test"].names == ["images/0000.jpg", "images/0008.jpg"]
    assert torch.allclose(scene.splits["train"].distortion, torch.tensor([0.05, -0.01, 0.001, 0.0]))
    assert torch.allclose(scene.splits["train"].intrinsics[0], torch.tensor([10.0, 11.0, 4.2, 2.9]))
    assert scene.aabb == [-3.0, -3.0, -3.0, 3.0, 3.0, 3.0]  # aabb_scale 2 x the 3-unit cube
    half = formats.load_ngp(root, torch.ones(3), downscale=2).splits["train"]
    assert half.images.shape[1:3] == (3, 4)
    assert torch.allclose(half.intrinsics[0], torch.tensor([5.0, 5.5, 2.1, 1.45]))


def test_llff_loader_converts_axes_and_holds_out(tmp_path):
    root = write_llff(tmp_path / "fern", count=5)
    scene = formats.load_llff(root, factor=8, holdout_every=4)
    assert scene.ndc and (scene.near, scene.far) == (0.0, 1.0)
    assert len(scene.splits["train"]) == 3 and len(scene.splits["test"]) == 2
    c2w = scene.splits["train"].c2w[0]
    assert torch.allclose(c2w[:3, :3] @ c2w[:3, :3].T, torch.eye(3), atol=1e-5)  # a rotation
    # LLFF [down, right, back] = [y, x, -z] -> OpenGL right axis is the old second column (+x)
    assert torch.allclose(c2w[:3, 0].abs(), torch.tensor([1.0, 0, 0]), atol=1e-5)
    assert scene.splits["train"].intrinsics[0, 0].item() == pytest.approx(50.0 / 8)


@pytest.mark.parametrize("writer", [write_blender, write_ngp, write_llff])
def test_datamodule_batches_for_each_format(tmp_path, writer):
    root = writer(tmp_path / "scene")
    dm = NerfDataModule(data_dir=str(root), num_rays=16, steps_per_epoch=3, path_frames=2)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = batches[0]
    assert b["origins"].shape == b["dirs"].shape == b["rgb"].shape == (16, 3)
    assert b["near"].shape == (16, 1) and b["aabb"].shape == (6,) and b["background"].shape == (3,)
    view = next(iter(dm.val_dataloader()))
    n = view["height"] * view["width"]
    assert view["origins"].shape == (n, 3) and view["rgb"].shape == (n, 3)
    assert len(list(dm.predict_dataloader())) == 2


def test_an_ndc_scene_tells_the_hash_grid_how_many_pixels_span_its_box(tmp_path):
    """In NDC a view's width spans x in [-1, 1] at every depth: the 3-unit box holds 1.5 widths of pixels."""
    dm = NerfDataModule(data_dir=str(write_llff(tmp_path / "fern", count=5, w=8, h=6)), num_rays=16)
    dm.setup("fit")
    assert dm.task_data().pixels_across_box == pytest.approx(12.0)
    origins, _ = view_rays(dm.scene.splits["train"], 0, ndc=True)  # one pixel apart along each row
    step = origins.reshape(6, 8, 3)[:, 1:, 0] - origins.reshape(6, 8, 3)[:, :-1, 0]
    assert step.abs().median().item() == pytest.approx(2 / 8, rel=0.1)


def test_downscale_on_an_llff_scene_is_refused_pointing_at_llff_factor(tmp_path):
    """LLFF ships each size as a folder (images_8): data.downscale, which the other formats apply, did nothing."""
    dm = NerfDataModule(data_dir=str(write_llff(tmp_path / "fern")), num_rays=16, downscale=2)
    dm.prepare_data()
    with pytest.raises(ValueError, match="data.downscale=2: LLFF scenes .*data.llff_factor"):
        dm.setup("fit")


def test_rgba_training_rays_are_composited_onto_a_random_colour_each(tmp_path):
    """The fixture's images are opaque red on the right half, transparent on the left."""
    dm = NerfDataModule(data_dir=str(write_blender(tmp_path / "scene")), num_rays=256, steps_per_epoch=1,
                        random_background="auto")
    dm.setup("fit")
    assert dm.scene.splits["train"].alpha.shape == (2, 4, 4, 1)
    batch = next(iter(dm.train_dataloader()))
    red = torch.tensor([1.0, 0.0, 0.0])
    opaque = torch.isclose(batch["rgb"], red).all(-1) & ~torch.isclose(batch["background"], red).all(-1)
    see_through = torch.isclose(batch["rgb"], batch["background"]).all(-1)
    assert (opaque | see_through).all() and opaque.any() and see_through.any()
    assert batch["background"][see_through].std(0).min() > 0.1  # fresh colours, not white
    views = next(iter(dm.val_dataloader()))
    assert views["background"].tolist() == [1.0, 1.0, 1.0]  # evaluation keeps data.background


def test_data_parallel_ranks_draw_different_rays_and_a_resumed_epoch_draws_the_same(tmp_path):
    """Each rank's batches are seeded by their own keys: under DDP the ranks do not train on copies of one batch
    (the global RNG is seeded alike on every rank), and a run resumed two steps in draws the rest unchanged."""
    dm = NerfDataModule(data_dir=str(write_blender(tmp_path / "scene")), num_rays=64, steps_per_epoch=4,
                        random_background="auto")
    dm.setup("fit")

    def batches(rank: int, steps_done: int = 0) -> list[dict]:
        sampler = RayBatchKeys(4, seed=0, num_replicas=2, rank=rank)
        if steps_done:
            sampler.resume_at(0, steps_done * 2)  # what the checkpoint's position gives: a step takes one a rank
        loader = DataLoader(RayBatches(dm.ray_buffer, 64), batch_size=1, sampler=sampler, collate_fn=lambda b: b[0])
        return list(loader)

    assert dm.per_device_batch_size == 64  # a batch is num_rays rays on each device
    rank0, rank1 = batches(0), batches(1)
    assert len(rank0) == len(rank1) == 4
    for mine, theirs in zip(rank0, rank1, strict=True):
        assert not torch.equal(mine["origins"], theirs["origins"])
        assert not torch.equal(mine["background"], theirs["background"])
    resumed = batches(0, steps_done=2)
    assert len(resumed) == 2 and all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(resumed, rank0[2:], strict=True))


def test_by_default_rays_train_on_the_fixed_background_colour(tmp_path):
    dm = NerfDataModule(data_dir=str(write_blender(tmp_path / "scene")), num_rays=256, steps_per_epoch=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["background"].tolist() == [1.0, 1.0, 1.0] and "alpha" not in dm.ray_buffer
    assert all(views.alpha is None for views in dm.scene.splits.values())  # kept only when it is used
    white_or_red = torch.isclose(batch["rgb"], torch.ones(3)).all(-1) | (batch["rgb"] == torch.tensor([1.0, 0, 0])).all(-1)
    assert white_or_red.all()


def test_an_opaque_palette_image_has_no_alpha_and_a_transparent_one_has(tmp_path):
    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0] * 256)
    palette.save(tmp_path / "opaque.png")
    palette.save(tmp_path / "see_through.png", transparency=0)
    assert formats.load_image(tmp_path / "opaque.png", torch.ones(3))[1] is None
    image, alpha = formats.load_image(tmp_path / "see_through.png", torch.ones(3))
    assert alpha is not None and float(alpha.max()) == 0.0 and image[0, 0].tolist() == [1.0, 1.0, 1.0]


def test_instant_ngp_rgba_frames_keep_their_alpha_in_the_split_they_fall_in(tmp_path):
    """Frame k's alpha is k/10 everywhere; every 8th frame (0 and 8) is held out for test."""
    root = write_ngp(tmp_path / "scene", count=10, distortion=False)
    meta = json.loads((root / "transforms.json").read_text())
    for k, frame in enumerate(meta["frames"]):
        rgba = np.zeros((6, 8, 4), np.uint8)
        rgba[..., 3] = 25 * k
        Image.fromarray(rgba, "RGBA").save(root / "images" / f"{k:04d}.png")
        frame["file_path"] = f"images/{k:04d}.png"
    (root / "transforms.json").write_text(json.dumps(meta))
    scene = formats.load_ngp(root, torch.ones(3))
    alpha = {name: scene.splits[name].alpha[:, 0, 0, 0] for name in ("train", "test")}
    assert alpha["test"].tolist() == pytest.approx([0.0, 200 / 255])
    assert alpha["train"].tolist() == pytest.approx([25 * k / 255 for k in (1, 2, 3, 4, 5, 6, 7, 9)])


def test_random_background_true_on_images_without_alpha_names_the_scene(tmp_path):
    root = write_ngp(tmp_path / "scene")  # JPEGs
    dm = NerfDataModule(data_dir=str(root), random_background=True)
    with pytest.raises(ValueError, match=f"data.random_background=true: the training images of {root} have no alpha"):
        dm.setup("fit")
    dm = NerfDataModule(data_dir=str(root), random_background="auto")
    dm.setup("fit")
    assert dm.random_background() is False and "alpha" not in dm.ray_buffer
    for value in ("sometimes", 0, 1):  # Hydra reads 0 and 1 as integers: not false and true
        with pytest.raises(ValueError, match="data.random_background must be auto, true or false"):
            NerfDataModule(random_background=value)


def test_built_in_scene_is_generated_once_into_the_suites_cache(tmp_path):
    dm = NerfDataModule(cache_dir=str(tmp_path / "nerf"), scene_size=16, scene_views=(4, 2, 2))
    dm.prepare_data()
    (scene,) = (tmp_path / "nerf").iterdir()
    first = (scene / "train" / "r_0.png").stat().st_mtime_ns
    NerfDataModule(cache_dir=str(tmp_path / "nerf"), scene_size=16, scene_views=(4, 2, 2)).prepare_data()
    assert (scene / "train" / "r_0.png").stat().st_mtime_ns == first
    dm.setup("fit")
    assert dm.scene.splits["train"].images.shape == (4, 16, 16, 3)
    assert 0.05 < (dm.scene.splits["train"].images < 0.99).float().mean() < 0.95  # objects and background


# ---- bad input ----------------------------------------------------------------------------------
def _blender(tmp_path):
    root = write_blender(tmp_path / "scene")
    meta = json.loads((root / "transforms_train.json").read_text())
    return root, meta


def _expect(root, fn, *words):
    with pytest.raises(NerfDataError) as info:
        fn(root)
    for word in words:
        assert word in str(info.value), str(info.value)


def _write(root, meta, name="transforms_train.json"):
    (root / name).write_text(json.dumps(meta))


def test_missing_image_names_file_and_field(tmp_path):
    root, _ = _blender(tmp_path)
    (root / "train" / "r_1.png").unlink()
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "transforms_train.json", "frames[1]", "file_path")


def test_malformed_json_names_the_line(tmp_path):
    root, _ = _blender(tmp_path)
    (root / "transforms_train.json").write_text('{"camera_angle_x": 0.7,\n "frames": [}')
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "transforms_train.json", "line 2")


def test_incomplete_json_names_the_missing_field(tmp_path):
    root, meta = _blender(tmp_path)
    del meta["camera_angle_x"]
    _write(root, meta)
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "camera_angle_x")
    _write(root, {"camera_angle_x": 0.7})
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "frames")
    meta = json.loads((root / "transforms_val.json").read_text())
    del meta["frames"][0]["transform_matrix"]
    _write(root, meta)
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "frames[0]", "transform_matrix")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5, 4.0])
def test_a_camera_angle_that_cannot_be_trained_names_file_and_field(tmp_path, value):
    root, meta = _blender(tmp_path)
    meta["camera_angle_x"] = value
    (root / "transforms_train.json").write_text(json.dumps(meta))    # NaN is written as the JSON token NaN
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "transforms_train.json", "camera_angle_x")


def test_an_instant_ngp_focal_length_of_nan_names_the_field(tmp_path):
    root = write_ngp(tmp_path / "fox", count=3)
    meta = json.loads((root / "transforms.json").read_text())
    meta["fl_x"] = float("nan")
    (root / "transforms.json").write_text(json.dumps(meta))
    _expect(root, lambda r: formats.load_ngp(r, torch.ones(3)), "transforms.json", "fl_x")


def test_llff_rows_with_nan_or_non_positive_bounds_are_named(tmp_path):
    root = write_llff(tmp_path / "fern", count=3)
    data = np.load(root / "poses_bounds.npy")
    data[1, 15] = np.nan
    np.save(root / "poses_bounds.npy", data)
    _expect(root, lambda r: formats.load_llff(r), "poses_bounds.npy", "row 1")
    data[1, 15], data[2, 16] = 1.0, -2.0
    np.save(root / "poses_bounds.npy", data)
    _expect(root, lambda r: formats.load_llff(r), "row 2")


def test_non_4x4_pose(tmp_path):
    root, meta = _blender(tmp_path)
    meta["frames"][0]["transform_matrix"] = meta["frames"][0]["transform_matrix"][:3]
    _write(root, meta)
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "frames[0].transform_matrix", "4x4", "(3, 4)")


def test_image_size_disagreeing_with_intrinsics(tmp_path):
    root = write_ngp(tmp_path / "fox", count=3)
    Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(root / "images" / "0001.jpg")
    _expect(root, lambda r: formats.load_ngp(r, torch.ones(3)), "transforms.json", "frames[1]", "8x5", "h=6")
    root2, _ = _blender(tmp_path)
    Image.fromarray(np.zeros((6, 6, 4), np.uint8)).save(root2 / "train" / "r_1.png")
    _expect(root2, lambda r: formats.load_blender(r, torch.ones(3)), "frames[1]", "6x6")


def test_file_path_escaping_the_root(tmp_path):
    root, meta = _blender(tmp_path)
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / "outside.png")
    meta["frames"][0]["file_path"] = "../outside"
    _write(root, meta)
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "frames[0].file_path", "outside the dataset root")


def test_unreadable_image(tmp_path):
    root, _ = _blender(tmp_path)
    (root / "train" / "r_0.png").write_bytes(b"not a png")
    _expect(root, lambda r: formats.load_blender(r, torch.ones(3)), "r_0.png", "cannot read image")


def test_llff_bad_shapes(tmp_path):
    root = write_llff(tmp_path / "fern", count=3)
    np.save(root / "poses_bounds.npy", np.zeros((3, 15)))
    _expect(root, lambda r: formats.load_llff(r), "poses_bounds.npy", "(N, 17)")
    root = write_llff(tmp_path / "fern2", count=3)
    (root / "images_8" / "image000.png").unlink()
    _expect(root, lambda r: formats.load_llff(r), "images_8", "2 images", "3 poses")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    dm = NerfDataModule(data_dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nowhere.*transforms"):
        dm.prepare_data()
    (tmp_path / "empty").mkdir()
    dm = NerfDataModule(data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(NerfDataError, match="transforms_train.json"):
        dm.setup("fit")
    assert not (tmp_path / "nowhere").exists() and not any((tmp_path / "empty").iterdir())
    assert not (tmp_path / "cache").exists()


def test_bad_settings():
    with pytest.raises(ValueError, match="background"):
        NerfDataModule(background="pink")
    with pytest.raises(ValueError, match="data.format"):
        NerfDataModule(format="colmap")


def test_unsupported_lens_models_are_refused(tmp_path):
    root = write_ngp(tmp_path / "fox", count=3)
    meta = json.loads((root / "transforms.json").read_text())
    meta["k3"] = 0.01
    (root / "transforms.json").write_text(json.dumps(meta))
    _expect(root, lambda r: formats.load_ngp(r, torch.ones(3)), "transforms.json", "k3")
    del meta["k3"]
    meta["camera_model"] = "OPENCV_FISHEYE"
    (root / "transforms.json").write_text(json.dumps(meta))
    _expect(root, lambda r: formats.load_ngp(r, torch.ones(3)), "OPENCV_FISHEYE")
