"""What a training run depends on: :class:`TrainConfig`, the presets per device, and the command
line that repeats a configuration."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields, replace

import torch

from .device import default_device
from .models import CORNERNET_ARCHS, input_multiple
from .models.resnet import TRUNKS

__all__ = [
    "PRETRAIN_STEPS", "TrainConfig", "default_config", "Preset", "PRESETS", "preset_config", "command_line",
    "config_only_settings", "check_config",
]

PRETRAIN_STEPS = 300  # trunk pre-training steps of a ResNet in the CPU preset (at most, when planned to a budget)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint.

    ``data=None`` trains on the embedded shapes dataset (generated on first use). Any other value
    is a COCO-layout folder with ``annotations/instances_{train,val}.json`` and ``train/``,
    ``val/`` image folders, or COCO 2017 as it unpacks (``instances_train2017.json``,
    ``train2017/``, ...; see :func:`~minicenternet.data.coco.find_split`); ``train_split`` and
    ``val_split`` name other splits.

    ``epochs`` may be fractional (the last epoch stops part-way). ``epochs=None`` plans them,
    with the trunk pre-training steps, so that the whole run, data drawing and final evaluation
    included, fits in ``budget_minutes`` on this machine (:mod:`minicenternet.budget`).

    ``pretrained`` is ``False``, ``True`` (torchvision's ImageNet trunk) or a trunk ``state_dict``
    file. Without one, ``pretrain_steps > 0`` first trains the trunk as a classifier of the
    training objects (:mod:`minicenternet.pretrain`) and starts from that; ``None`` means
    "planned within the budget", or :data:`PRETRAIN_STEPS` when the epochs are given.

    ``random_crop`` is the reference's random scale and crop; without it, ``jitter`` is the
    reference's other branch (the whole image shifted and scaled by clipped Gaussians, see
    :func:`~minicenternet.data.transforms.jitter_crop_params`), and neither keeps the whole image
    still (the CPU preset: in so short a run augmentation costs more than it gives).

    ``color_aug`` adds the reference's colour jitter and PCA lighting noise
    (:func:`~minicenternet.data.transforms.augment_colour`) after the crop and flip; on in the
    paper setting, off in the CPU preset.

    ``save_every_minutes``: besides the end of every epoch, ``last.pt`` is written this often in
    the middle of one (with the optimiser, schedule, generator states and position in the epoch),
    so a killed run resumed with ``--resume`` loses at most that much.

    ``sync_bn``: under ``torchrun``, BatchNorm statistics over the global batch instead of each
    process's share (:mod:`minicenternet.distributed`).

    ``grad_clip`` is a maximum gradient norm, or ``None``: the official code clips nothing.

    ``task`` is ``"centernet"`` or ``"cornernet"`` (CornerNet: an Hourglass ``arch`` only, see
    :data:`minicenternet.models.CORNERNET_ARCHS`).

    ``amp`` is ``True``, ``False`` or ``"auto"`` (:func:`minicenternet.device.resolve_amp`: on a
    CPU only where bf16 is native and measured faster).

    ``eval_input_size``, ``eval_flip``, ``eval_scales`` and ``eval_pad`` are the
    :class:`~minicenternet.predict.Detector` settings of the validation runs (defaults: the
    paper's single-scale test at the original resolution, padded as the official code). They are
    stored in the checkpoints as ``test_config``, with ``amp``, so
    :meth:`Detector.from_checkpoint` tests a model the way its run scored it. Validation runs
    every ``val_every`` epochs and after the last one; ``val_every=0``: after the last one only.
    ``eval_limit`` validates and tests on the first ``eval_limit`` images of each split only (a
    quick look, as in the lessons; ``None``: all of them).
    """

    arch: str = "resnet18"
    task: str = "centernet"
    data: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    out: str = "runs/shapes"
    input_size: int = 512
    epochs: float | None = 140
    budget_minutes: float = 15.0
    batch_size: int = 32
    lr: float = 1.25e-4
    lr_drops: tuple[float, ...] = (90 / 140, 120 / 140)
    warmup_iters: int = 0
    grad_clip: float | None = None
    dcn: bool = True
    up_init: str = "reference"
    pretrained: str | bool = False
    pretrain_steps: int | None = 0
    amp: bool | str = "auto"
    channels_last: bool = True
    num_workers: int = 4
    random_crop: bool = True
    jitter: bool = False
    color_aug: bool = True
    scale_range: tuple[float, float] = (0.6, 1.4)
    flip_prob: float = 0.5
    max_objects: int = 128
    cache_images: bool = False
    val_every: int = 5
    eval_input_size: int | None = None
    eval_flip: bool = False
    eval_scales: tuple[float, ...] = (1.0,)
    eval_pad: str = "reference"
    eval_limit: int | None = None
    device: str | None = None
    seed: int = 0
    save_every_minutes: float = 2.0
    sync_bn: bool = False


