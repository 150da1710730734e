"""Can one CPU worker keep a GPU busy? Samples per second of the whole training pipeline.

    python benchmarks/bench_loader.py                       # 512x512, both tasks, 200 images
    python benchmarks/bench_loader.py --size 512 --images 300 --no-color-aug

One loader worker is one process with one thread (the library's `_worker_init`), so the rate of
`CenterNetDataset.__getitem__` in a single thread is the rate of one worker: decoding the image,
the random affine crop and flip, the colour jitter and PCA lighting, and the targets. Measured on
the shapes images (256x256 PNG) and on the same images as 640x480 JPEG files, COCO's usual size
and format, whose decoding costs more. The last lines divide the training speed of the official
CenterNet runs (their MODEL_ZOO: images per second per GPU over 140 or 50 epochs of COCO
train2017) by the rate of one worker: the workers each GPU needs.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import cv2
import torch

from minicenternet.data.centernet_dataset import CenterNetDataset
from minicenternet.data.coco import CocoDetection
from minicenternet.data.shapes import ensure_shapes

COCO_TRAIN_IMAGES = 118_287
# the official MODEL_ZOO: GPUs, training hours, epochs (TITAN V)
OFFICIAL_RUNS = {"ctdet_coco_resdcn18": (4, 28, 140), "ctdet_coco_dla_1x": (8, 57, 140), "ctdet_coco_hg": (5, 109, 50)}


def as_coco_jpegs(source: CocoDetection, count: int, folder: Path) -> CocoDetection:
    """The first ``count`` images of ``source`` stretched to 640x480 and saved as JPEG, boxes scaled."""
    images, annotations = [], []
    for index in range(count):
        record = source[index]
        height, width = record.image.shape[:2]
        name = f"{index:06d}.jpg"
        cv2.imwrite(str(folder / name), cv2.cvtColor(cv2.resize(record.image, (640, 480)), cv2.COLOR_RGB2BGR))
        images.append({"id": index + 1, "file_name": name, "width": 640, "height": 480})
        for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
            sx, sy = 640 / width, 480 / height
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": source.cat_ids[label],
                "bbox": [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy], "area": (x2 - x1) * (y2 - y1) * sx * sy,
                "iscrowd": 0,
            })
    categories = [{"id": cat, "name": name} for cat, name in zip(source.cat_ids, source.class_names)]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return CocoDetection(folder / "instances.json", folder)


def samples_per_second(source: CocoDetection, size: int, task: str, color_aug: bool, count: int) -> float:
    dataset = CenterNetDataset(source, (size, size), True, task=task, color_aug=color_aug)
    dataset[(0, 0)]  # warm-up
    started = time.perf_counter()
    for index in range(count):
        dataset[(1, index % len(dataset))]
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--color-aug", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    shapes = CocoDetection.from_root(ensure_shapes(), "train")
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        jpegs = as_coco_jpegs(shapes, args.images, Path(folder))
        print(f"one worker (one thread), {args.size}x{args.size}, colour augmentation {args.color_aug}:")
        print("| images | task | samples/s |")
        print("| --- | --- | --- |")
        for name, source in (("shapes 256x256 PNG", shapes), ("640x480 JPEG", jpegs)):
            for task in ("centernet", "cornernet"):
                rates[name, task] = samples_per_second(source, args.size, task, args.color_aug, args.images)
                print(f"| {name} | {task} | {rates[name, task]:.1f} |", flush=True)
    slowest = min(rate for (name, _), rate in rates.items() if name == "640x480 JPEG")
    print(f"workers per GPU at the official training speed (640x480 JPEG, {slowest:.1f} samples/s per worker):")
    for run, (gpus, hours, epochs) in OFFICIAL_RUNS.items():
        per_gpu = COCO_TRAIN_IMAGES * epochs / (hours * 3600) / gpus
        print(f"  {run}: {per_gpu:.1f} images/s per GPU -> {math.ceil(per_gpu / slowest)} workers")


if __name__ == "__main__":
    main()
