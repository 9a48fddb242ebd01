"""The torchvision detector for plates: architecture, plate-shaped anchors, local pretrained weights.

Nothing is downloaded: every network is built with `weights=None`; `load_pretrained` reads a
local file (a torchvision state dict of the whole detector or of its backbone) and reports which
keys loaded. The suite's own checkpoints are started from with `init_from=`, as for every task.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

log = logging.getLogger(__name__)

ARCHS = ("fasterrcnn", "retinanet", "fcos")
MAX_TRAINABLE = {"mobilenet": 6, "resnet": 5}


def build_backbone(name: str, arch: str, trainable_layers: int | None) -> nn.Module:
    family = "mobilenet" if name.startswith("mobilenet") else "resnet" if name.startswith("resnet") else None
    if family is None:
        raise ValueError(f"model.net.backbone={name!r}: use a torchvision mobilenet_v3_* or resnet* name")
    layers = MAX_TRAINABLE[family] if trainable_layers is None else int(trainable_layers)
    if not 0 <= layers <= MAX_TRAINABLE[family]:
        raise ValueError(f"model.net.trainable_backbone_layers={layers} must be in 0..{MAX_TRAINABLE[family]} for {name}")
    # Plain BatchNorm (not frozen): with no ImageNet weights its statistics must be learned.
    if family == "mobilenet":
        extra = LastLevelP6P7(256, 256) if arch != "fasterrcnn" else None
        return mobilenet_backbone(backbone_name=name, weights=None, fpn=True, norm_layer=nn.BatchNorm2d,
                                  trainable_layers=layers, extra_blocks=extra)
    if arch == "fasterrcnn":
        return resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=layers)
    return resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=layers,
                               returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))


def count_feature_maps(backbone: nn.Module) -> int:
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        count = len(backbone(torch.zeros(1, 3, 64, 64)))
    backbone.train(was_training)
    return count


def build_anchor_generator(sizes: Sequence, aspect_ratios: Sequence, levels: int) -> AnchorGenerator:
    """sizes: one list for every feature level, or one list per level. aspect_ratios are height/width
    as in torchvision (0.25 = four times wider than tall), one list for all levels or one per level."""
    def per_level(value, what):
        value = [list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str) else v for v in value]
        if value and all(isinstance(v, list) for v in value):
            if len(value) != levels:
                raise ValueError(f"model.{what} has {len(value)} per-level lists but the backbone gives {levels} feature maps")
            return tuple(tuple(float(x) for x in v) for v in value)
        return (tuple(float(x) for x in value),) * levels

    size_levels = per_level(sizes, "anchor_sizes")
    ratio_levels = per_level(aspect_ratios, "anchor_aspect_ratios")
    counts = {len(s) * len(r) for s, r in zip(size_levels, ratio_levels, strict=True)}
    if len(counts) != 1:
        raise ValueError("Every feature level needs the same number of anchors (sizes x ratios); "
                         f"got {[len(s) * len(r) for s, r in zip(size_levels, ratio_levels, strict=True)]}")
    if min(min(s) for s in size_levels) <= 0 or min(min(r) for r in ratio_levels) <= 0:
        raise ValueError("model.net.anchor_sizes and model.net.anchor_aspect_ratios must be positive")
    return AnchorGenerator(tuple(tuple(int(round(x)) for x in s) for s in size_levels), ratio_levels)


def build_detector(
    arch: str = "fasterrcnn",
    backbone: str = "mobilenet_v3_large",
    num_classes: int = 1,
    anchor_sizes: Sequence = (16, 32, 64, 128, 256),
    anchor_aspect_ratios: Sequence = (0.2, 0.3, 0.5),
    min_size: int = 320,
    max_size: int = 640,
    nms_threshold: float = 0.5,
    eval_score_threshold: float = 0.001,
    detections_per_image: int = 100,
    trainable_backbone_layers: int | None = None,
    detector_kwargs: dict | None = None,
) -> nn.Module:
    """num_classes counts plate classes; the detector gets one more for background (Faster R-CNN)."""
    if arch not in ARCHS:
        raise ValueError(f"model.net.arch={arch!r} must be one of {ARCHS}")
    if not 0 <= nms_threshold <= 1:
        raise ValueError(f"model.net.nms_threshold={nms_threshold} must be in [0, 1]")
    body = build_backbone(backbone, arch, trainable_backbone_layers)
    levels = count_feature_maps(body)
    # detector_kwargs: any other argument of torchvision's FasterRCNN / RetinaNet / FCOS constructor
    common = dict(min_size=min_size, max_size=max_size, detections_per_img=detections_per_image, **dict(detector_kwargs or {}))
    if arch == "fasterrcnn":
        # What torchvision's fasterrcnn_mobilenet_v3_large_fpn builds, with plate-shaped anchors.
        common["box_detections_per_img"] = common.pop("detections_per_img")
        return FasterRCNN(body, num_classes=num_classes + 1,
                          rpn_anchor_generator=build_anchor_generator(anchor_sizes, anchor_aspect_ratios, levels),
                          rpn_score_thresh=0.05, box_score_thresh=eval_score_threshold, box_nms_thresh=nms_threshold,
                          **common)
    # RetinaNet / FCOS have no background class, but labels stay 1-based here: one spare class.
    if arch == "retinanet":
        anchors = build_anchor_generator(anchor_sizes, anchor_aspect_ratios, levels)
        return RetinaNet(body, num_classes=num_classes + 1, anchor_generator=anchors,
                         score_thresh=eval_score_threshold, nms_thresh=nms_threshold, **common)
    # FCOS is anchor-free: one square 'anchor' per location, only its stride matters.
    anchors = AnchorGenerator(tuple((8 * 2 ** i,) for i in range(levels)), ((1.0,),) * levels)
    return FCOS(body, num_classes=num_classes + 1, anchor_generator=anchors,
                score_thresh=eval_score_threshold, nms_thresh=nms_threshold, **common)


def get_thresholds(detector: nn.Module) -> tuple[float, float]:
    if isinstance(detector, FasterRCNN):
        return detector.roi_heads.nms_thresh, detector.roi_heads.score_thresh
    return detector.nms_thresh, detector.score_thresh


# ---- pretrained weights --------------------------------------------------------------------------
def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"model.pretrained={path} is not a readable PyTorch file: {err}") from None
    if isinstance(obj, dict) and ("run_config" in obj or "pytorch-lightning_version" in obj):
        # one of the suite's checkpoints: starting from it is what init_from does, for every task
        raise ValueError(f"model.pretrained={path} is a Lightning checkpoint: start from its weights with "
                         f"init_from={path}. model.pretrained reads torchvision weights (a whole detector or a backbone).")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]           # a bare {"state_dict": ...} file
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]                # torchvision reference-script checkpoints
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"model.pretrained={path} holds no state dict (a dict of tensors)")
    return {k.replace("_orig_mod.", ""): v for k, v in obj.items()}


def _candidates(source: dict[str, torch.Tensor]):
    """Ways to name the file's keys as this detector's: whole detector, or backbone only."""
    prefixes = ("detector.", "model.", "module.", "")
    for prefix in prefixes:
        yield f"strip '{prefix}'" if prefix else "as is", {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    for prefix in ("features.", "backbone.body.", "backbone.", "body.", ""):
        yield (f"backbone ('{prefix}' -> 'backbone.body.')",
               {"backbone.body." + k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)})


def load_pretrained(detector: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load what fits (same name and shape) and report loaded / shape-mismatched / missing / unused keys."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained={path} does not exist")
    source = _state_dict_from_file(path)
    target = detector.state_dict()
    best_name, best, best_hits = None, {}, -1
    for name, mapped in _candidates(source):
        hits = sum(1 for k, v in mapped.items() if k in target and target[k].shape == v.shape)
        if hits > best_hits:
            best_name, best, best_hits = name, mapped, hits
    if best_hits <= 0:
        raise ValueError(f"model.pretrained={path}: none of its {len(source)} tensors fits this detector "
                         f"(e.g. {list(source)[:3]}); is it for another architecture or backbone?")
    loaded = {k: v for k, v in best.items() if k in target and target[k].shape == v.shape}
    report = {
        "loaded": sorted(loaded),
        "shape_mismatch": sorted(k for k, v in best.items() if k in target and target[k].shape != v.shape),
        "missing": sorted(k for k in target if k not in loaded),
        "unused": sorted(k for k in best if k not in target),
    }
    detector.load_state_dict(loaded, strict=False)
    log.info("Pretrained %s (%s): loaded %d of %d detector tensors; %d shape-mismatched (%s), %d left as initialised "
             "(e.g. %s), %d unused from the file", path, best_name, len(loaded), len(target), len(report["shape_mismatch"]),
             ", ".join(report["shape_mismatch"][:4]), len(report["missing"]), ", ".join(report["missing"][:4]),
             len(report["unused"]))
    return report
