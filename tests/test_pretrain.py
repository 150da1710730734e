"""Tests of minicenternet.pretrain: object crops, trunk pre-training and its use by train()."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from minicenternet.checkpoint import load_checkpoint
from minicenternet.data.coco import CocoDetection
from minicenternet.models import build_model
from minicenternet.pretrain import object_crops, pretrain_trunk
from minicenternet.train import TrainConfig, train


def _one_square_dataset(root, box=(20, 12, 16, 16), size=64) -> CocoDetection:
    """A 64x64 black image with one white square (COCO xywh ``box``), category 7."""
    (root / "images").mkdir(parents=True)
    image = np.zeros((size, size, 3), np.uint8)
    x, y, w, h = box
    image[y : y + h, x : x + w] = 255
    cv2.imwrite(str(root / "images" / "a.png"), image)
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": size, "height": size}],
        "categories": [{"id": 3, "name": "other"}, {"id": 7, "name": "square"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": list(box), "area": w * h, "iscrowd": 0}],
    }
    (root / "ann.json").write_text(json.dumps(ann))
    return CocoDetection(root / "ann.json", root / "images")


def test_object_crops_frame_the_object(tmp_path):
    source = _one_square_dataset(tmp_path)
    # context 2: the 16-px square fills the middle half of a 32-px crop, with black around it
    crops, labels = object_crops(source, crop_size=32, context=(2.0, 2.0), shift=0.0)
    assert crops.shape == (1, 3, 32, 32) and crops.dtype == torch.uint8
    assert labels.tolist() == [1]  # contiguous index of category 7
    crop = crops[0, 0].float()
    assert crop[10:22, 10:22].min() == 255  # inside the square
    assert crop[:6].max() == 0 and crop[-6:].max() == 0 and crop[:, :6].max() == 0 and crop[:, -6:].max() == 0


def test_object_crops_skip_small_objects(tmp_path):
    source = _one_square_dataset(tmp_path, box=(5, 5, 8, 8))
    with pytest.raises(ValueError, match="no object of at least 12"):
        object_crops(source, min_size=12)
    crops, _ = object_crops(source, min_size=8)
    assert len(crops) == 1


def test_object_crops_count_and_labels_on_shapes(tiny_shapes):
    source = CocoDetection.from_root(tiny_shapes, "train")
    expected = []
    for index in range(len(source)):
        boxes, labels = source.boxes(index)
        sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        expected += labels[sides >= 6].tolist()
    crops, labels = object_crops(source, crop_size=24, min_size=6)
    assert labels.tolist() == expected
    assert crops.shape == (len(expected), 3, 24, 24)


def test_pretrain_trunk_writes_a_trunk_that_build_model_loads(tiny_shapes, tmp_path):
    source = CocoDetection.from_root(tiny_shapes, "train")
    path = pretrain_trunk(source, tmp_path / "trunk.pt", steps=2, batch_size=4, crop_size=32, amp=False, progress=False)
    state = load_checkpoint(path)
    assert state and not any(k.startswith("fc.") for k in state)
    model = build_model("resnet18", num_classes=5, dcn=False, pretrained=path)
    torch.testing.assert_close(model.trunk[0].weight, state["conv1.weight"])  # trunk[0] is conv1
    torch.testing.assert_close(model.trunk[7][1].conv2.weight, state["layer4.1.conv2.weight"])
    # two Adam steps moved the weights away from a fresh initialisation with the same seed
    torch.manual_seed(0)
    fresh = build_model("resnet18", num_classes=5, dcn=False)
    assert not torch.allclose(fresh.trunk[0].weight, state["conv1.weight"])


def test_pretrain_trunk_rejects_non_resnet(tiny_shapes, tmp_path):
    source = CocoDetection.from_root(tiny_shapes, "train")
    with pytest.raises(ValueError, match="ResNet trunk"):
        pretrain_trunk(source, tmp_path / "t.pt", arch="dla34", steps=1, progress=False)


def test_train_starts_from_the_pretrained_trunk(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(tiny_shapes), out=str(out), input_size=64, epochs=1, batch_size=4, lr=1e-3, num_workers=0,
        val_every=1, dcn=False, amp=False, device="cpu", pretrain_steps=2,
    )
    train(cfg, progress=False)
    trunk = load_checkpoint(out / "trunk_pretrained.pt")
    stamp = (out / "trunk_pretrained.pt").stat().st_mtime_ns
    # a resumed run keeps the trunk file it started from
    train(replace(cfg, epochs=2), resume=True, progress=False)
    assert (out / "trunk_pretrained.pt").stat().st_mtime_ns == stamp
    # with lr 0 the weights stay where they started: the trunk's convolutions are the pre-trained ones
    out2 = tmp_path / "run_lr0"
    train(replace(cfg, out=str(out2), lr=0.0), progress=False)
    model = load_checkpoint(out2 / "last.pt")["model"]
    trunk2 = load_checkpoint(out2 / "trunk_pretrained.pt")
    torch.testing.assert_close(model["trunk.0.weight"], trunk2["conv1.weight"])
    torch.testing.assert_close(trunk2["conv1.weight"], trunk["conv1.weight"])  # same seed, same pre-training
    # a new (not resumed) run in the same folder pre-trains again instead of reusing a stale trunk
    train(replace(cfg, epochs=1), progress=False)
    assert (out / "trunk_pretrained.pt").stat().st_mtime_ns != stamp
