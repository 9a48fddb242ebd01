"""Diffusion's benchmark hooks (`python -m bench`, `python -m bench.quality`).

peer: the training loop of diffusers' examples/unconditional_image_generation/train_unconditional.py,
as that script runs it: accelerate's `Accelerator` (mixed precision as the suite's: bf16 on GPUs),
a `UNet2DModel` of the suite's configuration (the task's `model.net`, read from the module's U-Net
config, fresh weights), the module's `DDPMScheduler` for `add_noise`, MSE on the noise, torch's
AdamW, a cosine schedule with warm-up, gradient clipping, diffusers' `EMAModel` stepped after every
optimizer step, and the loss read to the host for the progress bar every step, as the script logs
it. Same batches: the datamodule's training loader. Class labels go to the U-Net only where the
configuration is class-conditional (the bench profile is not, like the script).
SUITE_VARIANTS: the suite default with channels-last weights, the layout the U-Net's defaults leave off.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.timing import Windows, synchronize

PEER_NAME = "diffusers example loop (accelerate)"
# `--impls channels_last`: the fast path with NHWC weights, which the U-Net's defaults leave off (channels_last_note)
SUITE_VARIANTS = {"channels_last": ["channels_last=true"]}


def peer(task_root: Path, prepared: tuple, w: Windows) -> dict:
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
    except ImportError as err:
        raise RuntimeError(f"accelerate unavailable ({err}); the diffusers example loop needs it") from err
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg, dm, module, precision = prepared
    unet_config, scheduler_config = dict(module.unet.config), dict(module.noise_scheduler.config)
    module.cpu()  # the suite's U-Net is not used here: its memory is not this row's
    mixed = {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(precision, "no")
    AcceleratorState._reset_state(True)  # another row (the HF Trainer) may have set this process's state up
    accelerator = Accelerator(mixed_precision=mixed, cpu=w.device.type == "cpu")
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)

    model = UNet2DModel.from_config(unet_config)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.optimizer.lr),
                                  weight_decay=float(cfg.optimizer.get("weight_decay", 0.0)))
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=min(500, w.total_steps // 10),
                                 num_training_steps=w.total_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema_settings = (cfg.get("callbacks") or {}).get("ema") or {}
    ema = EMAModel(model.parameters(), decay=float(ema_settings.get("decay", 0.9999)), use_ema_warmup=True,
                   inv_gamma=float(ema_settings.get("inv_gamma", 1.0)),
                   power=float(ema_settings.get("power", 0.75)), model_cls=UNet2DModel, model_config=model.config)
    ema.to(accelerator.device)
    conditional = unet_config.get("num_class_embeds") is not None
    clip = float(cfg.get("gradient_clip_val") or 0.0)
    timesteps_total = int(noise_scheduler.config.num_train_timesteps)
    batches = itertools.chain.from_iterable(itertools.repeat(dm.train_dataloader()))
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    last_end = None
    for step in range(w.total_steps):
        images, labels = next(batches)
        clean = images.to(device, non_blocking=True).to(weight_dtype)
        if conditional:  # unlabelled images (-1) get the null class, the last embedding row
            labels = labels.to(device, non_blocking=True)
            labels = torch.where(labels < 0, unet_config["num_class_embeds"] - 1, labels)
        else:
            labels = None
        w.before_step(step, time.perf_counter() - last_end if last_end else 0.0)
        noise = torch.randn(clean.shape, dtype=weight_dtype, device=device)
        timesteps = torch.randint(0, timesteps_total, (clean.shape[0],), device=device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(model):
            prediction = model(noisy, timesteps, class_labels=labels).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(model.parameters())
        logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value}
        w.after_step(step, clean.shape[0])
        last_end = time.perf_counter()
    synchronize(device)
    memory = {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}
    return {**w.summary(), **memory, "precision": precision, "last_loss": logs["loss"]}


QUALITY = [  # for `python -m bench.quality`
    {"name": "mnist_cond", "overrides": ["experiment=mnist_cond", "data.data_dir={data}/diffusion/mnist"],
     "metrics": ["test/cond_accuracy", "test/fd_classifier_ratio", "test/fd_classifier",
                 "test/cond_accuracy_g1", "test/fd_classifier_ratio_g1",
                 "test/cond_accuracy_g2_t0-999", "test/fd_classifier_ratio_g2_t0-999"], "budgets": [7.5]},
]
