"""COCO box AP through pycocotools ``COCOeval`` (the metric both papers report)."""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .data.coco import CocoDetection
from .distributed import gather, world
from .predict import Detector

__all__ = [
    "METRIC_NAMES", "coco_detections", "coco_eval", "evaluate", "format_table", "format_per_class", "Report", "run_report",
]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_detections(dataset: CocoDetection, index: int, prediction: dict, decimals: int | None = None) -> list[dict]:
    """One image's prediction as COCO result entries (``xywh`` boxes, the file's category ids).

    ``decimals=2`` rounds boxes and scores as the official code writes its results file (scores
    under 0.005 become 0, and equal rounded scores are ranked in file order); the default keeps
    full precision.
    """
    boxes = prediction["boxes"].tolist()

    def rounded(value: float) -> float:
        return float(value) if decimals is None else round(float(value), decimals)

    return [
        {
            "image_id": dataset.image_ids[index],
            "category_id": dataset.cat_ids[int(label)],
            "bbox": [rounded(x1), rounded(y1), rounded(x2 - x1), rounded(y2 - y1)],
            "score": rounded(score),
        }
        for (x1, y1, x2, y2), score, label in zip(boxes, prediction["scores"].tolist(), prediction["labels"].tolist())
    ]


def coco_eval(
    dataset: CocoDetection,
    detections: list[dict],
    image_ids: list[int] | None = None,
    class_agnostic: bool = False,
    per_class: bool = False,
) -> dict[str, float]:
    """Run ``COCOeval`` (iouType ``bbox``) and return the six headline numbers, and with
    ``per_class`` the AP of each class as ``"AP/<class name>"`` (COCO's AP is their mean over the
    classes that have objects).

    COCOeval writes -1 for a size range with no ground-truth object; that is returned as ``nan``
    (missing), not as an AP of 0.

    Args:
        dataset: the ground truth.
        detections: COCO result entries (see :func:`coco_detections`).
        image_ids: restrict the evaluation to these images (default: all of the dataset).
        class_agnostic: match detections to ground truth whatever their categories
            (``COCOeval.params.useCats = 0``).
        per_class: add each class's AP (IoU 0.50:0.95, all sizes, 100 detections), ``nan`` for
            a class without objects in these images.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        results = dataset.coco.loadRes(detections) if detections else COCO()
        evaluator = COCOeval(dataset.coco, results, "bbox")
        evaluator.params.imgIds = list(image_ids) if image_ids is not None else dataset.image_ids
        evaluator.params.useCats = 0 if class_agnostic else 1
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(value) if value >= 0 else math.nan for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}
    if per_class and not class_agnostic:
        precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (IoU thresholds, recalls, classes): all sizes, 100 dets
        for k, name in enumerate(dataset.class_names):  # params.catIds are the file's ids, sorted as cat_ids
            values = precision[:, :, k]
            metrics[f"AP/{name}"] = float(values[values > -1].mean()) if (values > -1).any() else math.nan
    return metrics


def format_per_class(metrics: dict[str, float]) -> str:
    """The ``"AP/<class>"`` entries of ``metrics`` as one line per class."""
    width = max((len(key) - 3 for key in metrics if key.startswith("AP/")), default=5)
    return "\n".join(
        f"{key[3:]:>{width}} {'-' if math.isnan(value) else f'{value:.3f}'}"
        for key, value in metrics.items() if key.startswith("AP/")
    )


def evaluate(
    detector: Detector, dataset: CocoDetection, limit: int | None = None, progress: bool = True,
    decimals: int | None = None, per_class: bool = False,
) -> dict[str, float]:
    """Predict every image of ``dataset`` (or the first ``limit``) and compute COCO AP
    (class-agnostic COCOeval when ``detector.class_agnostic``); ``decimals``: see
    :func:`coco_detections`; ``per_class``: see :func:`coco_eval`.

    Under ``torchrun`` every process predicts its share of the images (``rank, rank + N, ...``)
    and all of them score the gathered detections: the same AP as one process, since COCOeval
    matches each image's detections on their own, in the order they were predicted."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 image (or None: all of them), got {limit}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    here = world()
    detections: list[dict] = []
    for index in tqdm(range(here.rank, count, here.size), desc="evaluate", disable=not progress, leave=False):
        prediction = detector(dataset.image_path(index))[0]
        detections.extend(coco_detections(dataset, index, prediction, decimals))
    detections = [entry for part in gather(detections) for entry in part]
    return coco_eval(dataset, detections, dataset.image_ids[:count], detector.class_agnostic, per_class)


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-line table; a missing value (``nan``: no object of that size) prints as ``-``."""
    header = " ".join(f"{name:>6}" for name in METRIC_NAMES)
    values = " ".join(f"{'-':>6}" if math.isnan(metrics[name]) else f"{metrics[name]:6.3f}" for name in METRIC_NAMES)
    return f"{header}\n{values}"


@dataclass(frozen=True)
class Report:
    """The COCO metrics a run reports, and what they measure.

    With a test split they are those of ``best.pt`` (the epoch with the best val AP) on test:
    val chose the model, so its val AP flatters it. Without one they are the last epoch's on
    val, as the reference reports (it tests on val and picks no epoch).

    Attributes:
        metrics: ``METRIC_NAMES`` -> value (``nan``: COCOeval had no object to score).
        split: ``"test"`` or ``"val"``.
        epoch: the epoch of the model measured.
        checkpoint: ``"best.pt"`` or ``"last.pt"``, in the run folder.
        limit: the run's ``eval_limit``: only the first ``limit`` images of the split were
            evaluated (``None``: all of them).
    """

    metrics: dict[str, float]
    split: str
    epoch: int
    checkpoint: str
    limit: int | None = None

    def describe(self) -> str:
        images = "" if self.limit is None else f" (its first {self.limit} images)"
        if self.split == "test":
            return f"COCO box AP on the test split{images} of {self.checkpoint} (epoch {self.epoch}, chosen by its val AP):"
        return (
            f"COCO box AP on the val split{images} of the last epoch ({self.epoch}), as the reference reports it "
            f"(no test split; best.pt was chosen on these same images):"
        )


def run_report(out: str | Path, last: dict, test_src: CocoDetection | None, device: torch.device | str,
               channels_last: bool = False, progress: bool = True, limit: int | None = None) -> Report:
    """The :class:`Report` of the training run in folder ``out``: its ``best.pt`` evaluated on
    ``test_src`` (its first ``limit`` images; with the test settings the run validated with), or,
    without a test split, the val metrics of ``last``, the record of the run's last epoch."""
    if test_src is None:
        return Report({k: last[k] for k in METRIC_NAMES}, "val", last["epoch"], "last.pt", limit)
    best = Path(out) / "best.pt"
    detector = Detector.from_checkpoint(best, device=device, channels_last=channels_last)
    epoch = load_checkpoint(best)["metrics"]["epoch"]
    return Report(evaluate(detector, test_src, limit, progress), "test", epoch, "best.pt", limit)
