"""A hash-grid field (the idea of instant-ngp, Müller et al. 2022) in plain PyTorch: a multiresolution
hash encoding of position, a small density MLP, and a colour MLP on a spherical-harmonics encoding of
the view direction. It is a drop-in `model.net` beside NeRFMLP: `forward(points, viewdirs)` gives raw
density and raw colour, `density(points)` raw density only; the module activates both. With `appearance_dim`
> 0 the colour MLP also reads a learned vector per training image (NeRF-W, nerfacto), `forward(points, viewdirs,
image)`, so one photo's exposure or white balance is explained by its vector, not baked into the geometry.

The encoding has two backends with the same values: plain PyTorch (a gather per corner per level, what the
CPU runs) and fused Triton kernels (hash_kernel.py) for CUDA tensors.
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_modules.nerf.contraction import CONTRACTIONS, box_share, box_to_unit

try:
    from lightning_modules.nerf import hash_kernel
except ImportError:  # no triton: the torch backend is the only one
    hash_kernel = None

# instant-ngp's spatial hash: coordinate i of a corner is multiplied by PRIMES[i] before the XOR
PRIMES = (1, 2654435761, 805459861)
BACKENDS = ("auto", "triton", "torch")
# raw density outside the scene box: softplus (and exp) of it is exactly 0.0 in float32
OUTSIDE_RAW_DENSITY = -1.0e4
# finest cells per training pixel across the scene box in instant-ngp's Blender setting: 2048 cells over 800-px
# views that put about 830 pixels across the box (model.net.cells_per_pixel's default)
CELLS_PER_PIXEL = 2.5
# instant-ngp's finest resolution: `finest_resolution: auto`'s cap, and its value where the data gives no pixel scale
MAX_FINEST = 2048


class HashEncoding(nn.Module):
    """Points in [0, 1]^3 -> (..., levels * features_per_level) features, one trilinear lookup per level.

    Level l has a grid of res_l = floor(base * b^l) cells a side (b spreads the levels geometrically
    from `base_resolution` to `finest_resolution`) and a table of min((res_l + 1)^3, 2^log2_table_size)
    rows: the (res_l + 1)^3 vertices are indexed directly while they fit, hashed otherwise.

    `backend`: `torch` (plain PyTorch), `triton` (the fused kernels; CUDA points that do not require grad)
    or `auto` (triton for CUDA points when triton imports and the points need no gradient, else torch).
    """

    def __init__(self, levels: int = 16, log2_table_size: int = 19, features_per_level: int = 2,
                 base_resolution: int = 16, finest_resolution: int = 2048, init_scale: float = 1e-4,
                 backend: str = "auto") -> None:
        super().__init__()
        if levels < 1 or features_per_level < 1 or not 1 <= base_resolution <= finest_resolution:
            raise ValueError("hash encoding: levels, features_per_level >= 1 and 1 <= base <= finest resolution")
        if backend not in BACKENDS:
            raise ValueError(f"hash encoding backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and hash_kernel is None:
            raise ValueError("hash encoding backend='triton' needs the triton package, which does not import here")
        self.backend = backend
        self.table_size = 2**log2_table_size
        self.features_per_level = features_per_level
        growth = math.exp((math.log(finest_resolution) - math.log(base_resolution)) / (levels - 1)) if levels > 1 else 1.0
        # the small epsilon keeps floor() from dropping a level whose exact value is an integer
        self.resolutions = [int(math.floor(base_resolution * growth**level + 1e-6)) for level in range(levels)]
        self.dense = [(res + 1) ** 3 <= self.table_size for res in self.resolutions]
        rows = [(res + 1) ** 3 if dense else self.table_size for res, dense in zip(self.resolutions, self.dense, strict=True)]
        # tiny uniform init as instant-ngp: features start near 0, so the MLPs see a near-constant input
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(n, features_per_level).uniform_(-init_scale, init_scale)) for n in rows)
        corners = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])  # (8, 3) offsets
        self.register_buffer("corners", corners, persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.int64), persistent=False)

    @property
    def out_dim(self) -> int:
        return len(self.tables) * self.features_per_level

    def corner_indices(self, coords: Tensor, level: int) -> Tensor:
        """Table rows of integer vertex coordinates (..., 3) at `level`: dense or hashed."""
        if self.dense[level]:
            side = self.resolutions[level] + 1
            return coords[..., 0] + side * (coords[..., 1] + side * coords[..., 2])
        scaled = coords * self.primes  # int64: no overflow for any grid a table could address
        hashed = scaled[..., 0] ^ scaled[..., 1] ^ scaled[..., 2]
        return hashed % self.table_size

    def lookup(self, unit: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """The 8 corner rows (N, 8) and trilinear weights (N, 8) of points (N, 3) in [0, 1]^3."""
        res = self.resolutions[level]
        pos = unit.float().clamp(0.0, 1.0) * res
        low = pos.floor().clamp(max=res - 1)  # x = 1 lies in the last cell, at weight 1
        frac = pos - low
        coords = low.long()[:, None, :] + self.corners  # (N, 8, 3)
        weights = torch.where(self.corners.bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)
        return self.corner_indices(coords, level), weights

    def backend_for(self, unit: Tensor) -> str:
        """The backend that encodes these points: `auto` resolved, `triton` checked (a clear error if it cannot)."""
        if self.backend == "triton":
            hash_kernel.check_launchable(unit)
            return "triton"
        # deterministic algorithms: the kernels' backward adds with unordered atomics, the torch path does not
        if self.backend == "torch" or hash_kernel is None or not unit.is_cuda or torch.are_deterministic_algorithms_enabled():
            return "torch"
        return "torch" if hash_kernel.points_need_grad(unit) else "triton"

    def forward(self, unit: Tensor) -> Tensor:
        flat = unit.reshape(-1, 3)
        if self.backend_for(flat) == "triton":
            out = hash_kernel.hash_encode(flat, tuple(self.tables), self.resolutions, self.dense, PRIMES)
            return out.reshape(*unit.shape[:-1], self.out_dim)
        outs = []
        for level, table in enumerate(self.tables):
            index, weights = self.lookup(flat, level)
            rows = table[index]  # (N, 8, F)
            outs.append((weights[..., None] * rows).sum(1))
        return torch.cat(outs, -1).reshape(*unit.shape[:-1], self.out_dim)


def auto_finest(pixels_across_box: float | None, contraction: str, base_resolution: int,
                cells_per_pixel: float = CELLS_PER_PIXEL) -> int:
    """`finest_resolution: auto`: `cells_per_pixel` finest cells a training pixel across the scene box, between the
    base resolution and MAX_FINEST; MAX_FINEST where the data has no pixel scale (no training views)."""
    if pixels_across_box is None:
        return MAX_FINEST
    return int(min(MAX_FINEST, max(base_resolution, pixel_matched_finest(pixels_across_box, contraction, cells_per_pixel))))


def pixel_matched_finest(pixels_across_box: float, contraction: str, cells_per_pixel: float) -> int:
    """The finest resolution that puts `cells_per_pixel` cells on each training pixel across the scene box."""
    return round(cells_per_pixel * pixels_across_box / box_share(contraction))


def sh_encoding(dirs: Tensor, degree: int = 4) -> Tensor:
    """Real spherical harmonics of unit directions (..., 3) up to band degree-1: degree^2 values (1 <= degree <= 4).
    Orthonormal on the sphere (constants are sqrt((2l+1)/4pi (l-m)!/(l+m)!) times the factors of each term)."""
    if not 1 <= degree <= 4:
        raise ValueError(f"sh degree must be 1..4, got {degree}")
    x, y, z = dirs.float().unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        c1 = 0.4886025119029199
        out += [-c1 * y, c1 * z, -c1 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.31539156525252005 * (3 * zz - 1),
                -1.0925484305920792 * x * z, 0.5462742152960396 * (xx - yy)]
    if degree > 3:
        out += [-0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * x * y * z,
                -0.4570457994644658 * y * (5 * zz - 1), 0.3731763325901154 * z * (5 * zz - 3),
                -0.4570457994644658 * x * (5 * zz - 1), 1.445305721320277 * z * (xx - yy),
                -0.5900435899266435 * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


class HashGridField(nn.Module):
    """Hash encoding -> density MLP (density + geometry feature) -> colour MLP (feature + SH of the view).

    Points are mapped from the scene box (`set_aabb`, given by the module from the data) to [-1, 1]^3,
    contracted when `contraction` is l2/linf (unbounded scenes: the box then holds the foreground and
    everything lands in [-2, 2]^3), then scaled into the encoding's [0, 1]^3. Without contraction,
    points outside the box get zero density.

    `appearance_dim` > 0: an `nn.Embedding(num_images, appearance_dim)` whose row for a sample's training image
    joins the colour MLP's input (never the density MLP's). The number of images comes from the data, after
    the field is built: `set_num_images(n)` creates the embedding (the module calls it from bind_data, and
    before a checkpoint's weights load). A sample without an image index (a camera path's view) gets the mean row.

    `level_warmup_steps` > 0: coarse to fine, as Neuralangelo trains hash grids. Training starts with the
    `level_warmup_start` coarsest levels; the finer ones fade in, one after another, until all are on at that
    step. With too few views, fine levels from step 0 let each view paint its own image on a screen just in front
    of its camera, so held-out views see nonsense; coarse levels first settle one geometry all views share.

    `finest_resolution: auto` sizes the finest level from the data (`set_pixels_across_box`, `auto_finest`); until
    then the tables are MAX_FINEST's. The resolution the tables were built for is a buffer: loading a checkpoint
    rebuilds them to it first, so a checkpoint loads whatever the data it is used with.
    """

    def __init__(self, levels: int = 16, log2_table_size: int = 19, features_per_level: int = 2,
                 base_resolution: int = 16, finest_resolution: int | Literal["auto"] = 2048, hidden: int = 64,
                 geo_features: int = 15, color_hidden: int = 64, color_layers: int = 2, sh_degree: int = 4,
                 contraction: str = "none", gradient_checkpointing: bool = False, backend: str = "auto",
                 appearance_dim: int = 0, level_warmup_steps: int = 0, level_warmup_start: int = 4,
                 cells_per_pixel: float | None = None) -> None:
        super().__init__()
        self.auto_finest = finest_resolution == "auto"
        if not self.auto_finest and not isinstance(finest_resolution, int):
            raise ValueError(f"model.net.finest_resolution must be an integer or auto, got {finest_resolution!r}")
        if cells_per_pixel is not None and not cells_per_pixel > 0:
            raise ValueError(f"model.net.cells_per_pixel={cells_per_pixel}: finest cells a training pixel must be a number "
                             f"> 0 (null: {CELLS_PER_PIXEL})")
        if cells_per_pixel is not None and not self.auto_finest:
            raise ValueError(f"model.net.cells_per_pixel={cells_per_pixel} sizes finest_resolution: auto; with "
                             f"finest_resolution={finest_resolution} set model.net.cells_per_pixel=null")
        self.cells_per_pixel = cells_per_pixel  # None: CELLS_PER_PIXEL
        self._set_finest = None if self.auto_finest else finest_resolution  # what a checkpoint must agree with
        self._loaded_resolution = False  # a checkpoint's tables keep their resolution whatever the data
        if contraction not in CONTRACTIONS:
            raise ValueError(f"model.net.contraction must be one of {CONTRACTIONS}, got {contraction!r}")
        if appearance_dim < 0:
            raise ValueError(f"model.net.appearance_dim must be >= 0 (0: off), got {appearance_dim}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (level_warmup_steps, level_warmup_start)) or \
                level_warmup_steps < 0 or (level_warmup_steps and not 1 <= level_warmup_start <= levels):
            raise ValueError(f"model.net.level_warmup_steps must be an integer >= 0 (0: off) and level_warmup_start an "
                             f"integer within 1..{levels} (the levels), got {level_warmup_steps!r} and "
                             f"{level_warmup_start!r}")
        self.level_warmup_steps, self.level_warmup_start = int(level_warmup_steps), int(level_warmup_start)
        self.appearance_dim = int(appearance_dim)
        # built by set_num_images: the number of training images is the data's, not the config's
        self.appearance: nn.Embedding | None = None
        self.contraction, self.sh_degree = contraction, sh_degree
        self.gradient_checkpointing = gradient_checkpointing
        self._encoding_settings = {"levels": levels, "log2_table_size": log2_table_size, "backend": backend,
                                   "features_per_level": features_per_level, "base_resolution": base_resolution}
        finest = MAX_FINEST if self.auto_finest else finest_resolution
        self.encoding = HashEncoding(**self._encoding_settings, finest_resolution=finest)
        self.register_buffer("finest_resolution", torch.tensor(finest))
        # each encoding feature's weight in the warm-up (a buffer: a compiled render reads this step's, and a
        # checkpoint taken mid-warm-up evaluates as it trained)
        self.register_buffer("level_mask", torch.ones(self.encoding.out_dim))
        self._active_levels: float | None = None  # the active levels the mask holds (None: unknown, e.g. loaded)
        self.set_step(0)  # what renders before the first training step (the sanity check) is what step 0 trains
        self.density_net = nn.Sequential(nn.Linear(self.encoding.out_dim, hidden), nn.ReLU(),
                                         nn.Linear(hidden, 1 + geo_features))
        layers, width = [], geo_features + sh_degree**2 + self.appearance_dim
        for _ in range(color_layers):
            layers += [nn.Linear(width, color_hidden), nn.ReLU()]
            width = color_hidden
        self.color_net = nn.Sequential(*layers, nn.Linear(width, 3))
        # the scene box: a buffer, so a checkpoint maps points exactly as the run that wrote it
        self.register_buffer("aabb", torch.tensor([-1.0, -1, -1, 1, 1, 1]))

    def set_aabb(self, aabb: Tensor) -> None:
        self.aabb.copy_(aabb.to(self.aabb))

    def table_parameters(self) -> list[nn.Parameter]:
        return list(self.encoding.parameters())

    def set_pixels_across_box(self, pixels: float | None) -> None:
        """`finest_resolution: auto` sized to the data's training pixels; not once a checkpoint's tables have loaded
        (`init_from`: rebuilding them would throw its training away)."""
        if not self.auto_finest or self._loaded_resolution:
            return
        if pixels is None and self.cells_per_pixel is not None:
            raise ValueError(f"model.net.cells_per_pixel={self.cells_per_pixel}: this data has no pixel scale (no "
                             f"training views), where finest_resolution: auto is {MAX_FINEST}; set "
                             "model.net.finest_resolution instead, and cells_per_pixel=null")
        base = self._encoding_settings["base_resolution"]
        self.set_finest_resolution(auto_finest(pixels, self.contraction, base, self.target_cells_per_pixel))

    @property
    def target_cells_per_pixel(self) -> float:
        """The finest cells a training pixel that `finest_resolution: auto` aims for (model.net.cells_per_pixel)."""
        return self.cells_per_pixel or CELLS_PER_PIXEL

    def set_finest_resolution(self, finest: int) -> None:
        """Fresh tables for `finest` cells a side at the finest level (nothing when they are that already)."""
        if int(self.finest_resolution) != finest:
            device = self.finest_resolution.device
            self.encoding = HashEncoding(**self._encoding_settings, finest_resolution=finest).to(device)
            self.finest_resolution.fill_(finest)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint's tables are rebuilt to its resolution before they load; one from before the resolution was
        stored has this field's (its tables were built from an integer setting, as this field's were)."""
        stored = state_dict.setdefault(prefix + "finest_resolution", self.finest_resolution.clone())
        if self._set_finest is not None and int(stored) != self._set_finest:  # auto takes the checkpoint's
            raise ValueError(f"model.net.finest_resolution={self._set_finest}, but the checkpoint's tables have "
                             f"{int(stored)} cells a side at the finest level; set model.net.finest_resolution="
                             f"{int(stored)}, or auto, which takes the checkpoint's")
        state_dict.setdefault(prefix + "level_mask", torch.ones_like(self.level_mask))  # before the warm-up existed
        self._active_levels = None
        self.set_finest_resolution(int(stored))
        self._loaded_resolution = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_step(self, step: int) -> None:
        """The level warm-up's weights at training step `step`: level l's is clamp(active - l, 0, 1), active
        rising linearly from level_warmup_start to all levels (computed on the mask's device: no copy)."""
        if not self.level_warmup_steps:
            return
        levels, features = self._encoding_settings["levels"], self._encoding_settings["features_per_level"]
        active = self.level_warmup_start + (levels - self.level_warmup_start) * min(step / self.level_warmup_steps, 1.0)
        if active != self._active_levels:  # past the warm-up: nothing to launch
            level = torch.arange(levels, device=self.level_mask.device).repeat_interleave(features)
            self.level_mask.copy_((active - level).clamp(0.0, 1.0))
            self._active_levels = active

    def cells_across_box(self) -> float:
        return self.encoding.resolutions[-1] * box_share(self.contraction)

    def resolution_note(self, pixels_across_box: float | None) -> tuple[int, str] | None:
        """(log level, line) comparing the finest cells across the scene box with the training pixels that span it;
        a warning where the cells are so much finer that each ray can get cells of its own to fit."""
        if pixels_across_box is None:
            return None
        cells = self.cells_across_box()
        ratio = cells / pixels_across_box
        line = (f"hash grid: {cells:.0f} finest cells across the scene box, {pixels_across_box:.0f} training pixels "
                f"({ratio:.1f} cells a pixel)")
        if ratio <= 2 * max(self.target_cells_per_pixel, CELLS_PER_PIXEL):
            return logging.INFO, line
        suggested = pixel_matched_finest(pixels_across_box, self.contraction, CELLS_PER_PIXEL)
        return logging.WARNING, (f"{line}: cells this much finer than the pixels let the tables fit single rays "
                                 f"instead of the scene (see docs/tasks/nerf.md); model.net.finest_resolution={suggested} "
                                 f"gives {CELLS_PER_PIXEL} cells a pixel, as instant-ngp on Blender scenes")

    @property
    def uses_appearance(self) -> bool:
        """Whether the colour depends on the training image a ray came from (the renderers then pass its index)."""
        return self.appearance_dim > 0

    def set_num_images(self, num_images: int) -> None:
        """Create the appearance embedding, one row per training image; nothing without appearance. Called
        again with the same count it keeps its rows; another count is refused (its rows belong to other images)."""
        if not self.uses_appearance:
            return
        if self.appearance is not None:
            if self.appearance.num_embeddings != num_images:
                raise ValueError(f"model.net.appearance_dim: the field has appearance vectors for "
                                 f"{self.appearance.num_embeddings} training images but the data has {num_images}; "
                                 "a checkpoint's vectors only fit the images it was trained on")
            return
        if num_images < 1:
            raise ValueError(f"model.net.appearance_dim needs at least one training image, got {num_images}")
        weight = self.color_net[0].weight
        self.appearance = nn.Embedding(num_images, self.appearance_dim, device=weight.device, dtype=weight.dtype)

    def appearance_code(self, image: Tensor | None, shape: torch.Size) -> Tensor:
        """The appearance vectors (*shape, appearance_dim) of samples from training images `image` (shape), or
        for a held-out view (`image` None) the mean of the training images' vectors: the average exposure, which
        is what an unseen photo most likely has (nerfacto uses zeros, a vector no training image was fitted with)."""
        if self.appearance is None:
            raise RuntimeError("model.net.appearance_dim > 0 but the field has no appearance embedding yet: "
                               "set_num_images(number of training images) builds it (NerfModule.bind_data does)")
        if image is None:
            return self.appearance.weight.mean(0).expand(*shape, self.appearance_dim)
        return self.appearance(image)

    def to_unit(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Encoding coordinates in [0, 1]^3 of scene points, and whether each one is inside the field."""
        return box_to_unit(points, self.aabb, self.contraction)

    def _geometry(self, unit: Tensor) -> Tensor:
        features = self.encoding(unit)
        if self.level_warmup_steps:
            features = features * self.level_mask
        return self.density_net(features)

    def geometry(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Raw density (...,) and the geometry feature (..., geo_features) at scene points."""
        unit, inside = self.to_unit(points)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            h = checkpoint(self._geometry, unit, use_reentrant=False)
        else:
            h = self._geometry(unit)
        raw = torch.where(inside, h[..., 0], torch.full_like(h[..., 0], OUTSIDE_RAW_DENSITY))
        return raw, h[..., 1:]

    def density(self, points: Tensor) -> Tensor:
        """Raw (pre-activation) density only: what the occupancy grid needs."""
        return self.geometry(points)[0]

    def forward(self, points: Tensor, viewdirs: Tensor, image: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Raw density (...,) and raw colour (..., 3) at `points` seen along unit `viewdirs`; with appearance,
        `image` (...,) is each sample's training image (None: a camera path's view, the mean vector)."""
        if image is not None and not self.uses_appearance:
            raise ValueError("an image index was passed to a field without appearance (model.net.appearance_dim=0)")
        raw, feature = self.geometry(points)
        inputs = [feature, sh_encoding(viewdirs, self.sh_degree).to(feature)]
        if self.uses_appearance:
            inputs.append(self.appearance_code(image, feature.shape[:-1]).to(feature))
        return raw, self.color_net(torch.cat(inputs, -1))
