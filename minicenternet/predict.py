"""Run a trained CenterNet on images and get torchvision-style predictions in image pixels.

Example::

    detector = Detector.from_checkpoint("runs/shapes/best.pt")
    predictions = detector(["a.png", "b.png"])   # [{"boxes", "scores", "labels"}, ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint
from .data.coco import read_image
from .data.transforms import affine_matrix, normalize_batch, warp_image
from .device import autocast, default_device
from .decode import boxes_to_image, decode_scores, merge_flip, padded_size
from .losses import clamped_sigmoid
from .models import build_model

__all__ = ["Detector"]

ImageLike = str | Path | np.ndarray | Tensor


def _as_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Paths are read from disk; arrays are ``(H, W, 3)`` uint8 RGB; tensors ``(3, H, W)`` in [0, 1] or uint8."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Tensor):
        array = image.detach().cpu()
        if array.dtype != torch.uint8:
            array = (array.clamp(0, 1) * 255).round().to(torch.uint8)
        return np.ascontiguousarray(array.permute(1, 2, 0).numpy())
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {array.shape} {array.dtype}")
    return array


class Detector:
    """Pre-processing, network, decoding and the inverse affine map, in one callable.

    Args:
        model: a CenterNet from :func:`minicenternet.models.build_model`.
        input_size: ``None`` tests at the original resolution, zero-padded (centred) to a
            multiple of 32 as the paper does; an int ``S`` resizes the longer side to ``S`` and
            pads to ``S x S`` (the training-time view).
        flip: flip test (average the heatmaps and sizes of the image and its mirror).
        K: detections per image before the score threshold (100 in the paper).
        score_threshold: drop detections below this score.
        device: where the network runs (default: :func:`default_device`).
        class_names: names of the contiguous labels, kept for drawing.
        pad_variant: see :func:`minicenternet.decode.padded_size`.
        amp: run the network under :func:`minicenternet.device.autocast` (bf16 on CPU).
        class_agnostic: merge the class heatmaps (maximum over classes) before peak extraction
            and label every detection 0: the detector's localisation alone, a diagnostic for
            how much AP the classification costs (evaluate it with ``class_agnostic`` COCOeval).
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int | None = None,
        flip: bool = False,
        K: int = 100,
        score_threshold: float = 0.0,
        device: str | torch.device | None = None,
        class_names: Sequence[str] | None = None,
        pad_variant: str = "reference",
        amp: bool = False,
        class_agnostic: bool = False,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.input_size, self.flip, self.K = input_size, flip, K
        self.score_threshold, self.pad_variant, self.amp = score_threshold, pad_variant, amp
        self.class_agnostic = class_agnostic
        self.class_names = list(class_names) if class_names is not None else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None, **kwargs) -> "Detector":
        """Rebuild the model recorded in a training checkpoint and wrap it."""
        checkpoint = load_checkpoint(path, map_location="cpu")
        meta = checkpoint["model_config"]
        model = build_model(meta["arch"], num_classes=meta["num_classes"], dcn=meta["dcn"])
        model.load_state_dict(checkpoint["model"])
        kwargs.setdefault("class_names", meta.get("class_names"))
        return cls(model, device=device, **kwargs)

    def _crop(self, height: int, width: int) -> tuple[np.ndarray, float, tuple[int, int]]:
        """Centre, scale and input size ``(H_in, W_in)`` of the test-time affine map."""
        if self.input_size is None:
            center = np.array([width // 2, height // 2], dtype=np.float32)  # integer shift, as the reference
            size = (padded_size(height, self.pad_variant), padded_size(width, self.pad_variant))
            return center, float(size[1]), size
        center = np.array([width / 2, height / 2], dtype=np.float32)
        return center, float(max(height, width)), (self.input_size, self.input_size)

    @torch.inference_mode()
    def predict_one(self, image: ImageLike) -> dict[str, Tensor]:
        """Detections of one image: ``{"boxes": (N, 4) xyxy pixels, "scores": (N,), "labels": (N,)}``."""
        rgb = _as_rgb_uint8(image)
        height, width = rgb.shape[:2]
        center, scale, in_size = self._crop(height, width)
        warped = warp_image(rgb, affine_matrix(center, scale, in_size), in_size)
        batch = torch.from_numpy(warped).permute(2, 0, 1)[None].to(self.device)
        if self.flip:
            batch = torch.cat([batch, batch.flip(3)])
        with autocast(self.device, self.amp):
            outputs = self.model(normalize_batch(batch))
        if self.flip:
            heat, wh, reg = merge_flip(outputs)
        else:
            heat, wh, reg = clamped_sigmoid(outputs["hm"]), outputs["wh"], outputs["reg"]
        if self.class_agnostic:
            heat = heat.amax(1, keepdim=True)
        boxes, scores, labels = decode_scores(heat, wh, reg, self.K)
        keep = scores[0] >= self.score_threshold
        out_size = (heat.shape[2], heat.shape[3])
        mapped = boxes_to_image(boxes[0][keep], center, scale, out_size, (height, width))
        return {"boxes": torch.from_numpy(mapped), "scores": scores[0][keep].cpu(), "labels": labels[0][keep].cpu()}

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> list[dict[str, Tensor]]:
        """Predictions for one image or a list of images (paths, ``(H, W, 3)`` uint8 RGB arrays
        or ``(3, H, W)`` tensors), one dict per image, boxes in original-image pixels."""
        if isinstance(images, (str, Path, np.ndarray, Tensor)):
            images = [images]
        return [self.predict_one(image) for image in images]
