"""The training loop: Adam, the paper's step schedule, AMP, checkpoints, validation, logs.

One process, one device::

    minicenternet train                       # shapes; hourglass-small on a CPU, ResNet-18 on CUDA
    minicenternet train --data /path/to/coco --epochs 140 --batch-size 32

The paper trains at 512x512 with Adam, batch 128, lr 5e-4, 140 epochs with 10x drops at epochs
90 and 120 (CenterNet Sec. 5; the official ResNet-18 script uses batch 114 at the same lr). Here
the drops sit at the same fractions of any run length (90/140 and 120/140), after a short linear
warm-up.

On a CPU the run is sized to a wall-clock budget instead of a number of epochs
(:mod:`minicenternet.budget`): it measures one training step, the evaluation and, for a ResNet,
one trunk pre-training step on this machine, plans the epochs to fit, and prints the plan with the command line
that repeats it without planning.

``task="cornernet"`` (``minicenternet train --task cornernet``) trains CornerNet on an Hourglass
through the same loop: its targets (:func:`~minicenternet.targets.encode_cornernet`), its loss
(:func:`~minicenternet.losses.cornernet_loss`) and its test (:class:`~minicenternet.predict.Detector`
reads the task from the model).

A run can be killed at any moment: ``last.pt`` is written every ``save_every_minutes`` and at
each epoch end with everything needed to go on, and ``resume=True`` continues from it to the
same weights an uninterrupted run reaches. Under ``torchrun`` the same loop runs as
DistributedDataParallel (:mod:`minicenternet.distributed`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .budget import MAX_EVAL_SHARE, Costs, Plan, mean_seconds, plan_run, untouched_rng
from .checkpoint import check_same_model, load_run_checkpoint, restore_rng_state, rng_state, save_checkpoint
from .config import PRETRAIN_STEPS, TrainConfig, check_config, command_line, config_only_settings, default_config
from .data.centernet_dataset import CenterNetDataset
from .data.sampler import EpochSampler
from .distributed import (
    all_finite, any_process, barrier, check_replicas, gather, reduce_mean, setup, sync_buffers, unwrap, world, wrap,
)
from .data.coco import CocoDetection, find_split
from .data.shapes import ensure_shapes
from .data.transforms import normalize_batch
from .device import AmpChoice, autocast, default_device, fused_adam, resolve_amp
from .evaluate import Report, evaluate, run_report
from .losses import TASK_LOSSES
from .models import build_model
from .models.resnet import TRUNKS
from .predict import Detector
from .pretrain import pretrain_step_seconds, pretrain_trunk
from .viz import save_training_curves

__all__ = ["TrainConfig", "default_config", "train", "Report", "lr_factor", "command_line", "PRETRAIN_STEPS"]

COCOEVAL_SECONDS_PER_IMAGE = 0.01  # COCOeval's share of a validation, added to the measured detector time
MAX_NONFINITE_IN_A_ROW = 3  # batches with a non-finite loss in a row before a run stops


def lr_factor(iteration: int, total_iters: int, warmup_iters: int, drops: tuple[float, ...]) -> float:
    """Multiplier of the base learning rate: linear warm-up, then x0.1 at each fraction in ``drops``."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    return 0.1 ** sum(iteration >= math.floor(d * total_iters) for d in drops)


