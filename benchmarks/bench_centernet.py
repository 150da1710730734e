"""Throughput of CenterNet-ResNet-18: training steps, inference latency, decoding.

    python benchmarks/bench_centernet.py                 # best device, all cases
    python benchmarks/bench_centernet.py --device cpu --sizes 256 --batch-size 8

Prints one line per case: training images/s (forward + loss + backward + Adam step on random
data with real targets, AMP when ``--amp``), inference latency of one image (forward only,
batch 1) and the decoding time of a ``(1, 80, 128, 128)`` heatmap with K = 100. Each figure is
the median of ``--repeats`` timed runs after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from minicenternet.decode import centernet_decode
from minicenternet.device import autocast, default_device, fused_adam
from minicenternet.losses import centernet_loss
from minicenternet.models import build_model
from minicenternet.targets import encode_centernet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _targets(batch: int, size: int, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    out = size // 4
    samples = []
    for _ in range(batch):
        xy = rng.uniform(0, out * 0.8, (10, 2))
        wh = rng.uniform(2, out * 0.2, (10, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        samples.append(encode_centernet(boxes, rng.integers(0, num_classes, 10), num_classes, (out, out)))
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])).to(device) for k in samples[0]}


def bench_train(arch: str, dcn: bool, size: int, batch: int, device: torch.device, amp: bool, warmup: int, repeats: int) -> float:
    """Training images per second."""
    model = build_model(arch, num_classes=80, dcn=dcn).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4, fused=fused_adam(device))
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = _targets(batch, size, 80, device)

    def step() -> None:
        with autocast(device, amp):
            outputs = model(images)
        loss = centernet_loss(outputs, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / _median_seconds(step, device, warmup, repeats)


def bench_latency(arch: str, dcn: bool, size: int, device: torch.device, amp: bool, warmup: int, repeats: int) -> float:
    """Milliseconds of one forward pass on one image."""
    model = build_model(arch, num_classes=80, dcn=dcn).to(device).to(memory_format=torch.channels_last).eval()
    image = torch.randn(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward() -> None:
        with autocast(device, amp):
            model(image)

    return 1000 * _median_seconds(forward, device, warmup, repeats)


def bench_decode(device: torch.device, warmup: int, repeats: int) -> float:
    """Milliseconds to decode a (1, 80, 128, 128) output with K = 100."""
    generator = torch.Generator().manual_seed(0)
    hm = torch.randn(1, 80, 128, 128, generator=generator).to(device)
    wh = torch.rand(1, 2, 128, 128, generator=generator).to(device) * 20
    reg = torch.rand(1, 2, 128, 128, generator=generator).to(device)
    return 1000 * _median_seconds(lambda: centernet_decode(hm, wh, reg, K=100), device, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--sizes", default="256,512", help="comma-separated square input sides")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    amp = device.type == "cuda" if args.amp is None else args.amp
    batch = args.batch_size or (32 if device.type == "cuda" else 8)
    torch.backends.cudnn.benchmark = True
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} amp={amp} batch={batch}")
    for size in (int(s) for s in args.sizes.split(",")):
        for dcn in (False, True):
            train_ips = bench_train(args.arch, dcn, size, batch, device, amp, args.warmup, args.repeats)
            latency = bench_latency(args.arch, dcn, size, device, amp, args.warmup, args.repeats)
            print(f"{args.arch} dcn={dcn!s:5} {size}x{size}: train {train_ips:7.1f} img/s   inference {latency:7.1f} ms/img", flush=True)
    print(f"decode (1, 80, 128, 128), K=100: {bench_decode(device, args.warmup, args.repeats * 4):.2f} ms")


if __name__ == "__main__":
    main()
