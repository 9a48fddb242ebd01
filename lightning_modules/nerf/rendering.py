"""Sampling along rays and volume rendering (pure functions, float32 throughout).

All ray tensors are batched: origins/dirs (N, 3), near/far (N, 1), sample depths t (N, S).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DensityActivation = Literal["softplus", "trunc_exp"]
DENSITY_ACTIVATIONS = ("softplus", "trunc_exp")
# trunc_exp's backward uses exp(clamp(x, -15, 15)), as instant-ngp / torch-ngp: a large raw density
# must not send an overflowing gradient into the hash tables
TRUNC_EXP_CLAMP = 15.0


class TruncExp(torch.autograd.Function):
    """exp(x) forward; backward exp(x) clamped to x in [-15, 15] (torch-ngp's trunc_exp)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-TRUNC_EXP_CLAMP, TRUNC_EXP_CLAMP))


def trunc_exp(x: Tensor) -> Tensor:
    return TruncExp.apply(x)


def density_activation(raw: Tensor, kind: DensityActivation = "softplus") -> Tensor:
    """Raw network density -> density >= 0. softplus(raw - 1) (as mip-NeRF): smooth, never 'dead' like a
    ReLU at init. trunc_exp(raw) (instant-ngp): densities spanning many orders of magnitude from small raw values."""
    if kind == "softplus":
        return F.softplus(raw.float() - 1.0)
    if kind == "trunc_exp":
        return trunc_exp(raw.float())
    raise ValueError(f"model.density_activation must be one of {DENSITY_ACTIVATIONS}, got {kind!r}")


def stratified_samples(near: Tensor, far: Tensor, num: int, perturb: bool, lindisp: bool = False) -> Tensor:
    """`num` depths per ray, one uniformly inside each of `num` equal bins (bin midpoints when not perturbed)."""
    steps = torch.linspace(0.0, 1.0, num + 1, device=near.device)
    lower, upper = steps[:-1], steps[1:]
    u = torch.rand(near.shape[0], num, device=near.device) if perturb else torch.full((1, num), 0.5, device=near.device)
    s = lower + (upper - lower) * u
    if lindisp:
        return 1.0 / (1.0 / near * (1 - s) + 1.0 / far * s)
    return near + (far - near) * s


def sample_pdf(bins: Tensor, weights: Tensor, num: int, deterministic: bool) -> Tensor:
    """Inverse-transform sampling of the piecewise-constant pdf given by `weights` on `bins` (N, M+1)."""
    weights = weights.float() + 1e-5
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, -1)], -1).clamp(max=1.0)
    if deterministic:
        u = torch.linspace(0.0, 1.0, num, device=bins.device).expand(cdf.shape[0], num).contiguous()
    else:
        u = torch.rand(cdf.shape[0], num, device=bins.device)
    idx = torch.searchsorted(cdf, u, right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    return bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)


def transmittance(optical: Tensor) -> Tensor:
    """The share of a ray's light (N, S) that reaches each interval, of optical depths sigma * length (N, S).
    exp(-exclusive cumsum), not a cumprod of (1 - alpha): equal in exact arithmetic, more accurate for thin
    samples, and cumprod's backward reads a flag back to the host (a sync every step)."""
    return torch.exp(-torch.cat([torch.zeros_like(optical[:, :1]), torch.cumsum(optical[:, :-1], dim=-1)], dim=-1))


def alpha_weights(sigma: Tensor, lengths: Tensor) -> Tensor:
    """Compositing weights (N, S): the share of a ray's light stopped in each interval, of densities sigma over
    intervals of `lengths` (scene units), front to back."""
    optical = sigma * lengths
    return (1.0 - torch.exp(-optical)) * transmittance(optical)


