"""Detection metrics for validation and test: COCO mAP (torchmetrics, faster_coco_eval backend)
and the CCPD metric (share of images whose top-scoring box has IoU > 0.7 with a plate).

The module's validation_step/test_step return {"preds": [...], "targets": [...]} in torchvision
format (xyxy boxes, scores, labels). Logged per stage (`val/` or `test/`):
    map (mAP@0.5:0.95, the monitored one), map_50, map_75, recall (mAR@100 over IoU 0.5:0.95),
    recall_50 (share of ground-truth boxes matched at IoU 0.5 by a detection above the confidence
    threshold) and top_iou_acc (CCPD).
"""
from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

# faster_coco_eval prints its whole COCO table at INFO on every evaluation; our metrics are logged instead.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


class TopBoxIoU(Metric):
    """CCPD-style: an image is right when its highest-scoring box overlaps a ground-truth box with
    IoU above `iou_threshold`. Images without ground truth are not counted."""

    full_state_update = False

    def __init__(self, iou_threshold: float = 0.7) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        self.add_state("hits", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        for pred, target in zip(preds, targets, strict=True):
            if len(target["boxes"]) == 0:
                continue
            self.total += 1
            if len(pred["boxes"]):
                top = pred["boxes"][pred["scores"].argmax()][None].float()
                self.hits += (box_iou(top, target["boxes"].float()).max() > self.iou_threshold).float()

    def compute(self) -> torch.Tensor:
        return self.hits / self.total.clamp(min=1)


class ThresholdedRecall(Metric):
    """Share of ground-truth boxes matched (IoU >= iou_threshold, one detection each, best score
    first) by detections at or above the confidence threshold: what a user of the cut sees."""

    full_state_update = False

    def __init__(self, score_threshold: float = 0.25, iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.add_state("matched", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        for pred, target in zip(preds, targets, strict=True):
            gt = target["boxes"].float()
            self.total += len(gt)
            keep = pred["scores"] >= self.score_threshold
            boxes = pred["boxes"][keep][pred["scores"][keep].argsort(descending=True)].float()
            if len(gt) == 0 or len(boxes) == 0:
                continue
            iou = box_iou(boxes, gt)
            free = torch.ones(len(gt), dtype=torch.bool, device=gt.device)
            for row in iou:
                row = torch.where(free, row, torch.full_like(row, -1.0))
                best = row.argmax()
                if row[best] >= self.iou_threshold:
                    free[best] = False
            self.matched += (~free).sum()

    def compute(self) -> torch.Tensor:
        return self.matched / self.total.clamp(min=1)


class DetectionMAP(Callback):
    def __init__(self, score_threshold: float = 0.25, ccpd_iou: float = 0.7, class_metrics: bool = False,
                 backend: str = "faster_coco_eval") -> None:
        super().__init__()
        self.score_threshold, self.ccpd_iou = score_threshold, ccpd_iou
        self.class_metrics, self.backend = class_metrics, backend
        self.metrics: dict[str, dict[str, Metric]] = {}

    def _fresh(self, stage: str, device) -> None:
        self.metrics[stage] = {
            "map": MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=self.backend,
                                        class_metrics=self.class_metrics),
            "top_iou": TopBoxIoU(self.ccpd_iou),
            "recall_50": ThresholdedRecall(self.score_threshold, 0.5),
        }
        for metric in self.metrics[stage].values():
            metric.to(device)

    def _update(self, stage: str, outputs) -> None:
        if not isinstance(outputs, dict) or "preds" not in outputs:
            raise TypeError("DetectionMAP needs validation_step/test_step to return {'preds': [...], 'targets': [...]}")
        preds = [{k: p[k].detach().float() if k != "labels" else p[k].detach() for k in ("boxes", "scores", "labels")}
                 for p in outputs["preds"]]
        targets = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in outputs["targets"]]
        for metric in self.metrics[stage].values():
            metric.update(preds, targets)

    def _log(self, stage: str, pl_module) -> None:
        metrics = self.metrics.pop(stage, None)
        if metrics is None:
            return
        result = metrics["map"].compute()
        values = {
            "map": result["map"], "map_50": result["map_50"], "map_75": result["map_75"],
            "recall": result["mar_100"], "recall_50": metrics["recall_50"].compute(),
            "top_iou_acc": metrics["top_iou"].compute(),
        }
        for name, value in values.items():
            # COCO eval gives -1 when there is no ground truth at all; report 0 so "max" stays meaningful.
            value = torch.as_tensor(value, dtype=torch.float32, device=pl_module.device)
            pl_module.log(f"{stage}/{name}", value.clamp(min=0.0), prog_bar=name in ("map", "map_50"))
        if self.class_metrics and "map_per_class" in result:
            for cls, value in zip(result["classes"].reshape(-1), result["map_per_class"].reshape(-1), strict=True):
                pl_module.log(f"{stage}/map_class{int(cls)}", float(value))

    # validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._fresh("val", pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log("val", pl_module)

    # test
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._fresh("test", pl_module.device)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", pl_module)
