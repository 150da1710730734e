"""Tests of minicenternet.predict.Detector on a tiny, randomly initialised ResNet-18 CenterNet."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from minicenternet.checkpoint import save_checkpoint
from minicenternet.data.transforms import normalize_batch
from minicenternet.decode import decode_scores, merge_scales
from minicenternet.losses import clamped_sigmoid
from minicenternet.models import build_model
from minicenternet.predict import Detector

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=NUM_CLASSES, dcn=False).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 60, 3), dtype=np.uint8)


def _check_prediction(pred: dict, height: int, width: int) -> None:
    assert set(pred) == {"boxes", "scores", "labels"}
    boxes, scores, labels = pred["boxes"], pred["scores"], pred["labels"]
    n = len(scores)
    assert boxes.shape == (n, 4) and labels.shape == (n,)
    assert boxes.dtype == torch.float32
    assert torch.all(boxes[:, 0] >= 0) and torch.all(boxes[:, 2] <= width)
    assert torch.all(boxes[:, 1] >= 0) and torch.all(boxes[:, 3] <= height)
    assert torch.all(boxes[:, :2] <= boxes[:, 2:])
    assert torch.all(scores[:-1] >= scores[1:])
    assert torch.all((scores >= 0) & (scores < 1))  # 0: fewer than K peaks
    assert torch.all((labels >= 0) & (labels < NUM_CLASSES))


def _assert_same(a: dict, b: dict) -> None:
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key]), key


def test_three_input_forms_give_the_same_result(model, image, tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    detector = Detector(model, input_size=64, device="cpu")
    from_path = detector(path)
    assert isinstance(from_path, list) and len(from_path) == 1
    _check_prediction(from_path[0], 48, 60)
    assert len(from_path[0]["scores"]) == 100  # K, no threshold
    _assert_same(detector(str(path))[0], from_path[0])
    _assert_same(detector(image)[0], from_path[0])
    as_float = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    _assert_same(detector(as_float)[0], from_path[0])
    _assert_same(detector(torch.from_numpy(image).permute(2, 0, 1))[0], from_path[0])
    both = detector([image, path])
    assert len(both) == 2
    _assert_same(both[1], from_path[0])


def _predict_and_watch(detector: Detector, rgb: np.ndarray) -> tuple[dict, dict]:
    """The detector's prediction for ``rgb`` and the network's last ``input`` and ``out``."""
    seen = {}
    handle = detector.model.register_forward_hook(lambda module, args, out: seen.update(input=args[0], out=out))
    try:
        return detector(rgb)[0], seen
    finally:
        handle.remove()


def _check_mapped_back(
    pred: dict, out: dict, factor: float, shift: tuple[float, float], image_hw: tuple[int, int], reference: bool = False
) -> None:
    """``pred`` is the top-K decoding of ``out`` with every stride-4 box mapped to the image by
    ``x = factor x' - shift_x``, ``y = factor y' - shift_y`` and clipped to the image
    (``reference``: plain sigmoid, no clipping)."""
    heat = out["hm"].sigmoid() if reference else clamped_sigmoid(out["hm"])
    boxes, scores, labels = decode_scores(heat, out["wh"], out["reg"], K=len(pred["scores"]))
    expected = boxes[0] * factor - torch.tensor([*shift, *shift])
    if not reference:
        expected = torch.minimum(expected.clamp(min=0), torch.tensor([image_hw[1], image_hw[0]] * 2, dtype=torch.float32))
    # reorder corners where a (near-zero, random) size is negative
    expected = torch.cat([torch.minimum(expected[:, :2], expected[:, 2:]), torch.maximum(expected[:, :2], expected[:, 2:])], 1)
    torch.testing.assert_close(pred["boxes"], expected, atol=1e-4, rtol=0)
    assert torch.equal(pred["scores"], scores[0]) and torch.equal(pred["labels"], labels[0])


def test_original_resolution_is_padded_and_mapped_back(model):
    """input_size=None: a 70x90 image is centred in a 96x96 input (padded_size: 70 -> 96, 90 -> 96)
    at scale 1, so image pixel (x, y) sits at (x + 3, y + 13) and a stride-4 box maps back by
    x = 4 x' - 3, y = 4 y' - 13, clipped to the image."""
    rgb = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    pred, seen = _predict_and_watch(Detector(model, input_size=None, device="cpu", K=20), rgb)
    _check_prediction(pred, 70, 90)
    padded = torch.zeros(1, 3, 96, 96, dtype=torch.uint8)
    padded[0, :, 13:83, 3:93] = torch.from_numpy(rgb).permute(2, 0, 1)
    torch.testing.assert_close(seen["input"], normalize_batch(padded))
    _check_mapped_back(pred, seen["out"], 4.0, (3.0, 13.0), (70, 90))


def test_reference_test_takes_the_plain_sigmoid_and_leaves_boxes_unclipped(model):
    """Detector(reference=True): the same mapping as above without clipping; with the head's
    bias at -2.19, boxes at the top-left map cell reach outside the image (x = 4 x' - 3 < 0)."""
    rgb = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    pred, seen = _predict_and_watch(Detector(model, input_size=None, device="cpu", K=400, reference=True), rgb)
    _check_mapped_back(pred, seen["out"], 4.0, (3.0, 13.0), (70, 90), reference=True)
    assert (pred["boxes"][:, :2] < 0).any()


def test_padding_follows_the_models_pad_multiple(model, monkeypatch):
    """A model with ``pad_multiple = 128`` (Hourglass) gets the 70x90 image centred in 128x128:
    the centre (45, 35) goes to (64, 64), so pixel (x, y) sits at (x + 19, y + 29)."""
    monkeypatch.setattr(model, "pad_multiple", 128, raising=False)
    rgb = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    pred, seen = _predict_and_watch(Detector(model, input_size=None, device="cpu", K=20, pad_variant="minimal"), rgb)
    padded = torch.zeros(1, 3, 128, 128, dtype=torch.uint8)
    padded[0, :, 29:99, 19:109] = torch.from_numpy(rgb).permute(2, 0, 1)
    torch.testing.assert_close(seen["input"], normalize_batch(padded))
    _check_mapped_back(pred, seen["out"], 4.0, (19.0, 29.0), (70, 90))
    _, seen = _predict_and_watch(Detector(model, input_size=None, device="cpu", K=20), rgb)
    assert seen["input"].shape[2:] == (128, 128)  # the reference (70 | 127) + 1 = 128, (90 | 127) + 1 = 128


def test_the_model_predicts_in_eval_mode_and_keeps_its_own_mode(image):
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=NUM_CLASSES, dcn=False).train()
    detector = Detector(net, input_size=64, device="cpu", amp=False)
    modes = []
    handle = net.register_forward_hook(lambda module, args, out: modes.append(module.training))
    try:
        in_training = detector(image)[0]
    finally:
        handle.remove()
    assert modes == [False] and net.training  # eval while predicting, train mode given back
    net.eval()
    _assert_same(in_training, Detector(net, input_size=64, device="cpu", amp=False)(image)[0])
    assert not net.training


