"""Proposal sampling for unbounded scenes (mip-NeRF 360, Barron et al. 2022; nerfacto in nerfstudio).

Samples live in a normalised "spacing" s in [0, 1] between each ray's near (s = 0) and far (s = 1), through
nerfacto's "uniform then inverse" curve: linear in depth up to `pivot` (half the scene box's side, where the
field's contraction starts), then linear in disparity 1/t, so the far, contracted part of space gets few
samples. A ray starts with `samples[0]` intervals uniform in s; a small density-only hash grid (a proposal
network) gives their weights, which are a histogram to draw the next round's interval edges from (inverse CDF
on edges, so intervals stay contiguous); after the last round the field shades `final_samples` intervals.

The proposal networks see no photometric gradient (resampled edges are constants): the interlevel loss trains
them so that their histograms bound the field's weights from above. The field gets the photometric loss and
the distortion loss, which pulls each ray's weights into few, short intervals (fewer floaters).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_modules.nerf import rendering
from lightning_modules.nerf.contraction import box_to_unit
from lightning_modules.nerf.hashgrid import OUTSIDE_RAW_DENSITY, HashEncoding
from lightning_modules.nerf.network import RadianceField
from lightning_modules.nerf.rendering import interval_distortion

# nerfacto's proposal networks: 5 levels, 2^17 rows, one hidden layer of 16; the finest grid 128, then 256
PROPOSAL_NET = {"levels": 5, "log2_table_size": 17, "features_per_level": 2, "base_resolution": 16,
                "finest_resolution": [128, 256], "hidden": 16, "backend": "auto"}
# added to every histogram bin before resampling (nerfacto's): a round never rules out an interval entirely
HISTOGRAM_PADDING = 0.01
# the annealing's steepness (nerfacto's): the exponent on the weights rises fast, then flattens towards 1
ANNEAL_SLOPE = 10.0
# the first steps always train the proposal networks (nerfacto's): their histograms start as noise
ALWAYS_UPDATE_STEPS = 10


def _spacing_curve(t: Tensor, pivot: Tensor) -> Tensor:
    """Linear up to the pivot, disparity beyond: 1/2 at the pivot with equal slopes on both sides, 1 at infinity."""
    return torch.where(t < pivot, t / (2 * pivot), 1 - pivot / (2 * torch.maximum(t, pivot)))


def _spacing_curve_inverse(y: Tensor, pivot: Tensor) -> Tensor:
    return torch.where(y < 0.5, 2 * pivot * y, pivot / (2 * (1 - y).clamp_min(1e-12)))


def to_spacing(t: Tensor, near: Tensor, far: Tensor, pivot: Tensor) -> Tensor:
    """Depths t (N, K) -> spacing s in [0, 1] (near -> 0, far -> 1), monotone; near/far (N, 1)."""
    lo, hi = _spacing_curve(near, pivot), _spacing_curve(far, pivot)
    return (_spacing_curve(t, pivot) - lo) / (hi - lo)


def from_spacing(s: Tensor, near: Tensor, far: Tensor, pivot: Tensor) -> Tensor:
    """Spacing s (N, K) -> depths: the inverse of `to_spacing`."""
    lo, hi = _spacing_curve(near, pivot), _spacing_curve(far, pivot)
    return _spacing_curve_inverse(lo + s * (hi - lo), pivot)


def uniform_edges(rays: int, intervals: int, perturb: bool, device: torch.device) -> Tensor:
    """`intervals` + 1 edges (rays, intervals + 1) in [0, 1], evenly spaced; with `perturb` the inner ones
    move together by up to half an interval (one draw per ray, as nerfacto), the ends stay at 0 and 1."""
    shift = torch.rand(rays, 1, device=device) - 0.5 if perturb else torch.zeros(rays, 1, device=device)
    inner = (torch.arange(1, intervals, device=device) + shift) / intervals
    return torch.cat([torch.zeros_like(shift), inner, torch.ones_like(shift)], -1)


@torch.no_grad()
def resample_edges(edges: Tensor, weights: Tensor, intervals: int, perturb: bool) -> Tensor:
    """New edges (N, intervals + 1), sorted, drawn from the piecewise-constant density of `weights` (N, M) on
    `edges` (N, M + 1): the inverse CDF at evenly spaced quantiles (one random offset per ray when `perturb`,
    the strata's midpoints otherwise). Consecutive edges bound the new intervals, so they stay contiguous."""
    padded = weights.float() + HISTOGRAM_PADDING
    cdf = torch.cumsum(padded / padded.sum(-1, keepdim=True), -1).clamp(max=1.0)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    count = intervals + 1
    offset = torch.rand(edges.shape[0], 1, device=edges.device) if perturb else torch.full((1, 1), 0.5,
                                                                                          device=edges.device)
    quantiles = ((torch.arange(count, device=edges.device) + offset) / count).expand(edges.shape[0], count)
    above = torch.searchsorted(cdf, quantiles.contiguous(), right=True).clamp(max=cdf.shape[-1] - 1)
    below = (above - 1).clamp(min=0)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    step = cdf_hi - cdf_lo
    frac = torch.where(step > 0, (quantiles - cdf_lo) / step.clamp_min(1e-12), torch.zeros_like(step)).clamp(0, 1)
    edge_lo, edge_hi = edges.gather(-1, below), edges.gather(-1, above)
    return edge_lo + frac * (edge_hi - edge_lo)


def histogram_bound(edges: Tensor, proposal_edges: Tensor, proposal_weights: Tensor) -> Tensor:
    """For each interval of `edges` (N, S + 1): the total proposal weight of the proposal intervals it overlaps
    (N, S), the most a histogram on `proposal_edges` (N, M + 1) allows there."""
    cumulative = torch.cat([torch.zeros_like(proposal_weights[:, :1]), torch.cumsum(proposal_weights, -1)], -1)
    last = proposal_edges.shape[-1] - 1
    # the first proposal interval that ends after an interval starts, and one past the last that starts before it ends
    first = (torch.searchsorted(proposal_edges, edges[:, :-1].contiguous(), right=True) - 1).clamp(0, last)
    stop = torch.searchsorted(proposal_edges, edges[:, 1:].contiguous(), right=False).clamp(0, last)
    return (cumulative.gather(-1, stop) - cumulative.gather(-1, first)).clamp_min(0.0)


def interlevel_loss(edges: Tensor, weights: Tensor, proposal_edges: Sequence[Tensor],
                    proposal_weights: Sequence[Tensor]) -> Tensor:
    """mip-NeRF 360's L_prop, summed over proposal rounds: where the final weights exceed what a round's histogram
    bounds, the excess squared over the weight, averaged over intervals and rays (nerfacto's scale). The final
    weights and all edges are constants: only the proposal weights learn from it."""
    edges, weights = edges.detach(), weights.detach()
    loss = weights.new_zeros(())
    for round_edges, round_weights in zip(proposal_edges, proposal_weights, strict=True):
        bound = histogram_bound(edges, round_edges.detach(), round_weights)
        loss = loss + ((weights - bound).clamp_min(0.0) ** 2 / (weights + torch.finfo(weights.dtype).eps)).mean()
    return loss


def distortion_loss(edges: Tensor, weights: Tensor) -> Tensor:
    """mip-NeRF 360's L_dist per ray, averaged over rays, of contiguous intervals between `edges` (N, S + 1, sorted)
    in spacing: `interval_distortion` of their midpoints and widths."""
    return interval_distortion(0.5 * (edges[:, 1:] + edges[:, :-1]), edges[:, 1:] - edges[:, :-1], weights)


class ProposalDensityField(nn.Module):
    """A density-only hash grid (nerfacto's proposal network): a small encoding and one hidden layer, no colour,
    mapping points like the field (its scene box, its contraction)."""

    def __init__(self, contraction: str, levels: int = 5, log2_table_size: int = 17, features_per_level: int = 2,
                 base_resolution: int = 16, finest_resolution: int = 128, hidden: int = 16,
                 backend: str = "auto") -> None:
        super().__init__()
        self.contraction = contraction
        self.encoding = HashEncoding(levels, log2_table_size, features_per_level, base_resolution, finest_resolution,
                                     backend=backend)
        self.density_net = nn.Sequential(nn.Linear(self.encoding.out_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("aabb", torch.tensor([-1.0, -1, -1, 1, 1, 1]))

    def set_aabb(self, aabb: Tensor) -> None:
        self.aabb.copy_(aabb.to(self.aabb))

    def table_parameters(self) -> list[nn.Parameter]:
        return list(self.encoding.parameters())

    def forward(self, points: Tensor) -> Tensor:
        """Raw density (...,) at scene points."""
        unit, inside = box_to_unit(points, self.aabb, self.contraction)
        raw = self.density_net(self.encoding(unit))[..., 0]
        return torch.where(inside, raw, torch.full_like(raw, OUTSIDE_RAW_DENSITY))


class ProposalSampler(nn.Module):
    """The proposal networks, the rounds of resampling, and the two losses (see the module docstring).

    `samples`: intervals per ray of each proposal round (the first uniform in spacing); `final_samples`: the
    field's. One network per round, or one for all with `share`. `anneal_steps`: over these training steps the
    resampling flattens the weights by an exponent rising from 0 (uniform) to 1 (nerfacto); 0: no annealing.
    `update_every`, `update_warmup`: the proposal networks train (get the interlevel loss's gradient) on every
    step at first, then on one step in `update_every`, the interval growing linearly over `update_warmup` steps
    (nerfacto's schedule); on other steps they run without autograd, which skips their backward."""

    def __init__(self, samples: Sequence[int], final_samples: int, contraction: str, share: bool = False,
                 net: Mapping[str, Any] | None = None, anneal_steps: int = 1000,
                 density_activation: rendering.DensityActivation = "softplus", interlevel_loss_mult: float = 1.0,
                 distortion_loss_mult: float = 0.002, update_every: int = 5, update_warmup: int = 5000) -> None:
        super().__init__()
        if contraction == "none":
            raise ValueError(
                "model.renderer=proposal samples out to data.far, far beyond the scene box, so the field must map all "
                "of space: it needs nerf_net=hashgrid with model.net.contraction=l2 (or linf), got none")
        self.samples = [int(n) for n in samples]
        if not self.samples or min(self.samples) < 1 or final_samples < 1:
            raise ValueError(f"model.proposal_samples must list >= 1 samples per round, got {list(samples)}")
        if anneal_steps < 0 or interlevel_loss_mult < 0 or distortion_loss_mult < 0 or update_warmup < 0:
            raise ValueError("model.proposal_anneal_steps, model.proposal_update_warmup, model.interlevel_loss_mult and "
                             "model.distortion_loss_mult must be >= 0")
        if update_every < 1:
            raise ValueError(f"model.proposal_update_every must be >= 1 (1: every step), got {update_every}")
        self.update_every, self.update_warmup = int(update_every), int(update_warmup)
        unknown = set(net or {}) - set(PROPOSAL_NET)
        if unknown:
            raise ValueError(f"model.proposal_net: unknown settings {sorted(unknown)}; known: {sorted(PROPOSAL_NET)}")
        settings = {**PROPOSAL_NET, **(net or {})}
        networks = 1 if share else len(self.samples)
        finest = settings.pop("finest_resolution")
        finest = [int(finest)] * networks if isinstance(finest, int) else [int(r) for r in finest]
        if len(finest) < networks:
            raise ValueError(f"model.proposal_net.finest_resolution: one per proposal network ({networks}), "
                             f"got {finest}")
        try:
            self.networks = nn.ModuleList(ProposalDensityField(contraction, finest_resolution=finest[k], **settings)
                                          for k in range(networks))
        except ValueError as error:  # the encoding's own message would read as the field's (model.net)
            raise ValueError(f"model.proposal_net: {error}") from error
        self.final_samples, self.anneal_steps = int(final_samples), int(anneal_steps)
        self.density_activation = density_activation
        self.interlevel_loss_mult, self.distortion_loss_mult = float(interlevel_loss_mult), float(distortion_loss_mult)
        # the annealing exponent: a buffer, so a compiled render reads this step's value without recompiling
        self.register_buffer("anneal_power", torch.ones(()), persistent=False)

    @classmethod
    def from_settings(cls, hparams: Mapping[str, Any], field: RadianceField) -> ProposalSampler:
        """From the module's settings (model.proposal_*, the loss multipliers) and its field's contraction."""
        return cls(hparams["proposal_samples"], hparams["num_samples"], field.contraction,
                   hparams["proposal_share"], hparams["proposal_net"], hparams["proposal_anneal_steps"],
                   hparams["density_activation"], hparams["interlevel_loss_mult"], hparams["distortion_loss_mult"],
                   hparams["proposal_update_every"], hparams["proposal_update_warmup"])

    def set_aabb(self, aabb: Tensor) -> None:
        for network in self.networks:
            network.set_aabb(aabb)

    def set_step(self, step: int) -> None:
        """The annealing exponent at this training step."""
        progress = min(step / self.anneal_steps, 1.0) if self.anneal_steps else 1.0
        self.anneal_power.fill_(ANNEAL_SLOPE * progress / ((ANNEAL_SLOPE - 1) * progress + 1))

    def check_wrapper(self, model: nn.Module) -> None:
        """Under DDP every parameter must get a gradient each step unless the reducer is told some may not: the
        steps that skip the proposal networks' backward need find_unused_parameters."""
        if self.update_every > 1 and isinstance(model, DistributedDataParallel) and (
                not model.find_unused_parameters or model.static_graph):
            raise ValueError(
                f"model.proposal_update_every={self.update_every} leaves the proposal networks without gradients on "
                "most steps, which DDP cannot reduce without trainer.strategy.find_unused_parameters=true (and "
                "static_graph off): set that, or model.proposal_update_every=1 (every step)")

    def trains_networks(self, step: int) -> bool:
        """Whether training step `step` trains the proposal networks: a function of the step alone, so a
        resumed run updates them on the same steps as an uninterrupted one."""
        if step < ALWAYS_UPDATE_STEPS:
            return True
        ramp = min(step / self.update_warmup, 1.0) if self.update_warmup else 1.0
        interval = max(1, round(self.update_every * ramp))
        return step % interval == 0

    def pivot(self) -> Tensor:
        """Where the spacing turns from linear to disparity: half the scene box's side (depth units)."""
        aabb = self.networks[0].aabb
        return (aabb[3:] - aabb[:3]).amax() / 2

    def render(self, shade: Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]], origins: Tensor,
               dirs: Tensor, near: Tensor, far: Tensor, background: Tensor, perturb: bool,
               image: Tensor | None = None, train_networks: bool = True) -> dict[str, Tensor]:
        """The proposal rounds, then the field through `shade(points, viewdirs, image)` -> (density, colour) at
        the final intervals' midpoints; composite's outputs plus the spacing edges and weights of every round.
        `train_networks` false: the proposal networks run without autograd (a step that does not train them)."""
        pivot, norm = self.pivot(), dirs.float().norm(dim=-1, keepdim=True)
        edges = uniform_edges(origins.shape[0], self.samples[0], perturb, origins.device)
        rounds: list[tuple[Tensor, Tensor]] = []
        for level, intervals in enumerate(self.samples):
            if level:
                edges = resample_edges(edges, rounds[-1][1].detach() ** self.anneal_power, intervals, perturb)
            mids, lengths = self._intervals(edges, near, far, pivot)
            network = self.networks[0 if len(self.networks) == 1 else level]
            with torch.set_grad_enabled(train_networks and torch.is_grad_enabled()):
                raw = network(origins[:, None] + dirs[:, None] * mids[..., None])
            sigma = rendering.density_activation(raw, self.density_activation)
            rounds.append((edges, rendering.alpha_weights(sigma, lengths * norm)))
        edges = resample_edges(edges, rounds[-1][1].detach() ** self.anneal_power, self.final_samples, perturb)
        mids, lengths = self._intervals(edges, near, far, pivot)
        points = origins[:, None] + dirs[:, None] * mids[..., None]
        viewdirs = F.normalize(dirs, dim=-1)[:, None].expand_as(points)
        sigma, rgb = shade(points, viewdirs, None if image is None else image[:, None].expand(mids.shape))
        out = rendering.composite(rgb, sigma, mids, dirs, background, deltas=lengths)
        out["spacing_edges"] = edges
        out["proposal_edges"], out["proposal_weights"] = [e for e, _ in rounds], [w for _, w in rounds]
        return out

    @staticmethod
    def _intervals(edges: Tensor, near: Tensor, far: Tensor, pivot: Tensor) -> tuple[Tensor, Tensor]:
        """Depth midpoints and lengths (N, K) of the intervals between spacing edges (N, K + 1)."""
        depths = from_spacing(edges, near, far, pivot)
        return 0.5 * (depths[:, 1:] + depths[:, :-1]), depths[:, 1:] - depths[:, :-1]

    def losses(self, out: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum of the interlevel and distortion losses of a render, and both unweighted (to log)."""
        interlevel = interlevel_loss(out["spacing_edges"], out["weights"], out["proposal_edges"],
                                     out["proposal_weights"])
        distortion = distortion_loss(out["spacing_edges"], out["weights"])
        total = self.interlevel_loss_mult * interlevel + self.distortion_loss_mult * distortion
        return total, {"train/interlevel": interlevel.detach(), "train/distortion": distortion.detach()}
