"""Tests of CornerNet decoding (minicenternet.decode.cornernet_decode / decode_corners) against a
hand-built example and a brute-force loop over all K x K pairs, and of the generalised soft-NMS
(linear, Gaussian, hard; per class; the official Cython's semantics with reference=True) against
hand computations and a scalar float32 replay of the official loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minicenternet.decode import cornernet_decode, decode_corners, merge_scales, reference_soft_nms, soft_nms

BACKGROUND_LOGIT = -30.0
TL_BACKGROUND_EMB, BR_BACKGROUND_EMB = 50.0, -50.0  # any pair with a background corner: distance >= 46


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _outputs(height: int, width: int, num_classes: int, corners: list[tuple]) -> dict[str, torch.Tensor]:
    """One image's CornerNet outputs: background logits of -30 and far-apart embeddings, plus the
    given corners ``(kind, class, x, y, score, embedding, (dx, dy))``, kind ``"tl"`` or ``"br"``."""
    out = {}
    for kind, emb in (("tl", TL_BACKGROUND_EMB), ("br", BR_BACKGROUND_EMB)):
        out[f"{kind}_hm"] = torch.full((1, num_classes, height, width), BACKGROUND_LOGIT)
        out[f"{kind}_emb"] = torch.full((1, 1, height, width), emb)
        out[f"{kind}_off"] = torch.zeros(1, 2, height, width)
    for kind, c, x, y, score, emb, offset in corners:
        out[f"{kind}_hm"][0, c, y, x] = _logit(score)
        out[f"{kind}_emb"][0, 0, y, x] = emb
        out[f"{kind}_off"][0, :, y, x] = torch.tensor(offset)
    return out


# ---------------------------------------------------------------------------------------------
# cornernet_decode: hand-built
# ---------------------------------------------------------------------------------------------

# kind, class, x, y, score, embedding, offset (dx, dy)
A_TL = ("tl", 0, 1, 2, 0.9, 0.0, (0.25, 0.5))  # object A, class 0: box [1.25, 2.5, 6.5, 7.25]
A_BR = ("br", 0, 6, 7, 0.7, 0.2, (0.5, 0.25))
B_TL = ("tl", 1, 4, 1, 0.6, 3.0, (0.0, 0.75))  # object B, class 1: box [4.0, 1.75, 9.25, 5.0]
B_BR = ("br", 1, 9, 5, 0.8, 3.3, (0.25, 0.0))
C_BR = ("br", 0, 8, 8, 0.5, 1.0, (0.0, 0.0))  # with A_TL: same class, right geometry, embedding 1.0 away
D_BR = ("br", 1, 2, 9, 0.4, 3.1, (0.0, 0.0))  # with B_TL: same class, embedding 0.1 away, left of it
E_BR = ("br", 1, 6, 9, 0.3, 0.1, (0.0, 0.0))  # with A_TL: embedding 0.1 away, right geometry, class 1


def test_cornernet_decode_hand_built():
    """Two objects of different classes and three distractor bottom-rights, each wrong pair failing
    exactly one test: (A_TL, C_BR) the embedding, (A_TL, E_BR) the class, (B_TL, D_BR) the
    geometry. K = 5 takes two real top-lefts and three background ones, whose pairs fail the
    embedding test (background embeddings 50 and -50): only the two objects survive, scored by
    the mean of their corners: A (0.9 + 0.7) / 2 = 0.8, B (0.6 + 0.8) / 2 = 0.7."""
    outputs = _outputs(10, 12, 2, [A_TL, A_BR, B_TL, B_BR, C_BR, D_BR, E_BR])
    boxes, scores, classes = cornernet_decode(outputs, K=5, num_dets=25)
    assert boxes.shape == (1, 25, 4) and scores.shape == classes.shape == (1, 25)
    assert classes.dtype == torch.int64
    torch.testing.assert_close(scores[0, :2], torch.tensor([0.8, 0.7]))
    assert torch.all(scores[0, 2:] == -1)
    torch.testing.assert_close(boxes[0, :2], torch.tensor([[1.25, 2.5, 6.5, 7.25], [4.0, 1.75, 9.25, 5.0]]))
    assert classes[0, :2].tolist() == [0, 1]
    # num_dets is capped at K * K; fewer keep the best
    assert cornernet_decode(outputs, K=5)[1].shape == (1, 25)
    _, best, _ = cornernet_decode(outputs, K=5, num_dets=1)
    torch.testing.assert_close(best, torch.tensor([[0.8]]))


@pytest.mark.parametrize("drop", ["C", "D", "E"])
def test_each_distractor_is_rejected_by_its_test_alone(drop):
    """Relaxing the one test each distractor fails lets its pair through."""
    corners = [A_TL, A_BR, B_TL, B_BR, C_BR, D_BR, E_BR]
    if drop == "C":  # embedding: a threshold of 1.0 accepts |0 - 1.0|
        _, scores, _ = cornernet_decode(_outputs(10, 12, 2, corners), K=5, ae_threshold=1.0)
        expected = (0.9 + 0.5) / 2
    elif drop == "D":  # geometry: move D to the right of B_TL
        corners[5] = ("br", 1, 5, 9, 0.4, 3.1, (0.0, 0.0))
        _, scores, _ = cornernet_decode(_outputs(10, 12, 2, corners), K=5)
        expected = (0.6 + 0.4) / 2
    else:  # class: make E class 0
        corners[6] = ("br", 0, 6, 9, 0.3, 0.1, (0.0, 0.0))
        _, scores, _ = cornernet_decode(_outputs(10, 12, 2, corners), K=5)
        expected = (0.9 + 0.3) / 2
    valid = scores[0][scores[0] > -1]
    assert len(valid) == 3
    assert any(abs(float(s) - expected) < 1e-5 for s in valid)


def test_cornernet_decode_comparisons_are_strict_as_the_official_code():
    """The official ``_decode`` rejects ``br_x < tl_x``, ``br_y < tl_y`` and ``dist > ae_threshold``:
    a box of zero width or height (after the offsets) and a pair exactly at the threshold are kept.

    One top-left at (2, 2), embedding 0. Bottom-rights: P1 at x = 2 (zero width), embedding
    0.5 (exactly the threshold); P2 at y = 2 (zero height), embedding -0.5; P3 embedding 0.5625
    (beyond); P4 at x = 1 + 0.75 = 1.75 < 2; P5 at y = 1 + 0.5 = 1.5 < 2."""
    corners = [
        ("tl", 0, 2, 2, 0.9, 0.0, (0.0, 0.0)),
        ("br", 0, 2, 6, 0.7, 0.5, (0.0, 0.0)),  # P1
        ("br", 0, 6, 2, 0.5, -0.5, (0.0, 0.0)),  # P2
        ("br", 0, 8, 8, 0.8, 0.5625, (0.0, 0.0)),  # P3
        ("br", 0, 1, 9, 0.6, 0.0, (0.75, 0.0)),  # P4
        ("br", 0, 9, 1, 0.6, 0.0, (0.0, 0.5)),  # P5
    ]
    boxes, scores, _ = cornernet_decode(_outputs(10, 10, 1, corners), K=5, num_dets=3)
    torch.testing.assert_close(scores[0], torch.tensor([0.8, 0.7, -1.0]))
    torch.testing.assert_close(boxes[0, :2], torch.tensor([[2.0, 2.0, 2.0, 6.0], [2.0, 2.0, 6.0, 2.0]]))


def test_cornernet_decode_sigmoid_clamped_or_plain():
    outputs = _outputs(6, 6, 1, [("tl", 0, 1, 1, 0.5, 0.0, (0, 0)), ("br", 0, 4, 4, 0.5, 0.0, (0, 0))])
    outputs["tl_hm"][0, 0, 1, 1] = 20.0  # sigmoid 1 - 2e-9, clamped to 1 - 1e-4
    _, clamped, _ = cornernet_decode(outputs, K=1, num_dets=1)
    _, plain, _ = cornernet_decode(outputs, K=1, num_dets=1, clamp=False)
    assert clamped.item() == pytest.approx((1 - 1e-4 + 0.5) / 2)
    assert plain.item() == pytest.approx((1 / (1 + math.exp(-20)) + 0.5) / 2)


# ---------------------------------------------------------------------------------------------
# cornernet_decode: brute force
# ---------------------------------------------------------------------------------------------


def _brute_force_corners(heat: np.ndarray, emb: np.ndarray, off: np.ndarray, K: int) -> list[tuple]:
    """The K highest 3x3 peaks of one image ``(C, H, W)``, each ``(score, class, x, y, emb)``."""
    num_classes, height, width = heat.shape
    peaks = []
    for c in range(num_classes):
        for y in range(height):
            for x in range(width):
                window = heat[c, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
                if heat[c, y, x] >= window.max():
                    peaks.append((heat[c, y, x], c, x + off[0, y, x], y + off[1, y, x], emb[0, y, x]))
    peaks.sort(key=lambda p: -p[0])
    assert len(peaks) >= K and peaks[K - 1][0] > peaks[K][0]  # no tie at the K-th: the top K is unique
    return peaks[:K]


def _brute_force_pairs(outputs: dict[str, torch.Tensor], b: int, K: int, ae_threshold: float) -> list[tuple]:
    maps = {name: value[b].numpy() for name, value in outputs.items()}
    tls = _brute_force_corners(1 / (1 + np.exp(-maps["tl_hm"].astype(np.float64))), maps["tl_emb"], maps["tl_off"], K)
    brs = _brute_force_corners(1 / (1 + np.exp(-maps["br_hm"].astype(np.float64))), maps["br_emb"], maps["br_off"], K)
    pairs = []
    for tl_s, tl_c, tl_x, tl_y, tl_e in tls:
        for br_s, br_c, br_x, br_y, br_e in brs:
            rejected = tl_c != br_c or abs(tl_e - br_e) > ae_threshold or br_x < tl_x or br_y < tl_y
            pairs.append((-1.0 if rejected else (tl_s + br_s) / 2, tl_x, tl_y, br_x, br_y, tl_c))
    return sorted(pairs)


def test_cornernet_decode_equals_a_brute_force_loop_over_all_pairs():
    torch.manual_seed(0)
    batch, num_classes, height, width, K = 2, 2, 9, 11, 15
    outputs = {
        "tl_hm": torch.randn(batch, num_classes, height, width) * 3,
        "br_hm": torch.randn(batch, num_classes, height, width) * 3,
        "tl_emb": torch.randn(batch, 1, height, width),  # N(0, 1): about half the distances pass 0.5
        "br_emb": torch.randn(batch, 1, height, width),
        "tl_off": torch.rand(batch, 2, height, width),
        "br_off": torch.rand(batch, 2, height, width),
    }
    boxes, scores, classes = cornernet_decode(outputs, K=K, num_dets=K * K, clamp=False)
    for b in range(batch):
        expected = _brute_force_pairs(outputs, b, K, 0.5)
        got = sorted(zip(scores[b].tolist(), *boxes[b].T.tolist(), classes[b].tolist()))
        valid = [p for p in expected if p[0] > -1]
        assert 3 <= len(valid) < K * K  # some pairs kept, some rejected
        got_rows, expected_rows = torch.tensor([g[:5] for g in got]), torch.tensor([e[:5] for e in expected])
        torch.testing.assert_close(got_rows, expected_rows, rtol=1e-5, atol=1e-5, check_dtype=False)
        # classes of the kept pairs (rejected pairs carry the top-left's class in any order)
        assert [g[5] for g in got if g[0] > -1] == [e[5] for e in expected if e[0] > -1]
        # fewer detections: the best num_dets scores, in decreasing order
        _, top, _ = cornernet_decode({k: v[b : b + 1] for k, v in outputs.items()}, K=K, num_dets=7, clamp=False)
        torch.testing.assert_close(top[0], torch.tensor([e[0] for e in expected[::-1][:7]]), check_dtype=False)


def test_decode_corners_takes_probabilities():
    torch.manual_seed(1)
    logits = {k: torch.randn(1, c, 6, 7) for k, c in
              (("tl_hm", 2), ("br_hm", 2), ("tl_emb", 1), ("br_emb", 1), ("tl_off", 2), ("br_off", 2))}
    got = cornernet_decode(logits, K=10, num_dets=50, clamp=False)
    expected = decode_corners(
        logits["tl_hm"].sigmoid(), logits["br_hm"].sigmoid(), logits["tl_emb"], logits["br_emb"],
        logits["tl_off"], logits["br_off"], K=10, num_dets=50,
    )
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# soft_nms: the three methods by hand
# ---------------------------------------------------------------------------------------------

# A, B, C overlap (continuous IoU: A-B 50/150 = 1/3, A-C 80/100 = 0.8, B-C 40/140 = 2/7); D alone
BOXES = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 8], [20, 0, 30, 10]], dtype=torch.float32)
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6])


def test_soft_nms_linear_by_hand():
    """Nt = 0.3. Keep A: B (IoU 1/3 > 0.3) -> 0.8 * 2/3, C (0.8) -> 0.7 * 0.2 = 0.14. Keep D (0.6).
    Keep B: C's IoU with B is 2/7 <= 0.3, weight 1. Keep C."""
    boxes, scores, labels = soft_nms(BOXES, SCORES, method="linear", iou_threshold=0.3)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6, 0.8 * 2 / 3, 0.14]))
    assert torch.equal(boxes, BOXES[[0, 3, 1, 2]])
    assert labels.tolist() == [0, 0, 0, 0] and labels.dtype == torch.int64  # labels=None: one class, 0


