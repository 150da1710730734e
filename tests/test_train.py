"""Tests of minicenternet.train: the schedule, a tiny end-to-end run with resume, and overfitting."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from torch.utils.data import default_collate

from minicenternet.checkpoint import load_checkpoint
from minicenternet.data.centernet_dataset import CenterNetDataset
from minicenternet.data.coco import CocoDetection
from minicenternet.data.shapes import CLASSES
from minicenternet.data.transforms import normalize_batch
from minicenternet.device import fused_adam
from minicenternet.evaluate import evaluate
from minicenternet.losses import centernet_loss
from minicenternet.models import build_model
from minicenternet.predict import Detector
from minicenternet.train import Report, TrainConfig, lr_factor, train

DROPS = (90 / 140, 120 / 140)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ---------------------------------------------------------------------------------------------
# lr_factor
# ---------------------------------------------------------------------------------------------


def test_lr_factor_paper_schedule():
    """140 iterations: x0.1 from iteration 90 and x0.01 from 120 (the paper's epochs 90 / 120)."""
    values = {it: lr_factor(it, 140, 0, DROPS) for it in (0, 1, 89, 90, 119, 120, 139)}
    assert values[0] == values[1] == values[89] == 1.0
    assert values[90] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert values[120] == pytest.approx(0.01) and values[139] == pytest.approx(0.01)


def test_lr_factor_same_fractions_of_any_length():
    # 42 = 3 x 14 iterations: drops at 9/14 and 12/14 of the run, iterations 27 and 36
    factors = [lr_factor(it, 42, 0, DROPS) for it in range(42)]
    assert factors[:27] == [1.0] * 27
    assert factors[27:36] == pytest.approx([0.1] * 9)
    assert factors[36:] == pytest.approx([0.01] * 6)
    assert all(lr_factor(it, 50, 0, ()) == 1.0 for it in range(50))


def test_lr_factor_linear_warm_up():
    assert [lr_factor(it, 140, 10, DROPS) for it in (0, 4, 9, 10, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    # warm-up is linear from 1 / warmup_iters
    assert lr_factor(2, 1000, 4, DROPS) == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# train(): tiny end-to-end run and resume
# ---------------------------------------------------------------------------------------------


def _read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_end_to_end_and_resume(tiny_shapes, tmp_path):
    cfg = TrainConfig(
        data=str(tiny_shapes), out=str(tmp_path / "run"), input_size=64, epochs=2, batch_size=4, lr=1e-3,
        num_workers=0, val_every=1, dcn=False, amp=False, device="cpu",
    )
    result = train(cfg, progress=False)
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.jsonl", "report.json"):
        assert (out / name).is_file(), name

    records = _read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert set(METRICS) <= set(record)
        assert {"loss", "hm_loss", "wh_loss", "off_loss", "lr"} <= set(record)
        assert math.isfinite(record["loss"]) and record["loss"] > 0

    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert last["model_config"] == {"arch": "resnet18", "task": "centernet", "num_classes": 5, "dcn": False, "class_names": list(CLASSES)}
    assert last["train_config"]["input_size"] == 64
    # 8 images / batch 4 = 2 iterations per epoch
    assert last["scheduler"]["last_epoch"] == 4
    assert all(s["step"] == 4 for s in last["optimizer"]["state"].values())
    best = load_checkpoint(out / "best.pt")
    assert best["metrics"]["AP"] == max(r["AP"] for r in records)
    # the report: best.pt (chosen on val) measured on the test split
    assert (result.split, result.checkpoint, result.epoch) == ("test", "best.pt", best["metrics"]["epoch"])
    on_test = evaluate(Detector.from_checkpoint(out / "best.pt", device="cpu"), CocoDetection.from_root(tiny_shapes, "test"),
                       progress=False)
    assert set(result.metrics) == set(METRICS)
    for name in METRICS:
        assert result.metrics[name] == pytest.approx(on_test[name], abs=1e-6, nan_ok=True)
    stored = json.loads((out / "report.json").read_text())
    assert (stored["split"], stored["epoch"], stored["checkpoint"]) == ("test", result.epoch, "best.pt")
    assert "test split of best.pt" in result.describe()

    # resume with a longer schedule: only epoch 3 runs
    train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), resume=True, progress=False)
    records = _read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 3 and len(last["history"]) == 3
    assert last["scheduler"]["last_epoch"] == 6
    assert all(s["step"] == 6 for s in last["optimizer"]["state"].values())


def test_validation_after_the_last_epoch_only_with_the_runs_test_settings(tiny_shapes, tmp_path):
    """val_every=0 validates once, at the end, with the eval_* settings; best.pt records them and
    Detector.from_checkpoint reproduces the stored AP."""
    cfg = TrainConfig(
        data=str(tiny_shapes), out=str(tmp_path / "run"), input_size=64, epochs=2, batch_size=4, num_workers=0,
        val_every=0, dcn=False, amp=False, device="cpu", eval_flip=True, eval_scales=(0.5, 1.0), eval_pad="minimal",
    )
    train(cfg, progress=False)
    records = _read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert "AP" not in records[0] and "AP" in records[1]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["test_config"] == {
        "input_size": None, "flip": True, "scales": (0.5, 1.0), "pad_variant": "minimal", "amp": False
    }
    detector = Detector.from_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    again = evaluate(detector, CocoDetection.from_root(tiny_shapes, "val"), progress=False)
    for name in METRICS:
        assert again[name] == pytest.approx(best["metrics"][name], abs=1e-6, nan_ok=True)


def test_eval_limit_validates_and_tests_on_the_first_images_only(tiny_shapes, tmp_path, monkeypatch):
    """eval_limit=2: two val images after the last epoch and two test images for the report
    (the tiny dataset has four of each); the AP equals evaluate() on those two."""
    seen = []
    original = Detector.predict_one
    monkeypatch.setattr(Detector, "predict_one", lambda self, image: seen.append(str(image)) or original(self, image))
    cfg = TrainConfig(
        data=str(tiny_shapes), out=str(tmp_path / "run"), input_size=64, epochs=1, batch_size=4, num_workers=0,
        val_every=0, dcn=False, amp=False, device="cpu", eval_limit=2,
    )
    report = train(cfg, progress=False)
    val, test = CocoDetection.from_root(tiny_shapes, "val"), CocoDetection.from_root(tiny_shapes, "test")
    assert seen == [str(val.image_path(i)) for i in range(2)] + [str(test.image_path(i)) for i in range(2)]
    detector = Detector.from_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert evaluate(detector, test, limit=2, progress=False) == pytest.approx(report.metrics, nan_ok=True)


def test_a_validation_without_objects_still_gives_a_best_checkpoint(tiny_shapes, tmp_path, monkeypatch):
    """COCOeval gives -1 (nan here) for every number when the val set has no object: best.pt is
    still written at the first validation, and metrics.jsonl stays strict JSON (null, not NaN)."""
    import minicenternet.train as train_module

    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: dict.fromkeys(METRICS, math.nan))
    cfg = TrainConfig(
        data=str(_without_test_split(tiny_shapes, tmp_path)), out=str(tmp_path / "run"), input_size=64, epochs=2,
        batch_size=4, num_workers=0, val_every=1, dcn=False, amp=False, device="cpu",
    )
    result = train(cfg, progress=False)
    assert set(result.metrics) == set(METRICS) and all(math.isnan(v) for v in result.metrics.values())
    assert load_checkpoint(tmp_path / "run" / "best.pt")["metrics"]["epoch"] == 1

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["AP"] for r in records] == [None, None]
    report = json.loads((tmp_path / "run" / "report.json").read_text(), parse_constant=refuse)
    assert report["metrics"] == dict.fromkeys(METRICS)


