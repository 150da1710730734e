"""Losses of CornerNet and CenterNet.

* :func:`focal_loss`: the penalty-reduced pixel-wise logistic regression with focal loss
  (CornerNet Eq. 1, CenterNet Eq. 1), alpha = 2, beta = 4.
* :func:`reg_l1_loss`: masked L1 at the object centres, used for the size (CenterNet Eq. 3) and
  the offset (CenterNet Eq. 2) heads.
* :func:`centernet_loss`: ``L_k + 0.1 L_size + 1 L_off`` (CenterNet Eq. 4).

CornerNet's pull / push embedding losses (CornerNet Eq. 4 and 5) will sit beside these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["clamped_sigmoid", "gather_at", "focal_loss", "reg_l1_loss", "centernet_loss"]

SIGMOID_EPS = 1e-4


def clamped_sigmoid(logits: Tensor) -> Tensor:
    """``sigmoid(logits)`` clamped to ``[1e-4, 1 - 1e-4]``, as the reference code does.

    The clamp keeps ``log(p)`` and ``log(1 - p)`` finite; where it is active the gradient is 0.
    """
    return torch.sigmoid(logits.float()).clamp(SIGMOID_EPS, 1 - SIGMOID_EPS)


def gather_at(feature: Tensor, index: Tensor) -> Tensor:
    """Pick the feature vector at each flat position.

    Args:
        feature: ``(B, D, H, W)`` map.
        index: ``(B, K)`` int64 flat positions ``y * W + x``.

    Returns:
        ``(B, K, D)``.
    """
    batch, depth = feature.shape[:2]
    flat = feature.reshape(batch, depth, -1)
    return flat.gather(2, index.unsqueeze(1).expand(batch, depth, index.shape[1])).transpose(1, 2)


def focal_loss(pred_logits: Tensor, gt_heatmap: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Penalty-reduced focal loss over a heatmap (CornerNet Eq. 1 / CenterNet Eq. 1).

    ``p = clamp(sigmoid(logit), 1e-4, 1 - 1e-4)``, ``y`` the Gaussian target:

    * where ``y == 1``:  ``(1 - p)^alpha * log(p)``
    * elsewhere:         ``(1 - y)^beta * p^alpha * log(1 - p)``

    summed over the whole batch and divided by ``-N``, ``N`` the number of positives in the batch.
    When the batch holds no positive at all the sum is divided by 1, as in the reference code.

    Args:
        pred_logits: ``(B, C, H, W)`` logits.
        gt_heatmap: ``(B, C, H, W)`` targets in ``[0, 1]``.
        alpha: focusing exponent on the prediction (2 in both papers).
        beta: exponent of the penalty reduction around positives (4 in both papers).

    Returns:
        A scalar tensor.
    """
    pred = clamped_sigmoid(pred_logits)
    gt = gt_heatmap.float()
    pos = gt.eq(1).float()
    neg = 1.0 - pos
    pos_loss = (torch.log(pred) * (1 - pred).pow(alpha) * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred.pow(alpha) * (1 - gt).pow(beta) * neg).sum()
    num_pos = pos.sum()
    return -(pos_loss + neg_loss) / num_pos.clamp(min=1.0)


def reg_l1_loss(pred_map: Tensor, index: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """Masked L1 between the prediction at each object's centre and its target (CenterNet Eq. 2, 3).

    As the reference ``RegL1Loss``: the mask is broadcast over the ``D`` channels, the absolute
    differences are summed and divided by ``mask.sum() * D + 1e-4`` -- that is, by the number of
    objects times ``D``: the mean absolute error per object and coordinate. An image without
    objects contributes exactly 0.

    Args:
        pred_map: ``(B, D, H, W)`` head output (``D = 2`` for size and offset).
        index: ``(B, K)`` int64 flat centre positions.
        mask: ``(B, K)``, 1 for real objects and 0 for padding.
        target: ``(B, K, D)``.

    Returns:
        A scalar tensor.
    """
    pred = gather_at(pred_map.float(), index)
    weight = mask.float().unsqueeze(2).expand_as(pred)
    loss = (pred * weight - target.float() * weight).abs().sum()
    return loss / (weight.sum() + 1e-4)


def _single_stack_loss(
    outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    hm = focal_loss(outputs["hm"], targets["hm"])
    wh = reg_l1_loss(outputs["wh"], targets["ind"], targets["mask"], targets["wh"])
    off = reg_l1_loss(outputs["reg"], targets["ind"], targets["mask"], targets["reg"])
    return hm, wh, off


def centernet_loss(
    outputs: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    targets: Mapping[str, Tensor],
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> dict[str, Tensor]:
    """``L_det = L_k + lambda_size L_size + lambda_off L_off`` (CenterNet Eq. 4).

    Args:
        outputs: one dict ``{"hm": (B, C, H, W), "wh": (B, 2, H, W), "reg": (B, 2, H, W)}``, or a
            list of such dicts (one per hourglass stack); each term is then averaged over the
            stacks, as the reference does for intermediate supervision.
        targets: the batched output of :func:`minicenternet.targets.encode_centernet`:
            ``hm (B, C, H, W)``, ``wh (B, K, 2)``, ``reg (B, K, 2)``, ``ind (B, K)``, ``mask (B, K)``.
        size_weight: ``lambda_size`` (0.1 in the paper).
        offset_weight: ``lambda_off`` (1 in the paper).

    Returns:
        ``{"loss", "hm_loss", "wh_loss", "off_loss"}``, scalar tensors; ``"loss"`` is the total.
    """
    stacks = [outputs] if isinstance(outputs, Mapping) else list(outputs)
    if not stacks:
        raise ValueError("outputs is an empty list")
    terms = [_single_stack_loss(out, targets) for out in stacks]
    hm, wh, off = (torch.stack(column).mean() for column in zip(*terms))
    total = hm + size_weight * wh + offset_weight * off
    return {"loss": total, "hm_loss": hm, "wh_loss": wh, "off_loss": off}
