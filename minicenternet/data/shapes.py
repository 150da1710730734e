"""The embedded default dataset: synthetic shapes written in COCO format.

Five classes that differ only in outline (ellipse, rectangle, triangle, cross, star), drawn in
random colours on textured, gradient or noisy backgrounds, 1-15 objects per image, sizes from
about 8 px to most of the image, any aspect ratio between 1:2 and 2:1, arbitrary rotation,
partial occlusion (each object keeps at least half of itself visible) and objects cut by the
image border. Every image is drawn from its own random generator seeded by ``(seed, split,
index)``, so the same seed gives the same bytes in any order and with any number of workers.

Layout written under ``root``::

    root/train/000000.png ...   root/val/000000.png ...   root/test/000000.png ...
    root/annotations/instances_{train,val,test}.json
    root/meta.json               (generator version and parameters)

Three splits: training picks its best checkpoint on ``val`` and reports it on ``test``, images
that played no part in choosing it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CLASSES", "ShapesConfig", "render_image", "generate_shapes", "ensure_shapes", "default_data_root"]

CLASSES = ("ellipse", "rectangle", "triangle", "cross", "star")
GENERATOR_VERSION = 2
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of the shapes dataset; the defaults are the dataset the main job trains on."""

    num_train: int = 3000
    num_val: int = 300
    num_test: int = 300
    image_size: int = 256
    seed: int = 0
    max_objects: int = 15
    min_size: float = 8.0
    max_size_frac: float = 0.75
    min_visible: float = 0.5


def default_data_root() -> Path:
    """Where datasets live: ``$MINICENTERNET_DATA``, else the checkout's ``data/``, else a cache folder."""
    env = os.environ.get("MINICENTERNET_DATA")
    if env:
        return Path(env)
    checkout_data = Path(__file__).resolve().parents[2] / "data"
    if (checkout_data / "README.md").is_file():
        return checkout_data
    return Path.home() / ".cache" / "minicenternet" / "data"


