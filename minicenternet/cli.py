"""Command line: ``minicenternet train | evaluate | predict | data``.

A bad command line stops before any data is drawn or loaded, with one line ``minicenternet:
error: ...`` and exit status 2 (argparse's); an error while running (a missing dataset, a
foreign checkpoint) is one line too, with exit status 1. ``--debug`` anywhere on the line shows
the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .data.shapes import ShapesConfig

__all__ = ["main"]

TASK_NAMES = {"centernet": "CenterNet", "cornernet": "CornerNet"}
AMP_HELP = "mixed precision on or off (default: auto, on for CUDA and on CPUs with native bf16 where it is faster)"


def _positive(kind: type, allow_zero: bool = False):
    """An argparse type: ``kind`` values above 0 (or at least 0)."""

    def parse(text: str):
        value = kind(text)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'at least 0' if allow_zero else 'positive'}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``minicenternet: error: ...`` (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"minicenternet: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A command line that parses but cannot run (reported like an argparse error, exit status 2)."""


def _device(text: str) -> str:
    """``--device``: a device torch knows and this machine has."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda, cuda:N or mps")
    return text


def _pretrained(text: str) -> bool | str:
    """``--pretrained``: ``imagenet`` (torchvision's weights), ``none``, or a local trunk file."""
    if text in ("imagenet", "none"):
        return text == "imagenet"
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"expected imagenet, none or a weights file; {text} is not a file")
    return text


def _train(args: argparse.Namespace) -> None:
    from .evaluate import format_table
    from .config import check_config, preset_config
    from .distributed import teardown
    from .models.resnet import TRUNKS
    from .train import PRETRAIN_STEPS, default_config, train

    names = ("arch", "task", "train_split", "val_split", "save_every_minutes", "sync_bn", "epochs", "batch_size", "lr", "input_size", "data", "out", "seed", "pretrain_steps", "val_every",
             "dcn", "amp", "budget_minutes", "pretrained", "eval_scales")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.eval_scales is not None:
        overrides["eval_scales"] = tuple(args.eval_scales)
    if args.budget_minutes is not None:
        overrides["epochs"] = None  # a budget plans the epochs, on any device
    if args.preset:  # the preset's lr scales with an explicit batch size unless --lr is given too
        cfg = preset_config(args.preset, args.device, **overrides)
    else:
        cfg = default_config(args.device, **overrides)
    try:
        check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)), args.resume and (Path(cfg.out) / "last.pt").is_file())
    except ValueError as err:
        raise UsageError(str(err)) from None
    epochs = f"{cfg.epochs:g} epochs" if cfg.epochs is not None else f"epochs planned to a {cfg.budget_minutes:g}-minute budget"
    if cfg.arch not in TRUNKS or cfg.pretrained:
        pretrain = "none"
    elif cfg.pretrain_steps is None:
        pretrain = "planned" if cfg.epochs is None else f"{PRETRAIN_STEPS} steps"
    else:
        pretrain = f"{cfg.pretrain_steps} steps"
    say = print if int(os.environ.get("RANK", 0)) == 0 else lambda *args, **kwargs: None  # torchrun: rank 0 speaks
    say(
        f"training {cfg.arch} {TASK_NAMES[cfg.task]}{f' (dcn={cfg.dcn})' if cfg.task == 'centernet' and not cfg.arch.startswith('hourglass') else ''} on {cfg.data or 'the shapes dataset'}: "
        f"{epochs}, batch {cfg.batch_size}, {cfg.input_size}x{cfg.input_size}, lr {cfg.lr}, "
        f"trunk pre-training {pretrain}, device {cfg.device}, run folder {cfg.out}",
        flush=True,
    )
    start = time.perf_counter()
    try:
        report = train(cfg, resume=args.resume)
    finally:
        teardown()
    say(f"finished in {(time.perf_counter() - start) / 60:.1f} min. {report.describe()}")
    say(format_table(report.metrics))


