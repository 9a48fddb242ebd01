"""Positional encoding and the NeRF MLP (Mildenhall et al. 2020): 8 x 256 ReLU layers with the
encoded position fed again after the 4th, density from the trunk, colour from a view-dependent head."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class PositionalEncoding(nn.Module):
    """x -> [x, sin(2^k x), cos(2^k x)] for k < num_freqs (no pi factor, as in the paper's code)."""

    def __init__(self, num_freqs: int, include_input: bool = True) -> None:
        super().__init__()
        self.num_freqs, self.include_input = num_freqs, include_input
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)

    def out_dim(self, in_dim: int = 3) -> int:
        return in_dim * (2 * self.num_freqs + int(self.include_input))

    def forward(self, x: Tensor) -> Tensor:
        scaled = (x[..., None, :] * self.freqs[:, None]).flatten(-2)  # (..., F*3), frequency-major
        parts = [x] if self.include_input else []
        return torch.cat(parts + [torch.sin(scaled), torch.cos(scaled)], dim=-1)


@runtime_checkable
class RadianceField(Protocol):
    """What the module and its renderers read from `model.net` (NeRFMLP here, HashGridField in hashgrid.py)."""

    uses_appearance: bool  # true: forward also takes each sample's training image index
    contraction: str       # "none", or how all of space maps into the field (renderer=proposal needs one)

    def table_parameters(self) -> list[nn.Parameter]:
        """Encoding tables (the hash grid's): an optimizer group of their own; none for the MLP."""

    def set_aabb(self, aabb: Tensor) -> None:
        """The scene box (from the data, before the first render): a bounded field maps it to its coordinates."""

    def set_num_images(self, num_images: int) -> None:
        """The number of training images (from the data): a field with appearance vectors makes one each."""

    def set_pixels_across_box(self, pixels: float | None) -> None:
        """The training pixels across the scene box (from the data; None without a scale): a grid set to size its
        finest level from the data (finest_resolution: auto) builds its tables for them."""

    def set_finest_resolution(self, finest: int) -> None:
        """A grid's tables rebuilt for `finest` cells a side (a checkpoint's, before its weights load)."""

    def resolution_note(self, pixels_across_box: float | None) -> tuple[int, str] | None:
        """(log level, start-up line) comparing a grid's finest cells with the training pixels across the scene box
        (from the data; None without a scale); None: no grid, or no scale."""

    def set_step(self, step: int) -> None:
        """The training step about to run: a field whose inputs change over training (the hash grid's level
        warm-up) sets them for it."""

    def density(self, points: Tensor) -> Tensor:
        """Raw density (...,) at scene points: what the occupancy grid needs."""


def missing_field_members(net: object) -> list[str]:
    """What `net` lacks of RadianceField, for the error that refuses it."""
    declared = [*RadianceField.__annotations__, *(k for k in vars(RadianceField) if not k.startswith("_"))]
    return [name for name in dict.fromkeys(declared) if not hasattr(net, name)]


class NeRFMLP(nn.Module):
    # the colour depends on position and direction only: the renderers never pass it an image index
    uses_appearance = False
    contraction = "none"  # positional encoding of scene coordinates as they are

    def __init__(self, depth: int = 8, width: int = 256, skips: tuple = (4,), pos_freqs: int = 10,
                 dir_freqs: int = 4, use_viewdirs: bool = True, gradient_checkpointing: bool = False,
                 appearance_dim: int = 0, level_warmup_steps: int = 0, cells_per_pixel: float | None = None,
                 contraction: str = "none") -> None:
        super().__init__()
        # the hash grid's keys are here only so that setting them with this field gets this answer, not Hydra's
        for key, value, what, off in (("appearance_dim", appearance_dim, "per-image appearance vectors are", 0),
                                      ("level_warmup_steps", level_warmup_steps, "the level warm-up is", 0),
                                      ("cells_per_pixel", cells_per_pixel, "the finest grid cells' size is", "null"),
                                      ("contraction", contraction, "scene contraction is", "none")):
            if value and value != "none":
                raise ValueError(f"model.net.{key}={value}: {what} a hash-grid setting (nerf_net=hashgrid, "
                                 "conf/nerf_net/hashgrid.yaml); the MLP field (nerf_net=mlp) has none: use "
                                 f"nerf_net=hashgrid, or model.net.{key}={off}")
        self.pos_enc, self.dir_enc = PositionalEncoding(pos_freqs), PositionalEncoding(dir_freqs)
        self.skips, self.use_viewdirs = tuple(skips), use_viewdirs
        self.gradient_checkpointing = gradient_checkpointing
        in_dim = self.pos_enc.out_dim()
        layers = []
        for i in range(depth):
            d_in = in_dim if i == 0 else width + (in_dim if i in self.skips else 0)
            layers.append(nn.Linear(d_in, width))
        self.layers = nn.ModuleList(layers)
        self.sigma = nn.Linear(width, 1)
        if use_viewdirs:
            self.feature = nn.Linear(width, width)
            self.view = nn.Linear(width + self.dir_enc.out_dim(), width // 2)
            self.rgb = nn.Linear(width // 2, 3)
        else:
            self.rgb = nn.Linear(width, 3)

    def _trunk(self, x: Tensor) -> Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            if i in self.skips:
                h = torch.cat([x, h], dim=-1)
            h = torch.relu(layer(h))
        return h

    def trunk(self, points: Tensor) -> Tensor:
        x = self.pos_enc(points)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._trunk, x, use_reentrant=False)
        return self._trunk(x)

    def table_parameters(self) -> list[nn.Parameter]:
        return []

    def set_aabb(self, aabb: Tensor) -> None:
        pass  # positional encoding reads scene coordinates as they are: no box to map

    def set_num_images(self, num_images: int) -> None:
        pass  # no appearance vectors

    def set_pixels_across_box(self, pixels: float | None) -> None:
        pass  # a continuous encoding: no cells to size

    def set_finest_resolution(self, finest: int) -> None:
        pass  # no tables

    def resolution_note(self, pixels_across_box: float | None) -> None:
        return None  # a continuous encoding: no cells to compare with the pixels

    def set_step(self, step: int) -> None:
        pass  # the same network at every step

    def density(self, points: Tensor) -> Tensor:
        """Raw (pre-activation) density only: what the occupancy grid needs."""
        return self.sigma(self.trunk(points)).squeeze(-1)

    def forward(self, points: Tensor, viewdirs: Tensor) -> tuple[Tensor, Tensor]:
        """Raw density (...,) and raw colour (..., 3) at `points` seen along unit `viewdirs`."""
        h = self.trunk(points)
        sigma = self.sigma(h).squeeze(-1)
        if self.use_viewdirs:
            h = torch.relu(self.view(torch.cat([self.feature(h), self.dir_enc(viewdirs)], dim=-1)))
        return sigma, self.rgb(h)
