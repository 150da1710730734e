"""COCO box AP through pycocotools ``COCOeval`` (the metric both papers report)."""

from __future__ import annotations

import contextlib
import io
import math

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from .data.coco import CocoDetection
from .predict import Detector

__all__ = ["METRIC_NAMES", "coco_detections", "coco_eval", "evaluate", "format_table"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_detections(dataset: CocoDetection, index: int, prediction: dict) -> list[dict]:
    """One image's prediction as COCO result entries (``xywh`` boxes, the file's category ids)."""
    boxes = prediction["boxes"].tolist()
    return [
        {
            "image_id": dataset.image_ids[index],
            "category_id": dataset.cat_ids[int(label)],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
        }
        for (x1, y1, x2, y2), score, label in zip(boxes, prediction["scores"].tolist(), prediction["labels"].tolist())
    ]


def coco_eval(
    dataset: CocoDetection,
    detections: list[dict],
    image_ids: list[int] | None = None,
    class_agnostic: bool = False,
) -> dict[str, float]:
    """Run ``COCOeval`` (iouType ``bbox``) and return the six headline numbers.

    COCOeval writes -1 for a size range with no ground-truth object; that is returned as ``nan``
    (missing), not as an AP of 0.

    Args:
        dataset: the ground truth.
        detections: COCO result entries (see :func:`coco_detections`).
        image_ids: restrict the evaluation to these images (default: all of the dataset).
        class_agnostic: match detections to ground truth whatever their categories
            (``COCOeval.params.useCats = 0``).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        results = dataset.coco.loadRes(detections) if detections else COCO()
        evaluator = COCOeval(dataset.coco, results, "bbox")
        evaluator.params.imgIds = list(image_ids) if image_ids is not None else dataset.image_ids
        evaluator.params.useCats = 0 if class_agnostic else 1
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) if value >= 0 else math.nan for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}


def evaluate(detector: Detector, dataset: CocoDetection, limit: int | None = None, progress: bool = True) -> dict[str, float]:
    """Predict every image of ``dataset`` (or the first ``limit``) and compute COCO AP
    (class-agnostic COCOeval when ``detector.class_agnostic``)."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    detections: list[dict] = []
    for index in tqdm(range(count), desc="evaluate", disable=not progress, leave=False):
        prediction = detector(dataset.image_path(index))[0]
        detections.extend(coco_detections(dataset, index, prediction))
    return coco_eval(dataset, detections, dataset.image_ids[:count], detector.class_agnostic)


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-line table; a missing value (``nan``: no object of that size) prints as ``-``."""
    header = " ".join(f"{name:>6}" for name in METRIC_NAMES)
    values = " ".join(f"{'-':>6}" if math.isnan(metrics[name]) else f"{metrics[name]:6.3f}" for name in METRIC_NAMES)
    return f"{header}\n{values}"