def _detector(args: argparse.Namespace):
    from .device import resolve_amp
    from .predict import Detector

    test = {"input_size": args.input_size, "flip": args.flip, "scales": args.scales, "pad_variant": args.pad, "amp": args.amp}
    detector = Detector.from_checkpoint(
        args.checkpoint, device=args.device, score_threshold=getattr(args, "threshold", 0.0),
        class_agnostic=getattr(args, "class_agnostic", False), reference=getattr(args, "reference", False),
        **{k: v for k, v in test.items() if v is not None},
    )
    print(resolve_amp(detector.device, detector.amp).describe(), flush=True)
    return detector


def _evaluate(args: argparse.Namespace) -> None:
    from .data.coco import CocoDetection
    from .data.shapes import ensure_shapes
    from .evaluate import evaluate, format_per_class, format_table

    root = Path(args.data) if args.data else ensure_shapes()
    dataset = CocoDetection.from_root(root, args.split)
    metrics = evaluate(_detector(args), dataset, decimals=2 if args.reference else None, per_class=args.per_class)
    kind = "class-agnostic COCO box AP" if args.class_agnostic else "COCO box AP"
    kind += " (the official test's details)" if args.reference else ""
    print(f"{kind} of {args.checkpoint} on {root} ({args.split}, {len(dataset)} images):")
    print(format_table(metrics))
    if args.per_class:
        print(f"AP of each class:\n{format_per_class(metrics)}")


