"""Tests of the ``minicenternet`` command line (``minicenternet.cli.main``) on tiny data."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import cv2
import pytest
import torch

from minicenternet.checkpoint import load_checkpoint
from minicenternet.cli import main
from minicenternet.config import command_line
from minicenternet.data.coco import CocoDetection
from minicenternet.data.shapes import CLASSES
from minicenternet.evaluate import METRIC_NAMES, evaluate
from minicenternet.predict import Detector
from minicenternet.train import default_config


def _run(argv: list[str]) -> str:
    """Run the CLI and return what it printed on stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv)
    return buffer.getvalue()


def _table(text: str) -> dict[str, float]:
    """The metrics of the last two-line AP table in ``text``."""
    lines = text.strip().splitlines()
    header = [i for i, line in enumerate(lines) if line.split() == list(METRIC_NAMES)]
    assert header, text
    values = [math.nan if v == "-" else float(v) for v in lines[header[-1] + 1].split()]  # "-": no object that size
    assert len(values) == 6 and all(0.0 <= v <= 1.0 or math.isnan(v) for v in values)
    return dict(zip(METRIC_NAMES, values))


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    """One CLI training run of one epoch (module-wide: evaluate and predict reuse its best.pt)."""
    out = tmp_path_factory.mktemp("cli_run")
    argv = [
        "train", "--data", str(tiny_shapes), "--epochs", "1", "--input-size", "64", "--batch-size", "2",
        "--out", str(out), "--device", "cpu", "--arch", "resnet18", "--no-dcn", "--pretrain-steps", "2",
    ]
    return out, _run(argv)