def test_soft_nms_gaussian_by_hand():
    """sigma = 0.5, no threshold. Keep A: B -> 0.8 exp(-(1/9) / 0.5) = 0.6405, C -> 0.7 exp(-0.64 / 0.5)
    = 0.1946. Keep B: C -> 0.1946 exp(-(2/7)^2 / 0.5) = 0.1653. Keep D, then C. The threshold
    does not apply: the default iou_threshold 0.3 would otherwise spare C from B."""
    boxes, scores, _ = soft_nms(BOXES, SCORES, method="gaussian", sigma=0.5)
    b = 0.8 * math.exp(-(1 / 9) / 0.5)
    c = 0.7 * math.exp(-0.64 / 0.5) * math.exp(-((2 / 7) ** 2) / 0.5)
    torch.testing.assert_close(scores, torch.tensor([0.9, b, 0.6, c]))
    assert torch.equal(boxes, BOXES[[0, 1, 3, 2]])
    assert torch.equal(soft_nms(BOXES, SCORES)[1], scores)  # the default method


def test_soft_nms_hard_by_hand():
    """Plain NMS: Nt = 0.3 removes B (1/3) and C (0.8) with A; Nt = 0.5 only C."""
    boxes, scores, _ = soft_nms(BOXES, SCORES, method="hard", iou_threshold=0.3)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6]))
    assert torch.equal(boxes, BOXES[[0, 3]])
    _, scores, _ = soft_nms(BOXES, SCORES, method="hard", iou_threshold=0.5)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8, 0.6]))
    # with a score threshold of 0 the suppressed boxes (score 0) are removed all the same
    _, scores, _ = soft_nms(BOXES, SCORES, method="hard", iou_threshold=0.3, score_threshold=0.0)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6]))


