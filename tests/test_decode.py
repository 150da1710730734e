"""Tests of minicenternet.decode: peaks, top-K boxes, the encode -> decode round trip, flip test,
padding and the inverse affine map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minicenternet.data.transforms import affine_matrix, apply_affine_to_boxes
from minicenternet.decode import (
    boxes_to_image,
    centernet_decode,
    decode_scores,
    merge_flip,
    merge_scales,
    padded_size,
    peak_mask,
    reference_soft_nms,
    soft_nms,
)
from minicenternet.losses import clamped_sigmoid
from minicenternet.targets import encode_centernet

# ---------------------------------------------------------------------------------------------
# peak_mask
# ---------------------------------------------------------------------------------------------


def _brute_force_peaks(heat: np.ndarray) -> np.ndarray:
    """A pixel is a peak iff no pixel of its (border-clipped) 3x3 neighbourhood is larger."""
    height, width = heat.shape
    out = np.zeros_like(heat, dtype=bool)
    for y in range(height):
        for x in range(width):
            window = heat[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
            out[y, x] = heat[y, x] >= window.max()
    return out


def test_peak_mask_hand_made():
    """One strict peak (0.9) and a plateau of two equal neighbours (0.5, 0.5): BOTH pixels of a
    plateau count as peaks (3x3 max-pool equality cannot break ties), so a plateau can give two
    detections. An all-zero channel is all "peaks" -- harmless, decoding multiplies by the score."""
    heat = torch.tensor(
        [
            [0.1, 0.2, 0.1, 0.0, 0.0],
            [0.2, 0.9, 0.3, 0.0, 0.5],
            [0.1, 0.3, 0.2, 0.0, 0.5],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    batch = torch.stack([heat, torch.zeros_like(heat)])[None]  # (1, 2, 4, 5)
    mask = peak_mask(batch)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[1, 1] = expected[1, 4] = expected[2, 4] = True
    assert torch.equal(mask[0, 0], expected)
    assert mask[0, 1].all()


def test_peak_mask_matches_brute_force_on_random_maps():
    rng = np.random.default_rng(0)
    heat = rng.integers(0, 4, (2, 3, 7, 9)).astype(np.float32)  # few levels: many ties
    mask = peak_mask(torch.from_numpy(heat)).numpy()
    for b in range(2):
        for c in range(3):
            assert np.array_equal(mask[b, c], _brute_force_peaks(heat[b, c]))


# ---------------------------------------------------------------------------------------------
# decode_scores / centernet_decode
# ---------------------------------------------------------------------------------------------


def _hand_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three objects on a 2-class 4x5 map.

    ====== ===== ===== ======== =========== =====================================
    class  (y,x) score wh (w,h) reg (dx,dy) box
    ====== ===== ===== ======== =========== =====================================
    0      (1,2) 0.9   (4, 2)   (0.25, 0.5) centre (2.25, 1.5): [0.25, 0.5, 4.25, 2.5]
    1      (3,0) 0.6   (2, 6)   (0.5, 0.0)  centre (0.5, 3.0):  [-0.5, 0.0, 1.5, 6.0]
    0      (2,4) 0.3   (1, 1)   (0.0, 0.75) centre (4.0, 2.75): [3.5, 2.25, 4.5, 3.25]
    ====== ===== ===== ======== =========== =====================================
    """
    heat = torch.zeros(1, 2, 4, 5)
    wh = torch.zeros(1, 2, 4, 5)
    reg = torch.zeros(1, 2, 4, 5)
    for c, y, x, score, size, offset in (
        (0, 1, 2, 0.9, (4, 2), (0.25, 0.5)),
        (1, 3, 0, 0.6, (2, 6), (0.5, 0.0)),
        (0, 2, 4, 0.3, (1, 1), (0.0, 0.75)),
    ):
        heat[0, c, y, x] = score
        wh[0, :, y, x] = torch.tensor(size, dtype=torch.float32)
        reg[0, :, y, x] = torch.tensor(offset)
    return heat, wh, reg


