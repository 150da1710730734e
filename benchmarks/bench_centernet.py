"""Throughput of CenterNet-ResNet-18: training steps, inference latency, decoding.

    python benchmarks/bench_centernet.py                 # best device, all cases
    python benchmarks/bench_centernet.py --device cpu --sizes 256 --batch-size 8
    python benchmarks/bench_centernet.py --device cpu --sizes 128 --batch-size 16 --no-dcn --no-amp

Prints one line per case: training images/s (forward + loss + backward + Adam step on random
data with real targets; mixed precision as ``--amp/--no-amp`` say, by default as
:func:`minicenternet.device.resolve_amp` decides for the device), inference latency of one image (forward only,
batch 1) and the decoding time of a ``(1, 80, 128, 128)`` heatmap with K = 100. Each figure is
the median of ``--repeats`` timed runs after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from minicenternet.budget import median_seconds
from minicenternet.decode import centernet_decode
from minicenternet.device import autocast, default_device, fused_adam, resolve_amp
from minicenternet.losses import centernet_loss
from minicenternet.models import build_model
from minicenternet.targets import ENCODERS


def _targets(batch: int, size: int, num_classes: int, device: torch.device, task: str = "centernet") -> dict[str, torch.Tensor]:
    """A batch of the ``task``'s targets for 10 random boxes per image."""
    rng = np.random.default_rng(0)
    out = size // 4
    samples = []
    for _ in range(batch):
        xy = rng.uniform(0, out * 0.8, (10, 2))
        wh = rng.uniform(2, out * 0.2, (10, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        samples.append(ENCODERS[task](boxes, rng.integers(0, num_classes, 10), num_classes, (out, out)))
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

    return batch / median_seconds(step, warmup, repeats, device)


def bench_latency(arch: str, dcn: bool, size: int, device: torch.device, amp: bool, warmup: int, repeats: int) -> float:
    """Milliseconds of one forward pass on one image."""
    model = build_model(arch, num_classes=80, dcn=dcn).to(device).to(memory_format=torch.channels_last).eval()
    image = torch.randn(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward() -> None:
        with autocast(device, amp):
            model(image)

    return 1000 * median_seconds(forward, warmup, repeats, device)


def bench_decode(device: torch.device, warmup: int, repeats: int) -> float:
    """Milliseconds to decode a (1, 80, 128, 128) output with K = 100."""
    generator = torch.Generator().manual_seed(0)
    hm = torch.randn(1, 80, 128, 128, generator=generator).to(device)
    wh = torch.rand(1, 2, 128, 128, generator=generator).to(device) * 20
    reg = torch.rand(1, 2, 128, 128, generator=generator).to(device)
    return 1000 * median_seconds(lambda: centernet_decode(hm, wh, reg, K=100), warmup, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--sizes", default="256,512", help="comma-separated square input sides")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 32 on CUDA, 8 on CPU)")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="mixed precision (default: auto, on for CUDA and on CPUs with native bf16 where it is faster)",
    )
    parser.add_argument(
        "--dcn", action=argparse.BooleanOptionalAction, default=None, help="only with (or without) DCN (default: both)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    choice = resolve_amp(device, "auto" if args.amp is None else args.amp)
    amp = choice.enabled
    batch = args.batch_size or (32 if device.type == "cuda" else 8)
    torch.backends.cudnn.benchmark = True
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} batch={batch}")
    print(choice.describe())
    for size in (int(s) for s in args.sizes.split(",")):
        for dcn in (False, True) if args.dcn is None else (args.dcn,):
            train_ips = bench_train(args.arch, dcn, size, batch, device, amp, args.warmup, args.repeats)
            latency = bench_latency(args.arch, dcn, size, device, amp, args.warmup, args.repeats)
            print(f"{args.arch} dcn={dcn!s:5} {size}x{size}: train {train_ips:7.1f} img/s   inference {latency:7.1f} ms/img", flush=True)
    print(f"decode (1, 80, 128, 128), K=100: {bench_decode(device, args.warmup, args.repeats * 4):.2f} ms")


if __name__ == "__main__":
    main()