def default_config(device: torch.device | str | None = None, **overrides) -> TrainConfig:
    """The main job's settings for ``device``.

    * CUDA: the paper's ResNet-18 setting: ImageNet trunk weights (torchvision's), 512x512, DCN,
      Adam with the paper's lr 5e-4 for batch 128 scaled linearly to batch 32 (1.25e-4), 140
      epochs, AMP. Another ``arch`` starts from scratch unless ``pretrained`` names a file.
    * CPU (and MPS): a run planned to finish within 15 minutes, first-use dataset drawing
      included, on whatever CPU it meets, on ``"hourglass-small"``: the paper's Hourglass (two
      stacks, intermediate supervision) with fewer channels and three levels instead of five.
      Within the same minutes it scored higher than ResNet-18 on CPUs with and without native
      bf16: its step is much cheaper, and without native bf16 ResNet-18 does not get through
      enough epochs to learn the classes. 128x128 input (evaluation
      is still at the original 256x256), batch 16, Adam 5e-4 (fused kernel) after a 100-step
      warm-up with 10x drops at 85 % and 95 % of the run (later than the paper's fractions: the
      classes are still being learnt at the full rate), flips but no random crops or colour
      augmentation, bf16 only where the CPU has it natively, images decoded once into memory, no
      loader worker processes (they would compete with the compute threads). Validation once,
      after the last epoch, with the reference's test-time augmentation: the flip test and
      three of its five test scales (0.75, 1, 1.25) merged by soft-NMS, without the reference's
      extra padding (``eval_pad="minimal"``: the model never saw that black frame in training);
      scale 1 only where that test would take more than a fifth of the budget.
      The preset also holds what a ResNet or DLA given as ``arch`` needs (the Hourglass has no
      DCN and no transposed convolution, and ignores them): plain 3x3 convs instead of DCN (in
      one run each, DCN ended lower within the budget, even with the native DCN of
      :mod:`minicenternet.models.dcn`), the ResNet's transposed convolutions initialised as true
      bilinear upsamplers (``up_init="identity"``) and, for a ResNet, a trunk first pre-trained
      as a classifier of the training objects (:mod:`minicenternet.pretrain`, standing in for
      the paper's ImageNet start). The measurements behind each choice are in
      benchmarks/README.md.

    ``task="cornernet"``: on CUDA the paper's setting (:data:`PRESETS`
    ``"cornernet-hourglass104-coco"``; an ``arch`` given replaces its Hourglass-104), elsewhere
    the CPU setting above.
    """
    device = torch.device(device) if device is not None else default_device()
    if overrides.get("task") == "cornernet" and device.type == "cuda":
        return preset_config("cornernet-hourglass104-coco", device, **overrides)
    if device.type == "cuda":  # torchvision's ImageNet weights exist for the ResNet trunks only
        cfg = TrainConfig(pretrained=overrides.get("arch", "resnet18") in TRUNKS, device=str(device))
    else:
        cfg = TrainConfig(
            arch="hourglass-small", input_size=128, epochs=None, batch_size=16, lr=5e-4, warmup_iters=100, dcn=False, up_init="identity",
            pretrain_steps=None, lr_drops=(0.85, 0.95), num_workers=0, cache_images=True,
            random_crop=False, color_aug=False, val_every=0, eval_flip=True, eval_scales=(0.75, 1.0, 1.25), eval_pad="minimal",
            device=str(device),
        )
    return replace(cfg, **overrides)


@dataclass(frozen=True)
class Preset:
    """One backbone's COCO training setting in "Objects as Points" (Sec. 5, Implementation
    details; CornerNet Sec. 4.1 for ``task="cornernet"``): 512x512 input, Adam, ``batch_size`` and
    ``lr`` together (a different batch size scales the lr linearly), ``epochs`` with 10x lr drops
    at the epochs in ``drops``. CornerNet's presets validate with the flip test, which its
    official test always runs; CenterNet's with the paper's plain single-scale test."""

    arch: str
    batch_size: int
    lr: float
    epochs: int
    drops: tuple[int, ...]
    pretrained: bool
    note: str
    task: str = "centernet"

    def config(self, device: str | None, batch_size: int | None = None, **overrides) -> TrainConfig:
        """The :class:`TrainConfig` of this preset; ``batch_size`` scales the lr unless ``lr`` is
        given too; other ``overrides`` win over the preset."""
        batch = batch_size or self.batch_size
        cfg = TrainConfig(
            arch=self.arch, task=self.task, input_size=512, eval_flip=self.task == "cornernet", batch_size=batch, lr=self.lr * batch / self.batch_size,
            epochs=self.epochs, lr_drops=tuple(d / self.epochs for d in self.drops), pretrained=self.pretrained,
            device=device,
        )
        return replace(cfg, **overrides)


