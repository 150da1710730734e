"""Tests of minicenternet.data.voc (Pascal VOC XML to the COCO layout) and ``minicenternet data voc``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from minicenternet.cli import main
from minicenternet.data import voc
from minicenternet.data.coco import CocoDetection
from minicenternet.data.voc import voc_to_coco

# image id -> (width, height, [(name, xmin, ymin, xmax, ymax, difficult)]), VOC's 1-based inclusive pixels
IMAGES = {
    "000005": (24, 16, [("dog", 3, 4, 10, 12, 0), ("person", 1, 1, 24, 16, 1)]),
    "000007": (20, 20, [("dog", 5, 5, 5, 5, 0)]),  # a single pixel
    "000009": (16, 12, [("cat", 2, 3, 9, 8, 0)]),
}
SPLITS = {"train": "000007\n000005\n", "val": "000009\n"}


def _xml(image_id: str, width: int, height: int, objects: list[tuple]) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, x1, y1, x2, y2, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


@pytest.fixture
def devkit(tmp_path) -> Path:
    """``VOCdevkit/VOC2007`` with three images: train 000005 and 000007, val 000009."""
    year = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / folder).mkdir(parents=True)
    for image_id, (width, height, objects) in IMAGES.items():
        (year / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, width, height, objects))
        assert cv2.imwrite(str(year / "JPEGImages" / f"{image_id}.jpg"), np.full((height, width, 3), 90, np.uint8))
    for split, text in SPLITS.items():
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text(text)
    (year / "ImageSets" / "Main" / "dog_train.txt").write_text("000005  1\n000007  1\n")  # a class list, not a split
    return tmp_path / "VOCdevkit"


@pytest.mark.parametrize("level", ["VOCdevkit", "VOC2007"])
def test_converted_boxes_labels_and_crowds(devkit, tmp_path, level):
    """Box [xmin - 1, ymin - 1, xmax, ymax] in xyxy: dog (3, 4, 10, 12) -> [2, 3, 10, 12], the
    difficult person over the whole 24x16 image -> [0, 0, 24, 16] with iscrowd 1, the
    one-pixel dog (5, 5, 5, 5) -> [4, 4, 5, 5], cat (2, 3, 9, 8) -> [1, 2, 9, 8]. Classes from
    both splits, sorted: cat 1, dog 2, person 3 (labels 0, 1, 2) in train too, which has no cat."""
    out = tmp_path / "coco"
    written = voc_to_coco(devkit if level == "VOCdevkit" else devkit / "VOC2007", out)
    assert written == {"train": out / "annotations" / "instances_train.json", "val": out / "annotations" / "instances_val.json"}
    train, val = CocoDetection.from_root(out, "train"), CocoDetection.from_root(out, "val")
    assert train.class_names == val.class_names == ["cat", "dog", "person"]
    assert train.cat_ids == [1, 2, 3]
    assert [train.image_path(i).name for i in range(2)] == ["000005.jpg", "000007.jpg"]  # sorted ids
    first, second = train[0], train[1]
    np.testing.assert_array_equal(first.boxes, [[2, 3, 10, 12], [0, 0, 24, 16]])
    assert first.labels.tolist() == [1, 2]
    assert first.image.shape == (16, 24, 3)
    np.testing.assert_array_equal(second.boxes, [[4, 4, 5, 5]])
    assert [a["iscrowd"] for a in train.coco.loadAnns(train.coco.getAnnIds(imgIds=[1]))] == [0, 1]
    assert train.coco.anns[1]["bbox"] == [2, 3, 8, 9] and train.coco.anns[1]["area"] == 72
    np.testing.assert_array_equal(val.boxes(0)[0], [[1, 2, 9, 8]])
    assert val.boxes(0)[1].tolist() == [0]
    assert (out / "train" / "000005.jpg").is_symlink()
    assert (out / "train" / "000005.jpg").resolve() == (devkit / "VOC2007" / "JPEGImages" / "000005.jpg").resolve()
    assert not (out / "train" / "000009.jpg").exists()
    assert CocoDetection.from_root(out, "train", skip_crowd=True).boxes(0)[0].tolist() == [[2, 3, 10, 12]]


def test_copies_where_links_fail_and_reconverts_in_place(devkit, tmp_path, monkeypatch):
    out = tmp_path / "coco"
    voc_to_coco(devkit, out, ["val"])
    assert (out / "val" / "000009.jpg").is_symlink()

    def refuse(*args, **kwargs):
        raise OSError("links not supported here")

    monkeypatch.setattr(voc.os, "symlink", refuse)
    voc_to_coco(devkit, out, ["val"])
    copied = out / "val" / "000009.jpg"
    assert not copied.is_symlink()
    assert copied.read_bytes() == (devkit / "VOC2007" / "JPEGImages" / "000009.jpg").read_bytes()
    assert CocoDetection.from_root(out, "val")[0].image.shape == (12, 16, 3)


def test_malformed_xml_names_the_file(devkit, tmp_path):
    xml = devkit / "VOC2007" / "Annotations" / "000007.xml"
    xml.write_text(xml.read_text()[:-5])
    with pytest.raises(ValueError, match=r"000007\.xml: malformed XML"):
        voc_to_coco(devkit, tmp_path / "coco")


def test_object_without_a_number_names_the_file(devkit, tmp_path):
    xml = devkit / "VOC2007" / "Annotations" / "000009.xml"
    xml.write_text(xml.read_text().replace("<ymax>8</ymax>", "<ymax></ymax>"))
    with pytest.raises(ValueError, match=r"000009\.xml: object 0 has no number <ymax>"):
        voc_to_coco(devkit, tmp_path / "coco")


def test_missing_image_names_it(devkit, tmp_path):
    (devkit / "VOC2007" / "JPEGImages" / "000005.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/000005\.jpg: image of .*000005\.xml not found"):
        voc_to_coco(devkit, tmp_path / "coco")


def test_empty_and_missing_split_lists_name_the_file(devkit, tmp_path):
    (devkit / "VOC2007" / "ImageSets" / "Main" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"Main/val\.txt: the split list names no images"):
        voc_to_coco(devkit, tmp_path / "coco")
    with pytest.raises(FileNotFoundError, match=r"Main/test\.txt: split list not found; splits there: \['train', 'val'\]"):
        voc_to_coco(devkit, tmp_path / "coco", ["train", "test"])
    with pytest.raises(ValueError, match="no splits"):
        voc_to_coco(devkit, tmp_path / "coco", [])


def test_devkit_with_two_years_asks_for_one(devkit, tmp_path):
    (devkit / "VOC2012" / "Annotations").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"VOCdevkit: holds VOC2007, VOC2012; pass one of them"):
        voc_to_coco(devkit, tmp_path / "coco")
    with pytest.raises(FileNotFoundError, match="neither a VOC year folder"):
        voc_to_coco(tmp_path / "coco_missing", tmp_path / "coco")


def test_data_voc_command(devkit, tmp_path):
    out = tmp_path / "coco"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["data", "voc", "--voc-root", str(devkit / "VOC2007"), "--out", str(out), "--splits", "val"])
    assert f"val: {out / 'annotations' / 'instances_val.json'}" in buffer.getvalue()
    assert not (out / "annotations" / "instances_train.json").exists()
    content = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert content["categories"] == [{"id": 1, "name": "cat"}]  # only the converted split's classes
    assert content["annotations"][0]["bbox"] == [1, 2, 8, 6]
    with contextlib.redirect_stdout(io.StringIO()):
        main(["data", "voc", "--voc-root", str(devkit), "--out", str(out)])  # default: train and val
    assert len(CocoDetection.from_root(out, "train")) == 2
