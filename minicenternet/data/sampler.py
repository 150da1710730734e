"""The order of a training epoch as a function of ``(seed, epoch)``, startable at any sample.

torch's ``RandomSampler`` draws each epoch's order from the global RNG when the epoch starts; a
run killed in the middle of an epoch cannot replay that draw, so it could not resume on the same
order. :class:`EpochSampler` can: the permutation depends on the seed and the epoch only, and
:meth:`EpochSampler.set_epoch` can skip the samples already trained on. Under ``torchrun`` each
process takes every ``size``-th sample of the same order, so that a step's batches of all the
processes together hold the samples a single process would take in one batch of the global size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[tuple[int, int]]):
    """A shuffled order of ``range(size)``, the same for the same ``(seed, epoch)``.

    Args:
        size: the number of samples.
        seed: the run's seed.
        rank, world_size: this process's share: samples ``rank, rank + world_size, ...`` of the
            order (the tail that does not divide evenly is dropped, as ``DistributedSampler(drop_last=True)``
            does).

    ``set_epoch(epoch, start)`` picks the epoch's permutation and the position in it, counted in
    samples of the whole order, to start from; ``len()`` counts this process's samples from there.
    The sampler yields ``(epoch, index)`` pairs, which
    :class:`~minicenternet.data.centernet_dataset.CenterNetDataset` turns into the sample's own
    augmentation generator.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.size:
            raise ValueError(f"start must be in [0, {self.size}], got {start}")
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The whole permutation of the current epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rest = self.order()[self.start:]
        return iter((self.epoch, index) for index in rest[: len(self) * self.world_size][self.rank :: self.world_size])

    def __len__(self) -> int:
        return (self.size - self.start) // self.world_size
