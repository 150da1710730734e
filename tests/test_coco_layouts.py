"""Tests of find_split / CocoDetection.from_root on our layout and COCO 2017's, and of crowd
annotations (``iscrowd=1`` with RLE segmentations)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from minicenternet.data.coco import CocoDetection, find_split

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 5, "name": "car"}]


def _split(root: Path, name: str, num_images: int) -> None:
    """``root/annotations/instances_{name}.json`` and ``root/{name}/`` with ``num_images`` 8x8 images."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / name).mkdir()
    images = []
    for i in range(num_images):
        assert cv2.imwrite(str(root / name / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 8, "height": 8})
    content = {"images": images, "annotations": [], "categories": CATEGORIES}
    (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(content))


@pytest.mark.parametrize("split", ["val", "val2017"])
def test_coco_2017_layout_is_found_by_short_and_full_name(tmp_path, split):
    _split(tmp_path, "val2017", 2)
    assert find_split(tmp_path, split) == (tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017")
    dataset = CocoDetection.from_root(tmp_path, split)
    assert len(dataset) == 2
    assert dataset.image_path(1) == tmp_path / "val2017" / "1.png"
    assert dataset[1].image.shape == (8, 8, 3)


def test_our_layout_wins_over_2017_and_full_name_reads_only_2017(tmp_path):
    _split(tmp_path, "train", 1)
    _split(tmp_path, "train2017", 3)
    assert len(CocoDetection.from_root(tmp_path, "train")) == 1
    assert len(CocoDetection.from_root(tmp_path, "train2017")) == 3


def test_nothing_found_names_the_folder_and_everything_looked_for(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")  # images not unpacked yet
    with pytest.raises(FileNotFoundError) as info:
        CocoDetection.from_root(tmp_path, "train")
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: no 'train' split")
    assert "annotations/instances_train.json + train/ (missing: annotations/instances_train.json, train/)" in message
    assert "annotations/instances_train2017.json + train2017/ (missing: train2017/)" in message


def test_full_name_is_not_shortened(tmp_path):
    _split(tmp_path, "val", 1)
    with pytest.raises(FileNotFoundError, match=r"looked for annotations/instances_val2017\.json \+ val2017/ \(missing") as info:
        find_split(tmp_path, "val2017")
    assert "instances_val.json" not in str(info.value)


def _square_mask() -> np.ndarray:
    """8x8, ones in rows 1-4 and columns 2-5: bbox [2, 1, 4, 4], area 16."""
    mask = np.zeros((8, 8), np.uint8)
    mask[1:5, 2:6] = 1
    return mask


@pytest.fixture
def crowded(tmp_path) -> Path:
    """Image 1 with a polygon person [0, 0, 2, 3], a crowd of people as uncompressed RLE
    (COCO's own form for crowds) and a crowd of cars as compressed RLE, both over the square."""
    _split(tmp_path, "train", 1)
    # column-major runs, starting with zeros: 2 empty columns + 1 row, then 4 columns of 4 ones
    # separated by 4 zeros, then 3 rows + 2 columns of zeros
    counts = [17, 4, 4, 4, 4, 4, 4, 4, 19]
    compressed = mask_utils.encode(np.asfortranarray(_square_mask()))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 3], "area": 6, "iscrowd": 0,
         "segmentation": [[0, 0, 2, 0, 2, 3, 0, 3]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 1, 4, 4], "area": 16, "iscrowd": 1,
         "segmentation": {"counts": counts, "size": [8, 8]}},
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [2, 1, 4, 4], "area": 16, "iscrowd": 1,
         "segmentation": {"counts": compressed["counts"].decode(), "size": [8, 8]}},
    ]
    ann_file = tmp_path / "annotations" / "instances_train.json"
    content = json.loads(ann_file.read_text())
    ann_file.write_text(json.dumps({**content, "annotations": annotations}))
    return tmp_path


def test_the_crowd_fixture_is_real_rle(crowded):
    """Both segmentations decode (pycocotools) to the 16-pixel square their bbox states."""
    dataset = CocoDetection.from_root(crowded, "train")
    for ann_id in (2, 3):
        np.testing.assert_array_equal(dataset.coco.annToMask(dataset.coco.anns[ann_id]), _square_mask())


def test_crowd_boxes_are_kept_by_default_as_in_the_reference_loaders(crowded):
    record = CocoDetection.from_root(crowded, "train")[0]
    np.testing.assert_array_equal(record.boxes, [[0, 0, 2, 3], [2, 1, 6, 5], [2, 1, 6, 5]])
    assert record.labels.tolist() == [0, 0, 1]  # person (id 1) -> 0, car (id 5) -> 1


def test_skip_crowd_drops_only_crowd_boxes(crowded):
    dataset = CocoDetection.from_root(crowded, "train", skip_crowd=True)
    np.testing.assert_array_equal(dataset.boxes(0)[0], [[0, 0, 2, 3]])
    assert dataset[0].labels.tolist() == [0]
    assert len(dataset.coco.anns) == 3  # the file is untouched: COCOeval still sees the crowds
