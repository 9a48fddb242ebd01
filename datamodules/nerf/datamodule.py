"""NeRF data: posed images in, batches of rays out.

Training batches are `num_rays` rays drawn at random across all training views from a buffer of
precomputed rays. The buffer can live on the GPU (`ray_device: auto` puts it on the Trainer's
device), so sampling is a gather on the device and never waits on dataloader workers.
Validation, test and predict batches are whole views (every pixel's ray), rendered in chunks by
the module.

Every batch is a dict: origins (N, 3), dirs (N, 3), near (N, 1), far (N, 1), background (3,) or, in
training with a random background, (N, 3), aabb (6,); training batches also rgb (N, 3) targets and
image (N,) int64, the training image each ray came from (for per-image appearance vectors); views also
rgb, height, width, index (of the view in its split, not a training image: held-out views have none).

Random background (`random_background`, for RGBA images, as instant-ngp and nerfacc train synthetic
scenes): each training ray's target is its pixel composited onto a fresh random colour, which the
renderer composites onto too. A fixed colour lets the field paint it into empty space, as floaters the
training views cannot see; a random one is matched only by leaving the space empty. Off by default: the
vanilla MLP takes hundreds of steps longer to clear its initial fog that way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from common.task_data import TaskData
from datamodules.base import BaseDataModule, EpochSampler
from datamodules.builtin import builtin_folder, user_folder
from datamodules.nerf import cameras, formats, synthetic
from datamodules.nerf.formats import Scene, Views
from datamodules.workers import key_seed

log = logging.getLogger(__name__)

FORMATS = ("auto", "blender", "ngp", "llff")
QUICK_RAYS, QUICK_VIEW_SIDE = 64, 16  # fast_dev_run: rays a training batch, side of a rendered view
SCENE_FILES = "a scene: Blender transforms_*.json, instant-ngp transforms.json or LLFF poses_bounds.npy"


def view_rays(views: Views, index: int, ndc: bool) -> tuple[Tensor, Tensor]:
    fx, fy, cx, cy = views.intrinsics[index].tolist()
    origins, dirs = cameras.camera_rays(views.c2w[index], fx, fy, cx, cy, views.height, views.width,
                                        views.distortion)
    if ndc:
        origins, dirs = cameras.ndc_rays(origins, dirs, fx, fy, views.width, views.height, near=1.0)
    return origins, dirs


def pixels_across_box(scene: Scene) -> float | None:
    """Training pixels spanning the scene box's longest side at its centre: the side over one pixel's footprint
    there (distance / focal length in pixels), the median over training views. In NDC a view's width maps onto
    x in [-1, 1] and its height onto y at every depth, so a pixel is 2 / width by 2 / height units."""
    views = scene.splits.get("train")
    if views is None or len(views) == 0:
        return None
    aabb = torch.tensor(scene.aabb, dtype=torch.float32)
    if scene.ndc:
        side = aabb[3:] - aabb[:3]
        return float(max(side[0] * views.width, side[1] * views.height) / 2)
    distance = (views.c2w[:, :3, 3] - (aabb[:3] + aabb[3:]) / 2).norm(dim=-1)
    footprint = (distance / views.intrinsics[:, 0]).median()
    return float((aabb[3:] - aabb[:3]).max() / footprint)


class RayBatchKeys(EpochSampler):
    """The numbers of this rank's ray batches in an epoch of `steps` steps: rank r of R takes r, r + R, ... of
    steps x R, each carrying its key (seed, epoch, rank, place in the epoch), which seeds that batch's draws.
    So ranks draw different rays, and a resumed run (which skips the batches done) draws what the
    uninterrupted one did, with or without loader workers."""

    keyed = True

    def __init__(self, steps: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(steps * num_replicas, seed, num_replicas, rank)

    def epoch_order(self) -> list[int]:
        return list(range(self.size))


class RayBatches(Dataset):
    """Batches of `num_rays` rays drawn uniformly from the whole buffer, one an index of RayBatchKeys. Its length
    is the buffer's rays: what the batch-size finder (mode=tune_batch_size, which scales num_rays) measures a
    batch against."""

    def __init__(self, buffer: dict[str, Tensor], num_rays: int) -> None:
        self.buffer, self.num_rays = buffer, num_rays
        self.total = len(buffer["origins"])

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        device = self.buffer["origins"].device
        key = getattr(i, "key", None)  # a worker reseeded the global RNG from the key and passed a plain int
        generator = None if key is None else torch.Generator(device=device).manual_seed(key_seed(key))
        idx = torch.randint(0, self.total, (self.num_rays,), device=device, generator=generator)
        batch = {k: v[idx] for k, v in self.buffer.items() if k in ("origins", "dirs", "rgb", "near", "far", "image")}
        batch["background"] = self.buffer["background"]
        if "alpha" in self.buffer:  # random background: the pixel was composited onto the fixed one
            background = torch.rand(self.num_rays, 3, device=device, generator=generator)
            batch["rgb"] = batch["rgb"] + (background - batch["background"]) * (1 - self.buffer["alpha"][idx])
            batch["background"] = background
        batch["aabb"] = self.buffer["aabb"]
        return batch


class ViewDataset(Dataset):
    """One whole view per item (rays computed on the fly; cheap next to rendering it). With `stride` > 1
    only every stride-th pixel of every stride-th row is rendered: a smaller picture of the same view."""

    def __init__(self, views: Views | None, c2w: Tensor | None, scene: Scene, background: Tensor,
                 intrinsics: Tensor | None = None, size: tuple[int, int] | None = None, stride: int = 1,
                 train_centres: Tensor | None = None) -> None:
        self.views, self.scene, self.background, self.stride = views, scene, background, stride
        # held-out photos: each one's rays carry the index of the training image taken nearest (`image`), whose
        # appearance vector is the best guess at its exposure; a camera path has none (the field's mean)
        self.nearest_train = None if train_centres is None or views is None else \
            torch.cdist(views.c2w[:, :3, 3].float(), train_centres.float()).argmin(1)
        if views is not None:
            self.c2w, self.intrinsics = views.c2w, views.intrinsics
            self.height, self.width, self.distortion = views.height, views.width, views.distortion
        else:  # a camera path: no images
            self.c2w, self.intrinsics = c2w, intrinsics.expand(len(c2w), 4)
            self.height, self.width = size
            self.distortion = None

    def __len__(self) -> int:
        return len(self.c2w)

    def __getitem__(self, i: int) -> dict:
        fx, fy, cx, cy = self.intrinsics[i].tolist()
        origins, dirs = cameras.camera_rays(self.c2w[i], fx, fy, cx, cy, self.height, self.width, None)
        if self.scene.ndc:
            origins, dirs = cameras.ndc_rays(origins, dirs, fx, fy, self.width, self.height, near=1.0)
        n = len(origins)
        batch = {"origins": origins, "dirs": dirs, "near": torch.full((n, 1), self.scene.near),
                 "far": torch.full((n, 1), self.scene.far), "background": self.background,
                 "aabb": torch.tensor(self.scene.aabb, dtype=torch.float32), "height": self.height,
                 "width": self.width, "index": i}
        if self.views is not None:
            if self.distortion is not None:  # undistorted rays of a real lens
                batch["origins"], batch["dirs"] = view_rays(self.views, i, self.scene.ndc)
            batch["rgb"] = self.views.images[i].reshape(-1, 3)
        if self.stride > 1:
            keep = torch.arange(n).reshape(self.height, self.width)[::self.stride, ::self.stride]
            for key in ("origins", "dirs", "near", "far", "rgb"):
                if key in batch:
                    batch[key] = batch[key][keep.reshape(-1)]
            batch["height"], batch["width"] = keep.shape
        if self.nearest_train is not None:
            batch["image"] = torch.full((len(batch["origins"]),), int(self.nearest_train[i]), dtype=torch.long)
        return batch


class NerfDataModule(BaseDataModule):
    batch_setting = "num_rays"  # what mode=tune_batch_size scales: a training batch is num_rays rays

    def __init__(
        self,
        loader=None,
        data_dir: str | None = None,
        cache_dir: str = "data/nerf",
        format: str = "auto",
        scene_size: int = 64,
        scene_views: tuple = (40, 8, 8),
        background="white",
        random_background: bool | str = False,
        downscale: float = 1.0,
        llff_factor: int = 8,
        ndc: bool = True,
        holdout_every: int = 8,
        near: float | None = None,
        far: float | None = None,
        aabb: list | None = None,
        num_rays: int = 1024,
        steps_per_epoch: int = 500,
        val_views: int = 4,
        ray_device: str = "auto",
        path: str = "auto",
        path_frames: int = 40,
        seed: int = 0,
        augment: Any = None,
    ) -> None:
        super().__init__(loader)
        if augment is not None:  # `+data.augment...` reaches here; without `+`, Hydra refuses the unknown key
            raise ValueError("data.augment: NeRF has no data augmentation: each training ray is a measurement of the "
                             "scene from its known camera, and a flipped, shifted or recoloured one would show another "
                             "scene; drop data.augment")
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
        if num_rays < 1 or steps_per_epoch < 1:
            raise ValueError("data.num_rays and data.steps_per_epoch must be >= 1")
        if downscale <= 0:
            raise ValueError(f"data.downscale must be > 0, got {downscale}")
        if not (isinstance(random_background, bool) or random_background == "auto"):  # 0 == False: not a choice
            raise ValueError(f"data.random_background must be auto, true or false, got {random_background!r}")
        if path not in ("auto", "orbit", "spiral"):
            raise ValueError(f"data.path must be auto, orbit or spiral, got {path!r}")
        # plain Python values only: checkpoints are read back with torch.load(weights_only=True)
        scene_views = tuple(int(v) for v in scene_views)
        aabb = [float(v) for v in aabb] if aabb is not None else None
        background = background if isinstance(background, str) else [float(v) for v in background]
        self.save_hyperparameters(ignore=["loader"])
        self.data_dir: Path | None = None  # the scene folder: the user's, or the built-in scene's in cache_dir
        self.background = formats.parse_background(background)
        self.scene: Scene | None = None
        self.ray_buffer: dict[str, Tensor] | None = None

    # ---- data on disk ---------------------------------------------------------------------
    def scene_folder(self) -> Path:
        """The user's scene folder (read only), or the built-in scene, rendered into cache_dir on first use."""
        hp = self.hparams
        if self.data_dir is None:
            if hp.data_dir is not None:
                self.data_dir = user_folder(hp.data_dir, SCENE_FILES)
            else:
                settings = {"version": synthetic.VERSION, "size": hp.scene_size,
                            "views": [int(v) for v in hp.scene_views], "seed": hp.seed}
                self.data_dir = builtin_folder(hp.cache_dir, "scene", settings, lambda folder: synthetic.generate(
                    folder, hp.scene_size, tuple(settings["views"]), hp.seed))
        return self.data_dir

    def prepare_data(self) -> None:
        self.scene_folder()

    def load_scene(self) -> Scene:
        if self.scene is not None:
            return self.scene
        hp = self.hparams
        self.scene_folder()
        fmt = formats.detect_format(self.data_dir) if hp.format == "auto" else hp.format
        bounds = {"near": hp.near, "far": hp.far, "aabb": list(hp.aabb) if hp.aabb is not None else None}
        if fmt == "blender":
            scene = formats.load_blender(self.data_dir, self.background, hp.downscale, **bounds)
        elif fmt == "ngp":
            scene = formats.load_ngp(self.data_dir, self.background, hp.downscale, hp.holdout_every, **bounds)
        else:
            if hp.downscale != 1:  # the LLFF release ships its smaller sizes as folders of their own
                raise ValueError(f"data.downscale={hp.downscale}: LLFF scenes are read at the size of images_<N>; pick "
                                 "it with data.llff_factor (the folder must exist) and leave data.downscale at 1")
            scene = formats.load_llff(self.data_dir, hp.llff_factor, hp.holdout_every, hp.ndc, **bounds)
            self.background = torch.zeros(3)  # forward-facing scenes have no background
        if scene.near >= scene.far:
            raise ValueError(f"near={scene.near} must be below far={scene.far} (data.near / data.far)")
        for name, views in scene.splits.items():  # only training rays are composited again, and only when asked
            if hp.random_background is False or name != "train":
                views.alpha = None
        train = scene.splits["train"]
        log.info("NeRF %s scene %s: %s views of %dx%d; near %.3g far %.3g%s", fmt, self.data_dir,
                 {k: len(v) for k, v in scene.splits.items()}, train.width, train.height, scene.near, scene.far,
                 " (NDC)" if scene.ndc else "")
        self.scene = scene
        return scene

    # ---- rays -----------------------------------------------------------------------------
    def _buffer_device(self) -> torch.device:
        choice = str(self.hparams.ray_device)
        if choice == "auto":
            trainer = getattr(self, "trainer", None)
            return trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return torch.device(choice)

    def build_ray_buffer(self, device=None) -> dict[str, Tensor]:
        scene = self.load_scene()
        train = scene.splits["train"]
        origins, dirs = zip(*(view_rays(train, i, scene.ndc) for i in range(len(train))), strict=True)
        origins, dirs = torch.cat(origins), torch.cat(dirs)
        n = len(origins)
        # rays are stored view after view, height x width each: the index of the image each came from
        image = torch.arange(len(train)).repeat_interleave(train.height * train.width)
        buffer = {"origins": origins, "dirs": dirs, "rgb": train.images.reshape(-1, 3), "image": image,
                  "near": torch.full((n, 1), scene.near), "far": torch.full((n, 1), scene.far),
                  "background": self.background.clone(), "aabb": torch.tensor(scene.aabb, dtype=torch.float32)}
        if self.random_background():
            buffer["alpha"] = train.alpha.reshape(-1, 1)
        device = torch.device(device) if device is not None else self._buffer_device()
        self.ray_buffer = {k: v.to(device) for k, v in buffer.items()}
        log.info("Ray buffer: %d rays (%.1f MB) on %s", n,
                 sum(v.numel() * v.element_size() for v in buffer.values()) / 1e6, device)
        return self.ray_buffer

    def random_background(self) -> bool:
        """Whether training rays are composited onto random colours: data.random_background=true, or auto with RGBA
        training images; true with images that have no alpha is an error."""
        choice, train = self.hparams.random_background, self.load_scene().splits["train"]
        if choice is True and train.alpha is None:
            raise ValueError(f"data.random_background=true: the training images of {self.data_dir} have no alpha "
                             "channel (RGBA) to composite onto a random colour; use auto or false")
        on = choice is not False and train.alpha is not None
        if not getattr(self, "_told_background", False):
            log.info("Random background: %s", "on (each training ray onto a random colour)" if on else
                     "off (data.random_background=false)" if choice is False else "off (the images have no alpha)")
            self._told_background = True
        return on

    def task_data(self) -> TaskData:
        """The module reads `num_train_images` (a hash-grid field with appearance vectors has one per training
        view) and `pixels_across_box` (what the training images resolve, against the field's finest cells); the
        suite reads `validation_is_test` (instant-ngp and LLFF scenes hold out test views only, which validate too)."""
        scene = self.load_scene()
        return TaskData(num_train_images=len(scene.splits["train"]), pixels_across_box=pixels_across_box(scene),
                        validation_is_test=self._split("val", "test") is self._split("test", "val"))

    def setup(self, stage: str | None = None) -> None:
        self.load_scene()
        if stage in (None, "fit") and self.ray_buffer is None:
            self.build_ray_buffer()

    # ---- loaders --------------------------------------------------------------------------
    def _split(self, *names: str) -> Views:
        scene = self.load_scene()
        for name in names:
            if name in scene.splits:
                return scene.splits[name]
        return scene.splits["train"]

    def _quick_check(self) -> bool:
        """Under fast_dev_run the question is whether everything runs: few rays, small views."""
        trainer = getattr(self, "trainer", None)
        quick = bool(trainer is not None and trainer.fast_dev_run)
        if quick and not getattr(self, "_told_quick", False):
            log.info("fast_dev_run: %d rays a batch and views of about %dx%d pixels (a pipeline check, not a score)",
                     QUICK_RAYS, QUICK_VIEW_SIDE, QUICK_VIEW_SIDE)
            self._told_quick = True
        return quick

    def _view_stride(self, views_height: int, views_width: int) -> int:
        return max(1, min(views_height, views_width) // QUICK_VIEW_SIDE) if self._quick_check() else 1

    def train_dataloader(self):
        if self.ray_buffer is None:
            self.build_ray_buffer()
        rays = min(self.hparams.num_rays, QUICK_RAYS) if self._quick_check() else self.hparams.num_rays
        dataset = RayBatches(self.ray_buffer, rays)
        sampler = RayBatchKeys(self.hparams.steps_per_epoch, self.hparams.seed, **self.data_parallel_ranks())
        if self.ray_buffer["origins"].is_cuda:
            # Sampling is a gather on the GPU; worker processes cannot touch CUDA tensors.
            self.resume_sampler(sampler)
            return DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=_first, num_workers=0)
        return self.make_loader(dataset, batch_size=1, shuffle=True, sampler=sampler, collate_fn=_first)

    def sampler_items_per_step(self) -> int:
        return self.world_size  # one index a rank: a whole ray batch

    @property
    def per_device_batch_size(self) -> int:
        """Rays a training batch on each device (what the start-up lines print); `batch_size` is not used."""
        return int(self.hparams.num_rays)

    def _view_loader(self, views: Views, limit: int | None):
        if limit and limit < len(views):
            views = views.subset([round(i) for i in torch.linspace(0, len(views) - 1, limit).tolist()])
        dataset = ViewDataset(views, None, self.scene, self.background,
                              stride=self._view_stride(views.height, views.width),
                              train_centres=self._split("train").c2w[:, :3, 3])
        return self.make_loader(dataset, batch_size=1, collate_fn=_first)

    def val_dataloader(self):
        return self._view_loader(self._split("val", "test"), self.hparams.val_views)

    def test_dataloader(self):
        return self._view_loader(self._split("test", "val"), None)

    def predict_dataloader(self):
        scene = self.load_scene()
        train = scene.splits["train"]
        kind = self.hparams.path
        if kind == "auto":
            kind = "spiral" if scene.ndc else "orbit"
        poses = (cameras.spiral_path if kind == "spiral" else cameras.orbit_path)(train.c2w, self.hparams.path_frames)
        dataset = ViewDataset(None, poses, scene, self.background, train.intrinsics[0], (train.height, train.width),
                              stride=self._view_stride(train.height, train.width))
        return self.make_loader(dataset, batch_size=1, collate_fn=_first)


def _first(items):
    """Items are whole batches already (a ray batch or a view): the loader's batch of one unwraps."""
    return items[0]
