"""The detector: plate anchors, thresholds from config, pretrained loading, predictions."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.license_plate import LicensePlateModule, filter_detections
from lightning_modules.license_plate.detector import build_anchor_generator, get_thresholds, load_pretrained

SMALL = dict(min_size=128, max_size=160, detector_kwargs={"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
                                                           "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
                                                           "box_batch_size_per_image": 32})


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return LicensePlateModule(**SMALL).eval()


def test_anchor_generator_shapes_are_wide():
    gen = build_anchor_generator([16, 32, 64], [0.25, 0.5], levels=3)
    assert gen.num_anchors_per_location() == [6, 6, 6]
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(1, 3, 64, 128), [(64, 128)])
    features = [torch.zeros(1, 8, 8, 16), torch.zeros(1, 8, 4, 8), torch.zeros(1, 8, 2, 4)]
    anchors = gen(images, features)[0]
    assert anchors.shape == (6 * (8 * 16 + 4 * 8 + 2 * 4), 4)
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    assert torch.all(widths > heights)                   # every anchor is wider than tall
    # size 32, ratio h/w 0.25: w = 32 / sqrt(0.25) = 64, h = 16
    assert any(torch.allclose(torch.stack([w, h]), torch.tensor([64.0, 16.0])) for w, h in zip(widths, heights, strict=True))


def test_anchor_generator_per_level_lists_and_errors():
    gen = build_anchor_generator([[16], [32], [64]], [0.3], levels=3)
    assert gen.sizes == ((16,), (32,), (64,))
    with pytest.raises(ValueError, match="3 feature maps"):
        build_anchor_generator([[16], [32]], [0.3], levels=3)


def test_default_model_is_faster_rcnn_mobilenet_with_config_thresholds(module):
    from torchvision.models.detection import FasterRCNN

    assert isinstance(module.detector, FasterRCNN)
    assert type(module.detector.backbone.body).__name__ == "IntermediateLayerGetter"
    assert get_thresholds(module.detector) == (0.5, 0.001)       # NMS from config; mAP sees every box
    assert module.detector.rpn.anchor_generator.num_anchors_per_location() == [15, 15, 15]
    other = LicensePlateModule(nms_threshold=0.3, score_threshold=0.6, **SMALL)
    assert get_thresholds(other.detector)[0] == 0.3 and other.score_threshold == 0.6


def test_confidence_threshold_applies_to_predictions(module, monkeypatch):
    fake = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 20.0], [0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.8, 0.2]),
             "labels": torch.tensor([1, 1])}]
    monkeypatch.setattr(module, "forward", lambda images: fake)
    target = {"scale": torch.tensor([2.0, 2.0]), "path": "x.jpg", "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}
    out = module.predict_step(([torch.zeros(3, 64, 64)], [target]), 0)
    assert out[0]["scores"].tolist() == [pytest.approx(0.8)]
    assert out[0]["boxes"].tolist() == [[5.0, 5.0, 25.0, 10.0]]     # back to original pixels (scale 2)
    assert len(filter_detections(fake[0], 0.1)["boxes"]) == 2


def test_training_step_returns_a_scalar_loss_with_negatives(module):
    module.train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 25.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]   # a negative image
    module.log = lambda *a, **k: None
    loss = module.training_step((images, targets), 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    module.eval()
    with torch.no_grad():
        preds = module(images)
    assert set(preds[0]) == {"boxes", "scores", "labels"}


def test_pretrained_whole_detector_and_backbone_only(tmp_path, module):
    torch.save(module.detector.state_dict(), tmp_path / "full.pt")
    fresh = LicensePlateModule(**SMALL)
    report = load_pretrained(fresh.detector, tmp_path / "full.pt")
    assert not report["missing"] and not report["shape_mismatch"]
    for k, v in module.detector.state_dict().items():
        assert torch.equal(v, fresh.detector.state_dict()[k]), k

    from torchvision.models import mobilenet_v3_large

    backbone = mobilenet_v3_large(weights=None)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    report = load_pretrained(fresh.detector, tmp_path / "backbone.pth")
    assert report["loaded"] and all(k.startswith("backbone.body.") for k in report["loaded"])
    assert any(k.startswith("roi_heads.") for k in report["missing"])
    assert torch.equal(fresh.detector.backbone.body["0"][0].weight, backbone.features[0][0].weight)


def test_pretrained_from_our_checkpoint_and_errors(tmp_path, module):
    torch.save({"state_dict": {f"detector.{k}": v for k, v in module.detector.state_dict().items()}}, tmp_path / "a.ckpt")
    fresh = LicensePlateModule(pretrained=str(tmp_path / "a.ckpt"), **SMALL)
    assert not fresh.pretrained_report["missing"]
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        LicensePlateModule(pretrained=str(tmp_path / "nope.pt"), **SMALL)
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="none of its 1 tensors fits"):
        load_pretrained(fresh.detector, tmp_path / "other.pt")


def test_freeze_backbone_stages():
    frozen = LicensePlateModule(trainable_backbone_layers=0, **SMALL)
    assert not any(p.requires_grad for p in frozen.detector.backbone.body.parameters())
    assert all(p.requires_grad for p in frozen.detector.backbone.fpn.parameters())
    frozen.train()
    bn = [m for m in frozen.detector.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_other_architectures_build_and_train(arch):
    model = LicensePlateModule(arch=arch, min_size=128, max_size=160).train()
    model.log = lambda *a, **k: None
    loss = model.training_step(([torch.rand(3, 96, 128)], [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 25.0]]),
                                                           "labels": torch.tensor([1])}]), 0)
    assert torch.isfinite(loss)


def test_boxes_stay_float32_under_bf16_autocast(module):
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds = module([torch.rand(3, 96, 128)])
    assert preds[0]["boxes"].dtype == torch.float32      # no 4-pixel bf16 steps in the coordinates


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = LicensePlateModule(**SMALL)
    ckpt = LicensePlateModule(gradient_checkpointing=True, **SMALL)
    ckpt.load_state_dict(plain.state_dict())
    batch = ([torch.rand(3, 96, 128)], [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 25.0]]), "labels": torch.tensor([1])}])
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.log = lambda *a, **k: None
        torch.manual_seed(1)                              # same proposal sampling
        model.training_step(batch, 0).backward()
        grads.append(model.detector.backbone.body["1"].block[0][0].weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_compile_keeps_parameter_names_so_checkpoints_load_uncompiled(module):
    compiled = LicensePlateModule(compile=True, **SMALL)     # compiles lazily: nothing runs here
    assert set(compiled.state_dict()) == set(module.state_dict())
    LicensePlateModule(**SMALL).load_state_dict(compiled.state_dict())


@pytest.mark.parametrize("nms, kept", [(0.5, 2), (0.7, 3)])
def test_nms_threshold_from_config_suppresses_overlaps(nms, kept):
    model = LicensePlateModule(nms_threshold=nms, **SMALL)
    # three proposals: A, B overlapping A with IoU 0.6, C far away; zero regression keeps them as they are
    proposals = [torch.tensor([[0.0, 0.0, 100.0, 20.0], [25.0, 0.0, 125.0, 20.0], [0.0, 50.0, 100.0, 70.0]])]
    logits = torch.tensor([[0.0, 4.0], [0.0, 3.0], [0.0, 2.0]])            # background, plate
    boxes, scores, labels = model.detector.roi_heads.postprocess_detections(
        logits, torch.zeros(3, 8), proposals, [(100, 200)])
    assert len(boxes[0]) == kept


def test_a_deterministic_run_on_cuda_is_told_why_its_first_step_is_slow():
    from lightning_modules.license_plate.module import deterministic_roi_align_note

    assert deterministic_roi_align_note("cpu", True) is None  # torchvision's CPU kernel is deterministic
    assert deterministic_roi_align_note("cuda", False) is None
    note = deterministic_roi_align_note("cuda", True)
    assert "roi_align" in note and "first step" in note and "deterministic=false" in note
