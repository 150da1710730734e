"""Command line: ``minicenternet train | evaluate | predict | data``."""

from __future__ import annotations

import argparse
import json
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


def _pretrained(text: str) -> bool | str:
    """``--pretrained``: ``imagenet`` (torchvision's weights), ``none``, or a local trunk file."""
    if text in ("imagenet", "none"):
        return text == "imagenet"
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"expected imagenet, none or a weights file; {text} is not a file")
    return text


def _train(args: argparse.Namespace) -> None:
    from .evaluate import format_table
    from .config import preset_config
    from .train import PRETRAIN_STEPS, default_config, train

    names = ("arch", "task", "epochs", "batch_size", "lr", "input_size", "data", "out", "seed", "pretrain_steps", "val_every",
             "dcn", "amp", "budget_minutes", "pretrained")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.budget_minutes is not None:
        overrides["epochs"] = None  # a budget plans the epochs, on any device
    if args.preset:  # the preset's lr scales with an explicit batch size unless --lr is given too
        cfg = preset_config(args.preset, args.device, **overrides)
    else:
        cfg = default_config(args.device, **overrides)
    epochs = f"{cfg.epochs:g} epochs" if cfg.epochs is not None else f"epochs planned to a {cfg.budget_minutes:g}-minute budget"
    if cfg.pretrain_steps is None:
        pretrain = "planned" if cfg.epochs is None else f"{PRETRAIN_STEPS} steps"
    else:
        pretrain = f"{cfg.pretrain_steps} steps"
    print(
        f"training {cfg.arch} {TASK_NAMES[cfg.task]}{f' (dcn={cfg.dcn})' if cfg.task == 'centernet' else ''} on {cfg.data or 'the shapes dataset'}: "
        f"{epochs}, batch {cfg.batch_size}, {cfg.input_size}x{cfg.input_size}, lr {cfg.lr}, "
        f"trunk pre-training {pretrain}, device {cfg.device}, run folder {cfg.out}",
        flush=True,
    )
    start = time.perf_counter()
    report = train(cfg, resume=args.resume)
    print(f"finished in {(time.perf_counter() - start) / 60:.1f} min. {report.describe()}")
    print(format_table(report.metrics))


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
    from .evaluate import evaluate, format_table

    root = Path(args.data) if args.data else ensure_shapes()
    dataset = CocoDetection.from_root(root, args.split)
    metrics = evaluate(_detector(args), dataset, decimals=2 if args.reference else None)
    kind = "class-agnostic COCO box AP" if args.class_agnostic else "COCO box AP"
    kind += " (the official test's details)" if args.reference else ""
    print(f"{kind} of {args.checkpoint} on {root} ({args.split}, {len(dataset)} images):")
    print(format_table(metrics))


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


def _parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .models import ARCHS, TASKS

    parser = argparse.ArgumentParser(prog="minicenternet", description="Train and run CenterNet and CornerNet.")
    sub = parser.add_subparsers(dest="command", required=True)

    presets = "\n".join(
        f"  {name}: {p.arch}{' CornerNet' if p.task == 'cornernet' else ''}, batch {p.batch_size}, lr {p.lr:g}, {p.epochs} epochs, drops at {p.drops}; {p.note}"
        for name, p in PRESETS.items()
    )
    train = sub.add_parser(
        "train", help="train a CenterNet or CornerNet (default: CenterNet, ResNet-18, on the shapes dataset)",
        epilog=f"paper presets (--preset; 512x512, Adam; explicit flags win):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", choices=sorted(PRESETS), help="a training setting of the paper (listed below)")
    train.add_argument("--arch", choices=ARCHS, help="backbone (default resnet18; CornerNet: hourglass-small on a CPU)")
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
    train.add_argument("--data", help="COCO-layout folder (annotations/instances_{train,val}.json, train/, val/)")
    train.add_argument("--device", help="cuda, cpu or mps (default: the best available)")
    train.add_argument("--out", help="run folder (default runs/shapes)")
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--pretrain-steps", type=_positive(int, allow_zero=True),
        help="steps of classification pre-training of the trunk on object crops (0: none; CPU default: planned, at most 300)",
    )
    train.add_argument(
        "--pretrained", type=_pretrained,
        help="trunk start: imagenet (torchvision's weights; needs a network once), none, or a local state_dict file "
        "(default: imagenet on CUDA; none on a CPU, which pre-trains on object crops instead)",
    )
    train.add_argument("--val-every", type=int, help="validate every N epochs as well as after the last (0: last only)")
    train.add_argument("--dcn", action=argparse.BooleanOptionalAction, default=None, help="DCNv2 upsampling")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.set_defaults(func=_train)

    for name, func, text in (("evaluate", _evaluate, "COCO AP of a checkpoint"), ("predict", _predict, "detect objects in images")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt")
        p.add_argument("--device")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``minicenternet`` console script."""
    from .models import CORNERNET_ARCHS

    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "task", None) == "cornernet" and args.arch not in (None, *CORNERNET_ARCHS):
        parser.error(f"--task cornernet needs an Hourglass backbone ({', '.join(CORNERNET_ARCHS)}), not {args.arch}")
    args.func(args)


if __name__ == "__main__":
    main()
