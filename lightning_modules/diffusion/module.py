"""Denoising diffusion: a diffusers UNet2DModel trained to predict noise (or v) under a DDPM schedule,
sampled with DDIM and classifier-free guidance.

Training: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for a random t; the U-Net predicts eps
(`prediction_type=epsilon`) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (`v_prediction`), MSE
loss. With classes, each label is replaced by the null class with probability `cond_drop_prob`,
so one network learns both the conditional and the unconditional prediction; sampling mixes them
as uncond + w (cond - uncond). The EMA weights (callbacks/ema.py) are swapped in for validation,
test and predict, so samples, grids and metrics come from the EMA model when that callback is on.
The U-Net is `model.net`, a config with its own `_target_` (common/network_config.py).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from common.fast_path import CompilePlan, CompileSetting, compiled
from common.network_config import build_network, network_config
from common.parallel import skipped_when_sharded
from common.task_data import TaskData
from lightning_modules.base import BaseTaskModule
from lightning_modules.diffusion.schedule import (  # noqa: F401 (re-exported)
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    check_guidance_interval,
    guided,
    make_noise_scheduler,
)
from lightning_modules.diffusion.unet import TIME_SCALE_SHIFTS, build_unet  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# model.net: the U-Net, built with image_size, channels and num_classes (which the module and data share)
NET_TARGET = "lightning_modules.diffusion.unet.build_unet"
# the U-Net's settings that were the module's own before model.net (checkpoints from then load)
NET_SETTINGS = ("block_out_channels", "layers_per_block", "attention_resolutions", "dropout",
                "norm_num_groups", "attention_head_dim", "time_scale_shift")


class DiffusionModule(BaseTaskModule):
    throughput_unit = "images"
    # The default monitored metric is the sample-quality callback's (callbacks/fid.py): the suite refuses
    # a fit that monitors one of these with that callback off, before training rather than after it
    callback_metrics = {"sample_quality": ("val/fd_", "val/kid", "val/fid", "val/cond_accuracy", "val/classifier")}

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        num_classes: int = 10,
        net: Mapping[str, Any] | None = None,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 2.0,
        guidance_interval: Sequence[int] | None = None,
        num_inference_steps: int = 50,
        ddim_eta: float = 0.0,
        clip_sample: bool = False,
        sample_every_n_epochs: int = 1,
        grid_per_class: int = 8,
        sample_seed: int = 0,
        compile: CompileSetting = "auto",
        compile_mode: str | None = None,
        gradient_checkpointing: bool = False,
        optimizer=None,
        scheduler=None,
        **flat_net: Any,
    ) -> None:
        super().__init__(optimizer, scheduler)
        # Plain Python types (Hydra passes ListConfig): checkpoints stay loadable with weights_only=True.
        net = network_config(net, flat_net, NET_TARGET, NET_SETTINGS, type(self).__name__)
        guidance_interval = check_guidance_interval(guidance_interval, num_timesteps)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *flat_net])
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"model.cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.num_classes = int(num_classes)
        self.unet = build_network(net, image_size=image_size, channels=channels, num_classes=self.num_classes)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = make_noise_scheduler(num_timesteps, beta_schedule, beta_start, beta_end, prediction_type)
        abar = self.noise_scheduler.alphas_cumprod.float()
        # Not in the state dict: they follow from the config, and move with the module.
        self.register_buffer("sqrt_abar", abar.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1.0 - abar).sqrt(), persistent=False)
        self.class_names: list[str] = [str(i) for i in range(self.num_classes)]
        self._compiled: Any = None  # the compiled training loss, when compile is on

    convolutional = None
    channels_last_note = "the U-Net's GroupNorm layers ran slower on NHWC weights on an H100 (BENCHMARKS.md)"

    def sharded_blocks(self) -> set[type[torch.nn.Module]]:
        """FSDP units: the U-Net's ResNet and attention blocks."""
        return {ResnetBlock2D, Attention}

    def compile_plan(self) -> CompilePlan:
        # model.compile_mode: reduce-overhead (CUDA graphs) by default, null = plain inductor
        return CompilePlan(True, "fixed image size and batch: static shapes", mode=self.hparams.compile_mode)

    def attention_kernel(self) -> str | None:
        names = sorted({type(m.processor).__name__ for m in self.unet.modules() if isinstance(m, Attention)})
        if names == ["AttnProcessor2_0"]:  # diffusers' processor that calls F.scaled_dot_product_attention
            return "sdpa (diffusers AttnProcessor2_0)"
        return f"{', '.join(names)} (diffusers)" if names else None

    # ---- the diffusion process -------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        return self.num_classes

    def _expand(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values[t].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self._expand(self.sqrt_abar, t, x0) * x0 + self._expand(self.sqrt_one_minus_abar, t, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.hparams.prediction_type == "epsilon":
            return noise
        return self._expand(self.sqrt_abar, t, x0) * noise - self._expand(self.sqrt_one_minus_abar, t, x0) * x0

    def class_input(self, labels: torch.Tensor | None, batch: int, drop_prob: float = 0.0) -> torch.Tensor | None:
        """Labels for the U-Net: -1 (unlabelled) and dropped labels become the null class."""
        if not self.num_classes:
            return None
        if labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=self.device)
        labels = torch.where(labels < 0, self.null_class, labels)
        if drop_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < drop_prob
            labels = torch.where(drop, self.null_class, labels)
        return labels

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=class_labels).sample

    def _train_loss(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Draw t and noise, noise x0, predict, MSE: one function, so torch.compile can fuse all of it."""
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.hparams.num_timesteps, (x0.shape[0],), device=x0.device)
        return self.diffusion_loss(x0, labels, noise, t, self.hparams.cond_drop_prob)

    def _train_fn(self):
        if not self.compile_decision.on:
            return self._train_loss
        if self._compiled is None:
            # A compiled function, not a compiled submodule: the state dict keeps its plain names. Under CUDA
            # graphs the loss is copied out of the replayed memory (common.fast_path.compiled).
            self._compiled = compiled(self._train_loss, self.compile_decision)
        return self._compiled

    def diffusion_loss(self, x0: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor, t: torch.Tensor,
                       drop_prob: float = 0.0) -> torch.Tensor:
        x_t = self.noised(x0, noise, t)
        pred = self.unet(x_t, t, class_labels=self.class_input(labels, len(x0), drop_prob)).sample
        return F.mse_loss(pred.float(), self.target(x0, noise, t).float())

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0, labels = batch
        loss = self._train_fn()(x0, labels)
        self.log_train_step({"train/loss": loss})
        return loss

    def _eval_loss(self, batch, batch_idx):
        """Same noise and timesteps for a batch every epoch, so the number is comparable across epochs."""
        x0, labels = batch
        g = torch.Generator().manual_seed(10_000 + batch_idx)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = torch.randint(0, self.hparams.num_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        return self.diffusion_loss(x0, labels, noise, t)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._eval_loss(batch, batch_idx), prog_bar=True, sync_dist=True, batch_size=len(batch[0]))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._eval_loss(batch, batch_idx), sync_dist=True, batch_size=len(batch[0]))

    # ---- sampling --------------------------------------------------------------------------------
    def _autocast(self):
        trainer = self.attached_trainer
        if trainer is not None and getattr(trainer, "precision_plugin", None) is not None:
            return trainer.precision_plugin.forward_context()
        return contextlib.nullcontext()

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | None = None, num_images: int | None = None, seed: int = 0,
               guidance_scale: float | None = None, num_inference_steps: int | None = None,
               eta: float | None = None, guidance_interval: Sequence[int] | None = None) -> torch.Tensor:
        """DDIM samples in [-1, 1], N x C x H x W. labels: class per image (-1 = unconditional); the
        starting noise comes from a CPU generator seeded with `seed`, so a seed gives the same images.
        None for a sampling setting means the model's own (hparams)."""
        hp = self.hparams
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        steps = hp.num_inference_steps if num_inference_steps is None else num_inference_steps
        eta = hp.ddim_eta if eta is None else eta
        if self.attached_trainer is not None and self.attached_trainer.fast_dev_run and steps > 2:
            if not getattr(self, "_told_fast_dev_run", False):
                log.info("fast_dev_run: sampling with 2 DDIM steps instead of %d (a pipeline check, not a score)", steps)
                self._told_fast_dev_run = True
            steps = 2
        n = len(labels) if labels is not None else int(num_images or 0)
        if n < 1:
            raise ValueError("sample() needs labels or num_images >= 1")
        if labels is not None:
            labels = labels.to(self.device)
            if self.num_classes and int(labels.max()) >= self.num_classes:
                raise ValueError(f"label {int(labels.max())} is out of range for {self.num_classes} classes")
        generator = torch.Generator().manual_seed(int(seed))
        shape = (n, hp.channels, hp.image_size, hp.image_size)
        x = torch.randn(shape, generator=generator).to(self.device)
        ddim = self.ddim_scheduler()
        ddim.set_timesteps(steps, device=self.device)
        cond = self.class_input(labels, n)
        use_cfg = cond is not None and scale != 1.0 and bool((cond != self.null_class).any())
        interval = check_guidance_interval(guidance_interval, hp.num_timesteps, "guidance_interval") or hp.get("guidance_interval")
        lo, hi = interval or (0, hp.num_timesteps)
        was_training = self.unet.training
        self.unet.eval()
        try:
            with self._autocast():
                for t, step in zip(ddim.timesteps, ddim.timesteps.tolist(), strict=True):  # the list: no sync per step
                    if use_cfg and lo <= step <= hi:
                        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([cond, torch.full_like(cond, self.null_class)])).sample
                        c, u = both.float().chunk(2)
                        pred = torch.where((cond == self.null_class).view(-1, 1, 1, 1), u, guided(c, u, scale))
                    else:
                        pred = self.unet(x, t, class_labels=cond).sample.float()
                    x = ddim.step(pred, t, x, eta=eta, generator=generator if eta > 0 else None).prev_sample
        finally:
            self.unet.train(was_training)
        return x.clamp(-1, 1)

    def check_sampling(self, guidance_interval: Sequence[int] | None = None, key: str = "guidance_interval") -> None:
        """Raise, naming `key`, if a sampling setting does not fit this model (callbacks check theirs at setup)."""
        check_guidance_interval(guidance_interval, self.hparams.num_timesteps, key)

    def ddim_scheduler(self) -> DDIMScheduler:
        """DDIM on the training schedule, from t = T ("trailing" spacing). The predicted x0 is not
        clipped to [-1, 1] unless model.clip_sample=true (diffusers' DDPM default): at the first,
        near-pure-noise steps that x0 lies far outside the range, and clipping it discarded the
        class, increasingly as training went on (one checkpoint: conditioning accuracy 0.765
        clipped, 1.000 not; BENCHMARKS.md)."""
        return DDIMScheduler.from_config(self.noise_scheduler.config, timestep_spacing="trailing",
                                         clip_sample=bool(self.hparams.clip_sample))

    def sample_grid(self, seed: int | None = None) -> tuple[torch.Tensor, int]:
        """One row per class (conditional) or a square of samples; returns images and images per row."""
        per_row = self.hparams.grid_per_class
        if self.num_classes:
            labels = torch.arange(self.num_classes).repeat_interleave(per_row)
        else:
            labels = torch.full((per_row * per_row,), -1)
        seed = self.hparams.sample_seed if seed is None else seed
        return self.sample(labels=labels, seed=seed), per_row

    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        if trainer.sanity_checking or not trainer.is_global_zero or self.hparams.grid_per_class < 1:
            return
        # outside a step no rank holds whole weights, so sampling from here cannot run
        if skipped_when_sharded(trainer, "Sample grids", "Sample from a checkpoint with mode=predict."):
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % max(1, self.hparams.sample_every_n_epochs) and not last and not trainer.fast_dev_run:
            return
        from torchvision.utils import make_grid

        from common.pictures import save_image

        images, per_row = self.sample_grid()
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=per_row, padding=2, pad_value=1.0)
        save_image(trainer, f"samples_epoch{epoch:03d}", grid.permute(1, 2, 0).numpy(),
                   caption=f"epoch {epoch}: DDIM-{self.hparams.num_inference_steps}, guidance {self.hparams.guidance_scale}"
                   + (", one row per class" if self.num_classes else ""))

    # ---- predict ---------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx):
        labels = batch if self.num_classes else torch.full_like(batch, -1)
        images = self.sample(labels=labels, seed=self.hparams.sample_seed + batch_idx)
        return {"images": ((images + 1) * 127.5).round().to(torch.uint8).cpu(), "labels": labels.cpu()}

    def save_predictions(self, predictions, output_dir: Path) -> None:
        from PIL import Image
        from torchvision.utils import make_grid

        images = torch.cat([p["images"] for p in predictions])
        labels = torch.cat([p["labels"] for p in predictions])
        out = Path(output_dir) / "samples"
        counts: dict[int, int] = {}
        for image, label in zip(images, labels.tolist(), strict=True):
            folder = out / (f"class_{self.class_names[label]}" if label >= 0 else "unconditional")
            folder.mkdir(parents=True, exist_ok=True)
            i = counts[label] = counts.get(label, -1) + 1
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / f"{i:05d}.png")
        per_row = max(counts.values()) + 1 if self.num_classes else math.ceil(math.sqrt(len(images)))
        grid = make_grid(images.float() / 255, nrow=per_row, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
        Image.fromarray((grid * 255).round().astype("uint8")).save(Path(output_dir) / "samples_grid.png")
        if self.attached_trainer is not None:
            from common.pictures import save_image

            save_image(self.attached_trainer, "predict_samples_grid", grid)
        log.info("Wrote %d samples to %s and a grid to %s", len(images), out, Path(output_dir) / "samples_grid.png")

    # ---- data agreement and checkpoints ----------------------------------------------------------
    def bind_data(self, data: TaskData) -> None:
        """The data's images must be those the U-Net was built for, with one class name per class."""
        super().bind_data(data)
        hp = self.hparams
        for key, value in (("image_size", data.image_size), ("channels", data.channels)):
            if value is not None and value != hp[key]:
                raise ValueError(f"data.{key}={value} but model.{key}={hp[key]}; they must agree")
        names = list(data.class_names)
        if self.num_classes and not names:
            raise ValueError(f"model.num_classes={self.num_classes} but the data has no labels; "
                             "set model.num_classes=0 for unconditional training, or use class subfolders")
        if self.num_classes and len(names) != self.num_classes:
            raise ValueError(f"The data has {len(names)} classes ({', '.join(names[:10])}) but "
                             f"model.num_classes={self.num_classes}; set model.num_classes={len(names)}")
        if names and not self.num_classes:
            log.info("Data has %d classes but model.num_classes=0: training unconditionally", len(names))
        if self.num_classes:
            self.class_names = names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["class_names"] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("class_names"):
            self.class_names = list(checkpoint["class_names"])