def test_soft_nms_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method"):
        soft_nms(BOXES, SCORES, method="soft")


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
def test_soft_nms_classes_are_independent(method, reference):
    """C in another class is never decayed by A or B; the result is the classes one by one,
    classes in increasing order."""
    labels = torch.tensor([3, 3, 1, 3])
    boxes, scores, out_labels = soft_nms(BOXES, SCORES, labels, method=method, reference=reference)
    expected = [soft_nms(BOXES[labels == c], SCORES[labels == c], method=method, reference=reference) for c in (1, 3)]
    assert torch.equal(boxes, torch.cat([e[0] for e in expected]))
    assert torch.equal(scores, torch.cat([e[1] for e in expected]))
    assert out_labels.tolist() == [1] * len(expected[0][1]) + [3] * len(expected[1][1])
    assert scores[0] == pytest.approx(0.7)  # C, alone in class 1
    no_labels = torch.zeros(0, dtype=torch.int64)
    empty = soft_nms(torch.zeros(0, 4), torch.zeros(0), no_labels, method=method, reference=reference)
    assert [t.shape for t in empty] == [(0, 4), (0,), (0,)]


# ---------------------------------------------------------------------------------------------
# soft_nms(reference=True): the official Cython's semantics
# ---------------------------------------------------------------------------------------------