def composite(rgb: Tensor, sigma: Tensor, t: Tensor, dirs: Tensor, background: Tensor,
              deltas: Tensor | None = None) -> dict[str, Tensor]:
    """Alpha compositing front to back onto `background`.

    rgb (N, S, 3) and sigma (N, S) are activated values at depths t (N, S). The last sample's
    interval reaches to infinity unless `deltas` (N, S) is given.
    """
    rgb, sigma, t = rgb.float(), sigma.float(), t.float()
    if deltas is None:
        deltas = torch.cat([t[:, 1:] - t[:, :-1], torch.full_like(t[:, :1], 1e10)], dim=-1)
    weights = alpha_weights(sigma, deltas * dirs.float().norm(dim=-1, keepdim=True))
    acc = weights.sum(-1)
    color = (weights[..., None] * rgb).sum(1) + (1.0 - acc)[:, None] * background.float()
    depth = (weights * t).sum(-1) / acc.clamp_min(1e-6)
    return {"rgb": color, "depth": depth, "acc": acc, "weights": weights}


def interval_distortion(mids: Tensor, widths: Tensor, weights: Tensor) -> Tensor:
    """L_dist = sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 d_i per ray, averaged over rays, of intervals with
    midpoints `mids` (N, S, sorted along each ray) and widths `widths` (N, S, or broadcastable). The double sum in
    O(S): for sorted midpoints, each pair counted once is w_i w_j (m_i - m_j) with j < i, from exclusive cumsums."""
    before = torch.cumsum(weights, -1) - weights
    before_moment = torch.cumsum(weights * mids, -1) - weights * mids
    pairs = 2.0 * (weights * (mids * before - before_moment)).sum(-1)
    return (pairs + (weights**2 * widths).sum(-1) / 3.0).mean()


def ray_aabb(origins: Tensor, dirs: Tensor, aabb: Tensor) -> tuple[Tensor, Tensor]:
    """Entry and exit depths (N,) of each ray through the box aabb = (xmin, ymin, zmin, xmax, ymax, zmax)."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t1 = (aabb[:3] - origins) / safe
    t2 = (aabb[3:] - origins) / safe
    return torch.minimum(t1, t2).amax(-1), torch.maximum(t1, t2).amin(-1)


def per_sample(image: Tensor | None, t: Tensor) -> Tensor | None:
    """Each ray's training image (N,) repeated for its samples at depths t (N, S); None stays None."""
    return None if image is None else image[:, None].expand(t.shape)


def ray_mse(rgb: Tensor, target: Tensor, complete: Tensor | None = None) -> Tensor:
    """Mean squared error over the rays, or over the `complete` ones (N,) only, when given."""
    if complete is None:
        return F.mse_loss(rgb, target)
    weight = complete.to(rgb.dtype)[:, None]
    return ((rgb - target).square() * weight).sum() / (weight.sum() * rgb.shape[-1]).clamp_min(1.0)


def render_vanilla(shade_coarse: Callable, shade_fine: Callable | None, origins: Tensor, dirs: Tensor, near: Tensor,
                   far: Tensor, background: Tensor, perturb: bool, image: Tensor | None, num_samples: int,
                   num_importance: int, lindisp: bool) -> dict[str, Tensor]:
    """The paper's renderer on a ray batch: `num_samples` stratified samples shaded by `shade_coarse(points, viewdirs,
    image)` -> (activated density, colour), then (with `shade_fine`) `num_importance` more from its weights, both
    composited; the fine result carries the coarse colour as `rgb_coarse`."""
    viewdirs = F.normalize(dirs, dim=-1)
    t = stratified_samples(near, far, num_samples, perturb, lindisp)
    points = origins[:, None] + dirs[:, None] * t[..., None]
    sigma, rgb = shade_coarse(points, viewdirs[:, None].expand_as(points), per_sample(image, t))
    coarse = composite(rgb, sigma, t, dirs, background)
    if shade_fine is None:
        return coarse
    mids = 0.5 * (t[:, 1:] + t[:, :-1])
    t_fine = sample_pdf(mids, coarse["weights"][:, 1:-1].detach(), num_importance, deterministic=not perturb).detach()
    t_all, _ = torch.sort(torch.cat([t, t_fine], -1), -1)
    points = origins[:, None] + dirs[:, None] * t_all[..., None]
    sigma, rgb = shade_fine(points, viewdirs[:, None].expand_as(points), per_sample(image, t_all))
    fine = composite(rgb, sigma, t_all, dirs, background)
    fine["rgb_coarse"] = coarse["rgb"]
    return fine
