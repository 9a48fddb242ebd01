"""An occupancy grid that lets the renderer skip empty space (the idea of nerfacc / instant-ngp),
in plain PyTorch.

The grid keeps, per cell of a res^3 lattice over the scene box, a running max-decayed density
estimate. Every `update_every` training steps it re-queries the network at one random point per
cell (all cells during warm-up, a random quarter afterwards) and marks as occupied the cells
whose opacity over one marching step would exceed `threshold`. The renderer marches many cheap
candidate samples per ray, keeps those in occupied cells and runs the network only on them.

How many samples are kept changes every step, so shading exactly those (boolean indexing) makes the GPU wait
for the count and gives every step new shapes. With a `sample_budget` (instant-ngp's fixed samples a step), a
training step shades a fixed number of slots instead (`shade_budget` in the pass with gradients, if smaller: early
ray termination leaves fewer samples than the occupied cells hold): the first kept samples in ray order, the rest
of the slots padding. Its shapes are static (one compiled graph, CUDA graphs) and nothing waits for a count; a
ray whose samples did not all get a slot is marked incomplete, and the loss leaves it out.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nerf import rendering

log = logging.getLogger(__name__)
# sample_budget: auto sizes both budgets at the end of the grid's warm-up: this much above the most samples (in
# occupied cells; shaded) of the last AUTO_WINDOW warm-up steps, rounded up to a rung of budget_ladder (at least
# AUTO_ROUND). The samples a step needs fall as training goes on: little headroom is needed
AUTO_HEADROOM, AUTO_WINDOW, AUTO_ROUND = 1.1, 32, 1024


def budget_ladder(samples: float) -> int:
    """The least of AUTO_ROUND x 2^(k/4), k = 0, 1, ... (rounded up to AUTO_ROUND) that holds `samples`: runs that
    count a little differently get the same budgets, the shapes of their compiled graphs, so a repeated or resumed
    run loads its graph from the compile cache instead of compiling again (half a minute cold on an H100)."""
    rung = max(0, math.ceil(4 * math.log2(max(samples, 1.0) / AUTO_ROUND) - 1e-9))
    return AUTO_ROUND * math.ceil(2 ** (rung / 4) - 1e-9)


class March(NamedTuple):
    """A batch of rays marched through the grid: S candidate samples a ray at a fixed step."""

    t: Tensor          # (N, S) depths
    points: Tensor     # (N, S, 3)
    keep: Tensor       # (N, S) inside [near, far] and in an occupied cell: the samples worth shading
    dt: Tensor         # (N,) each ray's step in depth units
    spacing: Tensor    # (N or 1, S) sample positions in steps of the box diagonal over S (L_dist's spacing)


class Slots(NamedTuple):
    """The samples a pass shades: `keep` itself (exact, index None) or a fixed number of slots."""

    keep: Tensor           # (N, S) the samples shaded
    index: Tensor | None   # (budget,) their flat indices, N * S (one past the last) in empty slots; None: keep's mask


def slots(keep: Tensor, budget: int | None) -> Slots:
    """The kept samples to shade: all of them (budget None), or the first `budget` in ray order, with no host sync."""
    if budget is None:
        return Slots(keep, None)
    flat = keep.reshape(-1)
    rank = flat.cumsum(0) - 1  # each kept sample's slot
    fits = flat & (rank < budget)
    index = torch.full((budget + 1,), flat.numel(), dtype=torch.long, device=keep.device)
    index.scatter_(0, torch.where(fits, rank, budget), torch.arange(flat.numel(), device=keep.device))
    return Slots(fits.reshape(keep.shape), index[:budget])  # slot `budget` took every sample without one


def take(values: Tensor, chosen: Slots) -> Tensor:
    """(N, S, ...) values at the shaded samples: (kept, ...), or (budget, ...), where empty slots repeat the last
    sample (shaded, then dropped by `place`)."""
    if chosen.index is None:
        return values[chosen.keep]
    flat = values.reshape(-1, *values.shape[2:])
    return flat[chosen.index.clamp_max(flat.shape[0] - 1)]


def take_per_ray(values: Tensor, chosen: Slots) -> Tensor:
    """(N, ...) values of each ray (its direction, its image) at the shaded samples, as `take` gives per-sample ones."""
    n, s = chosen.keep.shape
    if chosen.index is None:
        return values[:, None].expand(n, s, *values.shape[1:])[chosen.keep]
    return values[(chosen.index // s).clamp_max(n - 1)]  # empty slots: the last ray's, as `take`


def place(shaded: Tensor, chosen: Slots) -> Tensor:
    """The shaded values back at their samples, (N, S, ...), zero elsewhere."""
    n, s = chosen.keep.shape
    if chosen.index is None:
        mask = chosen.keep.reshape(n, s, *[1] * (shaded.dim() - 1)).expand(n, s, *shaded.shape[1:])
        return shaded.new_zeros(n, s, *shaded.shape[1:]).masked_scatter(mask, shaded)
    full = shaded.new_zeros(n * s + 1, *shaded.shape[1:]).index_put((chosen.index,), shaded)
    return full[:-1].reshape(n, s, *shaded.shape[1:])  # empty slots all wrote the spare row, dropped here


@torch.no_grad()
def _write_schedule(grid: OccupancyGrid, *_) -> None:
    counts = torch.full((AUTO_WINDOW, 2), -1, dtype=torch.long)
    counts[:len(grid._counted)] = torch.tensor(list(grid._counted), dtype=torch.long).view(-1, 2)
    grid.schedule.copy_(torch.tensor([grid.steps, *(grid._sized or (0, 0))]))
    grid.warmup_counts.copy_(counts)


def _read_schedule(grid: OccupancyGrid, _) -> None:
    steps, march, shade = grid.schedule.tolist()
    grid.steps, grid._sized = steps, (march, shade) if march else None
    grid._counted = deque((tuple(c) for c in grid.warmup_counts.tolist() if c[0] >= 0), maxlen=AUTO_WINDOW)


def _fresh_schedule_for_older_checkpoints(grid, state_dict, prefix, *_) -> None:
    """Checkpoints written before the schedule was saved load as a fresh schedule: warm-up and sizing again, as then."""
    state_dict.setdefault(prefix + "schedule", torch.zeros_like(grid.schedule))
    state_dict.setdefault(prefix + "warmup_counts", torch.full_like(grid.warmup_counts, -1))


class OccupancyGrid(nn.Module):
    run_state = ("schedule", "warmup_counts")  # the training run's position, not what the grid learned (init_from)

    def __init__(self, resolution: int = 64, update_every: int = 16, warmup_steps: int = 256,
                 decay: float = 0.95, threshold: float = 0.01, march_samples: int = 256,
                 query_chunk: int = 65536, sample_budget: int | Literal["auto"] | None = None,
                 shade_budget: int | None = None, early_stop_eps: float = 0.0) -> None:
        super().__init__()
        auto = sample_budget == "auto"
        if auto and shade_budget is not None:
            raise ValueError(f"model.shade_budget={shade_budget}: model.sample_budget=auto sizes both from the grid's "
                             "warm-up; set shade_budget=null, or both as numbers")
        for key, value in (("sample_budget", None if auto else sample_budget), ("shade_budget", shade_budget)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"model.{key} must be a number of samples > 0 (null: "
                                 f"{'shade exactly the kept samples' if key == 'sample_budget' else 'sample_budget'}"
                                 f"{'; auto: sized from the warm-up' if key == 'sample_budget' else ''}), got {value!r}")
        if shade_budget is not None and (sample_budget is None or shade_budget > sample_budget or not early_stop_eps):
            raise ValueError(f"model.shade_budget={shade_budget} is the part of model.sample_budget="
                             f"{'null' if sample_budget is None else sample_budget} that early ray termination leaves "
                             f"to shade (model.early_stop_eps={early_stop_eps}): set sample_budget, at least as large, "
                             "and early_stop_eps > 0; without early termination sample_budget alone holds the samples")
        self.sample_budget = sample_budget  # training steps only: a rendered view shades every kept sample
        self.shade_budget = shade_budget or sample_budget
        self._counted: deque[tuple[int, int]] = deque(maxlen=AUTO_WINDOW)  # auto: the warm-up's exact sample counts
        self._sized: tuple[int, int] | None = None  # auto: the budgets, once the warm-up has been counted
        self.resolution, self.update_every, self.warmup_steps = resolution, update_every, warmup_steps
        self.decay, self.threshold, self.march_samples, self.query_chunk = decay, threshold, march_samples, query_chunk
        self.register_buffer("aabb", torch.zeros(6))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("density", torch.zeros(resolution**3))
        self.register_buffer("occupied", torch.ones(resolution**3, dtype=torch.bool))
        # The schedule in checkpoints, so a resumed run keeps the warm-up, the updates' phase and `auto`'s budgets
        # (from step 0 it would warm up and size again): steps, the sized budgets (0: not yet) and the warm-up's
        # counts (-1: none). Training reads the Python values; these buffers take them only when the state is saved.
        self.register_buffer("schedule", torch.zeros(3, dtype=torch.long))
        self.register_buffer("warmup_counts", torch.full((AUTO_WINDOW, 2), -1, dtype=torch.long))
        self.steps = 0
        self.register_state_dict_pre_hook(_write_schedule)  # module-level hooks: the grid stays picklable
        self.register_load_state_dict_pre_hook(_fresh_schedule_for_older_checkpoints)
        self.register_load_state_dict_post_hook(_read_schedule)

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
               background: Tensor, perturb: bool, image: Tensor | None, early_stop_eps: float,
               budget: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """A ray batch marched through the grid: only the kept samples are shaded (`shade(points, viewdirs,
        image)` -> activated density, colour), then composited. With `early_stop_eps` > 0, a density-only pass
        without gradients (`density(points)`) first drops the samples behind which less than that light is left.
        With a `budget` (the early-stop pass's slots, the shading pass's) each pass shades that many, and `complete`
        (N,) says which rays got all theirs."""
        t, points, keep, dt, spacing = self.march(origins, dirs, near, far, perturb)
        n, s = keep.shape
        complete = None  # under a budget: the rays whose samples all had slots, in each pass, render exactly
        occupied = None  # the samples in occupied cells (a host count in the exact path)
        if early_stop_eps > 0:
            with torch.no_grad():
                chosen = slots(keep, None if budget is None else budget[0])
                marched = take(points, chosen)
                sigma, occupied = place(density(marched).float(), chosen), marched.shape[0]
                complete = None if budget is None else (chosen.keep == keep).all(-1)
                march_used = None if budget is None else chosen.keep.sum() / budget[0]
                keep = keep & (rendering.transmittance(sigma * (dt * dirs.norm(dim=-1))[:, None]) > early_stop_eps)
        chosen = slots(keep, None if budget is None else budget[1])
        image_k = None if image is None else take_per_ray(image, chosen)
        sigma_k, rgb_k = shade(take(points, chosen), take_per_ray(F.normalize(dirs, dim=-1), chosen), image_k)
        if budget is None and self.sample_budget == "auto" and self._sized is None and self.training \
                and torch.is_grad_enabled():
            self._counted.append((occupied or sigma_k.shape[0], sigma_k.shape[0]))  # a training step's, exact
        sigma, rgb = place(sigma_k.float(), chosen), place(rgb_k.float(), chosen)
        out = rendering.composite(rgb, sigma, t, dirs, background, deltas=dt[:, None].expand(n, s))
        if budget is not None:
            shaded = (chosen.keep == keep).all(-1)
            out["complete"] = shaded if complete is None else shaded & complete
            out["slots_used"] = chosen.keep.sum() / budget[1]  # the shading pass's share of its slots (the rest: padding)
            if complete is not None:
                out["march_slots_used"] = march_used  # the early-stop pass's share of sample_budget's slots
        return {**out, "spacing_mids": spacing}

    def distortion(self, out: dict[str, Tensor]) -> Tensor:
        """L_dist on a render's march (its samples as intervals, the box diagonal over `march_samples` a step); under
        a budget over the complete rays only, as the colour loss."""
        weights, complete = out["weights"], out.get("complete")
        if complete is None:
            return rendering.interval_distortion(out["spacing_mids"], 1.0 / self.march_samples, weights)
        mean = rendering.interval_distortion(out["spacing_mids"], 1.0 / self.march_samples, weights * complete[:, None])
        return mean * complete.numel() / complete.sum().clamp_min(1)  # the mean over complete rays, not all

    def budget_use(self, out: dict[str, Tensor], read: bool) -> dict[str, Tensor]:
        """How a step used its sample budget: the share of rays it cut short (train/incomplete_rays), of the
        shading pass's slots that held a sample (train/budget_used) and of the early-stop pass's (sample_budget's:
        train/march_budget_used). `read` (a step whose logs are written, which reads the values anyway): warn when
        it cut every ray, as the step then trained nothing."""
        share = 1.0 - out["complete"].float().mean()
        if read and float(share) == 1.0:
            log.warning("model.sample_budget: %d samples (%d shaded) held no ray's samples this step: nothing trained; "
                        "raise it", *self.budgets)
        march = {"train/march_budget_used": out["march_slots_used"]} if "march_slots_used" in out else {}
        return {"train/incomplete_rays": share, "train/budget_used": out["slots_used"], **march}

    @property
    def budgets(self) -> tuple[int, int] | None:
        """A training step's slots: (samples in occupied cells, samples shaded after early termination); None: exact."""
        if self.sample_budget == "auto":
            return self._sized  # None (the exact path) until the warm-up has been counted
        return None if self.sample_budget is None else (self.sample_budget, self.shade_budget)

    def _size_budgets(self) -> None:
        """sample_budget: auto, at the end of the warm-up: both budgets from the most samples its last steps had."""
        most = torch.tensor([max(counts[i] for counts in self._counted) for i in (0, 1)], device=self.density.device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # every rank's step the same shapes: the most any rank counted
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        most = most.tolist()
        self._sized = tuple(budget_ladder(AUTO_HEADROOM * m) for m in most)
        if not distributed or torch.distributed.get_rank() == 0:
            log.info("model.sample_budget: auto: %d samples a step in occupied cells, %d shaded (%g x the most of the "
                     "last %d exact training steps, %d and %d, on the budgets' ladder)", *self._sized, AUTO_HEADROOM, len(self._counted), *most)

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
        if self.sample_budget == "auto" and self._sized is None and self.steps >= self.warmup_steps and self._counted:
            self._size_budgets()
        updated = self.steps % self.update_every == 0
        if updated:
            self.update(density_fn)
        self.steps += 1
        return updated

    def occupancy_fraction(self) -> Tensor:
        return self.occupied.float().mean()
