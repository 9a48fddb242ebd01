"""NeRF's benchmark hooks (`python -m bench`, `python -m bench.quality`).

peer: the plain vanilla NeRF at equal rays per batch, written here in plain PyTorch apart from the
suite's module (positional encoding, an 8 x 256 MLP with the input fed again mid-way, coarse + fine
networks, stratified then hierarchical sampling, volume rendering onto the background, MSE on both),
with the task config's sizes (model.net, num_samples, num_importance, data.num_rays) and the same
rays: the datamodule's training batches. Autocast as the suite's precision (bf16 on GPUs), AdamW.
SUITE_VARIANTS: extra suite rows; the occupancy-grid renderer at the same rays per batch.
CPU_OVERRIDES: smaller batches for `python -m bench` on a CPU, which checks that the rows run.
QUALITY: `python -m bench.quality`'s profiles; each hash-grid experiment (issue 28) beside the MLP field.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.timing import Windows, synchronize

PEER_NAME = "vanilla NeRF, plain PyTorch"
# `--impls occupancy`, at the same rays a batch; on a GPU after 300 warm-up steps, once the grid has left
# its dense start (grid_warmup_steps: 256) and prunes empty space as it does for the rest of a run
SUITE_VARIANTS = {"occupancy": {"overrides": ["model.renderer=occupancy"], "min_warmup": 300}}
# a CPU's dry run, in seconds (the vanilla renderer's counts; rows with another renderer go without them)
CPU_OVERRIDES = ["data.num_rays=256", "model.num_samples=16", "model.num_importance=32"]


def outside_trainer_overrides(device: torch.device) -> list[str]:
    """For rows that run without a Trainer (plain loop, peer): the ray buffer on the training device,
    where the suite's `ray_device: auto` puts it (there, auto reads the device from the Trainer)."""
    return [f"data.ray_device={device.type}"]


class Encoding(nn.Module):
    """gamma(p) = (p, sin(2^0 p), cos(2^0 p), ..., sin(2^(L-1) p), cos(2^(L-1) p))."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels
        self.out_dim = 3 + 6 * levels

    def forward(self, p: Tensor) -> Tensor:
        out = [p]
        for level in range(self.levels):
            out += [torch.sin(p * 2.0 ** level), torch.cos(p * 2.0 ** level)]
        return torch.cat(out, -1)


class VanillaNeRF(nn.Module):
    """Density from the position, colour from a 128-wide layer that also sees the view direction."""

    def __init__(self, depth: int, width: int, skips, pos_levels: int, dir_levels: int) -> None:
        super().__init__()
        self.pos, self.dir = Encoding(pos_levels), Encoding(dir_levels)
        self.skips = set(skips)
        dims = [self.pos.out_dim] + [width + (self.pos.out_dim if i in self.skips else 0) for i in range(1, depth)]
        self.trunk = nn.ModuleList(nn.Linear(d, width) for d in dims)  # layer i in skips reads [gamma(x), h]
        self.density = nn.Linear(width, 1)
        self.bottleneck = nn.Linear(width, width)
        self.view = nn.Linear(width + self.dir.out_dim, width // 2)
        self.color = nn.Linear(width // 2, 3)

    def forward(self, points: Tensor, viewdirs: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pos(points)
        h = x
        for i, layer in enumerate(self.trunk):
            h = F.relu(layer(torch.cat([x, h], -1) if i in self.skips else h))
        sigma = self.density(h)[..., 0]
        h = F.relu(self.view(torch.cat([self.bottleneck(h), self.dir(viewdirs)], -1)))
        return sigma, self.color(h)


def render(net: VanillaNeRF, origins: Tensor, dirs: Tensor, z: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Colour of each ray from samples at depths z (rays, samples), and each sample's weight."""
    points = origins[:, None, :] + dirs[:, None, :] * z[..., None]
    viewdirs = (dirs / dirs.norm(dim=-1, keepdim=True))[:, None, :].expand(points.shape)
    sigma, raw_rgb = net(points, viewdirs)
    sigma, rgb = F.relu(sigma.float()), torch.sigmoid(raw_rgb.float())
    gaps = torch.cat([z[:, 1:] - z[:, :-1], torch.full_like(z[:, :1], 1e10)], -1) * dirs.norm(dim=-1, keepdim=True)
    alpha = 1.0 - torch.exp(-sigma * gaps)
    light = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1] + 1e-10], -1), -1)
    weights = alpha * light
    color = (weights[..., None] * rgb).sum(1) + (1.0 - weights.sum(-1, keepdim=True)) * background
    return color, weights


def stratified(near: Tensor, far: Tensor, count: int) -> Tensor:
    """One depth drawn uniformly in each of `count` equal bins between near and far."""
    edges = torch.linspace(0.0, 1.0, count + 1, device=near.device)
    u = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(near.shape[0], count, device=near.device)
    return near * (1.0 - u) + far * u


