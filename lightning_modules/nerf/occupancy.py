"""An occupancy grid that lets the renderer skip empty space (the idea of nerfacc / instant-ngp),
in plain PyTorch.

The grid keeps, per cell of a res^3 lattice over the scene box, a running max-decayed density
estimate. Every `update_every` training steps it re-queries the network at one random point per
cell (all cells during warm-up, a random quarter afterwards) and marks as occupied the cells
whose opacity over one marching step would exceed `threshold`. The renderer marches many cheap
candidate samples per ray, keeps those in occupied cells and runs the network only on them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nerf import rendering


class March(NamedTuple):
    """A batch of rays marched through the grid: S candidate samples a ray at a fixed step."""

    t: Tensor          # (N, S) depths
    points: Tensor     # (N, S, 3)
    keep: Tensor       # (N, S) inside [near, far] and in an occupied cell: the samples worth shading
    dt: Tensor         # (N,) each ray's step in depth units
    spacing: Tensor    # (N or 1, S) sample positions in steps of the box diagonal over S (L_dist's spacing)


class OccupancyGrid(nn.Module):
    def __init__(self, resolution: int = 64, update_every: int = 16, warmup_steps: int = 256,
                 decay: float = 0.95, threshold: float = 0.01, march_samples: int = 256,
                 query_chunk: int = 65536) -> None:
        super().__init__()
        self.resolution, self.update_every, self.warmup_steps = resolution, update_every, warmup_steps
        self.decay, self.threshold, self.march_samples, self.query_chunk = decay, threshold, march_samples, query_chunk
        self.register_buffer("aabb", torch.zeros(6))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("density", torch.zeros(resolution**3))
        self.register_buffer("occupied", torch.ones(resolution**3, dtype=torch.bool))
        self.steps = 0

    def set_aabb(self, aabb: Tensor) -> None:
        self.aabb.copy_(aabb.to(self.aabb))
        self.initialized.fill_(True)

    @property
    def step_size(self) -> Tensor:
        """The marching step of a ray crossing the whole box diagonally."""
        return (self.aabb[3:] - self.aabb[:3]).norm() / self.march_samples

    def cell_index(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Flat cell index of each point and whether it lies inside the box."""
        lo, hi = self.aabb[:3], self.aabb[3:]
        unit = (points - lo) / (hi - lo)
        inside = ((unit >= 0) & (unit < 1)).all(-1)
        ijk = (unit * self.resolution).long().clamp(0, self.resolution - 1)
        r = self.resolution
        return (ijk[..., 0] * r + ijk[..., 1]) * r + ijk[..., 2], inside

    def march(self, origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor, perturb: bool) -> March:
        """March each ray from where it enters the box (or `near`) in steps of `step_size` scene units, jittered
        within each step when `perturb`."""
        t_in, t_out = rendering.ray_aabb(origins, dirs, self.aabb)
        t_near = torch.maximum(near[:, 0], t_in)
        t_far = torch.minimum(far[:, 0], t_out)
        n, s, device = origins.shape[0], self.march_samples, origins.device
        dt = self.step_size / dirs.norm(dim=-1)  # a fixed step in scene units along every ray
        u = torch.rand(n, s, device=device) if perturb else torch.full((1, s), 0.5, device=device)
        steps = torch.arange(s, device=device) + u
        t = t_near[:, None] + steps * dt[:, None]
        points = origins[:, None] + dirs[:, None] * t[..., None]
        keep = (t < t_far[:, None]) & self.query(points)
        return March(t, points, keep, dt, steps / s)

    def render(self, shade: Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]],
               density: Callable[[Tensor], Tensor], origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor,
               background: Tensor, perturb: bool, image: Tensor | None, early_stop_eps: float) -> dict[str, Tensor]:
        """A ray batch marched through the grid: only the kept samples are shaded (`shade(points, viewdirs,
        image)` -> activated density, colour), then composited. With `early_stop_eps` > 0, a density-only pass
        without gradients (`density(points)`) first drops the samples behind which less than that light is left."""
        t, points, keep, dt, spacing = self.march(origins, dirs, near, far, perturb)
        n, s = keep.shape
        if early_stop_eps > 0:
            with torch.no_grad():
                sigma = torch.zeros(n, s, device=keep.device).masked_scatter(keep, density(points[keep]))
                keep = keep & (rendering.transmittance(sigma * (dt * dirs.norm(dim=-1))[:, None]) > early_stop_eps)
        viewdirs = F.normalize(dirs, dim=-1)[:, None].expand(n, s, 3)
        image_k = None if image is None else rendering.per_sample(image, t)[keep]
        sigma_k, rgb_k = shade(points[keep], viewdirs[keep], image_k)
        sigma = torch.zeros(n, s, device=origins.device).masked_scatter(keep, sigma_k)
        rgb = torch.zeros(n, s, 3, device=origins.device).masked_scatter(keep[..., None].expand(n, s, 3), rgb_k)
        out = rendering.composite(rgb, sigma, t, dirs, background, deltas=dt[:, None].expand(n, s))
        return {**out, "spacing_mids": spacing}

    def query(self, points: Tensor) -> Tensor:
        """True where a point is inside the box and in an occupied cell."""
        index, inside = self.cell_index(points)
        return self.occupied[index] & inside

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], step: int | None = None) -> None:
        """Re-estimate densities (density_fn maps (M, 3) points to activated densities (M,))."""
        step = self.steps if step is None else step
        r, device = self.resolution, self.density.device
        if step < self.warmup_steps:
            cells = torch.arange(r**3, device=device)
        else:
            cells = torch.randperm(r**3, device=device)[: r**3 // 4]
        i = cells // (r * r)
        j = (cells // r) % r
        k = cells % r
        ijk = torch.stack([i, j, k], -1).float()
        unit = (ijk + torch.rand_like(ijk)) / r
        lo, hi = self.aabb[:3], self.aabb[3:]
        points = lo + unit * (hi - lo)
        values = torch.cat([density_fn(chunk).float() for chunk in points.split(self.query_chunk)])
        self.density[cells] = torch.maximum(self.density[cells] * self.decay, values)
        alpha = 1.0 - torch.exp(-self.density * self.step_size)
        # never empty the grid: a cell counts as occupied at or above min(threshold, mean opacity); a field that
        # reads the same everywhere (a fresh one, its tiny differences rounded away in bf16) can have a mean a
        # rounding above every cell, and then keeps them all, as it has told nothing about where the scene is
        threshold = torch.minimum(torch.tensor(self.threshold, device=device), alpha.mean())
        occupied = alpha >= threshold
        self.occupied.copy_(occupied | ~occupied.any())

    def maybe_update(self, density_fn: Callable[[Tensor], Tensor]) -> bool:
        updated = self.steps % self.update_every == 0
        if updated:
            self.update(density_fn)
        self.steps += 1
        return updated

    def occupancy_fraction(self) -> Tensor:
        return self.occupied.float().mean()
