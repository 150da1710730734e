"""CornerNet through the library's pipeline: its samples, the Detector's pairing, flip test and
soft-NMS, training, checkpoints and the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from minicenternet.checkpoint import load_checkpoint
from minicenternet.cli import main
from minicenternet.config import command_line, default_config
from minicenternet.data.centernet_dataset import CenterNetDataset
from minicenternet.data.coco import CocoDetection
from minicenternet.decode import mirror_boxes
from minicenternet.evaluate import METRIC_NAMES, evaluate
from minicenternet.predict import Detector
from minicenternet.train import TrainConfig, train

MAP = 16  # output side of the 64x64 test images: 64 / 4, no padding with pad_variant="minimal"


def test_mirror_boxes_hand_values_and_involution():
    boxes = torch.tensor([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 10.0, 3.5]])
    mirrored = mirror_boxes(boxes, 10)
    assert torch.equal(mirrored, torch.tensor([[6.0, 2.0, 9.0, 5.0], [0.0, 0.0, 10.0, 3.5]]))
    assert torch.equal(mirror_boxes(mirrored, 10), boxes)


def _corner_maps(tl: tuple[float, float], br: tuple[float, float], label: int, emb: tuple[float, float]) -> dict:
    """One image's CornerNet outputs (``MAP x MAP``, 3 classes) holding one corner pair: logit 4
    at the integer corners, -9 elsewhere, the fractional parts as offsets. Every background pixel
    of a flat map is a 3x3 peak too; the background embeddings, 0 for top-left and 10 for
    bottom-right, keep those out of every pair."""
    out = {
        "tl_hm": torch.full((3, MAP, MAP), -9.0), "br_hm": torch.full((3, MAP, MAP), -9.0),
        "tl_emb": torch.zeros(1, MAP, MAP), "br_emb": torch.full((1, MAP, MAP), 10.0),
        "tl_off": torch.zeros(2, MAP, MAP), "br_off": torch.zeros(2, MAP, MAP),
    }
    for corner, (x, y), e in (("tl", tl, emb[0]), ("br", br, emb[1])):
        px, py = int(x), int(y)
        out[f"{corner}_hm"][label, py, px] = 4.0
        out[f"{corner}_emb"][0, py, px] = e
        out[f"{corner}_off"][:, py, px] = torch.tensor([x - px, y - py])
    return out


class FixedCornerNet(nn.Module):
    """Returns given maps whatever the input: the first for the image, the second (if any) for
    its mirror, so the Detector's own arithmetic is all that is tested."""

    task = "cornernet"
    pad_multiple = 32

    def __init__(self, *per_image: dict) -> None:
        super().__init__()
        self.per_image = per_image
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so the model has a device

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        chosen = self.per_image[: images.shape[0]]
        return {key: torch.stack([maps[key] for maps in chosen]) for key in chosen[0]}


def _image() -> np.ndarray:
    return np.zeros((64, 64, 3), dtype=np.uint8)


def test_detector_pairs_corners_into_one_box_in_image_pixels():
    """Top-left (2.5, 3.25), bottom-right (10.25, 12.5) on the 16x16 map of a 64x64 image (stride
    4, no padding): the box (10, 13, 41, 50) in image pixels, scored sigmoid(4), class 1."""
    model = FixedCornerNet(_corner_maps((2.5, 3.25), (10.25, 12.5), 1, (5.0, 5.3)))
    pred = Detector(model, device="cpu", pad_variant="minimal", channels_last=False)(_image())[0]
    assert len(pred["scores"]) == 1
    torch.testing.assert_close(pred["boxes"][0], torch.tensor([10.0, 13.0, 41.0, 50.0]))
    assert pred["scores"][0].item() == pytest.approx(1 / (1 + math.exp(-4.0)), abs=1e-6)
    assert pred["labels"].tolist() == [1]


def test_detector_drops_pairs_whose_embeddings_differ():
    model = FixedCornerNet(_corner_maps((2.5, 3.25), (10.25, 12.5), 1, (5.0, 5.6)))
    pred = Detector(model, device="cpu", pad_variant="minimal", channels_last=False)(_image())[0]
    assert len(pred["scores"]) == 0


