"""DCNv2 on the CPU: the native PyTorch formulation against torchvision's kernel and a plain conv.

    python benchmarks/bench_dcn.py                                   # every layer shape, then the model
    python benchmarks/bench_dcn.py --archs resnet18 --sizes 256 --batches 2 --no-model
    python benchmarks/bench_dcn.py --no-layers --threads 2           # only the whole model

Per layer: the distinct input shapes of the ``ModulatedDeformConv2d`` layers of ResNet-18 and
DLA-34 (80 classes) at each ``--sizes`` input side, found by hooking the built models, at each
``--batches``. For each, the median milliseconds of the forward pass and of forward + backward
(gradients of input, offsets, mask, weight and bias; offsets ~N(0, 2) px, random mask, a random
upstream gradient) of ``deform_conv2d`` with ``impl="native"`` and ``impl="torchvision"``, and
of ``F.conv2d`` of the same shape, with the ratios native / torchvision and native / conv.

Whole model (``--model``): ResNet-18 + DCN at 256x256, training images/s (batch 8, forward +
loss + backward + Adam step, float32) and inference ms/img (batch 1), with the DCN layers set to
each implementation, and without DCN.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_centernet import _targets
from minicenternet.budget import median_seconds
from minicenternet.device import fused_adam
from minicenternet.losses import centernet_loss
from minicenternet.models import build_model
from minicenternet.models.dcn import ModulatedDeformConv2d, deform_conv2d, set_impl

Shape = tuple[int, int, int, int]  # in_channels, height, width, out_channels


def dcn_shapes(arch: str, size: int) -> list[Shape]:
    """Distinct ``(C, H, W, C_out)`` of the DCN layers of ``arch`` at a ``size x size`` input."""
    model = build_model(arch, num_classes=80).eval()
    shapes: list[Shape] = []
    for module in model.modules():
        if isinstance(module, ModulatedDeformConv2d):
            module.register_forward_hook(
                lambda m, inputs, _: shapes.append((*inputs[0].shape[1:], m.weight.shape[0]))
            )
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return list(dict.fromkeys(shapes))


def bench_layer(batch: int, shape: Shape, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of forward (``*_f``) and forward + backward (``*_fb``) of one 3x3 layer."""
    channels, height, width, out_channels = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=g).requires_grad_()
    offset = (torch.randn(batch, 18, height, width, generator=g) * 2).requires_grad_()
    mask = torch.rand(batch, 9, height, width, generator=g).requires_grad_()
    weight = (torch.randn(out_channels, channels, 3, 3, generator=g) * 0.05).requires_grad_()
    bias = torch.zeros(out_channels).requires_grad_()
    grad_out = torch.randn(batch, out_channels, height, width, generator=g)
    runs = {
        "native": lambda: deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, impl="native"),
        "torchvision": lambda: deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, impl="torchvision"),
        "conv": lambda: F.conv2d(x, weight, bias, 1, 1),
    }
    times = {}
    for name, run in runs.items():
        with torch.no_grad():
            times[f"{name}_f"] = 1000 * median_seconds(run, warmup, repeats)
        times[f"{name}_fb"] = 1000 * median_seconds(lambda: run().backward(grad_out), warmup, repeats)
    return times


def _model(dcn: bool, impl: str) -> torch.nn.Module:
    model = build_model("resnet18", num_classes=80, dcn=dcn)
    set_impl(model, impl)
    return model.to(memory_format=torch.channels_last)


def bench_model(dcn: bool, impl: str, size: int, batch: int, warmup: int, repeats: int) -> tuple[float, float]:
    """Training images/s at ``batch`` and inference ms/img at batch 1, float32 on the CPU."""
    model = _model(dcn, impl).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4, fused=fused_adam("cpu"))
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = _targets(batch, size, 80, torch.device("cpu"))

    def step() -> None:
        loss = centernet_loss(model(images), targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_ips = batch / median_seconds(step, warmup, repeats)
    model.eval()
    image = images[:1].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        latency = 1000 * median_seconds(lambda: model(image), warmup, repeats)
    return train_ips, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "dla34"])
    parser.add_argument("--sizes", default="256,512", help="comma-separated square input sides")
    parser.add_argument("--batches", default="2,8", help="comma-separated layer batch sizes")
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True, help="per-layer timings")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True, help="whole-model timings")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}")
    if args.layers:
        shapes: dict[Shape, list[str]] = {}
        for size in (int(s) for s in args.sizes.split(",")):
            for arch in args.archs:
                for shape in dcn_shapes(arch, size):
                    shapes.setdefault(shape, []).append(f"{arch}@{size}")
        print("| input | used by | native f / fb ms | torchvision f / fb ms | conv f / fb ms | fb native/tv | fb native/conv |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for batch in (int(b) for b in args.batches.split(",")):
            for shape, users in shapes.items():
                t = bench_layer(batch, shape, args.warmup, args.repeats)
                channels, height, width, out_channels = shape
                print(
                    f"| ({batch}, {channels}, {height}, {width}) -> {out_channels} | {', '.join(users)} "
                    f"| {t['native_f']:.1f} / {t['native_fb']:.1f} | {t['torchvision_f']:.1f} / {t['torchvision_fb']:.1f} "
                    f"| {t['conv_f']:.1f} / {t['conv_fb']:.1f} | {t['native_fb'] / t['torchvision_fb']:.2f} "
                    f"| {t['native_fb'] / t['conv_fb']:.1f} |",
                    flush=True,
                )
    if args.model:
        print("| resnet18, 256x256 | train img/s (batch 8) | inference ms/img |")
        print("| --- | --- | --- |")
        for label, dcn, impl in (("DCN native", True, "native"), ("DCN torchvision", True, "torchvision"), ("no DCN", False, "auto")):
            train_ips, latency = bench_model(dcn, impl, 256, 8, args.warmup, args.repeats)
            print(f"| {label} | {train_ips:.2f} | {latency:.1f} |", flush=True)


if __name__ == "__main__":
    main()