def _without_test_split(root, tmp_path):
    """A copy of the dataset at ``root`` with its train and val splits only."""
    copy = tmp_path / "no_test"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("test", "instances_test.json"))
    return copy


def test_without_a_test_split_the_last_epoch_is_reported_on_val(tiny_shapes, tmp_path):
    """As the reference: no model selection, the last epoch's val metrics, and said so."""
    cfg = TrainConfig(
        data=str(_without_test_split(tiny_shapes, tmp_path)), out=str(tmp_path / "run"), input_size=64, epochs=2,
        batch_size=4, lr=1e-3, num_workers=0, val_every=1, dcn=False, amp=False, device="cpu",
    )
    result = train(cfg, progress=False)
    last = _read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert isinstance(result, Report)
    assert (result.split, result.checkpoint, result.epoch) == ("val", "last.pt", 2)
    assert result.metrics == pytest.approx({k: math.nan if last[k] is None else last[k] for k in METRICS}, nan_ok=True)
    assert "last epoch (2)" in result.describe() and "no test split" in result.describe()


def test_fused_adam_takes_the_same_steps_as_the_default_adam():
    """fused_adam picks the fused kernel on CPU and CUDA only; on CPU it follows the default Adam
    step for step (same rule, different kernel)."""
    assert fused_adam("cpu") is True and fused_adam(torch.device("cuda")) is True and fused_adam("mps") is None
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    final = []
    for fused in (None, fused_adam("cpu")):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = torch.optim.Adam(params, lr=1e-2, fused=fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        final.append(params)
    for before, default, fused in zip(start, *final):
        assert (default - before).norm() > 1e-2  # the parameters moved
        torch.testing.assert_close(fused, default, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# overfitting one batch
# ---------------------------------------------------------------------------------------------


def test_loss_decreases_when_overfitting_one_batch(tiny_shapes):
    torch.manual_seed(0)
    source = CocoDetection.from_root(tiny_shapes, "train")
    dataset = CenterNetDataset(source, (64, 64), train=False)
    images, targets = default_collate([dataset[0], dataset[1]])
    images = normalize_batch(images)
    model = build_model("resnet18", num_classes=source.num_classes, dcn=False).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = centernet_loss(model(images), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("arch", ["dla-small", "hourglass-small"])
def test_the_small_backbones_train_and_report(tiny_shapes, tmp_path, arch):
    """The whole loop with the other backbones: Hourglass's per-stack outputs in training, its
    last stack at validation; the run ends with a report on the test split."""
    cfg = TrainConfig(
        arch=arch, data=str(tiny_shapes), out=str(tmp_path / "run"), input_size=64, epochs=1, batch_size=4,
        num_workers=0, val_every=1, dcn=False, amp=False, device="cpu",
    )
    result = train(cfg, progress=False)
    assert result.split == "test" and set(result.metrics) == set(METRICS)
    record = _read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert math.isfinite(record["loss"]) and record["loss"] > 0
    assert load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]["arch"] == arch


def test_the_loader_follows_the_config_and_a_2017_layout_is_found(tiny_shapes, tmp_path):
    """COCO 2017 as it unpacks (train2017/, instances_train2017.json; no test annotations):
    the splits are found and there is no test split; color_aug reaches the dataset."""
    from minicenternet.train import _datasets, _loader

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(tiny_shapes / split, root / f"{split}2017")
        shutil.copy(tiny_shapes / "annotations" / f"instances_{split}.json", root / "annotations" / f"instances_{split}2017.json")
    cfg = TrainConfig(data=str(root), input_size=64, batch_size=4, num_workers=0, device="cpu", color_aug=False)
    train_src, val_src, test_src = _datasets(cfg)
    assert (len(train_src), len(val_src), test_src) == (8, 4, None)
    assert train_src.image_dir == root / "train2017"
    assert _loader(cfg, train_src, torch.device("cpu")).dataset.color_aug is False
    assert _loader(replace(cfg, color_aug=True), train_src, torch.device("cpu")).dataset.color_aug is True