def test_flip_test_maps_the_mirror_back_and_merges_by_soft_nms():
    """The mirror of box (2.5, 3.25, 10.25, 12.5) on a 16-wide map is (5.75, 3.25, 13.5, 12.5):
    its top-left corner is the original's top-right one. Decoded and mapped back, it lands on the
    original box; Gaussian soft-NMS keeps the first at its score and decays the duplicate by
    exp(-IoU^2 / 0.5) = exp(-2)."""
    original = _corner_maps((2.5, 3.25), (10.25, 12.5), 1, (5.0, 5.3))
    mirrored = _corner_maps((5.75, 3.25), (13.5, 12.5), 1, (5.0, 5.3))
    detector = Detector(FixedCornerNet(original, mirrored), device="cpu", pad_variant="minimal", flip=True,
                        channels_last=False)
    pred = detector(_image())[0]
    assert len(pred["scores"]) == 2
    torch.testing.assert_close(pred["boxes"], torch.tensor([[10.0, 13.0, 41.0, 50.0]] * 2))
    score = 1 / (1 + math.exp(-4.0))
    torch.testing.assert_close(pred["scores"], torch.tensor([score, score * math.exp(-2.0)]))


def test_cornernet_samples_encode_the_corners_of_the_flipped_boxes(tiny_shapes):
    """With every image flipped, the top-left target of each object sits at the mirror of its
    top-right corner, computed here from the annotation."""
    source = CocoDetection.from_root(tiny_shapes, "train")
    dataset = CenterNetDataset(source, (64, 64), train=True, flip_prob=1.0, random_crop=False, task="cornernet")
    torch.manual_seed(0)
    _, targets = dataset[0]
    record = source[0]
    assert set(targets) == {"tl_hm", "br_hm", "tl_off", "br_off", "tl_ind", "br_ind", "mask", "image_id"}
    count = int(targets["mask"].sum())
    assert count == len(record.boxes)
    boxes = record.boxes[:count] / 4  # the 64x64 image is the input: output stride 4
    x1 = np.minimum(MAP - boxes[:, 2], MAP - 1)  # mirrored right edge, clipped as the encoder clips
    expected = boxes[:, 1].astype(int) * MAP + x1.astype(int)
    assert targets["tl_ind"][:count].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="unknown task"):
        CenterNetDataset(source, (64, 64), task="cornernets")


@pytest.fixture(scope="module")
def cornernet_run(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("cornernet_run")
    cfg = TrainConfig(
        arch="hourglass-small", task="cornernet", data=str(tiny_shapes), out=str(out), input_size=64, epochs=2,
        batch_size=4, num_workers=0, val_every=1, amp=False, device="cpu", eval_flip=True, eval_pad="minimal",
    )
    return out, train(cfg, progress=False)


def test_cornernet_trains_and_reports(cornernet_run):
    out, report = cornernet_run
    assert report.split == "test" and set(report.metrics) == set(METRIC_NAMES)
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(records) == 2
    for name in ("loss", "hm_loss", "pull_loss", "push_loss", "off_loss"):
        assert f'"{name}"' in records[0]
    meta = load_checkpoint(out / "best.pt")["model_config"]
    assert (meta["arch"], meta["task"]) == ("hourglass-small", "cornernet")


def test_cornernet_checkpoint_rebuilds_its_detector(cornernet_run, tiny_shapes):
    out, report = cornernet_run
    detector = Detector.from_checkpoint(out / "best.pt", device="cpu")
    assert detector.task == "cornernet" and detector.flip is True
    metrics = evaluate(detector, CocoDetection.from_root(tiny_shapes, "test"), progress=False)
    assert metrics == pytest.approx(report.metrics, nan_ok=True)


def test_cornernet_defaults_and_command_line():
    cfg = default_config("cpu", task="cornernet")
    assert (cfg.arch, cfg.input_size, cfg.epochs) == ("hourglass-small", 128, None)
    cfg = default_config("cuda", task="cornernet")  # the paper: batch 49, lr 2.5e-4, drop at 450k of 500k iterations
    assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.epochs, cfg.pretrained) == ("hourglass104", 49, 2.5e-4, 207, False)
    assert cfg.lr_drops == (186 / 207,)
    line = command_line(default_config("cpu", task="cornernet", epochs=2.0, pretrain_steps=0), False)
    assert line.startswith("minicenternet train --task cornernet --device cpu")  # hourglass-small is the CPU default
    line = command_line(default_config("cpu", task="cornernet", arch="hourglass104", epochs=2.0, pretrain_steps=0), False)
    assert "--arch hourglass104 --task cornernet" in line