def test_reference_keeps_a_low_box_only_while_it_overlaps_no_kept_box():
    """The official loop compares a box with the score threshold only right after rescoring it
    for overlapping a kept box. L (0.0005 < 0.001) overlaps nothing: the reference keeps it at
    its score, the default removes it (every box under the threshold goes, from the start).
    M (0.0008) overlaps A a little: IoU(+1) = 22 / 220 = 0.1 <= Nt, so linear weighs it by 1,
    but it was compared, found under the threshold and removed by both."""
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [9, 0, 19, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.0005, 0.0008])
    for method in ("linear", "gaussian", "hard"):
        kept_boxes, kept_scores, _ = soft_nms(boxes, scores, method=method, reference=True)
        torch.testing.assert_close(kept_scores, torch.tensor([0.9, 0.0005]))
        assert torch.equal(kept_boxes, boxes[:2])
        _, default_scores, _ = soft_nms(boxes, scores, method=method)
        torch.testing.assert_close(default_scores, torch.tensor([0.9]))
    # the first box of a class is never compared: a class of low boxes only keeps them all
    _, low, _ = soft_nms(boxes[1:2], scores[1:2], reference=True)
    torch.testing.assert_close(low, torch.tensor([0.0005]))
    assert soft_nms(boxes[1:2], scores[1:2])[1].numel() == 0


