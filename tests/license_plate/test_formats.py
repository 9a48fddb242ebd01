"""Each annotation format read from a tiny fixture, box conversions, and every bad-input case."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from datamodules.license_plate.formats import AnnotationError, detect_format, read_dataset
from tests.license_plate.helpers import write_image


def boxes_of(splits, split="all"):
    return {s.image.name: s.boxes.tolist() for s in splits[split]}


def test_yolo_plain_folder_converts_normalised_centre_boxes(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", (40, 30))
    write_image(tmp_path / "images" / "b.jpg", (40, 30))   # no label file: a negative
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.2\n\n")
    splits = read_dataset(tmp_path, "auto", ["plate"])
    # cx=20, cy=15, w=20, h=6  ->  x1=10, y1=12, x2=30, y2=18
    assert boxes_of(splits) == {"a.jpg": [[10.0, 12.0, 30.0, 18.0]], "b.jpg": []}
    assert detect_format(tmp_path) == "yolo"


def test_yolo_data_yaml_splits(tmp_path):
    for split in ("train", "val"):
        write_image(tmp_path / "images" / split / f"{split}1.png", (100, 50))
        (tmp_path / "labels" / split).mkdir(parents=True)
        (tmp_path / "labels" / split / f"{split}1.txt").write_text("0 0.25 0.5 0.1 0.2\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [plate]\n")
    splits = read_dataset(tmp_path, "yolo", ["plate"])
    assert set(splits) == {"train", "val"}
    assert boxes_of(splits, "val") == {"val1.png": [[20.0, 20.0, 30.0, 30.0]]}


def test_coco_json(tmp_path):
    write_image(tmp_path / "images" / "c.jpg", (60, 40))
    write_image(tmp_path / "images" / "empty.jpg", (60, 40))
    spec = {"images": [{"id": 7, "file_name": "c.jpg", "width": 60, "height": 40},
                       {"id": 8, "file_name": "empty.jpg", "width": 60, "height": 40}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 6, 20, 8]}],
            "categories": [{"id": 1, "name": "plate"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(spec))
    splits = read_dataset(tmp_path, "auto", ["plate"])
    assert boxes_of(splits) == {"c.jpg": [[5.0, 6.0, 25.0, 14.0]], "empty.jpg": []}


def test_voc_xml(tmp_path):
    write_image(tmp_path / "JPEGImages" / "v.jpg", (80, 60))
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "v.xml").write_text(
        "<annotation><filename>v.jpg</filename><object><name>licence</name>"
        "<bndbox><xmin>10</xmin><ymin>20</ymin><xmax>50</xmax><ymax>30</ymax></bndbox></object></annotation>")
    splits = read_dataset(tmp_path, "auto", ["plate"])
    assert boxes_of(splits) == {"v.jpg": [[10.0, 20.0, 50.0, 30.0]]}
    assert splits["all"][0].labels.tolist() == [0]


def test_ccpd_box_from_file_name(tmp_path):
    name = "025-95_113-10&20_50&35-50&35_10&35_10&20_50&20-0_0_22_27_27_33_16-37-15.jpg"
    write_image(tmp_path / name, (80, 60))
    write_image(tmp_path / "0001.jpg", (80, 60))   # no box in the name: a negative
    splits = read_dataset(tmp_path, "ccpd", ["plate"])
    assert boxes_of(splits) == {name: [[10.0, 20.0, 50.0, 35.0]], "0001.jpg": []}
    assert detect_format(tmp_path) == "ccpd"


def test_openalpr_benchmark_lines(tmp_path):
    write_image(tmp_path / "eu1.jpg", (100, 80))
    (tmp_path / "eu1.txt").write_text("eu1.jpg\t10\t20\t30\t8\tAB123\n")
    splits = read_dataset(tmp_path, "auto", ["plate"])
    sample = splits["all"][0]
    assert sample.boxes.tolist() == [[10.0, 20.0, 40.0, 28.0]] and sample.texts == ["AB123"]


# ---- bad input ---------------------------------------------------------------------------------
def _yolo(tmp_path, line, size=(40, 30)):
    write_image(tmp_path / "images" / "a.jpg", size)
    (tmp_path / "labels").mkdir(exist_ok=True)
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n" + line + "\n")
    return tmp_path


def test_wrong_field_count_names_file_and_line(tmp_path):
    with pytest.raises(AnnotationError, match=r"a\.txt:2: expected 5 fields"):
        read_dataset(_yolo(tmp_path, "0 0.5 0.5 0.2"), "yolo", ["plate"])


def test_non_numeric_value_names_file_and_line(tmp_path):
    with pytest.raises(AnnotationError, match=r"a\.txt:2: cy must be a number, got 'abc'"):
        read_dataset(_yolo(tmp_path, "0 0.5 abc 0.2 0.2"), "yolo", ["plate"])


def test_openalpr_non_numeric(tmp_path):
    write_image(tmp_path / "x.jpg")
    (tmp_path / "x.txt").write_text("x.jpg\t1\ttwo\t3\t4\tT\n")
    with pytest.raises(AnnotationError, match=r"x\.txt:1: y must be a number"):
        read_dataset(tmp_path, "openalpr", ["plate"])


def test_box_partly_outside_is_clipped_with_warning(tmp_path, caplog):
    # cx=0.95 w=0.3 -> x from 32 to 44 px on a 40 px image
    with caplog.at_level(logging.WARNING):
        splits = read_dataset(_yolo(tmp_path, "0 0.95 0.5 0.3 0.2"), "yolo", ["plate"])
    assert splits["all"][0].boxes[1].tolist() == pytest.approx([32.0, 12.0, 40.0, 18.0])
    assert "clipped" in caplog.text and "a.txt:2" in caplog.text


def test_box_wholly_outside_is_an_error(tmp_path):
    write_image(tmp_path / "x.jpg", (40, 30))
    (tmp_path / "x.txt").write_text("x.jpg\t50\t5\t10\t5\tT\n")
    with pytest.raises(AnnotationError, match=r"x\.txt:1: .*wholly outside the 40x30 image"):
        read_dataset(tmp_path, "openalpr", ["plate"])


def test_empty_box_is_an_error(tmp_path):
    with pytest.raises(AnnotationError, match=r"a\.txt:2: empty box"):
        read_dataset(_yolo(tmp_path, "0 0.5 0.5 0.0 0.2"), "yolo", ["plate"])


def test_label_without_image_is_skipped_and_counted(tmp_path, caplog):
    _yolo(tmp_path, "")
    (tmp_path / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "ghost2.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with caplog.at_level(logging.WARNING):
        splits = read_dataset(tmp_path, "yolo", ["plate"])
    assert len(splits["all"]) == 1
    assert "skipped 2 label files without an image" in caplog.text


def test_unreadable_image_is_skipped_and_counted(tmp_path, caplog):
    _yolo(tmp_path, "")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        splits = read_dataset(tmp_path, "yolo", ["plate"])
    assert [s.image.name for s in splits["all"]] == ["a.jpg"]
    assert "skipped 1 unreadable images" in caplog.text


def test_truncated_image_is_a_clear_error_or_skipped_with_full_check(tmp_path, caplog):
    from datamodules.license_plate.datamodule import LicensePlateDataModule, load_image

    for i in range(4):
        write_image(tmp_path / f"ok{i}.jpg", (64, 48))
        (tmp_path / f"ok{i}.txt").write_text(f"ok{i}.jpg\t5\t5\t20\t8\tT\n")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    noise.save(tmp_path / "trunc.jpg")
    good = (tmp_path / "trunc.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) * 2 // 3])   # header intact, pixels cut
    with pytest.raises(ValueError, match=r"Cannot decode image .*trunc\.jpg"):
        load_image(tmp_path / "trunc.jpg")
    dm = LicensePlateDataModule({"batch_size": 2, "num_workers": 0}, data_dir=str(tmp_path),
                                split=[2, 1, 1], check_images="full")
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    names = {s.image.name for v in dm.splits.values() for s in v}
    assert "trunc.jpg" not in names and len(names) == 4
    assert "Skipped 1 undecodable images" in caplog.text


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dataset(tmp_path / "nowhere", "auto", ["plate"])


def test_unknown_layout_says_what_it_looked_for(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(AnnotationError, match="Cannot tell the annotation format"):
        read_dataset(tmp_path, "auto", ["plate"])


def test_a_label_file_that_is_not_utf8_is_named(tmp_path):
    root = _yolo(tmp_path, "0 0.5 0.5 0.2 0.2")
    label = next(root.rglob("*.txt"))
    label.write_bytes(b"0 0.5 0.5 0.2 0.2 \xff\xfe\n")
    with pytest.raises(AnnotationError, match=rf"{label.name}: not UTF-8 text \(byte 18"):
        read_dataset(root, "yolo", ["plate"])


def test_multi_class_ids_checked(tmp_path):
    with pytest.raises(AnnotationError, match=r"a\.txt:2: class id 5"):
        read_dataset(_yolo(tmp_path, "5 0.5 0.5 0.2 0.2"), "yolo", ["car", "plate"])


def test_sample_arrays_have_fixed_shapes(tmp_path):
    write_image(tmp_path / "images" / "n.jpg")
    splits = read_dataset(tmp_path / "", "yolo", ["plate"])
    s = splits["all"][0]
    assert s.boxes.shape == (0, 4) and s.boxes.dtype == np.float32 and s.labels.shape == (0,)