def _worker_init(worker_id: int) -> None:
    """One thread per loader worker for torch and OpenCV, so workers never fight the model for cores."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _datasets(cfg: TrainConfig) -> tuple[CocoDetection, CocoDetection, CocoDetection | None]:
    """``cfg.train_split``, ``cfg.val_split`` and, where the folder has one with annotations, the
    test split (:func:`~minicenternet.data.coco.find_split`: our layout or COCO 2017's)."""
    root = ensure_shapes() if cfg.data is None else Path(cfg.data)
    try:
        find_split(root, "test")
        test = CocoDetection.from_root(root, "test")
    except FileNotFoundError:  # COCO 2017 ships its test images without annotations
        test = None
    return CocoDetection.from_root(root, cfg.train_split), CocoDetection.from_root(root, cfg.val_split), test


def _loader(cfg: TrainConfig, source: CocoDetection, device: torch.device, persistent: bool = True) -> DataLoader:
    """This process's loader: under ``torchrun`` its share of each epoch, ``batch_size / N`` per step."""
    dataset = CenterNetDataset(
        source, (cfg.input_size, cfg.input_size), True, cfg.max_objects, cfg.scale_range, cfg.flip_prob,
        cfg.random_crop, cfg.jitter, cfg.task, cfg.color_aug, cfg.seed,
    )
    here = world()
    sampler = EpochSampler(len(dataset), cfg.seed, here.rank, here.size)
    return DataLoader(
        dataset, cfg.batch_size // here.size, sampler=sampler, num_workers=cfg.num_workers,
        drop_last=len(dataset) >= cfg.batch_size,
        pin_memory=device.type == "cuda", persistent_workers=persistent and cfg.num_workers > 0, worker_init_fn=_worker_init,
    )


def _model_config(cfg: TrainConfig, source: CocoDetection) -> dict:
    return {
        "arch": cfg.arch, "task": cfg.task, "num_classes": source.num_classes, "dcn": cfg.dcn,
        "class_names": source.class_names,
    }


def _memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _new_model(cfg: TrainConfig, num_classes: int, device: torch.device, pretrained: str | Path | bool = False):
    model = build_model(
        cfg.arch, cfg.task, num_classes=num_classes, pretrained=pretrained, dcn=cfg.dcn, up_init=cfg.up_init
    )
    return model.to(device, memory_format=_memory_format(cfg))


def _step(model, optimizer, scaler, images, targets, cfg: TrainConfig, amp: bool) -> dict[str, torch.Tensor] | None:
    """One optimiser step on a loader batch; ``None`` (and no step) when the loss is not finite.
    The returned loss terms are this process's (see :func:`~minicenternet.distributed.reduce_mean`)."""
    device = next(model.parameters()).device
    images = normalize_batch(images.to(device, non_blocking=True)).contiguous(memory_format=_memory_format(cfg))
    targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
    with autocast(device, amp):
        outputs = model(images)
    losses = TASK_LOSSES[cfg.task](outputs, targets)
    optimizer.zero_grad(set_to_none=True)
    if not all_finite(losses["loss"]):  # under torchrun: in every process, so that all skip it together
        return None
    scaler.scale(losses["loss"]).backward()
    if cfg.grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return losses


def _evaluated(cfg: TrainConfig, split: CocoDetection) -> int:
    """How many images of ``split`` a validation or test evaluates."""
    return len(split) if cfg.eval_limit is None else min(cfg.eval_limit, len(split))


def _needs_pretraining(cfg: TrainConfig) -> bool:
    return not cfg.pretrained and cfg.arch in TRUNKS and cfg.pretrain_steps != 0


def _measure(
    cfg: TrainConfig, source: CocoDetection, val_src: CocoDetection, device: torch.device, amp: AmpChoice,
    test_config: dict, test_images: int,
) -> Costs:
    """Seconds of a training step, a pre-training step, the end of an epoch (checkpoint and
    curves written, and the share of a validation when ``val_every > 0``) and the final
    validation with the test of ``test_images`` more images, timed on a throwaway model and loader; the global RNG is restored and the run's
    own loader untouched, so a planned run and the same run started with the planned numbers are
    identical."""
    if len(val_src) == 0:
        raise ValueError(f"{val_src.ann_file}: no validation image to time the evaluation on")
    num_classes = val_src.num_classes
    with untouched_rng(device):
        model = _new_model(cfg, num_classes, device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0, fused=fused_adam(device))
        scaler = torch.amp.GradScaler("cuda", enabled=amp.dtype == torch.float16)
        batches = itertools.cycle(_loader(cfg, source, device, persistent=False))
        train_step = mean_seconds(lambda: _step(model, optimizer, scaler, *next(batches), cfg, amp.enabled), device=device)
        scratch = Path(cfg.out) / ".planning"
        started = time.perf_counter()
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, scratch.with_suffix(".pt"))
        save_training_curves([{"epoch": 1, "loss": 1.0}], scratch.with_suffix(".png"))
        per_epoch = time.perf_counter() - started
        scratch.with_suffix(".pt").unlink()
        scratch.with_suffix(".png").unlink()
        detector = Detector(model, device=device, channels_last=cfg.channels_last, **{**test_config, "amp": amp.enabled})
        paths = iter([val_src.image_path(i % len(val_src)) for i in range(4)])
        per_image = mean_seconds(lambda: detector(next(paths)), warmup=1, repeats=3, device=device)
    pretrain_step = 0.0
    if _needs_pretraining(cfg):
        pretrain_step = pretrain_step_seconds(cfg.arch, num_classes, device=device, amp=amp.enabled)
    validation = _evaluated(cfg, val_src) * (per_image + COCOEVAL_SECONDS_PER_IMAGE)
    if cfg.val_every > 0:  # validations along the way, spread over the epochs
        per_epoch += validation / cfg.val_every
    evaluation = validation + test_images * (per_image + COCOEVAL_SECONDS_PER_IMAGE)
    return Costs(train_step=train_step, pretrain_step=pretrain_step, evaluation=evaluation, per_epoch=per_epoch)