def test_flip_test_runs_on_the_image_and_its_mirror(model, image):
    seen = {}
    handle = model.register_forward_hook(lambda module, args, out: seen.update(input=args[0]))
    try:
        pred = Detector(model, input_size=64, flip=True, device="cpu")(image)[0]
    finally:
        handle.remove()
    assert seen["input"].shape == (2, 3, 64, 64)
    assert torch.equal(seen["input"][1], seen["input"][0].flip(2))
    _check_prediction(pred, 48, 60)
    plain = Detector(model, input_size=64, device="cpu")(image)[0]
    assert not torch.equal(pred["scores"], plain["scores"])


def test_score_threshold_filters(model, image):
    everything = Detector(model, input_size=64, device="cpu")(image)[0]
    threshold = float(everything["scores"][10])
    kept = Detector(model, input_size=64, device="cpu", score_threshold=threshold)(image)[0]
    keep = everything["scores"] >= threshold
    assert 0 < keep.sum() < len(keep)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(kept[key], everything[key][keep])
    none = Detector(model, input_size=64, device="cpu", score_threshold=1.0)(image)[0]
    assert none["boxes"].shape == (0, 4) and none["scores"].shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3), np.float32)],
    ids=["gray", "rgba", "float"],
)
def test_wrong_arrays_are_rejected(model, bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        Detector(model, input_size=64, device="cpu")(bad)


def test_from_checkpoint_round_trip(model, image, tmp_path):
    path = save_checkpoint(
        {
            "model": model.state_dict(),
            "model_config": {"arch": "resnet18", "num_classes": NUM_CLASSES, "dcn": False, "class_names": ["a", "b", "c"]},
        },
        tmp_path / "best.pt",
    )
    restored = Detector.from_checkpoint(path, device="cpu", input_size=64)
    assert restored.class_names == ["a", "b", "c"]
    assert restored.input_size == 64 and restored.device == torch.device("cpu")
    assert not restored.model.training
    _assert_same(restored(image)[0], Detector(model, input_size=64, device="cpu")(image)[0])
    renamed = Detector.from_checkpoint(path, device="cpu", input_size=64, class_names=["x", "y", "z"])
    assert renamed.class_names == ["x", "y", "z"]


def test_from_checkpoint_takes_the_runs_test_settings(model, image, tmp_path):
    test_config = {"input_size": 96, "flip": True, "pad_variant": "minimal"}
    path = save_checkpoint(
        {
            "model": model.state_dict(),
            "model_config": {"arch": "resnet18", "num_classes": NUM_CLASSES, "dcn": False},
            "test_config": test_config,
        },
        tmp_path / "best.pt",
    )
    restored = Detector.from_checkpoint(path, device="cpu")
    assert (restored.input_size, restored.flip, restored.pad_variant) == (96, True, "minimal")
    _assert_same(restored(image)[0], Detector(model, device="cpu", **test_config)(image)[0])
    overridden = Detector.from_checkpoint(path, device="cpu", input_size=None, flip=False)
    assert (overridden.input_size, overridden.flip, overridden.pad_variant) == (None, False, "minimal")


def test_a_test_scale_resizes_the_image_before_padding(model):
    """scales=(0.5,): a 70x90 image becomes 35x45 (the reference's int(H * s)), centred at its
    integer centre (22, 17) in a 64x64 input (35, 45 -> 64), so original pixel (X, Y) sits at
    (X / 2 + 10, Y / 2 + 15) and a stride-4 box maps back by X = 8 x' - 20, Y = 8 y' - 30."""
    rgb = np.full((70, 90, 3), 200, dtype=np.uint8)
    detector = Detector(model, scales=(0.5,), pad_variant="reference", device="cpu", K=20)
    pred, seen = _predict_and_watch(detector, rgb)
    _check_prediction(pred, 70, 90)
    expected_input = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    expected_input[..., 15:50, 10:55] = 200  # the resized image: rows 15 .. 49, columns 10 .. 54
    torch.testing.assert_close(seen["input"], normalize_batch(expected_input))
    _check_mapped_back(pred, seen["out"], 8.0, (20.0, 30.0), (70, 90))


def test_multi_scale_test_merges_the_single_scales(model, image):
    """Two scales (each with its flip test): the result is merge_scales of the two one-scale results."""
    inputs = []
    handle = model.register_forward_hook(lambda module, args, out: inputs.append(args[0].shape))
    try:
        pred = Detector(model, scales=(0.5, 1.5), flip=True, pad_variant="minimal", device="cpu", K=30)(image)[0]
    finally:
        handle.remove()
    assert inputs == [(2, 3, 32, 32), (2, 3, 96, 96)]  # 48x60 -> 24x30 -> 32; 72x90 -> 96
    _check_prediction(pred, 48, 60)
    assert len(pred["scores"]) <= 30
    singles = [Detector(model, scales=(s,), flip=True, pad_variant="minimal", device="cpu", K=30)(image)[0] for s in (0.5, 1.5)]
    boxes, scores, labels = merge_scales([(p["boxes"], p["scores"], p["labels"]) for p in singles], K=30)
    _assert_same(pred, {"boxes": boxes, "scores": scores, "labels": labels})


def test_multi_scale_needs_the_original_resolution(model):
    with pytest.raises(ValueError, match="input_size=None"):
        Detector(model, input_size=64, scales=(0.5, 1.0))


def test_channels_last_changes_the_layout_not_the_detections(model, image):
    nhwc = Detector(model, input_size=64, device="cpu")(image)[0]
    assert model.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)
    nchw = Detector(model, input_size=64, device="cpu", channels_last=False)(image)[0]
    assert model.trunk[0].weight.is_contiguous()
    torch.testing.assert_close(nhwc["scores"], nchw["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(nhwc["boxes"], nchw["boxes"], atol=1e-3, rtol=0)
    assert torch.equal(nhwc["labels"], nchw["labels"])