def _predict(args: argparse.Namespace) -> None:
    import cv2

    from .data.coco import read_image
    from .viz import render_detections

    detector = _detector(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path, prediction in zip(args.images, detector(args.images)):
        image = read_image(path)
        drawn = render_detections(image, prediction, detector.class_names)
        target = out / f"{Path(path).stem}_pred.png"
        cv2.imwrite(str(target), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        names = detector.class_names or []
        results.append(
            {
                "image": str(path),
                "output": str(target),
                "detections": [
                    {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": label,
                     "name": names[label] if label < len(names) else str(label)}
                    for box, score, label in zip(
                        prediction["boxes"].tolist(), prediction["scores"].tolist(), prediction["labels"].tolist()
                    )
                ],
            }
        )
        print(f"{path}: {len(prediction['boxes'])} detections -> {target}")
    (out / "predictions.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'predictions.json'}")


def _data(args: argparse.Namespace) -> None:
    from .data.shapes import default_data_root, ensure_shapes

    cfg = ShapesConfig(
        num_train=args.num_train, num_val=args.num_val, num_test=args.num_test, image_size=args.image_size, seed=args.seed
    )
    root = ensure_shapes(Path(args.out) if args.out else default_data_root() / "shapes", cfg)
    print(f"shapes dataset ready in {root}")


def _data_voc(args: argparse.Namespace) -> None:
    from .data.voc import voc_to_coco

    for split, ann_file in voc_to_coco(args.voc_root, args.out, args.splits).items():
        print(f"{split}: {ann_file} and {Path(args.out) / split}")
    print(f"COCO layout ready in {args.out} (minicenternet train --data {args.out})")


def _show_targets(args: argparse.Namespace) -> None:
    import cv2
    import torch

    from .config import default_config
    from .data.centernet_dataset import CenterNetDataset
    from .data.coco import CocoDetection
    from .data.shapes import ensure_shapes
    from .viz import render_targets

    cfg = default_config("cpu", **({"task": args.task} if args.task else {}))
    root = Path(args.data) if args.data else ensure_shapes()
    source = CocoDetection.from_root(root, args.split)
    if not 0 <= args.index < len(source):
        raise UsageError(f"--index {args.index}: {root} has {len(source)} {args.split} images")
    size = args.input_size or cfg.input_size
    if size % 32:
        raise UsageError(f"--input-size {size}: the training samples need a multiple of 32")
    dataset = CenterNetDataset(
        source, (size, size), True, cfg.max_objects, cfg.scale_range, cfg.flip_prob, args.random_crop, False,
        cfg.task, args.color_aug,
    )
    torch.manual_seed(args.seed)  # the sample's augmentation draws come from torch's generator
    image, targets = dataset[args.index]
    picture = render_targets(image, {k: v.numpy() for k, v in targets.items()}, source.class_names, cfg.task)
    zoom = max(1, 384 // picture.shape[0])  # a 128-pixel sample is shown three times larger, pixels kept sharp
    picture = cv2.resize(picture, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    print(f"wrote {out}: {source.image_path(args.index).name}, {int(targets['mask'].sum())} objects, {cfg.task} targets")


def _parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .models import ARCHS, TASKS

    parser = _Parser(prog="minicenternet", description="Train and run CenterNet and CornerNet.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    presets = "\n".join(
        f"  {name}: {p.arch}{' CornerNet' if p.task == 'cornernet' else ''}, batch {p.batch_size}, lr {p.lr:g}, {p.epochs} epochs, drops at {p.drops}; {p.note}"
        for name, p in PRESETS.items()
    )
    train = sub.add_parser(
        "train", help="train a CenterNet or CornerNet (default: CenterNet on the shapes dataset)",
        epilog=f"paper presets (--preset; 512x512, Adam; explicit flags win):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", choices=sorted(PRESETS), help="a training setting of the paper (listed below)")
    train.add_argument("--arch", choices=ARCHS, help="backbone (default: hourglass-small on a CPU, resnet18 on CUDA; CornerNet: hourglass104 on CUDA)")
    train.add_argument(
        "--task", choices=TASKS, help="centernet (default) or cornernet (Hourglass backbones only)"
    )
    length = train.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs", type=_positive(float),
        help="epochs, may be fractional; giving them turns budget planning off (CPU default: planned)",
    )
    length.add_argument(
        "--budget-minutes", type=_positive(float),
        help="plan the epochs and pre-training steps to finish within this many minutes, data drawing and "
        "evaluation included (CPU default: 15)",
    )
    train.add_argument("--batch-size", type=_positive(int))
    train.add_argument("--lr", type=float)
    train.add_argument("--input-size", type=int, help="square input side, divisible by 32")
    train.add_argument(
        "--data", help="COCO-layout folder: annotations/instances_{train,val}.json with train/, val/, or COCO 2017 as it "
        "unpacks (instances_train2017.json, train2017/, ...)"
    )
    train.add_argument("--train-split", help="the training split's name (default train; train2017 is found by itself)")
    train.add_argument("--val-split", help="the validation split's name (default val)")
    train.add_argument("--device", type=_device, help="cuda, cpu or mps (default: the best available)")
    train.add_argument("--out", help="run folder (default runs/shapes)")
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--pretrain-steps", type=_positive(int, allow_zero=True),
        help="steps of classification pre-training of a ResNet trunk on object crops (0: none; CPU default: planned, at most 300)",
    )
    train.add_argument(
        "--pretrained", type=_pretrained,
        help="trunk start: imagenet (torchvision's weights; needs a network once), none, or a local state_dict file "
        "(default: imagenet on CUDA; none on a CPU, where a ResNet pre-trains on object crops instead)",
    )
    train.add_argument("--val-every", type=int, help="validate every N epochs as well as after the last (0: last only)")
    train.add_argument(
        "--eval-scales", type=_positive(float), nargs="+", metavar="SCALE",
        help="test scales of the validations and the final test (CPU default: 0.75 1 1.25, or 1 alone where "
        "that test would take more than a fifth of a planned run's budget)",
    )
    train.add_argument("--dcn", action=argparse.BooleanOptionalAction, default=None, help="DCNv2 upsampling (ResNet and DLA; the Hourglass has none)")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    train.add_argument(
        "--sync-bn", action=argparse.BooleanOptionalAction, default=None,
        help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)",
    )
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt, where a killed run left off")
    train.add_argument(
        "--save-every-minutes", type=_positive(float),
        help="write OUT/last.pt this often in the middle of an epoch too (default 2), so a killed run loses at most that",
    )
    train.set_defaults(func=_train)

    for name, func, text in (("evaluate", _evaluate, "COCO AP of a checkpoint"), ("predict", _predict, "detect objects in images")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt")
        p.add_argument("--device", type=_device)
        p.add_argument(
            "--input-size", type=int, help="fixed square input (default: as the checkpoint's run validated, else original resolution)"
        )
        p.add_argument(
            "--flip", action=argparse.BooleanOptionalAction, default=None, help="flip test (default: as the checkpoint's run)"
        )
        p.add_argument(
            "--scales", type=float, nargs="+", help="test scales, e.g. 0.75 1 1.25 (default: as the checkpoint's run)"
        )
        p.add_argument(
            "--pad", choices=("reference", "minimal"),
            help="padding at the original resolution: reference (256 -> 288) or minimal (256 -> 256); default: as the checkpoint's run",
        )
        p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
        p.set_defaults(func=func)
    sub.choices["evaluate"].add_argument("--data", help="COCO-layout folder (default: shapes)")
    sub.choices["evaluate"].add_argument("--split", default="val", help="val (default), test or train")
    sub.choices["evaluate"].add_argument(
        "--reference", action="store_true",
        help="the official test code's details: plain sigmoid, unclipped boxes, soft-NMS with its stale rows, "
        "2-decimal results",
    )
    sub.choices["evaluate"].add_argument("--per-class", action="store_true", help="also print the AP of each class")
    sub.choices["evaluate"].add_argument(
        "--class-agnostic", action="store_true", help="merge the class heatmaps and ignore categories: localisation only"
    )
    sub.choices["predict"].add_argument("images", nargs="+", help="image files")
    sub.choices["predict"].add_argument("--out", default="predictions", help="folder for drawn images and JSON")
    sub.choices["predict"].add_argument("--threshold", type=float, default=0.3, help="minimum score")

    data = sub.add_parser("data", help="prepare datasets")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    shapes = data_sub.add_parser("shapes", help="generate the synthetic shapes dataset")
    shapes.add_argument("--out", help="folder (default: data/shapes)")
    for name in ("num_train", "num_val", "num_test", "image_size", "seed"):
        shapes.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(ShapesConfig, name))
    shapes.set_defaults(func=_data)
    voc = data_sub.add_parser("voc", help="convert Pascal VOC XML to the COCO layout that --data reads")
    voc.add_argument("--voc-root", required=True, help="a VOC year folder (VOC2007) or the VOCdevkit holding one")
    voc.add_argument("--out", required=True, help="folder for annotations/instances_{split}.json and {split}/")
    voc.add_argument("--splits", nargs="+", default=["train", "val"], help="lists in ImageSets/Main (default: train val)")
    voc.set_defaults(func=_data_voc)

    show = sub.add_parser(
        "show-targets", help="draw one augmented training sample with its ground-truth heatmaps (a PNG)"
    )
    show.add_argument("--data", help="COCO-layout folder (default: shapes)")
    show.add_argument("--split", default="train", help="split to read (default train)")
    show.add_argument("--index", type=_positive(int, allow_zero=True), default=0, help="image index in the split")
    show.add_argument("--task", choices=TASKS, help="centernet (default) or cornernet targets")
    show.add_argument("--input-size", type=_positive(int), help="network input side (default: the CPU preset's, 128)")
    show.add_argument("--random-crop", action=argparse.BooleanOptionalAction, default=True, help="the reference's random scale and crop")
    show.add_argument("--color-aug", action=argparse.BooleanOptionalAction, default=True, help="colour jitter and PCA lighting")
    show.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws")
    show.add_argument("--out", default="targets.png", help="PNG to write (default targets.png)")
    show.set_defaults(func=_show_targets)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``minicenternet`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    parser = _parser()
    args = parser.parse_args([word for word in argv if word != "--debug"])
    try:
        args.func(args)
    except UsageError as err:
        if debug:
            raise
        parser.error(str(err))
    except (OSError, ValueError, RuntimeError) as err:  # missing or bad files, bad data: one line, no traceback
        if debug:
            raise
        parser.exit(1, f"minicenternet: error: {err}\n")


if __name__ == "__main__":
    main()
