"""PSNR and SSIM (torchmetrics) over whole rendered views.

The module's validation_step / test_step returns {"rgb": (H, W, 3), "target": (H, W, 3)} images in
[0, 1] for each view; this callback accumulates per-view PSNR and SSIM and logs their means over
the views as `<stage>/psnr` and `<stage>/ssim` (stage = val or test). PSNR is averaged per image,
as NeRF papers report it, not computed from the pooled MSE. Synchronised across devices. SSIM's 11-pixel
Gaussian window needs views over 5 pixels a side: smaller ones (a tiny smoke-test render) are left out of SSIM
only, with a warning that counts them.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

log = logging.getLogger(__name__)
SSIM_MIN_SIDE = 6  # torchmetrics reflect-pads by half its 11-pixel window (5): a side must exceed that


class PSNRSSIM(Callback):
    def __init__(self, data_range: float = 1.0, ssim: bool = True, prog_bar: bool = True) -> None:
        super().__init__()
        self.data_range, self.use_ssim, self.prog_bar = data_range, ssim, prog_bar
        self.metrics: dict[str, dict] = {}
        self.too_small: dict[str, int] = {}  # views left out of SSIM this epoch, by stage

    def _stage(self, stage: str, device) -> dict:
        if stage not in self.metrics:
            metrics = {"psnr": PeakSignalNoiseRatio(data_range=self.data_range, dim=(1, 2, 3))}
            if self.use_ssim:
                metrics["ssim"] = StructuralSimilarityIndexMeasure(data_range=self.data_range)
            self.metrics[stage] = metrics
        for metric in self.metrics[stage].values():
            metric.to(device)
        return self.metrics[stage]

    def update(self, stage: str, outputs, device) -> None:
        if not isinstance(outputs, dict) or "rgb" not in outputs or "target" not in outputs:
            return
        pred = outputs["rgb"].float().clamp(0, 1)
        target = outputs["target"].float()
        if pred.shape != target.shape or pred.ndim not in (3, 4):
            raise ValueError(f"PSNRSSIM needs rgb and target images of the same (H, W, 3) shape; "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        if pred.ndim == 3:
            pred, target = pred[None], target[None]
        pred, target = pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)  # (B, 3, H, W)
        for name, metric in self._stage(stage, device).items():
            if name == "ssim" and min(pred.shape[-2:]) < SSIM_MIN_SIDE:
                self.too_small[stage] = self.too_small.get(stage, 0) + pred.shape[0]
                continue
            metric.update(pred, target)

    def log_stage(self, stage: str, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        metrics = self.metrics.get(stage)
        values = {}
        if not metrics or not metrics["psnr"]._update_count:
            return values
        skipped = self.too_small.pop(stage, 0)
        if skipped:
            log.warning("%s/ssim: %d view(s) left out, under %d pixels a side (SSIM's 11-pixel window); %s/psnr "
                        "scores every view", stage, skipped, SSIM_MIN_SIDE, stage)
        for name, metric in metrics.items():
            if metric._update_count:
                values[name] = metric.compute()
                pl_module.log(f"{stage}/{name}", values[name], prog_bar=self.prog_bar and name == "psnr")
            metric.reset()
        return values

    # ---- hooks ----------------------------------------------------------------------------------
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.update("val", outputs, pl_module.device)

    def on_validation_epoch_end(self, trainer, pl_module):
        self.log_stage("val", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.update("test", outputs, pl_module.device)

    def on_test_epoch_end(self, trainer, pl_module):
        self.log_stage("test", pl_module)
