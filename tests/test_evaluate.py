"""Tests of minicenternet.evaluate and the class-agnostic diagnostic of Detector."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from minicenternet.data.coco import CocoDetection
from minicenternet.evaluate import coco_detections, coco_eval, evaluate, format_per_class, format_table
from minicenternet.predict import Detector


@pytest.fixture
def one_box(tmp_path) -> CocoDetection:
    """One 64x64 image with a single object of category 7 at xyxy (16, 16, 48, 40); categories 3 and 7."""
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64, 3), np.uint8))
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [16, 16, 32, 24], "area": 768, "iscrowd": 0}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return CocoDetection(tmp_path / "ann.json", tmp_path)


def _prediction(label: int) -> dict:
    return {"boxes": torch.tensor([[16.0, 16.0, 48.0, 40.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([label])}


def test_size_ranges_without_objects_are_missing_not_zero(one_box):
    """The only object is 32x24 (area 768 < 32^2: COCO "small"): APm and APl have no ground truth,
    and COCOeval's -1 for them comes back as nan, with or without detections."""
    right = coco_detections(one_box, 0, _prediction(1))
    for detections, ap in ((right, 1.0), ([], 0.0)):
        metrics = coco_eval(one_box, detections)
        assert metrics["AP"] == pytest.approx(ap) and metrics["APs"] == pytest.approx(ap)
        assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])
    assert format_table(coco_eval(one_box, right)).splitlines()[1].split() == ["1.000"] * 4 + ["-", "-"]


def test_right_box_wrong_class_counts_only_class_agnostically(one_box):
    wrong = coco_detections(one_box, 0, _prediction(0))  # label 0 is category 3
    assert wrong[0]["category_id"] == 3
    assert coco_eval(one_box, wrong)["AP"] == 0.0
    assert coco_eval(one_box, wrong, class_agnostic=True)["AP"] == pytest.approx(1.0)
    right = coco_detections(one_box, 0, _prediction(1))
    assert coco_eval(one_box, right)["AP"] == pytest.approx(1.0)


class _TwoClassPeak(nn.Module):
    """Heads for a 64x64 input (16x16 output): both classes peak at output pixel (8, 7), class 1
    higher (logit 2 vs 1), with size (8, 6) and no offset: the box (16, 16, 48, 40) in pixels of a
    64x64 image evaluated at 64x64."""

    def forward(self, x):
        hm = torch.full((x.shape[0], 2, 16, 16), -10.0)
        hm[:, 0, 7, 8], hm[:, 1, 7, 8] = 1.0, 2.0
        wh = torch.zeros(x.shape[0], 2, 16, 16)
        wh[:, 0], wh[:, 1] = 8.0, 6.0
        return {"hm": hm, "wh": wh, "reg": torch.zeros(x.shape[0], 2, 16, 16)}


def test_class_agnostic_detector_merges_the_class_heatmaps(one_box):
    image = np.zeros((64, 64, 3), np.uint8)
    per_class = Detector(_TwoClassPeak(), input_size=64, device="cpu", score_threshold=0.5)(image)[0]
    merged = Detector(_TwoClassPeak(), input_size=64, device="cpu", score_threshold=0.5, class_agnostic=True)(image)[0]
    # per class: the same box twice (sigmoid 2 = 0.881 as class 1, sigmoid 1 = 0.731 as class 0)
    assert per_class["labels"].tolist() == [1, 0]
    torch.testing.assert_close(per_class["scores"], torch.sigmoid(torch.tensor([2.0, 1.0])))
    # merged: once, with the higher score, label 0
    assert merged["labels"].tolist() == [0]
    torch.testing.assert_close(merged["scores"], torch.sigmoid(torch.tensor([2.0])))
    torch.testing.assert_close(merged["boxes"], torch.tensor([[16.0, 16.0, 48.0, 40.0]]))
    # the box is right, class 1 (category 7) is right: AP 1 both ways; the duplicate as category 3
    # is a false positive of a category without ground truth, which COCO does not score
    assert evaluate(Detector(_TwoClassPeak(), input_size=64, device="cpu"), one_box, progress=False)["AP"] == pytest.approx(1.0)
    agnostic = Detector(_TwoClassPeak(), input_size=64, device="cpu", class_agnostic=True)
    assert evaluate(agnostic, one_box, progress=False)["AP"] == pytest.approx(1.0)


def test_reference_results_are_rounded_to_two_decimals(one_box):
    dataset = one_box
    prediction = {"boxes": torch.tensor([[1.234, 2.345, 11.111, 22.226]]), "scores": torch.tensor([0.4567]),
                  "labels": torch.tensor([0])}
    full = coco_detections(dataset, 0, prediction)[0]
    rounded = coco_detections(dataset, 0, prediction, decimals=2)[0]
    assert full["score"] == pytest.approx(0.4567) and full["bbox"][0] == pytest.approx(1.234)
    assert rounded["score"] == 0.46 and rounded["bbox"] == [1.23, 2.35, 9.88, 19.88]


def test_per_class_ap_by_hand(tmp_path):
    """Two classes, one object each; a perfect box for class a and a box with IoU 2/3 for class b:
    AP/a = 1, AP/b = the share of the ten IoU thresholds 0.50..0.95 it passes (0.50 to 0.65:
    4 of 10, 0.4); COCO's AP is their mean; a class with no object is nan."""
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((100, 100, 3), np.uint8))
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    dataset = CocoDetection(tmp_path / "ann.json", tmp_path)
    # class b: the box shifted by 8 along x: intersection 32 x 40, union 48 x 40, IoU 2/3
    prediction = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [58.0, 50.0, 98.0, 90.0]]),
                  "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    metrics = coco_eval(dataset, coco_detections(dataset, 0, prediction), per_class=True)
    assert metrics["AP/a"] == pytest.approx(1.0) and metrics["AP/b"] == pytest.approx(0.4)
    assert math.isnan(metrics["AP/c"])
    assert metrics["AP"] == pytest.approx((metrics["AP/a"] + metrics["AP/b"]) / 2)
    assert format_per_class(metrics).splitlines() == ["a 1.000", "b 0.400", "c -"]
    assert "AP/a" not in coco_eval(dataset, coco_detections(dataset, 0, prediction))