PRESETS = {
    "resnet18-coco": Preset(
        "resnet18", 114, 5e-4, 140, (90, 120), True,
        "ImageNet trunk, DCN; the paper's batch 114 on 4 GPUs, as the official ctdet_coco_resdcn18 script",
    ),
    "resnet101-coco": Preset(
        "resnet101", 128, 5e-4, 140, (90, 120), True,
        "ImageNet trunk, DCN; the official ctdet_coco_resdcn101 script runs batch 96 at lr 3.75e-4, the same ratio",
    ),
    "dla34-coco": Preset(
        "dla34", 128, 5e-4, 140, (90, 120), False,
        "DCN; the paper starts from ImageNet DLA-34 weights, which this library cannot download: pass them with "
        "--pretrained FILE",
    ),
    "hourglass104-coco": Preset(
        "hourglass104", 29, 2.5e-4, 50, (40,), False,
        "the paper's batch 29 on 5 GPUs, 50 epochs, drop at 40, from scratch (the official script starts from "
        "ExtremeNet weights, batch 24)",
    ),
    "cornernet-hourglass104-coco": Preset(
        "hourglass104", 49, 2.5e-4, 207, (186,), False,
        "CornerNet: batch 49 on 10 GPUs, 500k iterations with a drop at 450k (207 and 186 epochs of COCO's "
        "118k training images), 511x511 input (here 512), from scratch; CornerNet's own crop (scale 0.6-1.3) "
        "and colour jitter are not reproduced",
        task="cornernet",
    ),
}


def preset_config(name: str, device: torch.device | str | None = None, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of the paper preset ``name`` (see :data:`PRESETS`) on ``device``;
    ``batch_size`` in ``overrides`` scales the lr linearly unless ``lr`` is given as well."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    device = torch.device(device) if device is not None else default_device()
    return PRESETS[name].config(str(device), **overrides)


_CLI_FLAGS = ("arch", "task", "data", "train_split", "val_split", "out", "input_size", "batch_size", "lr", "seed", "val_every", "dcn", "eval_scales")
_LENGTH_AND_DEVICE = ("epochs", "pretrain_steps", "budget_minutes", "amp", "device", "pretrained")
_NO_EFFECT = ("save_every_minutes",)  # when last.pt is written does not change the run


def config_only_settings(cfg: TrainConfig) -> list[str]:
    """``name=value`` of the settings that differ from the device's preset and that the command
    line cannot set (so :func:`command_line` cannot repeat them)."""
    preset = default_config(cfg.device)
    skip = set(_CLI_FLAGS) | set(_LENGTH_AND_DEVICE) | set(_NO_EFFECT)
    return [
        f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg)
        if f.name not in skip and getattr(cfg, f.name) != getattr(preset, f.name)
    ]


def command_line(cfg: TrainConfig, amp: bool) -> str:
    """The ``minicenternet train`` command that runs ``cfg`` without planning: the flags that
    differ from the device's preset, then the device, epochs, pre-training steps and precision."""
    preset = default_config(cfg.device)
    words = ["minicenternet", "train"]
    for name in _CLI_FLAGS:
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if value == getattr(preset, name):
            continue
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words += [flag, *(f"{v:g}" for v in value)] if isinstance(value, tuple) else [flag, str(value)]
    if cfg.pretrained != preset.pretrained:
        words += ["--pretrained", {True: "imagenet", False: "none"}.get(cfg.pretrained, str(cfg.pretrained))]
    words += ["--device", str(cfg.device), "--epochs", f"{cfg.epochs:g}", "--pretrain-steps", str(cfg.pretrain_steps)]
    words.append("--amp" if amp else "--no-amp")
    return shlex.join(words)


def check_config(cfg: TrainConfig, processes: int = 1, resuming: bool = False) -> None:
    """Raise a ``ValueError`` naming the first setting of ``cfg`` that cannot run, before any data
    is drawn or read (the command line reports it as a usage error): a CornerNet on a backbone
    other than the Hourglass, torchvision's ImageNet weights for a backbone other than a ResNet, an input side that is not a multiple of the backbone's, ``sync_bn``
    off CUDA, and under ``torchrun`` (``processes > 1``) a run without epochs (the budget planner
    times one process; a resumed run has its own) or a global batch that does not divide."""
    if cfg.task == "cornernet" and cfg.arch not in CORNERNET_ARCHS:
        raise ValueError(f"--task cornernet needs an Hourglass backbone ({', '.join(CORNERNET_ARCHS)}), not {cfg.arch}")
    if cfg.pretrained is True and cfg.arch not in TRUNKS:
        raise ValueError(
            f"--pretrained imagenet: torchvision has ImageNet weights for {' and '.join(TRUNKS)} only, not {cfg.arch}; "
            "pass --arch resnet18, or a local weights file (--pretrained FILE)"
        )
    multiple = input_multiple(cfg.arch)
    if cfg.input_size % multiple:
        raise ValueError(f"--input-size {cfg.input_size}: {cfg.arch} needs a multiple of {multiple}")
    if cfg.sync_bn and not str(cfg.device).startswith("cuda"):
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only)")
    if processes > 1 and cfg.epochs is None and not resuming:
        raise ValueError(f"under torchrun ({processes} processes) give --epochs: the budget planner times one process")
    if processes > 1 and cfg.batch_size % processes:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must divide over {processes} processes")
