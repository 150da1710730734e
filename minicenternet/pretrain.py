"""Classification pre-training of a ResNet trunk on object crops: the paper's ImageNet start, in small.

CenterNet never trains a backbone from scratch: ResNet, DLA and Hourglass all start from
ImageNet classification weights (CenterNet Sec. 5, "Training"). Those weights cannot be
downloaded here, and without them a ResNet-18 CenterNet on the shapes set spends its first
thousand steps learning *where* objects are while its five class heatmaps stay identical: the
features at the object centres carry no class information yet (a linear probe on them scores
chance).

The same two-stage recipe works in small: crop every training object (square, with some context
and a random shift), train torchvision's ResNet as a plain classifier on the crops for a few
hundred steps, keep the trunk and drop the classifier. :func:`minicenternet.train.train` does this
first when ``TrainConfig.pretrain_steps > 0`` and loads the result through the same
``pretrained=<path>`` route as ImageNet weights. Only the training split and its labels are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .budget import mean_seconds, untouched_rng
from .checkpoint import save_checkpoint
from .data.coco import CocoDetection, ImageReadError
from .data.transforms import affine_matrix, normalize_batch, warp_image
from .device import AmpSetting, autocast, fused_adam
from .models.resnet import TRUNKS

__all__ = ["object_crops", "pretrain_trunk", "pretrain_step_seconds"]


def object_crops(
    source: CocoDetection,
    crop_size: int = 64,
    min_size: float = 12.0,
    context: tuple[float, float] = (1.0, 1.8),
    shift: float = 0.1,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Square crops around every object at least ``min_size`` pixels on its longer side.

    Each crop is ``context`` times the object's longer side (drawn uniformly in the range),
    centred on the box centre moved by up to ``shift`` of that side, resized to ``crop_size``;
    pixels outside the image are 0 (as in the training crops). Unreadable images are skipped.

    Returns:
        ``crops (N, 3, crop_size, crop_size)`` uint8 RGB and ``labels (N,)`` int64.
    """
    rng = np.random.default_rng(seed)
    size = (crop_size, crop_size)
    crops, labels = [], []
    for index in range(len(source)):
        try:
            record = source[index]
        except ImageReadError:
            continue
        for (x1, y1, x2, y2), label in zip(record.boxes, record.labels):
            side = max(x2 - x1, y2 - y1)
            if side < min_size:
                continue
            extent = side * rng.uniform(*context)
            cx = (x1 + x2) / 2 + rng.uniform(-shift, shift) * side
            cy = (y1 + y2) / 2 + rng.uniform(-shift, shift) * side
            crops.append(warp_image(record.image, affine_matrix((cx, cy), extent, size), size))
            labels.append(int(label))
    if not crops:
        raise ValueError(f"{source.ann_file}: no object of at least {min_size} px to pre-train on")
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def _classifier(
    arch: str, num_classes: int, device: torch.device, lr: float = 1e-3
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    if arch not in TRUNKS:
        raise ValueError(f"classification pre-training needs a ResNet trunk ({sorted(TRUNKS)}), got {arch!r}")
    model = TRUNKS[arch][0](num_classes=num_classes).to(device, memory_format=torch.channels_last).train()
    return model, torch.optim.Adam(model.parameters(), lr=lr, fused=fused_adam(device))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, targets: Tensor, amp: AmpSetting) -> Tensor:
    """One Adam step on ``images (B, 3, S, S)`` uint8 and ``targets (B,)``; returns the loss."""
    device = next(model.parameters()).device
    images = normalize_batch(images.to(device)).contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), targets.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def pretrain_trunk(
    source: CocoDetection,
    out: str | Path,
    arch: str = "resnet18",
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    crop_size: int = 64,
    device: str | torch.device = "cpu",
    amp: AmpSetting = "auto",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train torchvision's ``arch`` (``resnet18`` or ``resnet101``) to classify the objects of ``source`` and save its trunk.

    Adam, random horizontal flips, cross-entropy; ``amp`` as in
    :func:`minicenternet.device.resolve_amp`. The saved file is the model's ``state_dict``
    without ``fc.`` (written atomically), ready for ``build_model(..., pretrained=out)``.

    Returns:
        ``out``.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, optimizer = _classifier(arch, source.num_classes, device, lr)
    crops, labels = object_crops(source, crop_size, seed=seed)
    bar = tqdm(range(steps), desc="pre-train trunk", disable=not progress, leave=False)
    for _ in bar:
        pick = torch.randint(len(crops), (batch_size,), generator=generator)
        images, targets = crops[pick], labels[pick]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        images[flip] = images[flip].flip(3)
        loss = _step(model, optimizer, images, targets, amp)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    trunk = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return save_checkpoint(trunk, out)


def pretrain_step_seconds(
    arch: str = "resnet18",
    num_classes: int = 5,
    batch_size: int = 64,
    crop_size: int = 64,
    device: str | torch.device = "cpu",
    amp: AmpSetting = "auto",
    repeats: int = 3,
) -> float:
    """Seconds of one :func:`pretrain_trunk` step (the mean of ``repeats`` in a row), timed on
    random crops with a throwaway model (the global RNG is left as it was)."""
    device = torch.device(device)
    with untouched_rng(device):
        model, optimizer = _classifier(arch, num_classes, device)
        images = torch.randint(0, 256, (batch_size, 3, crop_size, crop_size), dtype=torch.uint8)
        targets = torch.randint(num_classes, (batch_size,))
        step = lambda: _step(model, optimizer, images, targets, amp)  # noqa: E731
        return mean_seconds(step, warmup=1, repeats=repeats, device=device)
