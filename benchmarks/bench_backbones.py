"""The four backbones of "Objects as Points" side by side: parameters, FLOPs, forward and
forward + backward time; with ``--tasks centernet cornernet``, CornerNet beside CenterNet on the
same Hourglass.

    python benchmarks/bench_backbones.py                                   # all four, 256 and 512, batch 2
    python benchmarks/bench_backbones.py --archs resnet18 dla34 --sizes 256 --device cpu --threads 2
    python benchmarks/bench_backbones.py --archs hourglass-small --tasks centernet cornernet --sizes 128 --batch-size 16

For each backbone (80 classes, the paper's configuration: DCN in the ResNet and DLA upsampling
paths) and input side it prints the parameter count, the forward GFLOPs of one image (2 FLOPs per
multiply-add, counted by ``torch.utils.flop_counter``; a deformable convolution counts as the 3x3
convolution it replaces), the
median seconds of a forward pass in eval mode without gradients, and of forward + loss +
backward in train mode (Hourglass: both stacks' heads and the loss averaged over them; the
task's own loss, :data:`minicenternet.losses.TASK_LOSSES`), at
``--batch-size``. Mixed precision as ``--amp/--no-amp``, by default as
:func:`minicenternet.device.resolve_amp` decides for the device; the deformable convolutions as
``--dcn-impl`` (see :func:`minicenternet.models.dcn.deform_conv2d`; ``auto``: the native one on a CPU).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_centernet import _targets
from minicenternet.budget import median_seconds
from minicenternet.device import autocast, default_device, resolve_amp
from minicenternet.losses import TASK_LOSSES
from minicenternet.models import CORNERNET_ARCHS, TASKS, build_model
from minicenternet.models.dcn import IMPLS, set_impl


def forward_gflops(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward GFLOPs of one ``size x size`` image, deformable convolutions included: the native
    DCN ends in one matrix product, which ``FlopCounterMode`` counts as the 3x3 convolution it
    replaces (its bilinear sampling, a gather, is not counted)."""
    previous = set_impl(model, "native")  # torchvision's kernel is invisible to the counter
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model.eval()(torch.zeros(1, 3, size, size, device=device))
    finally:
        for module, impl in previous.items():
            module.impl = impl
    return counter.get_total_flops() / 1e9


def time_backbone(model: torch.nn.Module, size: int, batch: int, device: torch.device, amp: bool, repeats: int) -> tuple[float, float]:
    """Median seconds of a forward pass (eval, no grad) and of forward + loss + backward (train)."""
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = _targets(batch, size, 80, device, model.task)
    loss = TASK_LOSSES[model.task]

    def forward() -> None:
        with torch.no_grad(), autocast(device, amp):
            model.eval()(images)

    def forward_backward() -> None:
        with autocast(device, amp):
            outputs = model.train()(images)
        model.zero_grad(set_to_none=True)
        loss(outputs, targets)["loss"].backward()

    return median_seconds(forward, 1, repeats, device), median_seconds(forward_backward, 1, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "dla34", "resnet101", "hourglass104"])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["centernet"], help="cornernet: Hourglass archs only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dcn-impl", choices=IMPLS, default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    amp = resolve_amp(device, "auto" if args.amp is None else args.amp)
    print(f"device {device}, {torch.get_num_threads()} threads, {amp.describe()}, batch {args.batch_size}, "
          f"DCN {args.dcn_impl}")
    print("| backbone | task | params | input | GFLOPs / image | forward s | forward + backward s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.archs:
        for task in args.tasks:
            if task == "cornernet" and arch not in CORNERNET_ARCHS:
                continue
            model = build_model(arch, task, num_classes=80).to(device, memory_format=torch.channels_last)
            set_impl(model, args.dcn_impl)
            params = sum(p.numel() for p in model.parameters())
            for size in args.sizes:
                gflops = forward_gflops(model, size, device)
                fwd, fwd_bwd = time_backbone(model, size, args.batch_size, device, amp.enabled, args.repeats)
                print(f"| {arch} | {task} | {params:,} | {size} | {gflops:.1f} | {fwd:.3f} | {fwd_bwd:.3f} |", flush=True)
            del model


if __name__ == "__main__":
    main()