def test_data_shapes_command(tmp_path):
    root = tmp_path / "shapes"
    argv = ["data", "shapes", "--out", str(root), "--num-train", "3", "--num-val", "2", "--num-test", "1", "--image-size", "64"]
    text = _run(argv)
    assert str(root) in text
    assert sorted(p.name for p in (root / "train").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert sorted(p.name for p in (root / "val").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["000000.png"]
    train = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 3 and all(i["width"] == i["height"] == 64 for i in train["images"])
    assert len(json.loads((root / "annotations" / "instances_val.json").read_text())["images"]) == 2
    assert cv2.imread(str(root / "train" / "000000.png")).shape == (64, 64, 3)
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["num_test"], meta["image_size"]) == (3, 2, 1, 64)
    # a second call finds the dataset up to date and leaves it alone
    stamp = (root / "train" / "000000.png").stat().st_mtime_ns
    assert "generating" not in _run(argv)
    assert (root / "train" / "000000.png").stat().st_mtime_ns == stamp


def test_train_command_prints_the_ap_table(trained):
    out, text = trained
    assert "training resnet18 CenterNet (dcn=False)" in text
    assert "1 epochs, batch 2, 64x64" in text and "trunk pre-training 2 steps" in text
    assert (out / "trunk_pretrained.pt").is_file()
    printed = _table(text)
    best = load_checkpoint(out / "best.pt")
    assert best["model_config"]["dcn"] is False and best["model_config"]["class_names"] == list(CLASSES)
    assert "COCO box AP on the test split of best.pt (epoch 1, chosen by its val AP):" in text
    report = json.loads((out / "report.json").read_text())
    for name in METRIC_NAMES:
        expected = math.nan if report["metrics"][name] is None else report["metrics"][name]
        assert printed[name] == pytest.approx(expected, abs=5e-4, nan_ok=True)
    assert (out / "last.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_evaluate_command_prints_the_ap_table(trained, tiny_shapes):
    out, _ = trained
    text = _run(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_shapes), "--device", "cpu"])
    assert "(val, 4 images)" in text
    _table(text)
    text = _run(
        ["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_shapes), "--split", "train", "--device", "cpu"]
    )
    assert "(train, 8 images)" in text
    _table(text)


def test_evaluate_command_tests_as_the_run_validated(trained, tiny_shapes):
    """Without test flags, ``evaluate`` uses the checkpoint's test settings and reproduces the AP the
    run stored; flags override them one by one."""
    out, _ = trained
    best = load_checkpoint(out / "best.pt")
    preset = default_config("cpu")
    assert best["test_config"] == {
        "input_size": None, "flip": preset.eval_flip, "scales": preset.eval_scales, "pad_variant": preset.eval_pad,
        "amp": preset.amp,
    }
    argv = ["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_shapes), "--device", "cpu"]
    for name, value in _table(_run(argv)).items():
        assert value == pytest.approx(best["metrics"][name], abs=5e-4, nan_ok=True)
    printed = _table(_run(argv + ["--no-flip", "--pad", "reference", "--scales", "1", "--input-size", "64"]))
    detector = Detector.from_checkpoint(
        out / "best.pt", device="cpu", flip=False, pad_variant="reference", scales=(1.0,), input_size=64
    )
    expected = evaluate(detector, CocoDetection.from_root(tiny_shapes, "val"), progress=False)
    for name, value in printed.items():
        assert value == pytest.approx(expected[name], abs=5e-4, nan_ok=True)


def test_evaluate_command_class_agnostic(trained, tiny_shapes):
    out, _ = trained
    argv = ["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_shapes), "--device", "cpu"]
    text = _run(argv + ["--class-agnostic"])
    assert "class-agnostic COCO box AP" in text
    detector = Detector.from_checkpoint(out / "best.pt", device="cpu", class_agnostic=True)
    expected = evaluate(detector, CocoDetection.from_root(tiny_shapes, "val"), progress=False)
    for name, value in _table(text).items():
        assert value == pytest.approx(expected[name], abs=5e-4, nan_ok=True)


def test_evaluate_command_with_the_reference_details(trained, tiny_shapes):
    out, _ = trained
    argv = ["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_shapes), "--device", "cpu"]
    text = _run(argv + ["--reference", "--scales", "0.5", "1"])
    assert "(the official test's details)" in text
    detector = Detector.from_checkpoint(out / "best.pt", device="cpu", reference=True, scales=(0.5, 1.0))
    expected = evaluate(detector, CocoDetection.from_root(tiny_shapes, "val"), progress=False, decimals=2)
    for name, value in _table(text).items():
        assert value == pytest.approx(expected[name], abs=5e-4, nan_ok=True)


def test_predict_command_writes_images_and_json(trained, tiny_shapes, tmp_path):
    out, _ = trained
    image = shutil.copy(tiny_shapes / "val" / "000000.png", tmp_path / "image.png")
    pred_dir = tmp_path / "preds"
    text = _run(
        ["predict", "--checkpoint", str(out / "best.pt"), str(image), "--out", str(pred_dir), "--device", "cpu", "--threshold", "0",
         "--scales", "1"]  # one scale: exactly K detections (the run's multi-scale soft-NMS may drop some)
    )
    drawn = cv2.imread(str(pred_dir / "image_pred.png"))
    assert drawn is not None and drawn.shape == (64, 64, 3)
    results = json.loads((pred_dir / "predictions.json").read_text())
    assert len(results) == 1 and results[0]["image"] == str(image)
    assert results[0]["output"] == str(pred_dir / "image_pred.png")
    detections = results[0]["detections"]
    assert len(detections) == 100  # K detections at threshold 0
    for det in detections:
        assert len(det["box"]) == 4 and 0.0 <= det["score"] <= 1.0
        assert det["name"] == CLASSES[det["label"]]
    scores = [det["score"] for det in detections]
    assert scores == sorted(scores, reverse=True)
    assert "100 detections" in text


def test_pretrained_argument(tmp_path):
    from minicenternet.cli import _parser
    from minicenternet.train import command_line

    weights = tmp_path / "trunk.pt"
    weights.write_bytes(b"")
    parse = lambda *v: _parser().parse_args(["train", "--pretrained", *v]).pretrained  # noqa: E731
    assert parse("imagenet") is True and parse("none") is False and parse(str(weights)) == str(weights)
    assert default_config("cuda").pretrained is True and default_config("cpu").pretrained is False
    cfg = default_config("cpu", arch="resnet18", epochs=1.0, pretrain_steps=0, pretrained=True)
    assert "--pretrained imagenet" in command_line(cfg, False)


def _config_of(monkeypatch, argv: list[str]):
    """The TrainConfig that ``minicenternet train ARGV`` would run (training replaced by a stub)."""
    import minicenternet.train as train_module
    from minicenternet.train import Report

    seen = {}
    stub = Report(dict.fromkeys(METRIC_NAMES, 0.0), "test", 1, "best.pt")
    monkeypatch.setattr(train_module, "train", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and stub)
    _run(["train", *argv])
    return seen["cfg"]


def test_the_main_job_is_the_small_hourglass_on_a_cpu_and_resnet18_on_cuda(monkeypatch):
    """With no flags a CPU plans an hourglass-small run with nothing to pre-train (it has no
    classification trunk); CUDA keeps the paper's ResNet-18 with its ImageNet trunk."""
    import minicenternet.train as train_module

    monkeypatch.setattr(train_module, "train", lambda cfg, resume=False: pytest.fail("only the first line is wanted"))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(pytest.fail.Exception):
        main(["train", "--device", "cpu"])
    assert buffer.getvalue().startswith(
        "training hourglass-small CenterNet on the shapes dataset: epochs planned to a 15-minute budget, batch 16, "
        "128x128, lr 0.0005, trunk pre-training none, device cpu"
    )
    cpu, cuda = default_config("cpu"), default_config("cuda")
    assert (cpu.arch, cpu.epochs, cuda.arch, cuda.epochs, cuda.pretrained) == ("hourglass-small", None, "resnet18", 140, True)
    assert default_config("cuda", arch="dla34").pretrained is False  # no torchvision weights to start from


def test_paper_presets_from_the_command_line(monkeypatch):
    """--preset sets the paper's setting; an explicit flag wins; a batch size scales the lr."""
    cfg = _config_of(monkeypatch, ["--preset", "hourglass104-coco", "--device", "cpu"])
    assert (cfg.arch, cfg.input_size, cfg.batch_size, cfg.lr, cfg.epochs) == ("hourglass104", 512, 29, 2.5e-4, 50)
    assert cfg.lr_drops == (40 / 50,) and cfg.pretrained is False
    cfg = _config_of(monkeypatch, ["--preset", "dla34-coco", "--batch-size", "32", "--device", "cpu"])
    assert (cfg.arch, cfg.batch_size, cfg.epochs) == ("dla34", 32, 140)
    assert cfg.lr == pytest.approx(5e-4 * 32 / 128) and cfg.lr_drops == (90 / 140, 120 / 140)
    cfg = _config_of(monkeypatch, ["--preset", "resnet18-coco", "--batch-size", "32", "--lr", "1e-3", "--epochs", "3"])
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.pretrained) == (32, 1e-3, 3, True)
    assert "hourglass104-coco: hourglass104, batch 29" in _parser_help()


def _parser_help() -> str:
    from minicenternet.cli import _parser

    train = _parser()._subparsers._group_actions[0].choices["train"]
    return train.format_help()


def test_bad_arguments_exit():
    bad = (
        ["train", "--epochs", "many"],
        ["evaluate"],  # --checkpoint is required
        ["train", "--epochs", "-3"],
        ["train", "--epochs", "0"],
        ["train", "--batch-size", "0"],
        ["train", "--budget-minutes", "0"],
        ["train", "--pretrain-steps", "-1"],
        ["train", "--epochs", "2", "--budget-minutes", "5"],  # an explicit length turns planning off
        ["train", "--pretrained", "no/such/weights.pt"],
    )
    for argv in bad:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        assert "minicenternet" in stderr.getvalue() and "error:" in stderr.getvalue(), argv


def _fails(argv: list[str], code: int) -> str:
    """Run the CLI expecting exit status ``code``; return stderr, checked to be one error line."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code, (argv, stderr.getvalue())
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minicenternet: error: "), lines
    return lines[0]


def test_bad_command_lines_fail_before_any_data(monkeypatch):
    """One line, exit status 2, and train() never called: no data drawn or loaded."""
    import minicenternet.train as train_module

    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: pytest.fail("train() ran"))
    assert "multiple of 32" in _fails(["train", "--input-size", "100"], 2)
    assert "hourglass104 needs a multiple of 128" in _fails(["train", "--arch", "hourglass104", "--input-size", "96"], 2)
    assert "invalid choice: 'resnet50'" in _fails(["train", "--arch", "resnet50"], 2)
    assert "ImageNet weights for resnet18 and resnet101 only, not hourglass-small" in _fails(
        ["train", "--device", "cpu", "--pretrained", "imagenet"], 2
    )
    assert "--batch-size" in _fails(["train", "--batch-size", "0"], 2)
    assert "--epochs" in _fails(["train", "--epochs", "-3"], 2)
    assert "unknown device 'tpu'" in _fails(["train", "--device", "tpu"], 2)
    if not torch.cuda.is_available():
        assert "no CUDA device" in _fails(["train", "--device", "cuda"], 2)
        assert "no CUDA device" in _fails(["evaluate", "--checkpoint", "x.pt", "--device", "cuda"], 2)


def test_a_foreign_or_truncated_checkpoint_is_one_line(tmp_path):
    import argparse
    import pickle

    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"w": torch.zeros(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    foreign = tmp_path / "foreign.pt"
    torch.save(argparse.Namespace(model=1), foreign)  # a PyTorch file holding a Python object
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": 1}, protocol=2))  # a plain pickle, not a PyTorch file
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)  # a readable file, but not a training checkpoint
    for path, reason in ((truncated, "truncated"), (foreign, "weights_only"), (raw, "not a PyTorch file"),
                         (weights, "no 'model'"), (tmp_path / "missing.pt", "not found")):
        line = _fails(["evaluate", "--checkpoint", str(path), "--device", "cpu"], 1)
        assert str(path) in line and reason in line, line


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        main(["evaluate", "--checkpoint", str(missing), "--device", "cpu", "--debug"])


def test_show_targets_writes_a_picture(tiny_shapes, tmp_path):
    for task, panels in (("centernet", 2), ("cornernet", 3)):
        out = tmp_path / f"{task}.png"
        text = _run(["show-targets", "--data", str(tiny_shapes), "--index", "2", "--task", task, "--input-size", "64",
                     "--out", str(out)])
        assert f"{task} targets" in text
        picture = cv2.imread(str(out))
        assert picture.shape[0] == 64 * 6 and picture.shape[1] == 64 * 6 * panels  # zoomed to 384 pixels high
    assert "--index 99" in _fails(["show-targets", "--data", str(tiny_shapes), "--index", "99"], 2)
    assert "multiple of 32" in _fails(["show-targets", "--data", str(tiny_shapes), "--input-size", "100"], 2)


def test_splits_from_the_command_line(monkeypatch):
    cfg = _config_of(monkeypatch, ["--train-split", "train2017", "--val-split", "val2017", "--epochs", "1"])
    assert (cfg.train_split, cfg.val_split) == ("train2017", "val2017")
    assert "--train-split train2017 --val-split val2017" in command_line(cfg, False)


def test_torchrun_and_sync_bn_command_lines(monkeypatch):
    import minicenternet.train as train_module

    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: pytest.fail("train() ran"))
    if not torch.cuda.is_available():
        assert "--sync-bn needs CUDA" in _fails(["train", "--sync-bn", "--epochs", "1"], 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "give --epochs" in _fails(["train", "--device", "cpu"], 2)
    assert "--batch-size 5 is the global batch" in _fails(["train", "--device", "cpu", "--epochs", "1", "--batch-size", "5"], 2)


def test_evaluate_command_per_class(trained, tiny_shapes):
    out, _ = trained
    text = _run(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_shapes), "--per-class",
                 "--device", "cpu"])
    lines = text.splitlines()
    start = lines.index("AP of each class:")
    assert [line.split()[0] for line in lines[start + 1:]] == list(CLASSES)
