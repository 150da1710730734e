"""Tests of minicenternet.data.shapes: determinism, COCO validity, content and the ensure_shapes cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from minicenternet.data import shapes
from minicenternet.data.shapes import CLASSES, ShapesConfig, ensure_shapes, generate_shapes, render_image

TINY = ShapesConfig(num_train=6, num_val=3, num_test=2, image_size=128)


def _all_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("tiny"), TINY, workers=0)


@pytest.fixture(scope="module")
def rendered_256():
    """50 train images of the default 256 px configuration."""
    cfg = ShapesConfig(image_size=256)
    return [render_image(cfg, "train", i) for i in range(50)]


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_layout(tiny_root):
    """Writes train/val/test pngs, the three annotation files and meta.json."""
    files = _all_files(tiny_root)
    expected = {f"{split}/{i:06d}.png" for split, n in (("train", 6), ("val", 3), ("test", 2)) for i in range(n)}
    expected |= {f"annotations/instances_{split}.json" for split in ("train", "val", "test")} | {"meta.json"}
    assert set(files) == expected
    meta = json.loads(files["meta.json"])
    assert (meta["num_train"], meta["num_val"], meta["num_test"], meta["image_size"]) == (6, 3, 2, 128)
    assert "version" in meta


def test_same_seed_same_bytes(tiny_root, tmp_path):
    """A second generation with the same config writes byte-identical files."""
    again = generate_shapes(tmp_path / "again", TINY, workers=0)
    assert _all_files(again) == _all_files(tiny_root)


def test_different_seed_different_bytes(tiny_root, tmp_path):
    """Another seed changes every image and the annotations."""
    other = _all_files(generate_shapes(tmp_path / "other", ShapesConfig(num_train=6, num_val=3, num_test=2, image_size=128, seed=1), workers=0))
    base = _all_files(tiny_root)
    for name in base:
        if name.endswith(".png") or name.startswith("annotations"):
            assert other[name] != base[name], name


def test_pool_and_serial_generation_identical(tmp_path):
    """workers=2 (process pool, used only above 64 images) and workers=0 write the same bytes."""
    cfg = ShapesConfig(num_train=65, num_val=2, num_test=1, image_size=48)
    serial = _all_files(generate_shapes(tmp_path / "serial", cfg, workers=0))
    pooled = _all_files(generate_shapes(tmp_path / "pool", cfg, workers=2))
    assert len(serial) == 65 + 2 + 1 + 4
    assert pooled == serial


def test_render_order_independent():
    """Rendering an index alone gives the same image and objects as rendering it inside a sequence."""
    sequence = [render_image(TINY, "train", i) for i in range(6)]
    for i in (4, 0, 2):
        image, objects = render_image(TINY, "train", i)
        np.testing.assert_array_equal(image, sequence[i][0])
        assert objects == sequence[i][1]
    # train, val and test are different streams
    val, test = render_image(TINY, "val", 0)[0], render_image(TINY, "test", 0)[0]
    assert not np.array_equal(val, sequence[0][0])
    assert not np.array_equal(test, sequence[0][0]) and not np.array_equal(test, val)


def test_png_holds_rendered_rgb(tiny_root):
    """Each png decodes (BGR -> RGB) to exactly the rendered image, and the json lists its objects."""
    data = json.loads((tiny_root / "annotations" / "instances_train.json").read_text())
    for i in range(6):
        image, objects = render_image(TINY, "train", i)
        decoded = cv2.cvtColor(cv2.imread(str(tiny_root / "train" / f"{i:06d}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, image)
        anns = [a for a in data["annotations"] if a["image_id"] == i + 1]
        assert [a["bbox"] for a in anns] == [o["bbox"] for o in objects]
        assert [a["category_id"] for a in anns] == [o["category"] + 1 for o in objects]


# ---------------------------------------------------------------------------------------------
# COCO validity and statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, count", [("train", 6), ("val", 3), ("test", 2)])
def test_coco_json_valid(tiny_root, split, count):
    """Loads with pycocotools; 5 categories ids 1..5 named CLASSES; boxes inside with positive size."""
    coco = COCO(str(tiny_root / "annotations" / f"instances_{split}.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5]
    assert [coco.loadCats(i)[0]["name"] for i in range(1, 6)] == list(CLASSES)
    assert sorted(coco.getImgIds()) == list(range(1, count + 1))
    ann_ids = coco.getAnnIds()
    assert len(set(ann_ids)) == len(ann_ids) > 0
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        assert (info["width"], info["height"]) == (128, 128)
        assert (tiny_root / split / info["file_name"]).is_file()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 15
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            # coordinates are rounded to 2 decimals separately, hence the 0.01 slack
            assert x >= 0 and y >= 0 and x + w <= 128 + 0.01 and y + h <= 128 + 0.01
            assert ann["area"] == pytest.approx(w * h, abs=0.01)
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 5


def test_object_counts_vary_in_range():
    """Over 30 images the object count stays within 1..15 and varies widely."""
    counts = [len(render_image(TINY, "train", i)[1]) for i in range(30)]
    assert min(counts) >= 1 and max(counts) <= 15
    assert len(set(counts)) >= 6
    assert min(counts) <= 3 and max(counts) >= 12


def test_sizes_classes_and_borders(rendered_256):
    """Across 50 images of 256 px: tiny and huge boxes, every class, and boxes cut by the border."""
    sizes, labels, touching = [], set(), 0
    for image, objects in rendered_256:
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 256.01 and y + h <= 256.01
            sizes.append(np.sqrt(w * h))
            labels.add(obj["category"])
            touching += x <= 0 or y <= 0 or x + w >= 255.99 or y + h >= 255.99
    assert min(sizes) < 16 and max(sizes) > 120
    assert labels == set(range(5))
    assert touching >= 1


# ---------------------------------------------------------------------------------------------
# content
# ---------------------------------------------------------------------------------------------


def test_objects_are_drawn(rendered_256):
    """Images are not constant and every box region has varying pixels."""
    for image, objects in rendered_256:
        assert image.std() > 0
        for obj in objects:
            x, y, w, h = obj["bbox"]
            x1, y1 = int(np.floor(x)), int(np.floor(y))
            x2, y2 = int(np.ceil(x + w)), int(np.ceil(y + h))
            assert image[y1:y2, x1:x2].std() > 0


def test_object_colour_differs_from_background():
    """A lone object changes the pixels in its box, and only there (vs the image's own background).

    The background is re-drawn with the image's generator, whose first draw it is in render_image.
    """
    cfg = TINY
    singles = [i for i in range(40) if len(render_image(cfg, "train", i)[1]) == 1][:3]
    assert singles
    for i in singles:
        image, (obj,) = render_image(cfg, "train", i)
        x, y, w, h = obj["bbox"]
        x1, y1, x2, y2 = int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))
        rng = np.random.default_rng([cfg.seed, 1, i])
        background = shapes._background(rng, cfg.image_size)
        inside = image[y1:y2, x1:x2].astype(float)
        diff = np.linalg.norm(inside - background[y1:y2, x1:x2], axis=2)
        # the object is at least 80 RGB units from the mean background it covers, minus shading / noise
        assert np.mean(diff > 40) > 0.25
        outside = np.ones(image.shape[:2], bool)
        outside[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = False
        diff_out = np.linalg.norm(image.astype(float) - background, axis=2)[outside]
        assert np.mean(diff_out > 40) < 0.01


# ---------------------------------------------------------------------------------------------
# ensure_shapes
# ---------------------------------------------------------------------------------------------


def test_ensure_shapes_generate_reuse_regenerate(tmp_path, monkeypatch):
    """Missing -> generated; same parameters -> reused untouched; other parameters -> regenerated."""
    root = tmp_path / "shapes"
    assert ensure_shapes(root, TINY, verbose=False) == root
    assert json.loads((root / "meta.json").read_text())["num_train"] == 6
    first = _all_files(root)
    assert len([n for n in first if n.endswith(".png")]) == 6 + 3 + 2
    stamp = {p: os.stat(p).st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def forbidden(*args, **kwargs):
        raise AssertionError("generate_shapes must not run when meta.json matches")

    with monkeypatch.context() as m:
        m.setattr(shapes, "generate_shapes", forbidden)
        assert ensure_shapes(root, TINY, verbose=False) == root
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp
    assert _all_files(root) == first

    other = ShapesConfig(num_train=4, num_val=2, num_test=1, image_size=96)
    calls = []
    real = shapes.generate_shapes
    monkeypatch.setattr(shapes, "generate_shapes", lambda *a, **k: calls.append(a) or real(*a, **k))
    ensure_shapes(root, other, verbose=False)
    assert len(calls) == 1
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["image_size"]) == (4, 2, 96)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 4 and coco["images"][0]["width"] == 96
    assert cv2.imread(str(root / "train" / "000000.png")).shape == (96, 96, 3)
    # and now the new parameters are reused
    ensure_shapes(root, other, verbose=False)
    assert len(calls) == 1


def test_ensure_shapes_regenerates_on_stale_version(tmp_path):
    """A meta.json from another generator version counts as stale."""
    root = generate_shapes(tmp_path / "s", TINY, workers=0)
    meta = json.loads((root / "meta.json").read_text())
    meta["version"] = -1
    (root / "meta.json").write_text(json.dumps(meta))
    ensure_shapes(root, TINY, verbose=False)
    assert json.loads((root / "meta.json").read_text())["version"] == shapes.GENERATOR_VERSION
