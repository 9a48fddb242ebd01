"""The NeRF LightningModule: sampling, the field (`model.net`), volume rendering, MSE.

`model.net` is a `RadianceField` config with its own `_target_` (network.py: the MLP; hashgrid.py: the hash grid):
`net(points, viewdirs[, image])` -> raw density, raw colour (`image` for a field with appearance vectors).
`renderer: vanilla` is the paper's: `num_samples` stratified samples through the coarse network, then
`num_importance` from its weights through the fine one (0: no fine network). `occupancy` evaluates only samples in
occupied cells of a grid (occupancy.py); `proposal` (unbounded scenes) lets nerfacto's proposal networks choose the
field's samples (proposal.py). Each renderer's own settings are refused under another (`inapplicable_settings`).
A field's encoding tables are an optimizer group of their own: lr x `table_lr_scale`, no weight decay.
Held-out views are rendered in chunks of `chunk` rays; `validation_step` returns {rgb, target, depth} images for
the PSNR/SSIM callback (callbacks/psnr_ssim.py).
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from common.config import to_plain
from common.fast_path import CUDA_GRAPHS, CompilePlan, CompileSetting, compiled
from common.network_config import build_network, network_config
from common.task_data import TaskData
from lightning_modules.base import BaseTaskModule, writes_logs_at_this_step
from lightning_modules.nerf import pictures, rendering
from lightning_modules.nerf.network import RadianceField, missing_field_members
from lightning_modules.nerf.occupancy import OccupancyGrid
from lightning_modules.nerf.proposal import ProposalSampler
from lightning_modules.nerf.rendering import DensityActivation

log = logging.getLogger(__name__)

RENDERERS = ("vanilla", "occupancy", "proposal")
# model.net: the MLP, built twice (coarse and fine) with the module's gradient_checkpointing
NET_TARGET = "lightning_modules.nerf.network.NeRFMLP"
# the MLP's settings that were the module's own before model.net (checkpoints from then load)
NET_SETTINGS = ("depth", "width", "skips", "pos_freqs", "dir_freqs", "use_viewdirs")
RAY_KEYS = ("origins", "dirs", "near", "far")
# the settings only one renderer reads (conf/model/nerf.yaml); the occupancy renderer reads no num_samples either
RENDERER_SETTINGS = {
    "vanilla": ("num_importance", "lindisp"),
    "occupancy": ("grid_resolution", "grid_update_every", "grid_warmup_steps", "grid_threshold", "march_samples",
                  "early_stop_eps", "occupancy_distortion_loss_mult", "sample_budget", "shade_budget"),
    "proposal": ("proposal_samples", "proposal_share", "proposal_net", "proposal_anneal_steps", "proposal_update_every",
                 "proposal_update_warmup", "interlevel_loss_mult", "distortion_loss_mult"),
}


class NerfModule(BaseTaskModule):
    throughput_unit, run_state = "rays", tuple(f"grid.{name}" for name in OccupancyGrid.run_state)

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        num_samples: int = 64,
        num_importance: int = 128,
        perturb: bool = True,
        lindisp: bool = False,
        renderer: str = "vanilla",
        grid_resolution: int = 64,
        grid_update_every: int = 16,
        grid_warmup_steps: int = 256,
        grid_threshold: float = 0.01,
        march_samples: int = 256,
        early_stop_eps: float = 1e-4,
        sample_budget: int | Literal["auto"] | None = None, shade_budget: int | None = None,
        proposal_samples: Sequence[int] = (256, 96), proposal_share: bool = False,
        proposal_net: Mapping[str, Any] | None = None, proposal_anneal_steps: int = 1000,
        proposal_update_every: int = 5, proposal_update_warmup: int = 5000,
        interlevel_loss_mult: float = 1.0, distortion_loss_mult: float = 0.002,
        occupancy_distortion_loss_mult: float = 0.0,
        density_activation: DensityActivation = "softplus",
        table_lr_scale: float = 1.0,
        table_decay: float = 0.0,
        chunk: int = 4096,
        compile: CompileSetting = "auto",
        gradient_checkpointing: bool = False,
        vis_every_n_epochs: int = 1,
        optimizer=None,
        scheduler=None,
        **flat_net: Any,
    ) -> None:
        super().__init__(optimizer, scheduler)
        if renderer not in RENDERERS:
            raise ValueError(f"model.renderer must be one of {RENDERERS}, got {renderer!r}")
        if num_samples < 1 or num_importance < 0 or chunk < 1:
            raise ValueError("model.num_samples and model.chunk must be >= 1 and model.num_importance >= 0")
        if density_activation not in rendering.DENSITY_ACTIVATIONS:
            raise ValueError(f"model.density_activation must be one of {rendering.DENSITY_ACTIVATIONS}, "
                             f"got {density_activation!r}")
        if not table_lr_scale > 0:
            raise ValueError(f"model.table_lr_scale must be > 0, got {table_lr_scale}")
        net = network_config(net, flat_net, NET_TARGET, NET_SETTINGS, type(self).__name__)
        proposal_samples, proposal_net = to_plain(proposal_samples), to_plain(proposal_net)  # checkpoints: plain values
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *flat_net])
        self.coarse = build_network(net, gradient_checkpointing=gradient_checkpointing)
        if not isinstance(self.coarse, RadianceField):
            lacks = ", ".join(missing_field_members(self.coarse))
            raise TypeError(f"model.net ({net['_target_']}) is not a NeRF field: it lacks {lacks} "
                            "(RadianceField, lightning_modules/nerf/network.py)")
        fine = renderer == "vanilla" and num_importance > 0
        self.fine = build_network(net, gradient_checkpointing=gradient_checkpointing) if fine else None
        if occupancy_distortion_loss_mult and renderer != "occupancy" or occupancy_distortion_loss_mult < 0:
            raise ValueError(f"model.occupancy_distortion_loss_mult={occupancy_distortion_loss_mult}: a weight >= 0 "
                             f"for renderer=occupancy, not {renderer} (the proposal renderer's is distortion_loss_mult)")
        self.proposal = ProposalSampler.from_settings(self.hparams, self.coarse) if renderer == "proposal" else None
        for key, value, off in (("table_lr_scale", table_lr_scale, 1.0), ("table_decay", table_decay, 0.0)):
            if value != off and not self.table_parameters():
                raise ValueError(f"model.{key}={value}: model.net ({net['_target_']}) has no encoding tables; "
                                 f"use nerf_net=hashgrid or leave it at {off:g}")
        if not table_decay >= 0:
            raise ValueError(f"model.table_decay must be >= 0 (0: off), got {table_decay}")
        self.grid = None
        if renderer == "occupancy":
            self.grid = OccupancyGrid(grid_resolution, grid_update_every, grid_warmup_steps, threshold=grid_threshold,
                                      march_samples=march_samples, sample_budget=sample_budget,
                                      shade_budget=shade_budget, early_stop_eps=early_stop_eps)
        self._grid_ready = False
        self._compiled: dict[str, object] = {}  # a plain dict: compiled wrappers stay out of the state dict

    @classmethod
    def inapplicable_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        renderer = settings.get("renderer", "vanilla")
        unused = {key: f"the {owner} renderer's setting, and this run renders with model.renderer={renderer}"
                  for owner, keys in RENDERER_SETTINGS.items() if owner != renderer for key in keys}
        if renderer == "occupancy":
            unused["num_samples"] = "the occupancy renderer marches model.march_samples per box diagonal instead"
        return unused

    # ---- networks -------------------------------------------------------------------------
    def compile_plan(self) -> CompilePlan:
        if self.grid is not None and self.grid.sample_budget is None:
            return CompilePlan(False, "the occupancy renderer shades a data-dependent number of samples each step: "
                                      "no static shapes (model.sample_budget fixes them)", dynamic=True)
        # dynamic=False: validation's chunks come first (sanity check) and would make the ray count symbolic
        what = ("fixed samples a step: static shapes; the whole training render (march, field, compositing) is one "
                "compiled unit; views render eager") if self.grid else (
                "fixed ray batches and samples per ray: static shapes; the whole render "
                f"({'proposal rounds, field' if self.proposal else 'coarse' + (', fine' if self.fine is not None else '')}, "
                "compositing) is one compiled unit")
        return CompilePlan(True, what, mode=CUDA_GRAPHS, dynamic=False)

    def _net(self, name: str):
        """The occupancy renderer's network: compiled alone (dynamic shapes); eager for views under a sample budget."""
        module = getattr(self, name)
        if not self.compile_decision.on or self.grid.sample_budget:
            return module
        if name not in self._compiled:
            self._compiled[name] = compiled(module, self.compile_decision)
        return self._compiled[name]

    def _whole_renderer(self, perturb: bool, train_proposals: bool = True):
        """`_render_vanilla` (`_render_proposal`, `_render_occupancy`'s slots), compiled as one unit when on: the samples, the
        networks and the compositing in one graph instead of many small kernels between compiled networks. One
        callable per `perturb` value (random or midpoint samples are different graphs) and, with proposals, per
        `train_proposals` (with or without the proposal networks' backward)."""
        render = self._render_vanilla if self.grid is None else \
            lambda *args: self._render_occupancy(*args, budgets=self.grid.budgets)  # noqa: E731
        if self.proposal is not None:
            render = lambda *args: self._render_proposal(*args, train_networks=train_proposals)  # noqa: E731
        if not self.compile_decision.on:
            return render
        key = f"{self.hparams.renderer}_perturb={bool(perturb)}"
        key += f"_train={train_proposals}" if self.proposal is not None else ""
        if key not in self._compiled:
            self._compiled[key] = compiled(render, self.compile_decision)
        return self._compiled[key]

    def _shade(self, net, points: Tensor, viewdirs: Tensor, image: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Activated density and colour; `image` (one per sample) only for a field with appearance vectors."""
        raw_sigma, raw_rgb = net(points, viewdirs) if image is None else net(points, viewdirs, image)
        return self._activate(raw_sigma), torch.sigmoid(raw_rgb.float())

    def _activate(self, raw_sigma: Tensor) -> Tensor:
        return rendering.density_activation(raw_sigma, self.hparams.density_activation)

    # ---- optimisation ---------------------------------------------------------------------
    def table_parameters(self) -> list[torch.nn.Parameter]:
        """Every network's encoding tables (the hash grid's); none for the MLP."""
        nets = (self.coarse, self.fine, *(self.proposal.networks if self.proposal is not None else ()))
        return [p for net in nets if net is not None for p in net.table_parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The base groups (decay on MLP weights, none on biases), with the encoding tables in a group of
        their own, last: lr x model.table_lr_scale, no weight decay (instant-ngp decays MLP weights only)."""
        tables = self.table_parameters()
        if not tables:
            return super().parameter_groups()
        ids = {id(p) for p in tables}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in super().parameter_groups()]
        table_group = {"params": tables, "weight_decay": 0.0, "name": "encoding_tables"}
        if self.hparams.table_lr_scale != 1.0:
            table_group["lr"] = self._optimizer_lr() * float(self.hparams.table_lr_scale)
        return [g for g in groups if g["params"]] + [table_group]

    def _optimizer_lr(self) -> float:
        """The lr the optimizer factory builds with (optimizer.lr, else its class's default)."""
        lr = inspect.signature(self.optimizer_factory).parameters.get("lr") if self.optimizer_factory else None
        if lr is None or lr.default is inspect.Parameter.empty:
            raise ValueError("model.table_lr_scale needs the optimizer's lr: set optimizer.lr")
        return float(lr.default)

    # ---- the data -----------------------------------------------------------------------
    def bind_data(self, data: TaskData) -> None:
        """A field with appearance vectors gets one per training image (`num_train_images`, from the data); a
        grid's finest cells are compared with the training pixels (`pixels_across_box`) in a start-up line."""
        super().bind_data(data)
        for net in (self.coarse, self.fine):
            if net is not None:
                net.set_pixels_across_box(data.pixels_across_box)
        if (note := self.coarse.resolution_note(data.pixels_across_box)) is not None:
            log.log(*note)
        if self.coarse.uses_appearance:
            if data.num_train_images is None:
                raise ValueError("model.net.appearance_dim needs the number of training images, which this data "
                                 "does not declare (TaskData.num_train_images)")
            self._set_num_images(data.num_train_images)

    def _set_num_images(self, num_images: int) -> None:
        for net in (self.coarse, self.fine):
            if net is not None:
                net.set_num_images(num_images)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.proposal is not None:
            self.proposal.check_wrapper(self.trainer.strategy.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the weights load (also without a Trainer: load_from_checkpoint, init_from): what a fresh fit sizes
        from the data in bind_data, at the checkpoint's sizes: appearance embeddings, an `auto` grid's tables."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if state.get("coarse.appearance.weight") is not None and self.coarse.uses_appearance:
            self._set_num_images(state["coarse.appearance.weight"].shape[0])
        for name, net in (("coarse", self.coarse), ("fine", self.fine)):
            if net is not None and f"{name}.finest_resolution" in state:
                net.set_finest_resolution(int(state[f"{name}.finest_resolution"]))
        bound = self.task_data  # data bound first (mode=test ckpt_path=...): say what renders it now
        note = self.coarse.resolution_note(bound.pixels_across_box) if bound is not None else None
        if note is not None:
            log.log(note[0], "the checkpoint's tables: %s", note[1])

    # ---- rendering ------------------------------------------------------------------------
    def render_rays(self, batch: dict, perturb: bool, train_proposals: bool = True) -> dict[str, Tensor]:
        """Render a batch of rays; returns rgb (N, 3), depth (N,), acc (N,) and, with a fine network, rgb_coarse. A
        field with appearance vectors reads the batch's `image` (N,); without one (camera paths), their mean."""
        origins, dirs, near, far = (batch[k].float() for k in RAY_KEYS)
        background = batch["background"].float()
        image = batch.get("image") if self.coarse.uses_appearance else None
        self._ensure_grid(batch["aabb"])
        if self.grid is not None and not (self.grid.budgets and self.training and torch.is_grad_enabled()):
            return self._render_occupancy(origins, dirs, near, far, background, perturb, image)
        return self._whole_renderer(perturb, train_proposals)(origins, dirs, near, far, background, perturb, image)

    def _render_vanilla(self, origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor, background: Tensor,
                        perturb: bool, image: Tensor | None = None) -> dict[str, Tensor]:
        """The paper's renderer (rendering.render_vanilla); uncompiled networks: when compiled, this is the unit."""
        hp, fine = self.hparams, self.fine
        return rendering.render_vanilla(lambda p, v, i: self._shade(self.coarse, p, v, i),
                                        None if fine is None else lambda p, v, i: self._shade(fine, p, v, i), origins,
                                        dirs, near, far, background, perturb, image, hp.num_samples, hp.num_importance,
                                        hp.lindisp)

    def _render_occupancy(self, origins, dirs, near, far, background, perturb, image=None, budgets=None) -> dict:
        """Through the occupancy grid: exactly the kept samples, or in `budgets`' fixed slots (a training batch under
        a sample budget: compiled, this is the unit, so its networks run uncompiled)."""
        net = self.coarse if budgets else self._net("coarse")
        return self.grid.render(lambda p, v, i: self._shade(net, p, v, i), lambda p: self._activate(self.coarse.density(p)),
                                origins, dirs, near, far, background, perturb, image, self.hparams.early_stop_eps, budgets)

    def _render_proposal(self, origins, dirs, near, far, background, perturb, image=None,
                         train_networks: bool = True) -> dict[str, Tensor]:
        """Proposal rounds, then the field (proposal.py); uncompiled networks: when compiled, this is the unit."""
        return self.proposal.render(lambda p, v, i: self._shade(self.coarse, p, v, i), origins, dirs, near, far,
                                    background, perturb, image, train_networks)

    def _ensure_grid(self, aabb: Tensor) -> None:
        """The scene box, once: the occupancy grid lives in it and a bounded field (the hash grid) maps it
        to its own coordinates (the MLP needs none)."""
        if not self._grid_ready:
            for part in (self.grid, self.coarse, self.fine, self.proposal):
                if part is not None:
                    part.set_aabb(aabb)
            self._grid_ready = True

    @torch.no_grad()
    def render_view(self, batch: dict) -> dict[str, Tensor]:
        """Render every ray of a view in chunks of `chunk` rays (bounded memory); returns flat rgb/depth/acc. A
        compiled whole render gets the last chunk padded to `chunk` rays: its own shape would compile again."""
        n, chunk = batch["origins"].shape[0], self.hparams.chunk
        pad = self.compile_decision.on and self.grid is None
        pieces: dict[str, list[Tensor]] = {"rgb": [], "depth": [], "acc": []}
        for start in range(0, n, chunk):
            part = {k: batch[k][start:start + chunk] for k in (*RAY_KEYS, "image") if k in batch}
            size = len(part["origins"])
            if pad:  # to `chunk` with copies of the last ray, dropped below; contiguous as the padded ones
                part = {k: torch.cat([v, v[-1:].expand(chunk - size, *v.shape[1:])]) if size < chunk else v.contiguous()
                        for k, v in part.items()}
            part["background"], part["aabb"] = batch["background"], batch["aabb"]
            out = self.render_rays(part, perturb=False)
            for key, values in pieces.items():
                values.append(out[key][:size])
        return {k: torch.cat(v) for k, v in pieces.items()}

    # ---- steps ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        for net in (self.coarse, self.fine):  # the hash grid's level warm-up, before the grid queries the density
            if net is not None:
                net.set_step(self.global_step)
        if self.grid is not None:
            self._ensure_grid(batch["aabb"])
            if self.grid.maybe_update(lambda p: self._activate(self.coarse.density(p))):
                self.log("train/occupancy", self.grid.occupancy_fraction(), on_step=True, on_epoch=False)
        if self.coarse.uses_appearance and "image" not in batch:  # the vectors would never train
            raise KeyError("model.net.appearance_dim > 0 learns a vector per training image: training batches need "
                           "each ray's `image` index (datamodules.nerf RayBatches carries it)")
        if self.proposal is not None:
            self.proposal.set_step(self.global_step)  # the resampling's annealing
        train_proposals = self.proposal is None or self.proposal.trains_networks(self.global_step)
        out = self.render_rays(batch, perturb=self.hparams.perturb, train_proposals=train_proposals)
        target = batch["rgb"].float()
        mse = rendering.ray_mse(out["rgb"], target, out.get("complete"))  # rays a sample budget cut short: left out
        loss = mse + F.mse_loss(out["rgb_coarse"], target) if "rgb_coarse" in out else mse
        regularisers, logged = self._regularisers(out)
        self.trained_in_step = out["complete"].sum() if "complete" in out else None  # cut rays trained nothing
        if "complete" in out:  # a sample budget too small for the batch shows here
            written = self.attached_trainer is not None and writes_logs_at_this_step(self.trainer)
            logged.update(self.grid.budget_use(out, written))
        loss = loss + regularisers
        self.log_train_step({"train/loss": loss, "train/psnr": -10.0 * torch.log10(mse.detach().clamp_min(1e-10)),
                             **logged}, batch_size=target.shape[0])
        return loss

    def _regularisers(self, out: dict) -> tuple[Tensor | float, dict[str, Tensor]]:
        """The proposal renderer's interlevel (trains the proposal networks) and distortion losses, or the occupancy
        march's distortion loss where its multiplier is on, and the tables' decay where it is on; their weighted
        sum and each unweighted (to log)."""
        total, logged = 0.0, {}
        if self.proposal is not None:
            total, logged = self.proposal.losses(out)
        elif self.grid is not None and self.hparams.occupancy_distortion_loss_mult:
            distortion = self.grid.distortion(out)
            total, logged = self.hparams.occupancy_distortion_loss_mult * distortion, {"train/distortion": distortion.detach()}
        if self.hparams.table_decay:
            decay = self.table_decay_loss()
            total, logged = total + self.hparams.table_decay * decay, {**logged, "train/table_decay": decay.detach()}
        return total, logged

    def table_decay_loss(self) -> Tensor:
        """Zip-NeRF's normalised weight decay: the mean squared feature of each table (each level's), summed. A
        level's entries share its weight, so a fine level with millions of rows is pulled to 0 only where rays
        rarely pull it elsewhere: detail the training views do not support fades."""
        return torch.stack([table.float().square().mean() for table in self.table_parameters()]).sum()

    def _eval_view(self, batch: dict, stage: str) -> dict[str, Tensor]:
        out = self.render_view(batch)
        h, w = int(batch["height"]), int(batch["width"])
        pred = out["rgb"].reshape(h, w, 3).clamp(0, 1)
        result = {"rgb": pred, "depth": out["depth"].reshape(h, w), "acc": out["acc"].reshape(h, w)}
        if "rgb" in batch:
            result["target"] = batch["rgb"].float().reshape(h, w, 3)
            self.log(f"{stage}/loss", F.mse_loss(pred, result["target"]), batch_size=1, sync_dist=True)
        return result

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        result = self._eval_view(batch, "val")
        every = max(1, int(self.hparams.vis_every_n_epochs))
        if batch_idx == 0 and self.attached_trainer is not None and self.current_epoch % every == 0:
            self._save_visual(result, batch, f"nerf_val_epoch{self.current_epoch:03d}")
        return result

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        result = self._eval_view(batch, "test")
        if batch_idx < 4 and self.attached_trainer is not None:
            self._save_visual(result, batch, f"nerf_test_view{int(batch['index']):03d}")
        return result

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        result = self._eval_view(batch, "predict")
        return {"index": int(batch["index"]), "rgb": (result["rgb"] * 255).round().byte().cpu(),
                "depth": (pictures.depth_colours(result["depth"], batch) * 255).round().byte().cpu()}

    # ---- outputs --------------------------------------------------------------------------
    def _save_visual(self, result: dict, batch: dict, name: str) -> None:
        if not self.trainer.is_global_zero:
            return
        from common.pictures import save_image

        image, caption = pictures.view_tiles(result, batch)
        save_image(self.trainer, name, image.numpy(), caption=caption or name)

    def save_predictions(self, predictions, output_dir) -> None:
        pictures.save_renders(predictions, Path(output_dir))
