"""mAP callback: 1 on perfect predictions, lower on shifted ones; CCPD and thresholded recall by hand."""
from __future__ import annotations

import torch

from callbacks.detection_map import DetectionMAP, ThresholdedRecall, TopBoxIoU


class FakeModule:
    device = torch.device("cpu")

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = float(value)


def _targets():
    return [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 20.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[30.0, 40.0, 90.0, 55.0], [5.0, 5.0, 25.0, 12.0]]), "labels": torch.tensor([1, 1])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]


def _run(preds, targets, stage="val"):
    callback, module = DetectionMAP(score_threshold=0.25), FakeModule()
    hook = "validation" if stage == "val" else stage
    getattr(callback, f"on_{hook}_epoch_start")(None, module)
    getattr(callback, f"on_{hook}_batch_end")(None, module, {"preds": preds, "targets": targets}, None, 0)
    getattr(callback, f"on_{hook}_epoch_end")(None, module)
    return module.logged


def _as_preds(targets, shift=0.0, score=0.9):
    return [{"boxes": t["boxes"] + shift, "scores": torch.full((len(t["boxes"]),), score), "labels": t["labels"]}
            for t in targets]


def test_perfect_predictions_score_one():
    logged = _run(_as_preds(_targets()), _targets())
    for name in ("val/map", "val/map_50", "val/recall", "val/recall_50", "val/top_iou_acc"):
        assert abs(logged[name] - 1.0) < 1e-6, name


def test_shifted_predictions_score_lower_and_test_stage_is_prefixed():
    perfect = _run(_as_preds(_targets()), _targets(), "test")["test/map"]
    shifted = _run(_as_preds(_targets(), shift=3.0), _targets(), "test")
    assert shifted["test/map"] < perfect
    assert shifted["test/map"] < _run(_as_preds(_targets(), shift=1.0), _targets(), "test")["test/map"]


def test_top_box_iou_by_hand():
    metric = TopBoxIoU(0.7)
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}] * 2
    # image 1: top box (0.9) IoU 0.81 with gt -> hit; image 2: top box is elsewhere (IoU 0) -> miss
    preds = [{"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0], [50.0, 50.0, 60.0, 60.0]]), "scores": torch.tensor([0.9, 0.2]),
              "labels": torch.tensor([1, 1])},
             {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]), "scores": torch.tensor([0.3, 0.8]),
              "labels": torch.tensor([1, 1])}]
    metric.update(preds, gt)
    assert metric.compute().item() == 0.5


def test_thresholded_recall_ignores_low_scores():
    metric = ThresholdedRecall(score_threshold=0.25, iou_threshold=0.5)
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]]), "labels": torch.tensor([1, 1])}]
    preds = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]]), "scores": torch.tensor([0.9, 0.1]),
              "labels": torch.tensor([1, 1])}]
    metric.update(preds, gt)
    assert metric.compute().item() == 0.5