def test_decode_scores_hand_built():
    heat, wh, reg = _hand_maps()
    boxes, scores, classes = decode_scores(heat, wh, reg, K=3)
    assert boxes.shape == (1, 3, 4) and scores.shape == (1, 3) and classes.shape == (1, 3)
    assert classes.dtype == torch.int64
    torch.testing.assert_close(
        boxes[0], torch.tensor([[0.25, 0.5, 4.25, 2.5], [-0.5, 0.0, 1.5, 6.0], [3.5, 2.25, 4.5, 3.25]])
    )
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.6, 0.3]))
    assert classes[0].tolist() == [0, 1, 0]


def test_decode_scores_without_offsets_uses_pixel_centres():
    heat, wh, _ = _hand_maps()
    boxes, _, _ = decode_scores(heat, wh, None, K=1)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.5, 0.5, 4.5, 2.5]))  # centre (2.5, 1.5)


def test_decode_scores_suppresses_non_peaks_and_sorts():
    heat, wh, reg = _hand_maps()
    heat[0, 0, 0, 1] = 0.8  # diagonal neighbour of the 0.9 peak: not a peak, must not be returned
    heat[0, 1, 0, 4] = 0.7  # isolated: a peak
    _, scores, classes = decode_scores(heat, wh, reg, K=6)
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.7, 0.6, 0.3, 0.0, 0.0]))
    assert classes[0, :4].tolist() == [0, 1, 1, 0]
    assert torch.all(scores[0, :-1] >= scores[0, 1:])


def test_decode_scores_batch_and_K_cap():
    heat, wh, reg = _hand_maps()
    heat2 = torch.cat([heat, heat.flip(3) * 0.5])
    boxes, scores, classes = decode_scores(heat2, wh.expand(2, -1, -1, -1), reg.expand(2, -1, -1, -1), K=1000)
    assert boxes.shape == (2, 2 * 4 * 5, 4)  # K capped at C * H * W = 40
    assert scores.shape == classes.shape == (2, 40)
    torch.testing.assert_close(scores[1, :3], torch.tensor([0.45, 0.3, 0.15]))
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_centernet_decode_is_decode_of_the_clamped_sigmoid():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 10) * 6  # values beyond +-9.2 hit the clamp
    logits[0, 1, 2, 3] = 30.0
    wh, reg = torch.rand(2, 2, 8, 10) * 5, torch.rand(2, 2, 8, 10)
    got = centernet_decode(logits, wh, reg, K=20)
    expected = decode_scores(clamped_sigmoid(logits), wh, reg, K=20)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert got[1].max() == pytest.approx(1 - 1e-4)


def test_encode_decode_round_trip():
    """Perfect head outputs built from encode_centernet's targets decode to the original boxes."""
    rng = np.random.default_rng(7)
    height, width, num_classes, count = 32, 40, 3, 12
    pixels = rng.choice(height * width, size=count, replace=False)  # distinct centre pixels
    cy, cx = pixels // width + rng.uniform(0, 1, count), pixels % width + rng.uniform(0, 1, count)
    w, h = rng.uniform(1, 8, count), rng.uniform(1, 8, count)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
    # keep only boxes inside the map, so that encode_centernet's clipping changes nothing
    inside = (boxes[:, :2] >= 0).all(1) & (boxes[:, 2] <= width - 1) & (boxes[:, 3] <= height - 1)
    boxes = boxes[inside]
    labels = rng.integers(0, num_classes, len(boxes))
    assert len(boxes) >= 6

    t = encode_centernet(boxes, labels, num_classes, (height, width), max_objects=16)
    heat = torch.from_numpy(t["hm"])[None]
    wh_map, reg_map = torch.zeros(1, 2, height, width), torch.zeros(1, 2, height, width)
    for k in np.flatnonzero(t["mask"]):
        y, x = divmod(int(t["ind"][k]), width)
        wh_map[0, :, y, x] = torch.from_numpy(t["wh"][k])
        reg_map[0, :, y, x] = torch.from_numpy(t["reg"][k])

    out_boxes, scores, classes = decode_scores(heat, wh_map, reg_map, K=len(boxes))
    assert torch.all(scores == 1.0)
    order_in = np.lexsort((boxes[:, 1], boxes[:, 0]))
    got = out_boxes[0].numpy()
    order_out = np.lexsort((got[:, 1], got[:, 0]))
    np.testing.assert_allclose(got[order_out], boxes[order_in], atol=1e-5)
    assert classes[0].numpy()[order_out].tolist() == labels[order_in].tolist()