def test_reference_hard_with_a_zero_threshold_keeps_suppressed_boxes_at_zero():
    _, scores, _ = soft_nms(BOXES, SCORES, method="hard", iou_threshold=0.3, score_threshold=0.0, reference=True)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6, 0.0, 0.0]))


def test_reference_iou_uses_the_plus_one_pixel_convention():
    """[0, 0, 1, 1] and [1.5, 0, 2.5, 1] do not even touch, yet in the +1 convention both are
    2 x 2 and share a 0.5 x 2 strip: IoU 1 / 7. Touching boxes [0, 0, 1, 1], [1, 0, 2, 1]: 2 / 6."""
    first = torch.tensor([0.0, 0.0, 1.0, 1.0])
    for other, iou in (([1.5, 0.0, 2.5, 1.0], 1 / 7), ([1.0, 0.0, 2.0, 1.0], 1 / 3)):
        boxes, scores = torch.stack([first, torch.tensor(other)]), torch.tensor([0.9, 0.8])
        _, ref, _ = soft_nms(boxes, scores, reference=True)
        torch.testing.assert_close(ref, torch.tensor([0.9, 0.8 * math.exp(-(iou**2) / 0.5)]))
        _, ref_linear, _ = soft_nms(boxes, scores, method="linear", iou_threshold=0.1, reference=True)
        torch.testing.assert_close(ref_linear, torch.tensor([0.9, 0.8 * (1 - iou)]))
        _, default, _ = soft_nms(boxes, scores)
        torch.testing.assert_close(default, torch.tensor([0.9, 0.8]))  # continuous IoU 0