def test_cornernet_needs_an_hourglass_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "cornernet", "--arch", "resnet18"])
    assert exit_info.value.code == 2
    assert "--task cornernet needs an Hourglass backbone" in capsys.readouterr().err


def test_class_agnostic_pairs_corners_of_any_classes():
    """Top-left of class 1, bottom-right of class 2: the pair is rejected (what is left pairs a
    real corner with a background pixel of the right class, scored (0.98 + 1e-4) / 2 < 0.5),
    unless the heatmaps are merged over the classes."""
    maps = _corner_maps((2.5, 3.25), (10.25, 12.5), 1, (5.0, 5.3))
    maps["br_hm"] = _corner_maps((2.5, 3.25), (10.25, 12.5), 2, (5.0, 5.3))["br_hm"]
    settings = {"device": "cpu", "pad_variant": "minimal", "channels_last": False}
    assert Detector(FixedCornerNet(maps), **settings)(_image())[0]["scores"].max() < 0.5
    pred = Detector(FixedCornerNet(maps), class_agnostic=True, **settings)(_image())[0]
    assert pred["scores"][0].item() == pytest.approx(1 / (1 + math.exp(-4.0)), abs=1e-6)
    assert pred["labels"].unique().tolist() == [0]
    torch.testing.assert_close(pred["boxes"][0], torch.tensor([10.0, 13.0, 41.0, 50.0]))


def test_reference_takes_the_plain_sigmoid():
    """Logit 10: the clamped sigmoid gives 1 - 1e-4, the plain one (the official test) 0.9999546."""
    maps = _corner_maps((2.5, 3.25), (10.25, 12.5), 1, (5.0, 5.3))
    for corner in ("tl", "br"):
        maps[f"{corner}_hm"][maps[f"{corner}_hm"] > 0] = 10.0
    settings = {"device": "cpu", "pad_variant": "minimal", "channels_last": False}
    clamped = Detector(FixedCornerNet(maps), **settings)(_image())[0]["scores"]
    plain = Detector(FixedCornerNet(maps), reference=True, **settings)(_image())[0]["scores"]
    assert clamped.tolist() == pytest.approx([1 - 1e-4]) and plain.tolist() == pytest.approx([1 / (1 + math.exp(-10))])


def test_a_checkpoint_without_a_task_is_a_centernet(tmp_path):
    from minicenternet.checkpoint import save_checkpoint
    from minicenternet.models import build_model

    model = build_model("resnet18", num_classes=3, dcn=False)
    meta = {"arch": "resnet18", "num_classes": 3, "dcn": False, "class_names": ["a", "b", "c"]}  # before tasks existed
    save_checkpoint({"model": model.state_dict(), "model_config": meta}, tmp_path / "old.pt")
    assert Detector.from_checkpoint(tmp_path / "old.pt", device="cpu").task == "centernet"


def test_cornernet_on_cuda_is_the_paper_preset_whatever_the_hourglass():
    cfg = default_config("cuda", task="cornernet", arch="hourglass-small")
    assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.pretrained, cfg.eval_flip) == ("hourglass-small", 49, 2.5e-4, False, True)
    assert default_config("cpu", task="cornernet", arch="hourglass104").arch == "hourglass104"


def test_a_preset_of_the_wrong_backbone_for_cornernet_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "resnet18-coco", "--task", "cornernet", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "needs an Hourglass backbone" in capsys.readouterr().err


def test_eval_limit_below_one_is_refused(tiny_shapes, tmp_path):
    cfg = TrainConfig(data=str(tiny_shapes), out=str(tmp_path), input_size=64, epochs=1, eval_limit=0, device="cpu")
    with pytest.raises(ValueError, match="eval_limit must be at least 1"):
        train(cfg, progress=False)
