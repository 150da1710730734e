"""Tests of minicenternet.data.coco (COCO files, images, errors) and CenterNetDataset."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from minicenternet.data.centernet_dataset import CenterNetDataset
from minicenternet.data.coco import CocoDetection, ImageReadError, read_image
from minicenternet.data.transforms import affine_matrix, apply_affine_to_boxes, jitter_crop_params

CATEGORIES = [{"id": 7, "name": "star"}, {"id": 3, "name": "cat"}]  # non-contiguous, unsorted


def _write_rgb(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": 1.0, "iscrowd": 0}


def _write_dataset(tmp_path: Path, images: list[dict], annotations: list[dict], categories=CATEGORIES) -> Path:
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


@pytest.fixture
def small(tmp_path):
    """Image 10 (40x30) with seven boxes of which two need clipping and three dropping; image 2
    (20x20) with none."""
    rng = np.random.default_rng(0)
    pixels = {"a.png": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "b.png": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)}
    for name, rgb in pixels.items():
        _write_rgb(tmp_path / name, rgb)
    images = [
        {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
    ]
    annotations = [
        _ann(1, 10, 7, [1, 2, 10, 5]),  # -> [1, 2, 11, 7], label 1
        _ann(2, 10, 3, [5.5, 6.25, 4, 3]),  # -> [5.5, 6.25, 9.5, 9.25], label 0
        _ann(3, 10, 3, [30, 20, 20, 20]),  # clipped -> [30, 20, 40, 30]
        _ann(4, 10, 7, [-5, -5, 10, 10]),  # clipped -> [0, 0, 5, 5]
        _ann(5, 10, 3, [3, 3, 0, 5]),  # w = 0: dropped
        _ann(6, 10, 3, [50, 5, 5, 5]),  # entirely outside: dropped
        _ann(7, 10, 7, [3, 3, 5, -2]),  # h < 0: dropped
    ]
    ann_file = _write_dataset(tmp_path, images, annotations)
    return ann_file, tmp_path, pixels


def _load_quietly(ann_file: Path, image_dir: Path) -> CocoDetection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDetection(ann_file, image_dir)


# ---------------------------------------------------------------------------------------------
# CocoDetection: records
# ---------------------------------------------------------------------------------------------


def test_boxes_labels_and_one_warning(small):
    ann_file, image_dir, pixels = small
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetection(ann_file, image_dir)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "clipped 2 box" in message and "dropped 3" in message and str(ann_file) in message

    assert dataset.cat_ids == [3, 7]
    assert dataset.class_names == ["cat", "star"]
    assert dataset.num_classes == 2
    assert dataset.image_ids == [2, 10] and len(dataset) == 2

    record = dataset[1]
    assert record.image_id == 10 and record.path == image_dir / "a.png"
    assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int64
    np.testing.assert_array_equal(
        record.boxes, [[1, 2, 11, 7], [5.5, 6.25, 9.5, 9.25], [30, 20, 40, 30], [0, 0, 5, 5]]
    )
    assert record.labels.tolist() == [1, 0, 0, 1]
    np.testing.assert_array_equal(record.image, pixels["a.png"])

    empty = dataset[0]  # an image without annotations is a valid record
    assert empty.image_id == 2 and empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert empty.boxes.dtype == np.float32
    np.testing.assert_array_equal(empty.image, pixels["b.png"])


def test_boxes_without_reading_and_copies(small):
    dataset = _load_quietly(*small[:2])
    boxes, labels = dataset.boxes(1)
    boxes[:] = -1  # a copy: the dataset is not changed
    assert dataset.boxes(1)[0].min() >= 0
    assert labels.tolist() == [1, 0, 0, 1]


def test_from_root_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    _write_rgb(tmp_path / "val" / "x.png", np.zeros((8, 8, 3), np.uint8))
    _write_dataset(tmp_path / "annotations", [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}], [])
    (tmp_path / "annotations" / "instances.json").rename(tmp_path / "annotations" / "instances_val.json")
    dataset = CocoDetection.from_root(tmp_path, "val")
    assert dataset.image_path(0) == tmp_path / "val" / "x.png"
    assert dataset[0].image.shape == (8, 8, 3)


# ---------------------------------------------------------------------------------------------
# CocoDetection: errors
# ---------------------------------------------------------------------------------------------


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(tmp_path / "missing.json", tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty"),
        ("  \n", "empty"),
        ('{"images": [', "not valid JSON"),
        ("[1, 2]", "not a COCO"),
        (json.dumps({"images": [], "categories": CATEGORIES}), "no images"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": []}), "no categories"),
    ],
)
def test_bad_annotation_files_name_the_file(tmp_path, content, match):
    ann_file = tmp_path / "broken_instances.json"
    ann_file.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        CocoDetection(ann_file, tmp_path)
    assert "broken_instances.json" in str(info.value)


def test_unknown_category_names_the_annotation(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}]
    ann_file = _write_dataset(tmp_path, images, [_ann(1, 1, 3, [0, 0, 2, 2]), _ann(42, 1, 99, [0, 0, 2, 2])])
    with pytest.raises(ValueError, match="annotation 42") as info:
        CocoDetection(ann_file, tmp_path)
    assert "99" in str(info.value) and str(ann_file) in str(info.value)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5], None])
def test_bbox_must_be_four_numbers(tmp_path, bbox):
    images = [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}]
    ann = _ann(5, 1, 3, bbox)
    if bbox is None:
        del ann["bbox"]
    ann_file = _write_dataset(tmp_path, images, [ann])
    with pytest.raises(ValueError, match="annotation 5.*4-number bbox") as info:
        CocoDetection(ann_file, tmp_path)
    assert str(ann_file) in str(info.value)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def test_read_grayscale_rgba_and_16_bit(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)
    bgra = np.concatenate([rgb[..., ::-1], alpha], axis=2)
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)  # alpha dropped, channels in RGB order

    cv2.imwrite(str(tmp_path / "rgb16.png"), np.ascontiguousarray(rgb[..., ::-1]).astype(np.uint16) * 257)
    out = read_image(tmp_path / "rgb16.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)  # v * 257 // 257 = v

    gray16 = np.minimum(gray.astype(np.int64) * 257 + 100, 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), gray16)
    out = read_image(tmp_path / "gray16.png")
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], gray)  # min(257 v + 100, 65535) // 257 = v

    plain = _write_rgb(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(str(plain)), rgb)


def test_corrupt_and_missing_images_raise_on_access(tmp_path):
    (tmp_path / "bad.png").write_bytes(os.urandom(300))
    _write_rgb(tmp_path / "good.png", np.full((6, 6, 3), 9, np.uint8))
    images = [
        {"id": 1, "file_name": "bad.png", "width": 6, "height": 6},
        {"id": 2, "file_name": "good.png", "width": 6, "height": 6},
        {"id": 3, "file_name": "gone.png", "width": 6, "height": 6},
    ]
    dataset = CocoDetection(_write_dataset(tmp_path, images, []), tmp_path)  # construction reads no image
    with pytest.raises(ImageReadError, match="bad.png"):
        dataset[0]
    assert dataset[1].image.shape == (6, 6, 3)
    with pytest.raises(ImageReadError, match="gone.png"):
        dataset[2]
    assert issubclass(ImageReadError, OSError)


def test_preload_keeps_images_in_memory(small):
    ann_file, image_dir, pixels = small
    dataset = _load_quietly(ann_file, image_dir)
    dataset.preload(threads=2)
    (image_dir / "a.png").unlink()
    (image_dir / "b.png").unlink()
    np.testing.assert_array_equal(dataset[1].image, pixels["a.png"])
    np.testing.assert_array_equal(dataset[0].image, pixels["b.png"])
    fresh = _load_quietly(ann_file, image_dir)  # without preload the files are gone
    with pytest.raises(ImageReadError, match="a.png"):
        fresh[1]


def test_preload_skips_unreadable_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    _write_rgb(tmp_path / "good.png", np.zeros((4, 4, 3), np.uint8))
    images = [{"id": 1, "file_name": "bad.png", "width": 4, "height": 4}, {"id": 2, "file_name": "good.png", "width": 4, "height": 4}]
    dataset = CocoDetection(_write_dataset(tmp_path, images, []), tmp_path)
    dataset.preload()
    assert dataset[1].image.shape == (4, 4, 3)
    with pytest.raises(ImageReadError, match="bad.png"):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# CenterNetDataset
# ---------------------------------------------------------------------------------------------


def test_centernet_dataset_skips_unreadable_images_with_one_warning(tmp_path):
    (tmp_path / "bad.png").write_bytes(os.urandom(200))
    rng = np.random.default_rng(2)
    for name in ("c.png", "d.png"):
        _write_rgb(tmp_path / name, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    images = [
        {"id": 1, "file_name": "bad.png", "width": 32, "height": 32},
        {"id": 2, "file_name": "c.png", "width": 32, "height": 32},
        {"id": 3, "file_name": "d.png", "width": 32, "height": 32},
    ]
    anns = [_ann(1, 2, 3, [4, 4, 10, 10]), _ann(2, 3, 7, [8, 8, 12, 6])]
    dataset = CenterNetDataset(CocoDetection(_write_dataset(tmp_path, images, anns), tmp_path), (32, 32), train=False)
    with pytest.warns(UserWarning, match="bad.png") as caught:
        image, targets = dataset[0]
    assert len(caught) == 1
    expected_image, expected_targets = dataset[1]  # the next readable sample
    assert torch.equal(image, expected_image)
    for key in expected_targets:
        assert torch.equal(targets[key], expected_targets[key])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: a second read is silent
        dataset[0]

    (tmp_path / "c.png").unlink()
    (tmp_path / "d.png").unlink()
    with pytest.warns(UserWarning), pytest.raises(ImageReadError, match="no readable image"):
        dataset[0]


def test_centernet_dataset_eval_sample_hand_computed(tmp_path):
    """80x40 image, input 64x64, output 16x16: centre (40, 20), s = 80, so input pixels are
    x' = 0.8 (x - 40) + 32 and heatmap pixels x' = 0.2 (x - 40) + 8 (same for y with 20).
    Box [25, 10, 60, 33] -> [5, 6, 12, 10.6]: centre (8.5, 8.3), size (7, 4.6)."""
    colour = np.array([10, 200, 30], np.uint8)
    _write_rgb(tmp_path / "wide.png", np.broadcast_to(colour, (40, 80, 3)).copy())
    images = [{"id": 1, "file_name": "wide.png", "width": 80, "height": 40}]
    source = CocoDetection(_write_dataset(tmp_path, images, [_ann(1, 1, 7, [25, 10, 35, 23])]), tmp_path)
    dataset = CenterNetDataset(source, (64, 64), train=False, max_objects=8)
    assert dataset.output_size == (16, 16) and len(dataset) == 1
    image, targets = dataset[0]

    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    # the 40 source rows fill input rows 16..47; above and below is zero padding
    assert torch.equal(image[:, 18:46], torch.from_numpy(colour).view(3, 1, 1).expand(3, 28, 64))
    assert image[:, :14].sum() == 0 and image[:, 50:].sum() == 0

    assert set(targets) == {"hm", "wh", "reg", "ind", "mask", "image_id"} and targets["image_id"].item() == 1
    assert targets["hm"].shape == (2, 16, 16) and targets["hm"].dtype == torch.float32
    assert targets["wh"].shape == (8, 2) and targets["reg"].shape == (8, 2)
    assert targets["ind"].shape == (8,) and targets["ind"].dtype == torch.int64
    assert targets["mask"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert targets["ind"][0] == 8 * 16 + 8
    torch.testing.assert_close(targets["wh"][0], torch.tensor([7.0, 4.6]))
    torch.testing.assert_close(targets["reg"][0], torch.tensor([0.5, 0.3]), atol=1e-5, rtol=0)
    assert targets["hm"][1, 8, 8] == 1.0  # category 7 is label 1
    assert targets["hm"][0].sum() == 0
    assert (targets["hm"] == 1).sum() == 1


def test_centernet_dataset_train_mode_is_well_formed(tmp_path):
    _write_rgb(tmp_path / "img.png", np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    images = [{"id": 1, "file_name": "img.png", "width": 48, "height": 48}]
    source = CocoDetection(_write_dataset(tmp_path, images, [_ann(1, 1, 3, [10, 12, 20, 16])]), tmp_path)
    dataset = CenterNetDataset(source, (32, 32), train=True)
    torch.manual_seed(0)
    for _ in range(5):
        image, targets = dataset[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert targets["hm"].shape == (2, 8, 8)
        assert targets["hm"].max() <= 1.0 and targets["mask"].sum() <= 1
    with pytest.raises(ValueError, match="divisible by 32"):
        CenterNetDataset(source, (48, 48))


def test_centernet_dataset_jitter_moves_the_whole_image_view(tmp_path):
    """random_crop=False, jitter=True (the reference's other branch), no flip: the heatmap peak of
    a 4x4 box at (30..34, 30..34) is its centre under the affine map of the jittered centre and
    side, drawn from the same generator the dataset seeds from torch; the view moves from draw
    to draw."""
    _write_rgb(tmp_path / "img.png", np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    images = [{"id": 1, "file_name": "img.png", "width": 64, "height": 64}]
    source = CocoDetection(_write_dataset(tmp_path, images, [_ann(1, 1, 3, [30, 30, 4, 4])]), tmp_path)
    dataset = CenterNetDataset(source, (64, 64), train=True, random_crop=False, jitter=True, flip_prob=0.0)
    peaks = set()
    for seed in range(8):
        torch.manual_seed(seed)
        _, targets = dataset[0]
        torch.manual_seed(seed)
        center, side = jitter_crop_params((64, 64), np.random.default_rng(int(torch.randint(2**62, ()))))
        box = apply_affine_to_boxes(np.array([[30, 30, 34, 34]], np.float32), affine_matrix(center, side, (16, 16)))[0]
        assert int(targets["ind"][0]) == int((box[1] + box[3]) / 2) * 16 + int((box[0] + box[2]) / 2)
        peaks.add(int(targets["ind"][0]))
    assert len(peaks) > 2
    still = CenterNetDataset(source, (64, 64), train=True, random_crop=False, flip_prob=0.0)
    assert {int(still[0][1]["ind"][0]) for _ in range(4)} == {8 * 16 + 8}  # without jitter: always the centre


def test_image_size_differing_from_the_file_is_an_error_and_missing_sizes_clip_on_reading(tmp_path):
    """The boxes were clipped on loading to the file's 40x30; a decoded 20x20 image is an
    ImageReadError naming both sizes. An image without a size in the file has its box clipped
    to the decoded 20x20 when read: [12, 4, 30, 25] -> [12, 4, 20, 20]."""
    _write_rgb(tmp_path / "small.png", np.zeros((20, 20, 3), np.uint8))
    images = [
        {"id": 1, "file_name": "small.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "small.png"},
    ]
    anns = [_ann(1, 1, 3, [12, 4, 18, 21]), _ann(2, 2, 3, [12, 4, 18, 21])]
    source = CocoDetection(_write_dataset(tmp_path, images, anns), tmp_path)
    with pytest.raises(ImageReadError, match=r"small\.png: the image is 20x20 but .* gives image 1 as 40x30"):
        source[0]
    record = source[1]
    np.testing.assert_array_equal(record.boxes, [[12, 4, 20, 20]])
    np.testing.assert_array_equal(source.boxes(1)[0], [[12, 4, 30, 25]])  # as in the file, not clipped


def test_an_augmented_box_is_found_again_in_the_pixels(tmp_path):
    """A red rectangle on a gray image, sent through the training pipeline (random scale and crop,
    flip, colour jitter and lighting) for many (epoch, index) draws: the box that the targets encode
    (centre index + offset, size, at stride 4) is where the red pixels are in the warped image."""
    image = np.full((120, 160, 3), 128, np.uint8)
    image[30:70, 50:110] = (230, 20, 20)  # box [50, 30, 110, 70]
    _write_rgb(tmp_path / "r.png", image)
    ann_file = _write_dataset(tmp_path, [{"id": 1, "file_name": "r.png", "width": 160, "height": 120}],
                              [_ann(1, 1, 3, [50, 30, 60, 40])])
    dataset = CenterNetDataset(CocoDetection(ann_file, tmp_path), (128, 128), train=True, color_aug=True, seed=3)
    checked = 0
    for epoch in range(30):
        warped, targets = dataset[(epoch, 0)]
        pixels = warped.permute(1, 2, 0).numpy().astype(int)
        red = (pixels[..., 0] - pixels[..., 1] > 80) & (pixels[..., 0] - pixels[..., 2] > 80)
        if targets["mask"][0] == 0 or red.sum() < 50:
            continue  # the crop cut the box away
        ys, xs = np.nonzero(red)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)  # pixel edges
        ind, (dx, dy), (w, h) = int(targets["ind"][0]), targets["reg"][0].tolist(), targets["wh"][0].tolist()
        cy, cx = divmod(ind, 32)
        encoded = 4 * np.array([cx + dx - w / 2, cy + dy - h / 2, cx + dx + w / 2, cy + dy + h / 2])
        inside = (found[0] > 1) & (found[1] > 1) & (found[2] < 127) & (found[3] < 127)
        if inside:  # a box cut by the crop is clipped to the output map in the targets, not to the pixels
            assert np.abs(found - encoded).max() <= 2.0, (epoch, found, encoded)
            checked += 1
    assert checked >= 10


def test_an_unreadable_image_is_skipped_under_loader_workers(tmp_path):
    (tmp_path / "bad.png").write_bytes(os.urandom(200))
    rng = np.random.default_rng(4)
    images = [{"id": 1, "file_name": "bad.png", "width": 32, "height": 32}]
    for index in range(2, 6):
        _write_rgb(tmp_path / f"{index}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        images.append({"id": index, "file_name": f"{index}.png", "width": 32, "height": 32})
    anns = [_ann(index, index, 3, [4, 4, 10, 10]) for index in range(2, 6)]
    dataset = CenterNetDataset(CocoDetection(_write_dataset(tmp_path, images, anns), tmp_path), (32, 32))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, sampler=[(0, i) for i in range(5)], num_workers=2)
    (batch, targets), = list(loader)  # one batch of five samples: the bad one replaced by the next readable
    assert batch.shape == (5, 3, 32, 32) and targets["image_id"].tolist() == [2, 2, 3, 4, 5]
