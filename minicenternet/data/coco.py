"""A COCO-format detection dataset: any ``instances_*.json`` plus a folder of images.

Records come out in the library's conventions: RGB ``uint8`` images, ``xyxy`` boxes in pixels,
contiguous class indices ``0..C-1`` (sorted by the file's category id). Bad input gets an error
that names the file and the annotation, or, for boxes that only need clipping or dropping, one
warning that counts them. :func:`find_split` locates a split in a dataset folder, in our own
layout or in the COCO 2017 one as it unpacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

__all__ = ["ImageReadError", "CocoDetection", "Record", "find_split", "read_image"]

YEAR_SUFFIX = "2017"  # the COCO release whose file names find_split also accepts


class ImageReadError(OSError):
    """An image file is missing, unreadable or not an image."""


@dataclass
class Record:
    """One image and its objects.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        boxes: ``(N, 4)`` float32 ``xyxy`` in pixels.
        labels: ``(N,)`` int64 class indices ``0..C-1``.
        image_id: the image's id in the annotation file.
        path: the image file.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    path: Path


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (grayscale and RGBA are converted).

    Raises:
        ImageReadError: naming the file, if it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: corrupt or unsupported image file")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def find_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` in the dataset folder ``root``.

    Looks for, in this order:

    1. ``root/annotations/instances_{split}.json`` and ``root/{split}/`` (our layout, as the shapes
       dataset and the VOC converter write it);
    2. ``root/annotations/instances_{split}2017.json`` and ``root/{split}2017/`` (COCO 2017 as
       its zips unpack, so ``"train"`` and ``"val"`` work on it without renaming).

    A split that already ends in ``2017`` (``"val2017"``) is looked for under its own name only.
    The first pair whose file and folder both exist wins.

    Raises:
        FileNotFoundError: naming ``root`` and, for every pair looked for, what was missing.
    """
    root = Path(root)
    names = [split] if split.endswith(YEAR_SUFFIX) else [split, split + YEAR_SUFFIX]
    missing = []
    for name in names:
        ann_file, image_dir = root / "annotations" / f"instances_{name}.json", root / name
        if ann_file.is_file() and image_dir.is_dir():
            return ann_file, image_dir
        wanted = {f"annotations/instances_{name}.json": ann_file.is_file(), f"{name}/": image_dir.is_dir()}
        absent = ", ".join(text for text, found in wanted.items() if not found)
        missing.append(f"{' + '.join(wanted)} (missing: {absent})")
    raise FileNotFoundError(f"{root}: no {split!r} split; looked for " + "; ".join(missing))


def _load_annotation_file(ann_file: Path) -> COCO:
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file not found")
    text = ann_file.read_text()
    if not text.strip():
        raise ValueError(f"{ann_file}: annotation file is empty")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_file}: not valid JSON ({err})") from None
    for key in ("images", "categories"):
        if not isinstance(content, dict) or key not in content:
            raise ValueError(f"{ann_file}: not a COCO detection file (no {key!r} list)")
    if not content["images"]:
        raise ValueError(f"{ann_file}: the file lists no images")
    if not content["categories"]:
        raise ValueError(f"{ann_file}: the file lists no categories")
    content.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection:
    """Images and boxes of a COCO-format detection file.

    Args:
        ann_file: the ``instances_*.json``.
        image_dir: folder that ``file_name`` entries are relative to.
        skip_crowd: leave out annotations with ``iscrowd=1`` (default: keep them, as the
            reference code does; see below).

    Attributes:
        coco: the pycocotools ``COCO`` object (for evaluation).
        cat_ids: file category ids in the order of the contiguous indices.
        class_names: category names, same order.
        image_ids: image ids in the order of the indices of this dataset.

    Boxes with non-positive width or height, or entirely outside their image, are dropped;
    boxes that stick out of the image are clipped to it. Both are counted and reported in one
    warning on construction, from the ``width`` and ``height`` the file gives each image; a
    decoded image of another size is an :class:`ImageReadError` (skipped and reported by the
    training loader), and the boxes of an image the file gives no size for are clipped when it
    is read. An annotation whose ``category_id`` is not among the file's
    categories raises ``ValueError`` naming the file and the annotation id.

    Crowd regions (``iscrowd=1``, one box around a group of objects, segmented as RLE): only
    ``bbox`` is read, so any ``segmentation`` loads. By default their boxes are training objects
    like any other, because both official loaders keep them: CenterNet's
    ``src/lib/datasets/sample/ctdet.py`` takes ``coco.getAnnIds(imgIds=[img_id])`` and CornerNet's
    ``db/coco.py`` takes ``coco.getAnnIds(imgIds=..., catIds=...)``, neither passing pycocotools'
    ``iscrowd`` filter. ``skip_crowd=True`` is the cleaner variant: one peak at the middle of a
    crowd teaches the model a box no single object has, and ``COCOeval`` ignores crowd regions at
    test time anyway (a detection matched to one counts neither for nor against).
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, skip_crowd: bool = False) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.skip_crowd = skip_crowd
        self.coco = _load_annotation_file(self.ann_file)
        self.cat_ids = sorted(self.coco.cats)
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.label_of = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}
        self.image_ids = sorted(self.coco.imgs)
        self._boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._images: dict[int, np.ndarray] = {}
        clipped = dropped = 0
        for image_id in self.image_ids:
            boxes, labels, n_clipped, n_dropped = self._parse(image_id)
            self._boxes[image_id] = (boxes, labels)
            clipped, dropped = clipped + n_clipped, dropped + n_dropped
        if clipped or dropped:
            warnings.warn(
                f"{self.ann_file}: clipped {clipped} box(es) to their image and dropped {dropped} "
                "with non-positive size or lying outside the image",
                stacklevel=2,
            )

    def _parse(self, image_id: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        info = self.coco.imgs[image_id]
        width, height = info.get("width"), info.get("height")
        boxes, labels, clipped, dropped = [], [], 0, 0
        for ann in self.coco.imgToAnns.get(image_id, []):
            if self.skip_crowd and ann.get("iscrowd", 0):
                continue
            if ann.get("category_id") not in self.label_of:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann.get('id')} (image {image_id}) has unknown "
                    f"category_id {ann.get('category_id')!r}; known: {self.cat_ids}"
                )
            bbox = ann.get("bbox")
            if bbox is None or len(bbox) != 4:
                raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} (image {image_id}) has no 4-number bbox")
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                dropped += 1
                continue
            x1, y1, x2, y2 = x, y, x + w, y + h
            if width and height:
                cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
                cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
                if cx2 <= cx1 or cy2 <= cy1:
                    dropped += 1
                    continue
                clipped += (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
                x1, y1, x2, y2 = cx1, cy1, cx2, cy2
            boxes.append((x1, y1, x2, y2))
            labels.append(self.label_of[ann["category_id"]])
        return (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            clipped,
            dropped,
        )

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes (N, 4) xyxy float32, labels (N,) int64)`` of image ``index`` without reading it."""
        boxes, labels = self._boxes[self.image_ids[index]]
        return boxes.copy(), labels.copy()

    def preload(self, threads: int = 2) -> None:
        """Decode every readable image once and keep it in memory (``H * W * 3`` bytes each).

        Worth it for small datasets trained for many epochs on a CPU, where decoding PNGs would
        otherwise take a tenth of the time; unreadable files are left to fail (and be reported)
        when they are asked for.
        """

        def load(index: int) -> None:
            try:
                self._images[self.image_ids[index]] = read_image(self.image_path(index))
            except ImageReadError:
                pass

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(load, range(len(self))))

    def __getitem__(self, index: int) -> Record:
        image_id = self.image_ids[index]
        path = self.image_path(index)
        image = self._images[image_id] if image_id in self._images else read_image(path)
        boxes, labels = self.boxes(index)
        info = self.coco.imgs[image_id]
        stated = (info.get("height"), info.get("width"))
        if not all(stated):  # no size in the file, so nothing was clipped on loading
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image.shape[1])
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image.shape[0])
        elif stated != image.shape[:2]:
            raise ImageReadError(
                f"{path}: the image is {image.shape[1]}x{image.shape[0]} but {self.ann_file} gives "
                f"image {image_id} as {stated[1]}x{stated[0]} (width x height)"
            )
        return Record(image, boxes, labels, image_id, path)

    @classmethod
    def from_root(cls, root: str | Path, split: str, skip_crowd: bool = False) -> "CocoDetection":
        """Split ``split`` of the dataset folder ``root``, found by :func:`find_split`: our layout
        (``annotations/instances_{split}.json`` + ``{split}/``) or COCO 2017's
        (``annotations/instances_{split}2017.json`` + ``{split}2017/``)."""
        return cls(*find_split(root, split), skip_crowd=skip_crowd)