def _unit_outline(name: str, rng: np.random.Generator) -> np.ndarray:
    """``(P, 2)`` outline of a class inside ``[-1, 1]^2`` before stretching and rotation."""
    if name == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if name == "triangle":
        apex = rng.uniform(-0.6, 0.6)
        return np.array([[apex, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if name == "cross":
        a = rng.uniform(0.25, 0.45)
        return np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]],
            dtype=np.float64,
        )
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    raise ValueError(f"unknown shape {name!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(size, size, 3)`` float32 background: a gradient, smooth blotches or a soft woven texture
    between two random colours, plus pixel grain.

    The textures are smooth on purpose: hard-edged patterns (checkerboards, sharp stripes) would
    draw extra rectangles that are not annotated.
    """
    kind = rng.integers(3)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / (t.max() - t.min())
    elif kind == 1:
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    else:
        t = np.zeros((size, size), dtype=np.float32)
        for _ in range(3):
            angle, period = rng.uniform(0, np.pi), rng.uniform(10, 60)
            phase = (np.cos(angle) * xx + np.sin(angle) * yy) * size / period + rng.uniform(0, 1)
            t += np.sin(2 * np.pi * phase) / 6
        t = (t + 0.5) * rng.uniform(0.3, 0.8)
    image = c0 + (c1 - c0) * t[..., None]
    image += rng.normal(0, rng.uniform(0, 10), (size, size, 1))
    return image.astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least 80 RGB units from ``under`` (the mean background it covers)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) > 80:
            return colour
    return 255 - under


def render_image(cfg: ShapesConfig, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """Draw one image of the dataset.

    Returns:
        ``(image (S, S, 3) uint8 RGB, objects)``; each object is
        ``{"category": int, "bbox": [x, y, w, h]}`` in pixels, boxes clipped to the image.
    """
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index])
    size = cfg.image_size
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)
    full_area: list[int] = []
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
        for _attempt in range(10):
            placed = _try_place(cfg, rng, image, owner, full_area, objects)
            if placed:
                break
    image += rng.normal(0, rng.uniform(0, 8), image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), objects


def _try_place(
    cfg: ShapesConfig,
    rng: np.random.Generator,
    image: np.ndarray,
    owner: np.ndarray,
    full_area: list[int],
    objects: list[dict],
) -> bool:
    """Draw one random object if it keeps every object at least ``min_visible`` visible."""
    size = cfg.image_size
    label = int(rng.integers(len(CLASSES)))
    side = math.exp(rng.uniform(math.log(cfg.min_size), math.log(cfg.max_size_frac * size)))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    angle = rng.uniform(0, 2 * np.pi)
    outline = _unit_outline(CLASSES[label], rng) * [side * math.sqrt(aspect) / 2, side / math.sqrt(aspect) / 2]
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outline = outline @ rot.T
    lo, hi = outline.min(0), outline.max(0)
    centre = rng.uniform(-0.1 * (hi - lo), size + 0.1 * (hi - lo))
    points = outline + centre
    mask = np.zeros((size, size), dtype=np.uint8)
    # pixel (i, j) covers [i, i + 1) x [j, j + 1) (COCO), so its centre is tested at i + 0.5
    cv2.fillPoly(mask, [np.round((points - 0.5) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    inside = int(mask.sum())
    polygon_area = 0.5 * abs(np.dot(points[:, 0], np.roll(points[:, 1], 1)) - np.dot(points[:, 1], np.roll(points[:, 0], 1)))
    if inside < 16 or inside < 0.4 * polygon_area:
        return False
    covered = mask.astype(bool)
    for other in np.unique(owner[covered]):
        if other >= 0 and ((owner == other) & ~covered).sum() < cfg.min_visible * full_area[other]:
            return False
    colour = _contrasting_colour(rng, image[covered].mean(0))
    shade = rng.uniform(0.75, 1.0)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.6)[..., None]
    fill = np.empty_like(image)
    fill[:] = colour
    if rng.random() < 0.5:
        fill *= (shade + (1 - shade) * np.linspace(0, 1, size, dtype=np.float32))[:, None, None]
    image[:] = image * (1 - alpha) + fill * alpha
    owner[covered] = len(objects)
    full_area.append(inside)
    x1, y1 = np.clip(points.min(0), 0, size)
    x2, y2 = np.clip(points.max(0), 0, size)
    objects.append({"category": label, "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)]})
    return True


def _render_and_write(args: tuple[ShapesConfig, str, int, str]) -> list[dict]:
    cfg, split, index, path = args
    image, objects = render_image(cfg, split, index)
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    Path(path).write_bytes(data.tobytes())
    return objects


def _coco_dict(split: str, cfg: ShapesConfig, per_image: list[list[dict]]) -> dict:
    images, annotations = [], []
    for index, objects in enumerate(per_image):
        images.append({"id": index + 1, "file_name": f"{index:06d}.png", "width": cfg.image_size, "height": cfg.image_size})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": obj["category"] + 1,
                    "bbox": [x, y, w, h],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    return {"info": {"description": f"minicenternet shapes ({split})"}, "images": images, "annotations": annotations, "categories": categories}


def generate_shapes(root: str | Path, cfg: ShapesConfig = ShapesConfig(), workers: int | None = None) -> Path:
    """Write the dataset under ``root`` (overwriting what is there) and return ``root``.

    Args:
        root: destination folder.
        cfg: dataset parameters.
        workers: processes to draw with (default: the CPU count, at most 4); ``0`` draws in this
            process. The bytes written do not depend on it.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_test)):
        (root / split).mkdir(exist_ok=True)
        jobs = [(cfg, split, i, str(root / split / f"{i:06d}.png")) for i in range(count)]
        if workers > 0 and count > 64:
            with ProcessPoolExecutor(workers) as pool:
                per_image = list(pool.map(_render_and_write, jobs, chunksize=32))
        else:
            per_image = [_render_and_write(job) for job in jobs]
        coco = _coco_dict(split, cfg, per_image)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, sort_keys=True))
    (root / "meta.json").write_text(json.dumps({"version": GENERATOR_VERSION, **asdict(cfg)}, sort_keys=True))
    return root


def ensure_shapes(root: str | Path | None = None, cfg: ShapesConfig = ShapesConfig(), verbose: bool = True) -> Path:
    """Return the shapes dataset folder, generating it first if it is missing or stale.

    A new dataset is drawn into a hidden sibling folder and moved into place when complete, so a
    reader never sees a half-written dataset and an interrupted run leaves no partial one.

    Args:
        root: folder of the dataset (default ``default_data_root() / "shapes"``).
        cfg: dataset parameters; a folder written with other parameters is regenerated.
        verbose: print what is generated and how long it took.
    """
    root = Path(root) if root is not None else default_data_root() / "shapes"
    wanted = {"version": GENERATOR_VERSION, **asdict(cfg)}
    meta = root / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == wanted:
        return root
    if verbose:
        counts = f"{cfg.num_train} train + {cfg.num_val} val + {cfg.num_test} test images"
        print(f"generating shapes dataset ({counts}) in {root} ...", flush=True)
    start = time.perf_counter()
    staging = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    generate_shapes(staging, cfg)
    stale = root.with_name(f".{root.name}.{os.getpid()}.old")
    if root.exists():
        root.rename(stale)
    staging.rename(root)
    shutil.rmtree(stale, ignore_errors=True)
    if verbose:
        print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return root
