"""Losses of CornerNet and CenterNet.

* :func:`focal_loss`: the penalty-reduced pixel-wise logistic regression with focal loss
  (CornerNet Eq. 1, CenterNet Eq. 1), alpha = 2, beta = 4.
* :func:`reg_l1_loss`: masked L1 at the object centres, used for the size (CenterNet Eq. 3) and
  the offset (CenterNet Eq. 2) heads.
* :func:`centernet_loss`: ``L_k + 0.1 L_size + 1 L_off`` (CenterNet Eq. 4).
* :func:`embedding_loss`: CornerNet's pull and push losses on the corner embeddings (Eq. 4, 5).
* :func:`corner_offset_loss`: CornerNet's smooth-L1 loss on the corner offsets (Eq. 2, 3).
* :func:`cornernet_loss`: ``L_det + 0.1 L_pull + 0.1 L_push + 1 L_off`` (CornerNet Sec. 4.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "clamped_sigmoid",
    "gather_at",
    "focal_loss",
    "reg_l1_loss",
    "centernet_loss",
    "embedding_loss",
    "corner_offset_loss",
    "cornernet_loss",
    "TASK_LOSSES",
]

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


def embedding_loss(tl_emb: Tensor, br_emb: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pull and push losses on the 1-D corner embeddings (CornerNet Eq. 4 and 5).

    For an image with ``N`` objects, ``e_k = (e_tl_k + e_br_k) / 2`` and ``Delta = 1``:

    * pull (Eq. 4) ``= 1/N sum_k [(e_tl_k - e_k)^2 + (e_br_k - e_k)^2]``
    * push (Eq. 5) ``= 1/(N(N-1)) sum_k sum_{j != k} relu(Delta - |e_k - e_j|)`` (ordered pairs)

    Both are summed over the images of the batch, not averaged, as the reference ``_ae_loss`` does.
    The reference divides by ``N + 1e-4`` and ``N(N-1) + 1e-4``; we divide by ``N`` and ``N(N-1)``
    exactly (relative difference below ``1e-4``). It also sums push over all ``N^2`` pairs,
    including ``j == k`` (each ``relu(1 - 0) = 1``), and subtracts ``1/(N + 1e-4)`` from every pair
    to cancel them; the cancellation leaves ``N * 1e-4 / (N + 1e-4) / (N(N-1) + 1e-4)``, negligible
    for ``N >= 2`` but ``1 / (1 + 1e-4) ~= 0.9999`` for a one-object image: a constant with no
    gradient. Here an image with ``N <= 1`` contributes push 0 and one with ``N = 0`` pull 0.
    Unlike the reference (which ``squeeze()``s the batch away), batch size 1 works.

    Args:
        tl_emb: ``(B, M, 1)`` (or ``(B, M)``) embeddings gathered at the top-left corners.
        br_emb: the same at the bottom-right corners; slot ``k`` of both belongs to one object.
        mask: ``(B, M)`` bool, uint8 or float; nonzero marks a real object.

    Returns:
        ``(pull, push)``, scalar float32 tensors.
    """
    valid = (mask != 0).float()  # (B, M)
    e_tl = tl_emb.float().reshape(valid.shape)
    e_br = br_emb.float().reshape(valid.shape)
    e_mean = (e_tl + e_br) / 2
    num = valid.sum(dim=1)  # (B,)
    pull = (((e_tl - e_mean) ** 2 + (e_br - e_mean) ** 2) * valid).sum(dim=1)
    pull = (pull / num.clamp(min=1.0)).sum()
    eye = torch.eye(valid.shape[1], device=valid.device, dtype=valid.dtype)
    pairs = valid.unsqueeze(2) * valid.unsqueeze(1) * (1 - eye)  # (B, M, M), j != k
    margin = F.relu(1.0 - (e_mean.unsqueeze(2) - e_mean.unsqueeze(1)).abs())
    push = (margin * pairs).sum(dim=(1, 2))
    push = (push / (num * (num - 1)).clamp(min=1.0)).sum()
    return pull, push