def hierarchical(z: Tensor, weights: Tensor, count: int) -> Tensor:
    """`count` depths drawn from the piecewise-constant density the coarse weights put between sample midpoints."""
    mids = 0.5 * (z[:, 1:] + z[:, :-1])
    pdf = weights[:, 1:-1] + 1e-5
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1)
    u = torch.rand(z.shape[0], count, device=z.device)
    hi = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(1, cdf.shape[1] - 1)
    lo = hi - 1
    c_lo, c_hi, m_lo, m_hi = cdf.gather(1, lo), cdf.gather(1, hi), mids.gather(1, lo), mids.gather(1, hi)
    span = torch.where(c_hi - c_lo < 1e-5, torch.ones_like(c_lo), c_hi - c_lo)
    return m_lo + (u - c_lo) / span * (m_hi - m_lo)


def nerf_loss(coarse: VanillaNeRF, fine: VanillaNeRF | None, batch: dict, num_samples: int,
              num_importance: int) -> Tensor:
    origins, dirs, target = batch["origins"].float(), batch["dirs"].float(), batch["rgb"].float()
    background = batch["background"].float()
    z = stratified(batch["near"].float(), batch["far"].float(), num_samples)
    color, weights = render(coarse, origins, dirs, z, background)
    loss = F.mse_loss(color, target)
    if fine is not None:
        z_fine = hierarchical(z, weights.detach(), num_importance).detach()
        z_all = torch.sort(torch.cat([z, z_fine], -1), -1).values
        loss = loss + F.mse_loss(render(fine, origins, dirs, z_all, background)[0], target)
    return loss


def peer(task_root: Path, prepared: tuple, w: Windows) -> dict:
    cfg, dm, module, precision = prepared
    device = w.device
    module.cpu()  # the suite's networks are not used here: their memory is not this row's
    net, hp = cfg.model.net, cfg.model

    def build() -> VanillaNeRF:
        return VanillaNeRF(int(net.depth), int(net.width), list(net.skips), int(net.pos_freqs), int(net.dir_freqs))

    coarse = build().to(device)
    fine = build().to(device) if int(hp.num_importance) > 0 else None
    params = [p for m in (coarse, fine) if m is not None for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=float(cfg.optimizer.lr))  # torch's default implementation
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)
    clip = float(cfg.get("gradient_clip_val") or 0.0)
    batches = itertools.chain.from_iterable(itertools.repeat(dm.train_dataloader()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    last_end = None
    for step in range(w.total_steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        w.before_step(step, time.perf_counter() - last_end if last_end else 0.0)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nerf_loss(coarse, fine, batch, int(hp.num_samples), int(hp.num_importance))
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        w.after_step(step, batch["rgb"].shape[0])
        last_end = time.perf_counter()
    synchronize(device)
    memory = {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}
    return {**w.summary(), **memory, "precision": precision}


QUALITY_METRICS = ["test/psnr", "test/ssim", "train/rays_per_sec"]
# The MLP field in a hash-grid experiment (same scene, renderer, rays a step and budget) with the MLP's own
# recipe (conf/model/nerf.yaml): lr 1e-2, eps 1e-15 and trunc_exp are the hash grid's, not the paper MLP's;
# appearance vectors (the fox's) are the hash grid's too, which the MLP refuses, and it has no levels to warm up,
# no tables to decay, no finest cells to size
MLP_FIELD = ["nerf_net=mlp", "optimizer.lr=5e-4", "optimizer.betas=[0.9,0.999]", "optimizer.eps=1e-8",
             "optimizer.weight_decay=0", "model.density_activation=softplus", "model.net.appearance_dim=0",
             "model.net.level_warmup_steps=0", "model.net.cells_per_pixel=null", "model.table_decay=0"]


def hashgrid_and_mlp(scene: str, data: list[str], budget: float, mlp_max_epochs: int) -> list[dict]:
    """Issue 28's pair on one scene: experiment=nerf_hashgrid_<scene>, then the MLP field at the same budget.
    `mlp_max_epochs` sizes the MLP's lr decay for its own expected speed (the experiment's is the hash grid's)."""
    overrides = [f"experiment=nerf_hashgrid_{scene}", *data]
    return [{"name": f"hashgrid_{scene}", "overrides": overrides, "metrics": QUALITY_METRICS, "budgets": [budget]},
            {"name": f"mlp_{scene}", "overrides": [*overrides, *MLP_FIELD, f"max_epochs={mlp_max_epochs}"],
             "metrics": QUALITY_METRICS, "budgets": [budget]}]


QUALITY = [  # for `python -m bench.quality` (time to quality on its benchmark scenes)
    {"name": "fox", "overrides": ["experiment=nerf_fox", "data.data_dir={data}/nerf/fox"],
     "metrics": QUALITY_METRICS, "budgets": [2]},
    {"name": "builtin_occupancy", "overrides": ["experiment=nerf_builtin_occupancy"],
     "metrics": QUALITY_METRICS, "budgets": [2]},
    *hashgrid_and_mlp("builtin", [], 1, mlp_max_epochs=7),
    *hashgrid_and_mlp("fox", ["data.data_dir={data}/nerf/fox"], 2, mlp_max_epochs=4),
    {"name": "hashgrid_fox_proposal", "overrides": ["experiment=nerf_hashgrid_fox_proposal", "data.data_dir={data}/nerf/fox"],
     "metrics": QUALITY_METRICS, "budgets": [2]},
    *hashgrid_and_mlp("fern", ["data.data_dir={data}/nerf/fern"], 5, mlp_max_epochs=20),
]
