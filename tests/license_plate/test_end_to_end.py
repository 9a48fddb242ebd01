"""Through the shared machinery: run.py's `run` with the task's real configs, tiny sizes."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import open_dict

from suite.train import run
from tests.license_plate.helpers import SMALL, write_image

FAST = SMALL + ["+model.net.detector_kwargs.rpn_post_nms_top_n_train=100",
                "+model.net.detector_kwargs.box_batch_size_per_image=32"]


def test_fast_dev_run_trains_validates_tests_and_draws(make_config):
    cfg = make_config("model=license_plate", "debug=fast_dev_run", *FAST)
    run(cfg)
    out = Path(cfg.paths.output_dir)
    assert list((out / "plots").glob("val_detections_epoch*.png"))
    assert list((Path(cfg.paths.data_dir) / "license_plate").glob("plates-*/data.yaml"))


def test_limit_run_keeps_best_by_map_then_predicts_a_folder(make_config, tmp_path):
    cfg = make_config("model=license_plate", "debug=limit", "trainer.limit_train_batches=2",
                      "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", *FAST)
    run(cfg)
    ckpts = Path(cfg.paths.ckpt_dir)
    best = sorted(ckpts.glob("best-*.ckpt"))
    assert best and (ckpts / "last.ckpt").is_file()
    metrics = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in ("val/map", "val/map_50", "val/recall", "val/top_iou_acc", "train/loss", "val/loss", "test/map"):
        assert name in metrics, name

    folder = tmp_path / "to_predict"
    write_image(folder / "one.jpg", (120, 90))
    write_image(folder / "two.png", (100, 80))
    pcfg = make_config("model=license_plate", "debug=fast_dev_run", "mode=predict", f"ckpt_path={best[0]}",
                       f"data.predict_dir={folder}", *FAST)
    with open_dict(pcfg):
        pcfg.model.score_threshold = 0.0     # an untrained model: keep every box so the file has some
        pcfg.paths.output_dir = str(tmp_path / "predict")
    run(pcfg)
    result = json.loads((Path(pcfg.paths.output_dir) / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in result["images"]] == ["one.jpg", "two.png"]
    assert (Path(pcfg.paths.output_dir) / "predictions" / "one.png").is_file()
    for r in result["images"]:
        for d in r["detections"]:
            x1, y1, x2, y2 = d["box_xyxy"]
            assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 90 and d["label"] == "plate"
