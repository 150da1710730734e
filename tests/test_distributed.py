"""torchrun DDP on a CPU with gloo: two replicas stay identical, the logged loss is the mean of
the processes' losses, and a torchrun training run reports the AP of a single-process evaluation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minicenternet.data.coco import CocoDetection
from minicenternet.distributed import gather, reduce_mean, setup, sync_buffers, unwrap, wrap
from minicenternet.evaluate import evaluate
from minicenternet.predict import Detector
from minicenternet.train import TrainConfig, _loader, _new_model, _step


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replica(rank: int, port: int, data: str, result: str) -> None:
    """One process: three DDP steps of the library's own loop pieces, then compare with the other."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    here, device = setup(torch.device("cpu"))
    cfg = TrainConfig(data=data, arch="hourglass-small", input_size=64, batch_size=4, num_workers=0, amp=False,
                      device="cpu", color_aug=False, channels_last=False)
    source = CocoDetection.from_root(data, "train")
    torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
    model = wrap(_new_model(cfg, source.num_classes, device), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loader = _loader(cfg, source, device)
    loader.sampler.set_epoch(0)
    own, reduced, ids = [], [], []
    for images, targets in list(loader)[:3]:
        ids.append(targets.pop("image_id").tolist())
        losses = _step(model, optimizer, scaler, images, targets, cfg, False)
        own.append(losses["loss"].item())
        reduced.append(reduce_mean(losses)["loss"].item())
    params = gather({k: v.detach().clone() for k, v in unwrap(model).named_parameters()})
    buffers_before = gather({k: v.clone() for k, v in unwrap(model).named_buffers()})
    sync_buffers(model)
    states = gather({k: v.clone() for k, v in unwrap(model).state_dict().items()})
    everything = gather({"own": own, "reduced": reduced, "ids": ids})
    if here.main:
        outcome = {
            "parameters": all(torch.equal(params[0][k], params[1][k]) for k in params[0]),
            "buffers_before": all(torch.equal(buffers_before[0][k], buffers_before[1][k]) for k in buffers_before[0]),
            "identical": all(torch.equal(states[0][k], states[1][k]) for k in states[0]),
            "ranks": everything,
        }
        with open(result, "w") as handle:
            json.dump(outcome, handle)
    dist.destroy_process_group()


def test_two_replicas_stay_identical_and_the_loss_is_their_mean(tiny_shapes, tmp_path):
    result = tmp_path / "result.json"
    mp.spawn(_replica, args=(_free_port(), str(tiny_shapes), str(result)), nprocs=2)
    outcome = json.loads(result.read_text())
    assert outcome["parameters"]  # the averaged gradients keep the weights identical
    assert not outcome["buffers_before"]  # each replica's BatchNorm saw its own last batch ...
    assert outcome["identical"]  # ... until sync_buffers copies rank 0's
    first, second = outcome["ranks"]
    for a, b, mean_a, mean_b in zip(first["own"], second["own"], first["reduced"], second["reduced"]):
        assert a != b  # each process trained on its own images ...
        assert mean_a == pytest.approx((a + b) / 2, rel=1e-6) and mean_b == pytest.approx(mean_a, rel=1e-6)
    for ids_a, ids_b in zip(first["ids"], second["ids"]):
        assert len(ids_a) == len(ids_b) == 2 and not set(ids_a) & set(ids_b)  # ... half of the global batch of 4


def test_torchrun_trains_and_reports_the_single_process_ap(tiny_shapes, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minicenternet",
        "train", "--data", str(tiny_shapes), "--out", str(out), "--arch", "hourglass-small", "--epochs", "2",
        "--batch-size", "4", "--input-size", "64", "--device", "cpu", "--no-amp", "--pretrain-steps", "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("epoch=1 ") == 1 and run.stdout.count("epoch=2 ") == 1  # rank 0 alone prints
    report = json.loads((out / "report.json").read_text())
    detector = Detector.from_checkpoint(out / "best.pt", device="cpu")
    single = evaluate(detector, CocoDetection.from_root(tiny_shapes, "test"), progress=False)
    assert single == pytest.approx({k: (float("nan") if v is None else v) for k, v in report["metrics"].items()},
                                   nan_ok=True)