# ---------------------------------------------------------------------------------------------
# merge_flip
# ---------------------------------------------------------------------------------------------


def test_merge_flip_of_a_flip_equivariant_network_is_the_plain_output():
    torch.manual_seed(1)
    net = torch.nn.Conv2d(3, 3 + 4, 1)  # per-pixel: commutes with a horizontal flip

    def fake(images):
        out = net(images)
        return {"hm": out[:, :3], "wh": out[:, 3:5].exp(), "reg": out[:, 5:]}

    images = torch.randn(2, 3, 6, 8)
    with torch.no_grad():
        plain = fake(images)
        outputs = fake(torch.cat([images, images.flip(3)]))
    outputs["reg"][2:] = 99.0  # the mirrored offsets must not be used
    heat, wh, reg = merge_flip(outputs)
    torch.testing.assert_close(heat, clamped_sigmoid(plain["hm"]))
    torch.testing.assert_close(wh, plain["wh"])
    assert torch.equal(reg, plain["reg"])


def test_merge_flip_averages_heat_and_sizes():
    hm = torch.zeros(2, 1, 1, 3)
    hm[0, 0, 0] = torch.tensor([0.0, 2.0, -1.0])  # second half: logits 0 -> p 0.5
    wh = torch.zeros(2, 2, 1, 3)
    wh[0, 0, 0] = torch.tensor([2.0, 4.0, 6.0])
    wh[1, 0, 0] = torch.tensor([10.0, 20.0, 30.0])  # flipped back: [30, 20, 10]
    heat, merged_wh, _ = merge_flip({"hm": hm, "wh": wh, "reg": torch.zeros(2, 2, 1, 3)})
    torch.testing.assert_close(heat[0, 0, 0], (torch.sigmoid(hm[0, 0, 0]) + 0.5) / 2)
    torch.testing.assert_close(merged_wh[0, 0, 0], torch.tensor([16.0, 12.0, 8.0]))


# ---------------------------------------------------------------------------------------------
# padded_size / boxes_to_image
# ---------------------------------------------------------------------------------------------


def test_padded_size():
    assert [padded_size(s) for s in (256, 255, 300, 1, 31, 32)] == [288, 256, 320, 32, 32, 64]
    assert [padded_size(s, "minimal") for s in (256, 255, 300, 1, 32, 33)] == [256, 256, 320, 32, 32, 64]
    # Hourglass pads to a multiple of 128: (s | 127) + 1, or the next multiple
    assert [padded_size(s, "reference", 128) for s in (256, 255, 300, 511, 512)] == [384, 256, 384, 512, 640]
    assert [padded_size(s, "minimal", 128) for s in (256, 255, 300, 1)] == [256, 256, 384, 128]
    with pytest.raises(ValueError, match="power of two"):
        padded_size(100, "minimal", 96)
    with pytest.raises(ValueError, match="variant"):
        padded_size(100, "maximal")


def test_boxes_to_image_inverts_the_affine_map():
    center, scale, out_size, image_size = np.array([50.0, 30.0]), 100.0, (16, 24), (60, 100)
    boxes = np.array([[10, 5, 40, 25], [60, 20, 95, 55], [0, 0, 100, 60]], dtype=np.float32)
    forward = apply_affine_to_boxes(boxes, affine_matrix(center, scale, out_size))
    # k = 24 / 100: x' = 0.24 (x - 50) + 12
    np.testing.assert_allclose(forward[0], [2.4, 2.0, 9.6, 6.8], atol=1e-5)
    back = boxes_to_image(forward, center, scale, out_size, image_size)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, boxes, atol=1e-4)
    # tensors are accepted too
    np.testing.assert_allclose(boxes_to_image(torch.from_numpy(forward), center, scale, out_size, image_size), boxes, atol=1e-4)


