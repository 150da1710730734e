"""Kill-safe training: the epoch order as a function of (seed, epoch), the generator states in the
checkpoint, and a real run killed with SIGKILL in the middle of an epoch, then resumed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from minicenternet.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from minicenternet.data.sampler import EpochSampler


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    pairs = list(sampler)
    order = [index for _, index in pairs]
    assert {epoch for epoch, _ in pairs} == {2} and sorted(order) == list(range(10)) and len(sampler) == 10
    again = EpochSampler(10, seed=3)
    again.set_epoch(2, start=4)
    assert [i for _, i in again] == order[4:] and len(again) == 6  # a resumed epoch: the same order, where it stopped
    sampler.set_epoch(3)
    assert [i for _, i in sampler] != order
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(0, start=11)


def test_the_processes_share_the_order_of_one():
    """Two processes: every other sample each, together the single-process order (the odd tail dropped)."""
    single = EpochSampler(11, seed=5)
    shares = [EpochSampler(11, seed=5, rank=rank, world_size=2) for rank in (0, 1)]
    for sampler in (single, *shares):
        sampler.set_epoch(1, start=2)
    order = [i for _, i in single]
    assert [i for _, i in shares[0]] == order[0:8:2] and [i for _, i in shares[1]] == order[1:8:2]
    assert len(shares[0]) == len(shares[1]) == 4


def test_augmentation_is_the_same_with_any_number_of_workers(tiny_shapes):
    """The training loader's samples depend on (seed, epoch, index) only, not on the worker that draws them."""
    from torch.utils.data import DataLoader

    from minicenternet.data.centernet_dataset import CenterNetDataset
    from minicenternet.data.coco import CocoDetection

    dataset = CenterNetDataset(CocoDetection.from_root(tiny_shapes, "train"), (64, 64), color_aug=True, seed=7)
    batches = []
    for workers in (0, 2):
        sampler = EpochSampler(len(dataset), seed=7)
        sampler.set_epoch(4)
        torch.manual_seed(workers)  # the global generator plays no part
        batches.append(next(iter(DataLoader(dataset, 4, sampler=sampler, num_workers=workers))))
    assert torch.equal(batches[0][0], batches[1][0])
    assert all(torch.equal(batches[0][1][k], batches[1][1][k]) for k in batches[0][1])
    other = CenterNetDataset(dataset.source, (64, 64), color_aug=True, seed=8)[(4, 0)][0]
    assert not torch.equal(dataset[(4, 0)][0], other)  # another seed, another sample


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of NumPy's state
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    first = (random.random(), np.random.normal(), torch.rand(3))
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only=True reads it
    second = (random.random(), np.random.normal(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def _command(data, out, epochs: int) -> list[str]:
    """A tiny deterministic run that writes last.pt after every step (8 images, batch 2: 4 steps an epoch)."""
    return [
        sys.executable, "-m", "minicenternet", "train", "--data", str(data), "--out", str(out), "--arch",
        "hourglass-small", "--epochs", str(epochs), "--input-size", "128", "--batch-size", "2", "--device", "cpu",
        "--no-amp", "--pretrain-steps", "0", "--val-every", "0", "--save-every-minutes", "1e-6",
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
EPOCHS, STEPS_PER_EPOCH = 5, 4


def _killed_in_the_middle(data, out) -> dict:
    """Start a run, SIGKILL it as soon as last.pt holds a state in the middle of an epoch after the
    first, and return the last.pt it left."""
    process = subprocess.Popen(_command(data, out, EPOCHS), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last, seen, deadline = out / "last.pt", None, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if last.is_file() and last.stat().st_mtime_ns != seen:
                seen = last.stat().st_mtime_ns
                state = load_checkpoint(last)
                if state["epoch"] >= 1 and state["step_in_epoch"] > 0:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.005)
        else:
            pytest.fail(f"the run ended or stalled before a mid-epoch checkpoint: {process.stderr.read()[-2000:]}")
    finally:
        process.kill()
        process.wait()
    return load_checkpoint(last)


def test_a_killed_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tiny_shapes, tmp_path):
    killed = _killed_in_the_middle(tiny_shapes, tmp_path / "killed")
    done = killed["scheduler"]["last_epoch"]
    assert 0 < killed["step_in_epoch"] < STEPS_PER_EPOCH and done == killed["epoch"] * STEPS_PER_EPOCH + killed["step_in_epoch"]
    lr = killed["optimizer"]["param_groups"][0]["lr"]
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as log:  # as if an epoch were logged after last.pt
        log.write('{"epoch": 99}\n')
    resumed = subprocess.run(_command(tiny_shapes, tmp_path / "killed", EPOCHS) + ["--resume"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (f"epoch {killed['epoch'] + 1}, step {killed['step_in_epoch']} of it, {done} steps done, lr {lr:.4g}"
            in resumed.stdout), resumed.stdout
    final = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert final["epoch"] == EPOCHS and final["scheduler"]["last_epoch"] == EPOCHS * STEPS_PER_EPOCH
    assert [record["epoch"] for record in final["history"]] == list(range(1, EPOCHS + 1))
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, EPOCHS + 1))  # the log restarts from the checkpoint's history

    whole = subprocess.run(_command(tiny_shapes, tmp_path / "whole", EPOCHS), env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    uninterrupted = load_checkpoint(tmp_path / "whole" / "last.pt")
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, final["model"][name]), name
    for a, b in zip(uninterrupted["history"], final["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_shapes, tmp_path, monkeypatch):
    """One bad batch: a warning naming its images, and the run goes on; three in a row: a clear
    stop, with last.pt (here: the end of epoch 1) untouched."""
    import minicenternet.train as train_module
    from minicenternet.train import TrainConfig, train

    real_step, calls = train_module._step, []

    def step_failing_at(bad):
        def step(*args, **kwargs):
            calls.append(1)
            return None if len(calls) in bad else real_step(*args, **kwargs)
        return step

    cfg = TrainConfig(data=str(tiny_shapes), out=str(tmp_path / "run"), arch="hourglass-small", input_size=64, epochs=2,
                      batch_size=4, num_workers=0, val_every=0, amp=False, device="cpu", color_aug=False)
    monkeypatch.setattr(train_module, "_step", step_failing_at({2}))
    with pytest.warns(UserWarning, match=r"non-finite loss on the batch of image ids \[\d+, \d+, \d+, \d+\], skipped"):
        train(cfg, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2

    calls.clear()
    monkeypatch.setattr(train_module, "_step", step_failing_at({3, 4, 5}))
    cfg = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "stop"), "epochs": 3, "save_every_minutes": 1e3})
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="3 batches in a row with a non-finite loss"):
        train(cfg, progress=False)
    assert load_checkpoint(tmp_path / "stop" / "last.pt")["epoch"] == 1  # written after steps 1-2, before the bad ones


def test_saved_generator_states_fit_the_number_of_processes():
    from minicenternet.train import _saved_rng

    one = rng_state()
    assert _saved_rng({"rng": one}, 1) == [one]  # a checkpoint that stored one process's states as a dict
    assert _saved_rng({"rng": [one, one]}, 2) == [one, one]
    with pytest.warns(UserWarning, match="2 process"):
        assert _saved_rng({"rng": [one, one]}, 1) is None