def _plan(
    cfg: TrainConfig, loader, source, val_src, device, amp: AmpChoice, test_images: int, started: float
) -> Plan:
    if len(loader) == 0:
        raise ValueError(f"{source.ann_file}: no training batch of {cfg.batch_size} images to plan a run with")
    costs = _measure(cfg, source, val_src, device, amp, _test_config(cfg), test_images)
    return plan_run(
        cfg.budget_minutes * 60, time.perf_counter() - started, costs, len(loader), pretrain_steps=cfg.pretrain_steps,
        max_pretrain_steps=PRETRAIN_STEPS if _needs_pretraining(cfg) else 0,
    )


FEW_EPOCHS = 8
"""Below this many planned epochs a ResNet CenterNet on shapes has not learnt the classes yet (measured in
benchmarks/README.md), and the run suggests the cheaper Hourglass instead."""


def _test_config(cfg: TrainConfig) -> dict:
    """The :class:`~minicenternet.predict.Detector` settings of ``cfg``'s validations and test."""
    return {
        "input_size": cfg.eval_input_size, "flip": cfg.eval_flip, "scales": tuple(cfg.eval_scales),
        "pad_variant": cfg.eval_pad, "amp": cfg.amp,
    }


def _settle_length(cfg, state, loader, source, val_src, device, amp: AmpChoice, test_images: int, started: float) -> TrainConfig:
    """``cfg`` with its epochs and pre-training steps fixed: as given, as the resumed run planned
    them, or planned now to the budget. A planned run whose multi-scale test would take more than
    :data:`~minicenternet.budget.MAX_EVAL_SHARE` of the budget tests at scale 1 only (flip kept):
    there those minutes train better than they test."""
    if cfg.epochs is None and state is not None:
        stored = state["train_config"]
        return replace(
            cfg, epochs=stored["epochs"], pretrain_steps=stored["pretrain_steps"], eval_scales=tuple(stored["eval_scales"])
        )
    if cfg.epochs is None:
        plan = _plan(cfg, loader, source, val_src, device, amp, test_images, started)
        share = plan.costs.evaluation / plan.budget_seconds
        if len(cfg.eval_scales) > 1 and share > MAX_EVAL_SHARE:
            print(
                f"the {len(cfg.eval_scales)}-scale test would take ~{plan.costs.evaluation:.0f} s "
                f"({share:.0%} of the budget): testing at scale 1 only, the time goes to training",
                flush=True,
            )
            cfg = replace(cfg, eval_scales=(1.0,))
            plan = _plan(cfg, loader, source, val_src, device, amp, test_images, started)
        print(plan.describe(), flush=True)
        if cfg.arch in TRUNKS and plan.epochs < FEW_EPOCHS:
            print(
                f"{cfg.arch} affords only {plan.epochs:g} epochs here, too few to learn the classes; "
                f"--arch hourglass-small (the CPU default) takes a fraction of its step time and learns them in fewer epochs "
                "(benchmarks/README.md)",
                flush=True,
            )
        cfg = replace(cfg, epochs=plan.epochs, pretrain_steps=plan.pretrain_steps)
        unexpressed = config_only_settings(cfg)
        extra = f" (and in TrainConfig: {', '.join(unexpressed)})" if unexpressed else ""
        print(f"the same run without planning: {command_line(cfg, amp.enabled)}{extra}", flush=True)
        return cfg
    if cfg.epochs <= 0:
        raise ValueError(f"epochs must be positive, got {cfg.epochs}")
    return replace(cfg, pretrain_steps=PRETRAIN_STEPS if cfg.pretrain_steps is None else cfg.pretrain_steps)