def test_boxes_to_image_clips_to_the_image():
    center, scale, out_size, image_size = np.array([50.0, 30.0]), 100.0, (16, 24), (60, 100)
    # x = (x' - 12) / 0.24 + 50, y = (y' - 8) / 0.24 + 30
    out_boxes = np.array([[-2.0, -2.0, 30.0, 20.0], [6.0, 5.6, 18.0, 30.0]], dtype=np.float32)
    back = boxes_to_image(out_boxes, center, scale, out_size, image_size)
    np.testing.assert_allclose(back, [[0, 0, 100, 60], [25, 20, 75, 60]], atol=1e-4)


def test_soft_nms_decays_by_overlap_and_reorders():
    """Hand-computed Gaussian soft-NMS (sigma 0.5). Class 0: A [0,0,10,10] 0.9, B [5,0,15,10] 0.85,
    C [10,0,20,10] 0.8; IoU(A, B) = IoU(B, C) = 50 / 150 = 1/3, IoU(A, C) = 0. Keep A; B decays to
    0.85 exp(-(1/9) / 0.5) = 0.6808 and falls below C; keep C; B decays again by the same factor to
    0.5451. Class 1 (D, on top of A) is never compared with class 0. E (a copy of A at 0.005)
    decays to 0.005 exp(-2) = 0.00068 < 0.001 and is dropped."""
    boxes = torch.tensor(
        [[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.85, 0.8, 0.3, 0.005])
    labels = torch.tensor([0, 0, 0, 1, 0])
    kept_boxes, kept_scores, kept_labels = soft_nms(boxes, scores, labels)
    factor = math.exp(-(1 / 9) / 0.5)
    torch.testing.assert_close(kept_scores, torch.tensor([0.9, 0.8, 0.85 * factor * factor, 0.3]))
    assert kept_labels.tolist() == [0, 0, 0, 1]
    assert torch.equal(kept_boxes, boxes[[0, 2, 1, 3]])
    empty = soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert [t.shape for t in empty] == [(0, 4), (0,), (0,)]


def test_merge_scales_pools_suppresses_and_keeps_the_best_K():
    """The same box found at two scales is kept once at full score (the copy decays by exp(-1 / 0.5));
    distinct boxes survive; the result is sorted and capped at K."""
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    far = torch.tensor([[100.0, 100.0, 120.0, 140.0]])
    first = (torch.cat([box, far]), torch.tensor([0.9, 0.5]), torch.tensor([2, 2]))
    second = (box.clone(), torch.tensor([0.7]), torch.tensor([2]))
    boxes, scores, labels = merge_scales([first, second], K=100)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.5, 0.7 * math.exp(-2)]))
    assert torch.equal(boxes, torch.cat([box, far, box])) and labels.tolist() == [2, 2, 2]
    boxes, scores, labels = merge_scales([first, second], K=2)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.5]))


def test_the_official_test_sigmoid_is_not_clamped():
    logits = torch.full((1, 1, 3, 3), -30.0)
    logits[0, 0, 1, 1] = 20.0
    wh, reg = torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
    _, clamped, _ = centernet_decode(logits, wh, reg, K=1)
    _, plain, _ = centernet_decode(logits, wh, reg, K=1, clamp=False)
    assert clamped.item() == pytest.approx(1 - 1e-4) and plain.item() == pytest.approx(1 / (1 + math.exp(-20)))
    heat, _, _ = merge_flip({"hm": torch.cat([logits, logits]), "wh": torch.cat([wh, wh]), "reg": torch.cat([reg, reg])}, clamp=False)
    torch.testing.assert_close(heat, logits.sigmoid())


