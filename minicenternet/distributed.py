"""Several processes, one model: the few pieces ``train`` needs under ``torchrun``.

``torchrun --nproc_per_node N -m minicenternet train ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set; :func:`setup` turns them into a process group
(NCCL on CUDA, one GPU per process; gloo on a CPU). Each process trains a DistributedDataParallel
replica on its share of every batch (see :class:`~minicenternet.data.sampler.EpochSampler`), the
gradients are averaged across processes at each step, and rank 0 alone prints, draws progress
bars and writes files. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is a
no-op, and the code path is the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "World", "setup", "world", "reduce_mean", "all_finite", "any_process", "gather", "barrier", "wrap", "unwrap",
    "sync_buffers", "check_replicas", "teardown",
]


COLLECTIVE_TIMEOUT = timedelta(hours=1)  # torch's default, 10 minutes, is shorter than a trunk pre-training


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0


def _collective_device() -> torch.device:
    """Where a tensor sent through the process group must live: NCCL reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def world() -> World:
    """The current process group's :class:`World` (a single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, once; return the
    world and this process's device (``cuda:LOCAL_RANK`` on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size == 1:
        return World(), device
    if not dist.is_initialized():  # an hour before a collective gives up: rank 0 may pre-train a trunk meanwhile
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    here = world()
    if device.type == "cuda":
        device = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(device)
    return here, device


def reduce_mean(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """The mean over the processes of each scalar (detached), as every process logs it."""
    if world().size == 1:
        return {name: value.detach() for name, value in values.items()}
    stacked = torch.stack([value.detach().float() for value in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / world().size))


def all_finite(loss: Tensor) -> bool:
    """Whether the loss is finite in every process: they must all skip a batch together, or the
    gradient all-reduce of the others would wait forever."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if world().size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process: a decision (save now) that all must take together."""
    if world().size == 1:
        return flag
    value = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (any picklable object)."""
    if world().size == 1:
        return [value]
    values: list[Any] = [None] * world().size
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait for every process (after rank 0 wrote a file the others read)."""
    if world().size > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` as a DistributedDataParallel replica (BatchNorm synchronised across processes
    with ``sync_bn``); unchanged in a single process."""
    if world().size == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (what is saved and evaluated)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every replica. DDP does so at the
    start of each forward pass, so after the last training step each replica still holds the
    statistics of its own last batch; evaluation and the saved model need one set."""
    if world().size > 1:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def teardown() -> None:
    """Leave the process group (at the end of a torchrun run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_replicas(model: nn.Module) -> None:
    """Raise if the replicas' parameters and buffers differ (a fingerprint per tensor, compared
    across processes): they must stay identical, or the saved model is only rank 0's."""
    state = unwrap(model).state_dict()
    fingerprint = [  # a NaN must equal a NaN here: count them, and sum the rest
        (float(torch.nan_to_num(tensor.double(), nan=0.0).sum()), int(torch.isnan(tensor.double()).sum()))
        for tensor in state.values()
    ]
    prints = gather(fingerprint)
    if any(other != prints[0] for other in prints[1:]):
        names = [name for i, name in enumerate(state) if len({p[i] for p in prints}) > 1]
        raise RuntimeError(f"the DDP replicas diverged in {len(names)} tensors, first {names[:3]}")