def _validate_and_save(model, val_src, device, cfg: TrainConfig, record: dict, checkpoint: dict[str, Any],
                       best_ap: float | None, out: Path, progress: bool) -> float | None:
    """Validate into ``record``; write ``best.pt`` for the first validation and whenever the AP
    beats ``best_ap`` (an AP of ``nan``, a validation set without objects, counts as -inf);
    return the best AP."""
    detector = Detector(model, device=device, channels_last=cfg.channels_last, **checkpoint["test_config"])
    record.update(evaluate(detector, val_src, cfg.eval_limit, progress))
    ap = -math.inf if math.isnan(record["AP"]) else record["AP"]
    if best_ap is None or ap > best_ap:
        if world().main:
            save_checkpoint({**checkpoint, "metrics": record}, out / "best.pt")
        return ap
    return best_ap


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Report:
    """Train, validate every ``val_every`` epochs and after the last, write ``last.pt`` /
    ``best.pt`` / ``metrics.jsonl`` / ``curves.png`` / ``report.json`` into ``cfg.out``, and
    return the :class:`Report`: ``best.pt`` on the test split when there is one, else the last
    epoch on val.

    Args:
        cfg: the run's settings (``epochs=None``: planned to ``cfg.budget_minutes``).
        resume: continue from ``cfg.out/last.pt`` (model, optimiser, schedule, epoch, plan).
        progress: show tqdm bars.
    """
    started = time.perf_counter()
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise ValueError(f"eval_limit must be at least 1 image (or None: all of them), got {cfg.eval_limit}")
    torch.manual_seed(cfg.seed)
    here, device = setup(torch.device(cfg.device) if cfg.device else default_device())
    progress = progress and here.main
    say = print if here.main else lambda *args, **kwargs: None  # rank 0 speaks for all
    cfg = replace(cfg, device=str(device))
    check_config(cfg, here.size, resume and (Path(cfg.out) / "last.pt").is_file())
    amp = resolve_amp(device, cfg.amp)
    say(amp.describe(), flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_src, val_src, test_src = _datasets(cfg)
    if cfg.cache_images:
        train_src.preload()
    loader = _loader(cfg, train_src, device)
    state = load_run_checkpoint(out / "last.pt") if resume and (out / "last.pt").is_file() else None
    if state is not None:  # a clear error, not a state_dict traceback, when the run asks for another model
        check_same_model(state["model_config"], _model_config(cfg, train_src), out / "last.pt")
    test_images = _evaluated(cfg, test_src) if test_src is not None else 0
    cfg = _settle_length(cfg, state, loader, train_src, val_src, device, amp, test_images, started)
    test_config = _test_config(cfg)
    pretrained = cfg.pretrained
    if _needs_pretraining(cfg):
        pretrained = out / "trunk_pretrained.pt"
        if here.main and not (resume and pretrained.is_file()):  # a resumed run keeps the trunk it started from
            pretrain_trunk(
                train_src, pretrained, cfg.arch, cfg.pretrain_steps, device=device, amp=amp.enabled, seed=cfg.seed,
                progress=progress,
            )
        barrier()  # the other processes read the trunk rank 0 wrote
    model = wrap(_new_model(cfg, train_src.num_classes, device, pretrained), device, cfg.sync_bn)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused_adam(device))
    total_iters = max(1, round(cfg.epochs * len(loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total_iters, cfg.warmup_iters, cfg.lr_drops)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp.dtype == torch.float16)
    start_epoch, start_step, best_ap, history, partial = 0, 0, None, [], ({}, 0)
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_ap, history = state["epoch"], state["best_ap"], state["history"]
        start_step = state.get("step_in_epoch", 0)  # checkpoints of older runs end their epochs
        partial = (state.get("partial_sums", {}), state.get("partial_steps", 0))
        if here.main:  # the log as far as the checkpoint: epochs logged after it are trained again
            (out / "metrics.jsonl").write_text("".join(json.dumps(_json_safe(record)) + "\n" for record in history))
        say(f"resuming {out / 'last.pt'}: epoch {start_epoch + 1}, step {start_step} of it, "
            f"{scheduler.last_epoch} steps done, lr {optimizer.param_groups[0]['lr']:.4g}", flush=True)
    steps_per_epoch = len(loader)
    num_epochs = math.ceil(total_iters / steps_per_epoch)
    checkpoint = {"model_config": _model_config(cfg, train_src), "test_config": test_config}

    def save_state(epoch: int, step_in_epoch: int, sums: dict[str, float], steps: int) -> None:
        """``last.pt``: everything a resumed run needs to go on exactly from here, with the
        generator states of every process (called by all of them)."""
        states = gather(rng_state())
        if here.main:
            save_checkpoint(
                {
                    **checkpoint, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "step_in_epoch": step_in_epoch, "partial_sums": sums, "partial_steps": steps,
                    "best_ap": best_ap, "history": history, "rng": states, "train_config": asdict(cfg),
                },
                out / "last.pt",
            )

    last_save, nonfinite = time.perf_counter(), []
    for epoch in range(start_epoch, num_epochs):
        model.train()
        skip = start_step if epoch == start_epoch else 0
        sums, steps = (dict(partial[0]), partial[1]) if epoch == start_epoch else ({}, 0)
        loader.sampler.set_epoch(epoch, skip * cfg.batch_size)
        saved = _saved_rng(state, here.size) if state is not None and epoch == start_epoch else None
        if saved is not None:  # the global generators as the killed run left them (samples draw from their own)
            restore_rng_state(saved[here.rank])
        batches = iter(loader)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{num_epochs}", total=steps_per_epoch, initial=skip,
                   disable=not progress, leave=False)
        for step_in_epoch, (images, targets) in enumerate(bar, start=skip + 1):
            if scheduler.last_epoch >= total_iters:  # a fractional last epoch ends here
                break
            image_ids = targets.pop("image_id").tolist()
            losses = _step(model, optimizer, scaler, images, targets, cfg, amp.enabled)
            scheduler.step()
            if losses is None:  # in every process at once (all_finite), so the gather below is safe
                image_ids = [i for part in gather(image_ids) for i in part]
                nonfinite.append(image_ids)
                if here.main:
                    warnings.warn(f"epoch {epoch + 1}: non-finite loss on the batch of image ids {image_ids}, skipped",
                                  stacklevel=1)
                if len(nonfinite) >= MAX_NONFINITE_IN_A_ROW:
                    raise RuntimeError(
                        f"{len(nonfinite)} batches in a row with a non-finite loss (image ids {nonfinite}); stopping. "
                        f"{out / 'last.pt'} holds the last state saved before them"
                    )
                continue
            nonfinite.clear()
            steps += 1
            for name, value in reduce_mean(losses).items():  # the mean over the processes
                sums[name] = sums.get(name, 0.0) + value.item()
            bar.set_postfix({k.replace("_loss", ""): f"{v / steps:.3f}" for k, v in sums.items()})
            due = time.perf_counter() - last_save >= 60 * cfg.save_every_minutes
            if any_process(due) and step_in_epoch < steps_per_epoch:  # the first process due decides for all
                save_state(epoch, step_in_epoch, sums, steps)
                last_save = time.perf_counter()
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "minutes": (time.perf_counter() - started) / 60}
        record.update({k: v / max(1, steps) for k, v in sums.items()})
        sync_buffers(model)  # one model: rank 0's BatchNorm statistics in every replica
        checkpoint["model"] = unwrap(model).state_dict()
        if (cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0) or epoch + 1 == num_epochs:
            best_ap = _validate_and_save(unwrap(model), val_src, device, cfg, record, checkpoint, best_ap, out, progress)
        history.append(record)
        if here.main:
            with open(out / "metrics.jsonl", "a") as log:
                log.write(json.dumps(_json_safe(record)) + "\n")
            save_training_curves(history, out / "curves.png")
        say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        if nonfinite and here.main:  # the forward passes of the skipped batches may have left non-finite BN statistics
            warnings.warn(f"epoch {epoch + 1} ended on skipped batches: {out / 'last.pt'} not updated", stacklevel=1)
        if not nonfinite:
            save_state(epoch + 1, 0, {}, 0)
            last_save = time.perf_counter()
    check_replicas(model)
    barrier()  # best.pt is written
    report = run_report(out, history[-1], test_src, device, cfg.channels_last, progress, cfg.eval_limit)
    if here.main:
        (out / "report.json").write_text(json.dumps({**asdict(report), "metrics": _json_safe(report.metrics)}, indent=1))
    return report


def _saved_rng(state: dict[str, Any], processes: int) -> list[dict[str, Any]] | None:
    """The generator states of a checkpoint, one per process, or ``None`` (with a warning) when
    they cannot be restored: a run resumed with another number of processes."""
    saved = state.get("rng")
    saved = [saved] if isinstance(saved, dict) else saved  # checkpoints with a single process's states
    if saved is None or len(saved) != processes:
        warnings.warn(f"the checkpoint holds the generator states of {0 if saved is None else len(saved)} "
                      f"process(es), this run has {processes}: they are not restored", stacklevel=2)
        return None
    return saved


def _json_safe(record: dict) -> dict:
    """``record`` with ``nan`` as ``None``: strict JSON has no nan."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
