"""Images per second of CenterNet target encoding (one process, one core).

    python benchmarks/bench_targets.py [--classes 80] [--output 128]

Encodes random boxes into a ``(C, 128, 128)`` heatmap plus the size / offset / index / mask
arrays, as the data loader does for a 512x512 input, for 10 and for 100 objects per image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from minicenternet.targets import encode_centernet


def images_per_second(num_objects: int, num_classes: int, output: int, seconds: float = 2.0) -> float:
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(64):
        xy = rng.uniform(0, output * 0.9, (num_objects, 2))
        wh = rng.uniform(1, output * 0.3, (num_objects, 2))
        samples.append((np.concatenate([xy, xy + wh], 1), rng.integers(0, num_classes, num_objects)))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        boxes, labels = samples[count % len(samples)]
        encode_centernet(boxes, labels, num_classes, (output, output))
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--output", type=int, default=128, help="side of the output map (input / 4)")
    args = parser.parse_args()
    for n in (10, 100):
        rate = images_per_second(n, args.classes, args.output)
        print(f"encode_centernet, {n:3d} objects, ({args.classes}, {args.output}, {args.output}): {rate:8.0f} images/s")


if __name__ == "__main__":
    main()