def test_boxes_to_image_unclipped_as_the_reference():
    center, scale, out_size, image_size = np.array([50.0, 30.0]), 100.0, (16, 24), (60, 100)
    out_boxes = np.array([[-2.0, -2.0, 30.0, 20.0]], dtype=np.float32)
    back = boxes_to_image(out_boxes, center, scale, out_size, image_size, clip=False)
    # x = (x' - 12) / 0.24 + 50, y = (y' - 8) / 0.24 + 30
    np.testing.assert_allclose(back, [[-14 / 0.24 + 50, -10 / 0.24 + 30, 18 / 0.24 + 50, 12 / 0.24 + 30]], rtol=1e-5)


A_ROW, C_ROW = [0, 0, 9, 9, 0.9], [20, 20, 29, 29, 0.5]


def test_reference_soft_nms_keeps_a_stale_copy_of_the_row_moved_forward():
    """B, a copy of A at 0.0015, decays by exp(-1 / 0.5) to 0.0002 < 0.001: the last row (C)
    is copied over it and the count shrinks, but the array keeps its three rows: C twice."""
    rows = np.array([A_ROW, [0, 0, 9, 9, 0.0015], C_ROW], dtype=np.float32)
    np.testing.assert_allclose(reference_soft_nms(rows), [A_ROW, C_ROW, C_ROW], rtol=1e-6)


def test_reference_soft_nms_leaves_a_dropped_last_row_in_place():
    rows = np.array([A_ROW, C_ROW, [0, 0, 9, 9, 0.0015]], dtype=np.float32)
    np.testing.assert_allclose(reference_soft_nms(rows), [A_ROW, C_ROW, [0, 0, 9, 9, 0.0015 * math.exp(-2)]], rtol=1e-5)


def test_reference_soft_nms_measures_iou_with_the_plus_one_convention():
    """Touching boxes [0, 0, 1, 1] and [1, 0, 2, 1]: continuous IoU 0, so soft_nms leaves the
    second alone; with +1 pixels both are 2 x 2 and share a 1 x 2 column: IoU 2 / 6 = 1/3."""
    rows = np.array([[0, 0, 1, 1, 0.9], [1, 0, 2, 1, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(reference_soft_nms(rows)[:, 4], [0.9, 0.8 * math.exp(-(1 / 9) / 0.5)], rtol=1e-6)
    _, scores, _ = soft_nms(torch.from_numpy(rows[:, :4]), torch.from_numpy(rows[:, 4]), torch.zeros(2, dtype=torch.int64))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8]))


def test_reference_soft_nms_decays_as_the_hand_computed_example():
    """The three-box example of the soft_nms test, in +1 pixels ([0, 0, 9, 9] is 10 x 10): the
    same scores, in the order the in-place swaps leave them."""
    rows = np.array([[0, 0, 9, 9, 0.9], [5, 0, 14, 9, 0.85], [10, 0, 19, 9, 0.8]], dtype=np.float32)
    factor = math.exp(-(1 / 9) / 0.5)
    np.testing.assert_allclose(reference_soft_nms(rows)[:, 4], [0.9, 0.8, 0.85 * factor * factor], rtol=1e-6)


def test_reference_merge_keeps_the_stale_rows_and_every_tie_of_the_kth_score():
    first = (torch.tensor([A_ROW[:4], [0, 0, 9, 9]], dtype=torch.float32), torch.tensor([0.9, 0.0015]), torch.tensor([0, 0]))
    second = (torch.tensor([C_ROW[:4]], dtype=torch.float32), torch.tensor([0.5]), torch.tensor([0]))
    boxes, scores, labels = merge_scales([first, second], K=2, reference=True)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.5, 0.5]))  # K = 2, but the 2nd score is tied
    assert boxes[1:].tolist() == [C_ROW[:4]] * 2 and labels.tolist() == [0, 0, 0]
    boxes, scores, _ = merge_scales([first, second], K=2)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.5]))
