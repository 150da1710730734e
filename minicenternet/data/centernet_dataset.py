"""Training samples for CenterNet and CornerNet: read, crop and flip an image, then encode its targets.

This is the reference ``ctdet`` loader: a random affine crop (scale x0.6 ... x1.3, centre drawn
away from the borders) and a horizontal flip, the same affine map applied to the boxes at the
output stride, optionally the reference colour augmentation of the warped image, then the task's
encoder, :func:`minicenternet.targets.encode_centernet` or
:func:`~minicenternet.targets.encode_cornernet` (a flipped image is encoded after the flip, so
its top-left corners are those of the mirrored boxes).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from ..targets import ENCODERS
from .coco import CocoDetection, ImageReadError, Record
from .transforms import (
    affine_matrix, apply_affine_to_boxes, augment_colour, hflip_image_and_boxes, jitter_crop_params, random_crop_params,
    warp_image,
)

__all__ = ["CenterNetDataset", "OUTPUT_STRIDE"]

OUTPUT_STRIDE = 4


class CenterNetDataset(Dataset):
    """Network inputs and CenterNet (or CornerNet) targets from a :class:`CocoDetection`.

    Args:
        source: the images and boxes.
        input_size: ``(H, W)`` of the network input, divisible by 32.
        train: random augmentation when ``True``; centred, unflipped resize otherwise.
        max_objects: ``K`` of the target arrays.
        scale_range: range of the random scale factor (reference: 0.6 to 1.3 in steps of 0.1).
        flip_prob: probability of a horizontal flip (reference: 0.5).
        random_crop: draw the reference random scale and centre; ``False`` keeps the whole image
            (centred, longer side fitted to the input).
        jitter: with ``random_crop=False``, jitter the whole-image view as the reference's
            no-random-crop branch does (:func:`jitter_crop_params`); ``False`` keeps it still
            and only flips.
        task: ``"centernet"`` or ``"cornernet"``: which encoder of
            :data:`minicenternet.targets.ENCODERS` makes the targets.
        seed: with the ``(epoch, index)`` keys of :class:`~minicenternet.data.sampler.EpochSampler`,
            each sample's augmentation is drawn from a generator seeded by ``(seed, epoch, index)``:
            the same with any number of loader workers or processes, and after a resume. A plain
            integer index draws from torch's global generator instead.
        color_aug: in training, apply :func:`augment_colour` (the reference's colour jitter and PCA
            lighting) to the warped image, as the reference does after its crop and flip. It draws
            from the sample's own generator after the crop and flip draws, so the geometry of a
            seed's sample is the same with or without it, and the targets are untouched.

    Each item is ``(image (3, H, W) uint8 RGB, targets)`` with ``targets`` the tensors of
    :func:`encode_centernet` (or :func:`encode_cornernet`) at ``(H/4, W/4)`` and ``image_id``,
    the image's id in the annotation file. An unreadable image is reported once and
    replaced by the next readable one, so one bad file never stops a long run.
    """

    def __init__(
        self,
        source: CocoDetection,
        input_size: tuple[int, int],
        train: bool = True,
        max_objects: int = 128,
        scale_range: tuple[float, float] = (0.6, 1.4),
        flip_prob: float = 0.5,
        random_crop: bool = True,
        jitter: bool = False,
        task: str = "centernet",
        color_aug: bool = False,
        seed: int = 0,
    ) -> None:
        if input_size[0] % 32 or input_size[1] % 32:
            raise ValueError(f"input_size must be divisible by 32, got {input_size}")
        if task not in ENCODERS:
            raise ValueError(f"unknown task {task!r}; choose from {tuple(ENCODERS)}")
        self.encode = ENCODERS[task]
        self.source, self.input_size, self.train = source, tuple(input_size), train
        self.max_objects, self.scale_range, self.flip_prob = max_objects, scale_range, flip_prob
        self.random_crop, self.jitter, self.color_aug, self.seed = random_crop, jitter, color_aug, seed
        self.output_size = (input_size[0] // OUTPUT_STRIDE, input_size[1] // OUTPUT_STRIDE)
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, index: int) -> Record:
        for offset in range(len(self.source)):
            try:
                return self.source[(index + offset) % len(self.source)]
            except ImageReadError as err:
                if str(err) not in self._reported:
                    self._reported.add(str(err))
                    warnings.warn(f"skipping unreadable sample: {err}", stacklevel=2)
        raise ImageReadError(f"{self.source.image_dir}: no readable image in the dataset")

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        record = self._read(index)
        image, boxes = record.image, record.boxes
        height, width = image.shape[:2]
        center, scale = np.array([width / 2, height / 2], dtype=np.float32), float(max(height, width))
        if self.train:
            if epoch is None:  # a sample asked for by index alone: drawn from torch's generator
                rng = np.random.default_rng(int(torch.randint(2**62, ())))
            else:  # the training loader's (epoch, index): a function of the seed, whatever the process or worker
                rng = np.random.default_rng([self.seed, epoch, index])
            if self.random_crop:
                center, scale = random_crop_params((height, width), rng, self.scale_range)
            elif self.jitter:
                center, scale = jitter_crop_params((height, width), rng)
            if rng.random() < self.flip_prob:
                image, boxes = hflip_image_and_boxes(image, boxes)
                center[0] = width - center[0] - 1
        warped = warp_image(image, affine_matrix(center, scale, self.input_size), self.input_size)
        if self.train and self.color_aug:
            warped = augment_colour(warped, rng)
        out_boxes = apply_affine_to_boxes(boxes, affine_matrix(center, scale, self.output_size))
        targets = self.encode(out_boxes, record.labels, self.source.num_classes, self.output_size, self.max_objects)
        tensors = {k: torch.from_numpy(v) for k, v in targets.items()}
        tensors["image_id"] = torch.tensor(record.image_id)  # to name the images of a batch that goes wrong
        return torch.from_numpy(warped).permute(2, 0, 1).contiguous(), tensors