def _official_loop(rows: np.ndarray, sigma: float, nt: float, threshold: float, method: str) -> tuple[np.ndarray, int]:
    """The official Cython soft_nms step by step, one box at a time, in float32 scalars."""
    f32 = np.float32
    rows = rows.astype(np.float32).copy()
    sigma, nt, threshold, one = f32(sigma), f32(nt), f32(threshold), f32(1)
    n = len(rows)
    for i in range(len(rows)):
        best = i
        for pos in range(i + 1, n):
            if rows[best, 4] < rows[pos, 4]:
                best = pos
        rows[[i, best]] = rows[[best, i]]
        tx1, ty1, tx2, ty2, _ = rows[i]
        pos = i + 1
        while pos < n:
            x1, y1, x2, y2, _ = rows[pos]
            area = (x2 - x1 + one) * (y2 - y1 + one)
            iw = min(tx2, x2) - max(tx1, x1) + one
            ih = min(ty2, y2) - max(ty1, y1) + one
            if iw > 0 and ih > 0:
                ov = iw * ih / ((tx2 - tx1 + one) * (ty2 - ty1 + one) + area - iw * ih)
                if method == "gaussian":
                    weight = f32(math.exp(float(-(ov * ov) / sigma)))
                else:
                    weight = (one - ov if method == "linear" else f32(0)) if ov > nt else one
                rows[pos, 4] = weight * rows[pos, 4]
                if rows[pos, 4] < threshold:
                    rows[pos] = rows[n - 1]
                    n -= 1
                    continue
            pos += 1
    return rows, n


@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
def test_reference_equals_the_official_loop_on_random_boxes(method):
    """Integer corners on a small grid (many overlaps, touching boxes and exact duplicates), tied
    scores and scores near the threshold: the kept rows of soft_nms(reference=True) and the whole
    array of reference_soft_nms, stale rows included, equal the one-box-at-a-time loop exactly."""
    rng = np.random.default_rng({"linear": 1, "gaussian": 2, "hard": 3}[method])
    for trial in range(30):
        n = int(rng.integers(1, 40))
        xy = rng.integers(0, 12, (n, 2))
        wh = rng.integers(0, 6, (n, 2))
        scores = rng.choice([0.9, 0.5, 0.5, 0.05, 0.002, 0.0011, 0.0005], n) * rng.choice([1.0, 0.7], n)
        rows = np.concatenate([xy, xy + wh, scores[:, None]], 1).astype(np.float32)
        expected, count = _official_loop(rows, 0.5, 0.3, 1e-3, method)
        assert np.array_equal(reference_soft_nms(rows, method=method, iou_threshold=0.3), expected)
        boxes, kept, labels = soft_nms(
            torch.from_numpy(rows[:, :4]), torch.from_numpy(rows[:, 4]), method=method, reference=True
        )
        assert np.array_equal(torch.cat([boxes, kept[:, None]], 1).numpy(), expected[:count])
        assert labels.tolist() == [0] * count


def test_merge_scales_still_runs_on_soft_nms():
    """merge_scales' default is soft_nms (Gaussian, sigma 0.5, threshold 0.001) per class."""
    first = (BOXES[:3], SCORES[:3], torch.tensor([0, 0, 1]))
    second = (BOXES[3:], SCORES[3:], torch.tensor([0]))
    boxes, scores, labels = merge_scales([first, second], K=10)
    expected = soft_nms(BOXES, SCORES, torch.tensor([0, 0, 1, 0]))
    order = expected[1].argsort(descending=True)
    assert torch.equal(scores, expected[1][order]) and torch.equal(labels, expected[2][order])
