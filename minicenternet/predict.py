"""Run a trained CenterNet or CornerNet on images and get torchvision-style predictions in image pixels.

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

from .checkpoint import load_run_checkpoint
from .data.coco import read_image
from .data.transforms import affine_matrix, normalize_batch, warp_image
from .device import AmpSetting, autocast, default_device
from .decode import (
    boxes_to_image, decode_corners, decode_scores, heatmap_probabilities, merge_flip, merge_scales, mirror_boxes,
    padded_size,
)
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

    The model's ``task`` attribute chooses the decoding. CenterNet: 3x3 peaks of the centre
    heatmap, top ``K``; soft-NMS only to merge several test scales. CornerNet, as its official
    test (``test/coco.py``): at each scale :func:`~minicenternet.decode.decode_corners` (``K``
    corners of each type, up to 1000 pairs), the rejected pairs (score -1) dropped, boxes clipped
    to the image; then the pairs of every scale (and mirror) pooled, per-class Gaussian soft-NMS
    and the ``K`` best kept, whatever the number of scales: CornerNet always needs soft-NMS, since
    one object's corners make several overlapping pairs.

    Args:
        model: a CenterNet or CornerNet from :func:`minicenternet.models.build_model`. It is moved to
            ``device`` and converted to the memory format in place (``nn.Module.to`` works in
            place); it runs in eval mode while predicting and is returned to the mode it had.
        input_size: ``None`` tests at the original resolution, zero-padded (centred) to the
            model's ``pad_multiple`` (32 for ResNet) as the paper does; an int ``S`` resizes the
            longer side to ``S`` and pads to ``S x S`` (the training-time view).
        flip: flip test. CenterNet: average the heatmaps and sizes of the image and its mirror
            (the centre of a mirrored box is the mirrored centre). CornerNet: decode the image
            and its mirror separately, map the mirror's boxes back with
            :func:`~minicenternet.decode.mirror_boxes` and pool the pairs before soft-NMS, as the
            official CornerNet test does; its heatmaps cannot be averaged, because the mirror of
            a top-left corner is a top-right corner, which no head predicts.
        scales: test scales. Each resizes the original image by the factor (to
            ``int(H * s) x int(W * s)``, as the reference; here the resize is folded into the
            one affine warp), then tests it as ``input_size=None`` does. With more than one,
            the detections of all scales (each with its own flip test) are pooled and merged
            by per-class Gaussian soft-NMS, then the ``K`` best kept: the reference's
            multi-scale test (it uses 0.5, 0.75, 1, 1.25, 1.5). Needs ``input_size=None``.
        K: detections per image before the score threshold (100 in both papers); for CornerNet
            also the corners of each type taken from the heatmaps (100).
        score_threshold: drop detections below this score.
        device: where the network runs (default: :func:`default_device`).
        class_names: names of the contiguous labels, kept for drawing.
        pad_variant: see :func:`minicenternet.decode.padded_size`. (The official CornerNet test
            pads to ``size | 127``, 383 for 256, one pixel short of the Hourglass multiple, and
            maps boxes back by ``383 / 96`` instead of 4, at most one pixel apart; we pad both
            tasks as CenterNet's Hourglass does, 384.)
        amp: mixed precision, ``True``, ``False`` (the default: results that do not depend on
            the CPU) or ``"auto"`` (see :func:`minicenternet.device.resolve_amp`: on a CPU only
            where bf16 is native and faster; what training runs store for their checkpoints).
            The heatmap is computed in fp32 in any case.
        class_agnostic: merge the class heatmaps (maximum over classes) before peak extraction
            and label every detection 0: the detector's localisation alone, a diagnostic for
            how much AP the classification costs (evaluate it with ``class_agnostic`` COCOeval).
        channels_last: run the network in the channels-last memory format (NHWC), about 25 %
            faster on this project's CPU.
        reference: the official test code in three details where ours differs (see
            :mod:`minicenternet.decode`): plain sigmoid instead of the clamped one, boxes not
            clipped to the image (CornerNet's official test clips them: so does ours, either
            way), and the soft-NMS output with its stale rows.
            (Its fourth, 2-decimal COCO results, is ``evaluate(..., decimals=2)``.)
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int | None = None,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        K: int = 100,
        score_threshold: float = 0.0,
        device: str | torch.device | None = None,
        class_names: Sequence[str] | None = None,
        pad_variant: str = "reference",
        amp: AmpSetting = False,
        class_agnostic: bool = False,
        channels_last: bool = True,
        reference: bool = False,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        if input_size is not None and tuple(scales) != (1.0,):
            raise ValueError(f"multi-scale test resizes the original image: use input_size=None, not {input_size}")
        self.input_size, self.flip, self.scales, self.K = input_size, flip, tuple(float(v) for v in scales), K
        self.score_threshold, self.pad_variant, self.amp = score_threshold, pad_variant, amp
        self.class_agnostic, self.reference = class_agnostic, reference
        self.class_names = list(class_names) if class_names is not None else None
        self.task = getattr(model, "task", "centernet")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None, **kwargs) -> "Detector":
        """Rebuild the model recorded in a training checkpoint and wrap it.

        Settings not given in ``kwargs`` come from the checkpoint's ``test_config`` (the
        ``input_size``, ``flip``, ``scales``, ``pad_variant`` and ``amp`` its training run
        validated with), so the detector reproduces the run's AP; checkpoints without one get
        the class defaults.
        """
        checkpoint = load_run_checkpoint(path, map_location="cpu")
        meta = checkpoint["model_config"]
        model = build_model(meta["arch"], meta.get("task", "centernet"), num_classes=meta["num_classes"], dcn=meta["dcn"])
        model.load_state_dict(checkpoint["model"])
        model.eval()  # the detector's own model: it stays in eval mode
        kwargs.setdefault("class_names", meta.get("class_names"))
        for name, value in checkpoint.get("test_config", {}).items():
            kwargs.setdefault(name, value)
        return cls(model, device=device, **kwargs)

    def _crop(self, height: int, width: int, test_scale: float) -> tuple[np.ndarray, float, tuple[int, int]]:
        """Centre and side ``s`` (original pixels) and input size ``(H_in, W_in)`` of the affine
        map that tests the image resized by ``test_scale``."""
        if self.input_size is None:
            height, width = int(height * test_scale), int(width * test_scale)  # the reference's resize
            center = np.array([width // 2, height // 2], dtype=np.float32)  # integer shift, as the reference
            multiple = getattr(self.model, "pad_multiple", 32)
            size = (padded_size(height, self.pad_variant, multiple), padded_size(width, self.pad_variant, multiple))
            return center / test_scale, size[1] / test_scale, size
        center = np.array([width / 2, height / 2], dtype=np.float32)
        return center, float(max(height, width)), (self.input_size, self.input_size)

    def _detect(self, rgb: np.ndarray, test_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """Detections at one test scale: ``boxes (N, 4)`` in original pixels, ``scores (N,)``,
        ``labels (N,)``; CenterNet's top ``K``, or CornerNet's accepted pairs."""
        height, width = rgb.shape[:2]
        center, scale, in_size = self._crop(height, width, test_scale)
        warped = warp_image(rgb, affine_matrix(center, scale, in_size), in_size)
        batch = torch.from_numpy(warped).permute(2, 0, 1)[None].to(self.device)
        if self.flip:
            batch = torch.cat([batch, batch.flip(3)])
        with autocast(self.device, self.amp):
            outputs = self.model(normalize_batch(batch).contiguous(memory_format=self.memory_format))
        if self.task == "cornernet":
            return self._pairs(outputs, center, scale, (height, width))
        clamp = not self.reference
        if self.flip:
            heat, wh, reg = merge_flip(outputs, clamp)
        else:
            heat, wh, reg = heatmap_probabilities(outputs["hm"], clamp), outputs["wh"], outputs["reg"]
        if self.class_agnostic:
            heat = heat.amax(1, keepdim=True)
        boxes, scores, labels = decode_scores(heat, wh, reg, self.K)
        mapped = boxes_to_image(boxes[0], center, scale, (heat.shape[2], heat.shape[3]), (height, width), clamp)
        return torch.from_numpy(mapped), scores[0].float().cpu(), labels[0].cpu()

    def _pairs(
        self, outputs: dict[str, Tensor], center: np.ndarray, scale: float, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """CornerNet's accepted pairs of the image (and its mirror, the second of the batch),
        mapped to original pixels and clipped to the image."""
        clamp = not self.reference
        tl_heat = heatmap_probabilities(outputs["tl_hm"], clamp)
        br_heat = heatmap_probabilities(outputs["br_hm"], clamp)
        if self.class_agnostic:
            tl_heat, br_heat = tl_heat.amax(1, keepdim=True), br_heat.amax(1, keepdim=True)
        boxes, scores, labels = decode_corners(
            tl_heat, br_heat, outputs["tl_emb"], outputs["br_emb"], outputs["tl_off"], outputs["br_off"], self.K
        )  # (1 or 2, num_dets, ...)
        out_size = (tl_heat.shape[2], tl_heat.shape[3])
        if self.flip:
            boxes = torch.stack([boxes[0], mirror_boxes(boxes[1], out_size[1])])
        boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
        accepted = scores > -1
        mapped = boxes_to_image(boxes[accepted], center, scale, out_size, image_size)
        return torch.from_numpy(mapped), scores[accepted].float().cpu(), labels[accepted].cpu()

    @torch.inference_mode()
    def predict_one(self, image: ImageLike) -> dict[str, Tensor]:
        """Detections of one image: ``{"boxes": (N, 4) xyxy pixels, "scores": (N,), "labels": (N,)}``."""
        rgb = _as_rgb_uint8(image)
        was_training = self.model.training
        self.model.eval()
        try:
            per_scale = [self._detect(rgb, test_scale) for test_scale in self.scales]
        finally:
            self.model.train(was_training)
        if len(per_scale) == 1 and self.task == "centernet":
            boxes, scores, labels = per_scale[0]
        else:
            boxes, scores, labels = merge_scales(per_scale, self.K, self.reference)
        keep = scores >= self.score_threshold
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> list[dict[str, Tensor]]:
        """Predictions for one image or a list of images (paths, ``(H, W, 3)`` uint8 RGB arrays
        or ``(3, H, W)`` tensors), one dict per image, boxes in original-image pixels."""
        if isinstance(images, (str, Path, np.ndarray, Tensor)):
            images = [images]
        return [self.predict_one(image) for image in images]
