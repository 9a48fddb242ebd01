"""Licence-plate detection: a torchvision detector trained and validated with Lightning.

Validation returns every detection above `eval_score_threshold` (tiny) so mAP is computed as
COCO evaluation expects; `score_threshold` (0.25 by default) is the confidence cut for
predictions and pictures. `nms_threshold` is the detector's own post-NMS IoU.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.config import to_plain
from common.fast_path import CompilePlan, CompileSetting
from common.network_config import build_network, network_config, network_setting
from lightning_modules.base import BaseTaskModule
from lightning_modules.license_plate.detector import load_pretrained

log = logging.getLogger(__name__)


# model.net: the detector, built with num_classes from class_names
NET_TARGET = "lightning_modules.license_plate.detector.build_detector"
# the detector's settings that were the module's own before model.net (checkpoints from then load)
NET_SETTINGS = ("arch", "backbone", "anchor_sizes", "anchor_aspect_ratios", "min_size", "max_size",
                "nms_threshold", "eval_score_threshold", "detections_per_image", "trainable_backbone_layers",
                "detector_kwargs")


def deterministic_roi_align_note(device_type: str, deterministic: bool) -> str | None:
    """Why the first step is slow, where it will be: torchvision's CUDA roi_align backward adds atomically, so
    under deterministic algorithms it runs a Python fallback that it compiles (dynamic shapes) on first use."""
    if device_type != "cuda" or not deterministic:
        return None
    return ("deterministic=true on cuda (every debug config sets it): torchvision's roi_align runs its deterministic "
            "fallback, which torch.compile builds during the first step (about a minute) and which is slower than "
            "its CUDA kernel; deterministic=false uses the kernel")


def filter_detections(pred: dict[str, torch.Tensor], score_threshold: float) -> dict[str, torch.Tensor]:
    keep = pred["scores"] >= score_threshold
    return {k: v[keep] for k, v in pred.items()}


def draw_detections(image: torch.Tensor, pred: dict | None, target: dict | None, score_threshold: float,
                    class_names: Sequence[str] = ("plate",)) -> torch.Tensor:
    """uint8 CHW picture: ground truth in green, detections above the threshold in red with scores."""
    from torchvision.utils import draw_bounding_boxes

    canvas = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).to(torch.uint8)
    canvas = canvas.cpu()
    width = max(1, round(max(canvas.shape[-2:]) / 250))
    if target is not None and len(target["boxes"]):
        canvas = draw_bounding_boxes(canvas, target["boxes"].cpu().float(), colors="lime", width=width)
    if pred is not None:
        pred = filter_detections({k: pred[k].cpu() for k in ("boxes", "scores", "labels")}, score_threshold)
        if len(pred["boxes"]):
            names = [f"{class_names[int(l) - 1] if len(class_names) > 1 else ''}{s:.2f}"
                     for l, s in zip(pred["labels"], pred["scores"], strict=True)]
            canvas = draw_bounding_boxes(canvas, pred["boxes"].float(), labels=names, colors="red", width=width)
    return canvas


class LicensePlateModule(BaseTaskModule):
    """A torchvision detector, `net` (model.net, with its own `_target_`: common/network_config.py),
    built with the number of classes that `class_names` gives."""

    def __init__(
        self,
        class_names: Sequence[str] = ("plate",),
        net: Mapping[str, Any] | None = None,
        score_threshold: float = 0.25,
        pretrained: str | None = None,
        freeze_frozen_bn: bool = True,
        val_loss: bool = True,
        compile: CompileSetting = "auto",
        gradient_checkpointing: bool = False,
        vis_every_n_epochs: int = 1,
        vis_num_images: int = 8,
        optimizer=None,
        scheduler=None,
        **flat_net: Any,
    ) -> None:
        # Plain lists/dicts (not OmegaConf's), so checkpoints load with torch.load(weights_only=True).
        class_names = to_plain(class_names)
        net = network_config(net, flat_net, NET_TARGET, NET_SETTINGS, type(self).__name__)
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *flat_net])
        if not 0 <= score_threshold <= 1:
            raise ValueError(f"model.score_threshold={score_threshold} must be in [0, 1]")
        self.class_names = list(class_names)
        self.score_threshold = float(score_threshold)
        self.detector = build_network(net, num_classes=len(self.class_names))
        self.pretrained_report = load_pretrained(self.detector, pretrained) if pretrained else None
        self._float_box_outputs()
        if gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self._backbone_compiled = False

    convolutional = "the detector"

    def compile_plan(self) -> CompilePlan:
        # model.compile=true compiles only the backbone, with dynamic shapes (_compile_backbone)
        return CompilePlan(False, "detection: per-image sizes and data-dependent proposal counts (NMS, box "
                                  "sampling) recompile and break graphs, so it stays eager", dynamic=True)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        note = deterministic_roi_align_note(self.device.type, torch.are_deterministic_algorithms_enabled())
        if note:
            log.warning(note)

    def _compile_backbone(self) -> None:
        """When compile is on: the backbone in place (nn.Module.compile), at first use. Parameter names stay
        the same, so checkpoints load uncompiled."""
        if not self._backbone_compiled and self.compile_decision.on:
            self.detector.backbone.compile(**self.compile_decision.kwargs())
        self._backbone_compiled = True

    # ---- network -----------------------------------------------------------------------------
    def _float_box_outputs(self) -> None:
        """Under bf16/fp16 autocast, box deltas in half precision would be decoded against anchors cast
        down to it: bf16 has 8 mantissa bits, so a 600 px coordinate moves in steps of 4 px, which
        costs mAP at strict IoU. The heads still compute in low precision; their outputs go float32."""
        def to_float(value):
            if torch.is_tensor(value):
                return value.float()
            if isinstance(value, (list, tuple)):
                return type(value)(to_float(v) for v in value)
            if isinstance(value, dict):
                return {k: to_float(v) for k, v in value.items()}
            return value

        det = self.detector
        heads = [det.rpn.head, det.roi_heads.box_predictor] if hasattr(det, "roi_heads") else [det.head.regression_head]
        for head in heads:
            head.register_forward_hook(lambda module, args, output: to_float(output))

    def _enable_gradient_checkpointing(self) -> None:
        """Recompute each backbone stage in the backward pass instead of storing its activations."""
        for stage in self.detector.backbone.body.children():
            original = stage.forward

            def forward(*args, _original=original, **kwargs):
                if torch.is_grad_enabled() and self.training:
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            stage.forward = forward

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_frozen_bn:
            # BatchNorm inside frozen backbone stages keeps its (pretrained) statistics.
            for module in self.detector.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (boxes xyxy in input pixels, scores, 1-based labels) above eval_score_threshold."""
        self._compile_backbone()
        return self.detector(images)

    @staticmethod
    def _targets(targets: list[dict]) -> list[dict[str, torch.Tensor]]:
        return [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]

    def _losses(self, images, targets) -> dict[str, torch.Tensor]:
        self._compile_backbone()
        return self.detector(images, self._targets(targets))

    # ---- steps -------------------------------------------------------------------------------
    throughput_unit = "images"

    def batch_size_of(self, batch) -> int:
        return len(batch[0])  # (list of images, list of targets)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self._losses(images, targets)
        loss = sum(losses.values())
        self.log_train_step({"train/loss": loss, **{f"train/{name}": v for name, v in losses.items()}},
                            batch_size=len(images))
        return loss

    def _val_loss(self, images, targets) -> torch.Tensor:
        """torchvision detectors give losses only in train mode: run it so, BatchNorm kept in eval."""
        self.detector.train()
        for module in self.detector.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        try:
            return sum(self._losses(images, targets).values())
        finally:
            self.detector.eval()

    def _eval_step(self, batch, batch_idx, stage: str) -> dict[str, Any]:
        images, targets = batch
        if self.hparams.val_loss:
            self.log(f"{stage}/loss", self._val_loss(images, targets), prog_bar=stage == "val",
                     batch_size=len(images), sync_dist=True)
        preds = self(images)
        if stage == "val" and batch_idx == 0:
            self._visualise(images, preds, targets)
        return {"preds": preds, "targets": self._targets(targets)}

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images, targets = batch
        out = []
        for pred, target in zip(self(images), targets, strict=True):
            pred = filter_detections(pred, self.score_threshold)
            sx, sy = (float(v) for v in target["scale"])
            boxes = pred["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
            out.append({"path": target["path"], "boxes": boxes, "scores": pred["scores"].float().cpu(),
                        "labels": pred["labels"].cpu()})
        return out

    # ---- outputs -----------------------------------------------------------------------------
    def _visualise(self, images, preds, targets) -> None:
        trainer = self.attached_trainer
        every = int(self.hparams.vis_every_n_epochs or 0)
        if trainer is None or every <= 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self.current_epoch % every and self.current_epoch != trainer.max_epochs - 1:
            return
        import torch.nn.functional as F
        from torchvision.utils import make_grid

        from common.pictures import save_image

        n = min(len(images), int(self.hparams.vis_num_images))
        pictures = [draw_detections(images[i], preds[i], targets[i], self.score_threshold, self.class_names)
                    for i in range(n)]
        h = max(p.shape[1] for p in pictures)
        w = max(p.shape[2] for p in pictures)
        pictures = [F.pad(p, (0, w - p.shape[2], 0, h - p.shape[1])) for p in pictures]
        grid = make_grid(torch.stack(pictures), nrow=min(4, n), padding=4, pad_value=255)
        save_image(trainer, f"val_detections_epoch{self.current_epoch:03d}", grid.permute(1, 2, 0).numpy(),
                   caption=f"green: ground truth, red: detections with score >= {self.score_threshold}")

    def save_predictions(self, predictions, output_dir) -> Path:
        """predictions.json (boxes in original pixels, xyxy) and annotated copies under predictions/."""
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        output_dir = Path(output_dir)
        pictures = output_dir / "predictions"
        pictures.mkdir(parents=True, exist_ok=True)
        records = []
        for batch in predictions:
            for p in batch:
                records.append({
                    "image": p["path"],
                    "detections": [{"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                                    "label": self.class_names[int(l) - 1]}
                                   for b, s, l in zip(p["boxes"], p["scores"], p["labels"], strict=True)],
                })
                with Image.open(p["path"]) as im:
                    canvas = draw_detections(pil_to_tensor(im.convert("RGB")), p, None, self.score_threshold,
                                             self.class_names)
                Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(pictures / f"{Path(p['path']).stem}.png")
        out = output_dir / "predictions.json"
        nms = network_setting(self.hparams.net, "nms_threshold")
        result = {"score_threshold": self.score_threshold, "nms_threshold": nms, "images": records}
        out.write_text(json.dumps(result, indent=1))
        log.info("Wrote %d images' detections to %s and annotated copies to %s", len(records), out, pictures)
        return out