def corner_offset_loss(pred_map: Tensor, index: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """Smooth-L1 loss on the offsets (Eq. 2) at the ground-truth corners (CornerNet Eq. 3).

    As the reference ``_regr_loss``: smooth L1 (``beta = 1``) summed over the objects and both
    coordinates, divided by ``n + 1e-4`` where ``n`` is the number of objects in the batch (not
    ``2n`` as :func:`reg_l1_loss` divides). No objects gives exactly 0.

    Args:
        pred_map: ``(B, 2, H, W)`` offset head.
        index: ``(B, K)`` int64 flat corner positions.
        mask: ``(B, K)``, nonzero for real objects.
        target: ``(B, K, 2)`` fractional corner offsets.

    Returns:
        A scalar tensor.
    """
    pred = gather_at(pred_map.float(), index)  # (B, K, 2)
    valid = (mask != 0).float()
    weight = valid.unsqueeze(2)
    loss = F.smooth_l1_loss(pred * weight, target.float() * weight, reduction="sum", beta=1.0)
    return loss / (valid.sum() + 1e-4)


def _cornernet_stack_loss(
    outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mask = targets["mask"]
    hm = focal_loss(outputs["tl_hm"], targets["tl_hm"]) + focal_loss(outputs["br_hm"], targets["br_hm"])
    tl_emb = gather_at(outputs["tl_emb"], targets["tl_ind"])  # (B, K, 1)
    br_emb = gather_at(outputs["br_emb"], targets["br_ind"])
    pull, push = embedding_loss(tl_emb, br_emb, mask)
    off = corner_offset_loss(outputs["tl_off"], targets["tl_ind"], mask, targets["tl_off"])
    off = off + corner_offset_loss(outputs["br_off"], targets["br_ind"], mask, targets["br_off"])
    return hm, pull, push, off


def cornernet_loss(
    outputs: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    targets: Mapping[str, Tensor],
    pull_weight: float = 0.1,
    push_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> dict[str, Tensor]:
    """``L = L_det + alpha L_pull + beta L_push + gamma L_off`` (CornerNet Sec. 4.1, training loss).

    Per stack: ``L_det`` is :func:`focal_loss` (Eq. 1; logits through the same clamped sigmoid as
    the reference ``_sigmoid``, each heatmap normalised by its own positives) on the top-left plus
    the bottom-right heatmap; pull and push come from :func:`embedding_loss` on the embeddings
    gathered at the ground-truth corners; ``L_off`` is :func:`corner_offset_loss` of the top-left
    plus the bottom-right corners (Eq. 3). Each term is averaged over the stacks, as the reference sums
    them and divides by the number of stacks. The weights are the paper's: 0.1, 0.1, 1.

    Args:
        outputs: one dict ``{"tl_hm", "br_hm": (B, C, H, W) logits, "tl_emb", "br_emb":
            (B, 1, H, W), "tl_off", "br_off": (B, 2, H, W)}`` or a list of them (one per stack).
        targets: the batched output of :func:`minicenternet.targets.encode_cornernet`:
            ``tl_hm``, ``br_hm (B, C, H, W)``, ``tl_off``, ``br_off (B, K, 2)``, ``tl_ind``,
            ``br_ind (B, K)`` int64, ``mask (B, K)``.
        pull_weight: ``alpha``.
        push_weight: ``beta``.
        offset_weight: ``gamma``.

    Returns:
        ``{"loss", "hm_loss", "pull_loss", "push_loss", "off_loss"}``, scalar tensors; the terms
        are unweighted, ``"loss"`` is the weighted total.
    """
    stacks = [outputs] if isinstance(outputs, Mapping) else list(outputs)
    if not stacks:
        raise ValueError("outputs is an empty list")
    terms = [_cornernet_stack_loss(out, targets) for out in stacks]
    hm, pull, push, off = (torch.stack(column).mean() for column in zip(*terms))
    total = hm + pull_weight * pull + push_weight * push + offset_weight * off
    return {"loss": total, "hm_loss": hm, "pull_loss": pull, "push_loss": push, "off_loss": off}


TASK_LOSSES = {"centernet": centernet_loss, "cornernet": cornernet_loss}  # the training loss of each task, by name
