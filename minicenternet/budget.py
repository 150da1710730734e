"""Plan a training run to fit a wall-clock budget on the machine at hand.

CPUs differ by an order of magnitude for this network (fp32 on an AVX2 core against bf16 on a
core with native bf16, see benchmarks/README.md), so a fixed number of epochs either wastes a
fast machine or overruns a slow one. :func:`plan_run` turns measured costs into a number of
epochs (fractional: the last one stops part-way) and of trunk pre-training steps that finish,
with the final evaluation, inside the budget. The plan is then an ordinary configuration: the
same ``--epochs`` and ``--pretrain-steps`` on the command line give the same run, step for step.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

__all__ = ["MAX_EVAL_SHARE", "Costs", "Plan", "median_seconds", "mean_seconds", "untouched_rng", "plan_run"]

MAX_EVAL_SHARE = 0.2
"""Largest share of a planned run's budget its multi-scale test may take; above it the run tests at
scale 1 only and trains for the time saved. The extra scales are worth their cost on a model
trained for some epochs and worth next to nothing on one that has barely started
(benchmarks/README.md)."""


def _sync(device: torch.device | str | None) -> Callable[[], None]:
    """What waits for queued work on ``device``: ``torch.cuda.synchronize`` on a GPU, nothing elsewhere."""
    return torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)


def untouched_rng(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A block whose draws from the global RNG (CPU, and CUDA on a GPU) are undone at its end, so
    timing a throwaway model leaves a seeded run as it was."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def median_seconds(fn: Callable[[], object], warmup: int = 1, repeats: int = 3, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (CUDA
    work is waited for when ``device`` is a GPU)."""
    sync = _sync(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mean_seconds(fn: Callable[[], object], warmup: int = 2, repeats: int = 6, device: torch.device | None = None) -> float:
    """Wall time of ``repeats`` back-to-back calls of ``fn()`` divided by ``repeats``, after
    ``warmup`` untimed ones: what a long loop of them costs, slow calls included (a plan must not
    count on the median)."""
    sync = _sync(device)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


@dataclass(frozen=True)
class Costs:
    """Measured seconds on this machine.

    Attributes:
        train_step: one training step of the detector (loader, forward, loss, backward, Adam).
        pretrain_step: one step of trunk pre-training (0 when the run does not pre-train).
        evaluation: the final validation with the run's test settings, COCOeval included.
        per_epoch: what the end of every epoch adds (writing the checkpoint and the curves).
    """

    train_step: float
    pretrain_step: float
    evaluation: float
    per_epoch: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Epochs and pre-training steps that fit the budget, with the estimate behind them."""

    epochs: float
    pretrain_steps: int
    steps_per_epoch: int
    budget_seconds: float
    spent_seconds: float
    margin_seconds: float
    costs: Costs

    @property
    def train_steps(self) -> int:
        """Optimiser steps of the detector: ``round(epochs * steps_per_epoch)``."""
        return round(self.epochs * self.steps_per_epoch)

    @property
    def estimated_seconds(self) -> float:
        """Predicted wall time of the whole run, from its start."""
        c = self.costs
        training = self.train_steps * c.train_step + math.ceil(self.epochs) * c.per_epoch
        return self.spent_seconds + self.pretrain_steps * c.pretrain_step + training + c.evaluation

    def describe(self) -> str:
        """A few lines for the start of a run."""
        c = self.costs
        return (
            f"plan for a {self.budget_seconds / 60:g}-minute budget: {self.epochs:g} epochs "
            f"({self.train_steps} steps x {c.train_step:.3f} s, {c.per_epoch:.1f} s per epoch to save) "
            f"+ trunk pre-training {self.pretrain_steps} steps "
            f"(x {c.pretrain_step:.3f} s) + evaluation ~{c.evaluation:.0f} s + {self.spent_seconds:.0f} s spent so far "
            f"= ~{self.estimated_seconds / 60:.1f} min ({self.margin_seconds:.0f} s kept in reserve)"
        )


def plan_run(
    budget_seconds: float,
    spent_seconds: float,
    costs: Costs,
    steps_per_epoch: int,
    pretrain_steps: int | None = None,
    max_pretrain_steps: int = 300,
    pretrain_share: float = 0.12,
    margin: float = 0.05,
    min_epochs: float = 0.1,
) -> Plan:
    """Choose epochs and pre-training steps so the run ends within ``budget_seconds``.

    What remains after ``spent_seconds`` (data drawing and loading, the measurements), the
    evaluation and a reserve of ``margin`` of the budget goes to training. Unless
    ``pretrain_steps`` fixes them, pre-training takes at most ``pretrain_share`` of it and at
    most ``max_pretrain_steps`` (the cap the CPU preset was tuned with); the rest becomes epochs
    (each costing its steps and ``costs.per_epoch``), rounded down to a tenth.

    Args:
        budget_seconds: the whole run's wall-clock budget.
        spent_seconds: already used, counted from the start of the run.
        costs: the measured per-step and evaluation seconds.
        steps_per_epoch: optimiser steps in one epoch.
        pretrain_steps: a fixed number of pre-training steps, or ``None`` to plan them.
        max_pretrain_steps: most pre-training steps when planned (0: none).
        pretrain_share: largest share of the training time given to pre-training.
        margin: share of the budget kept in reserve for what is not measured (checkpoints,
            cropping the pre-training objects, noise).
        min_epochs: fewest epochs planned; a budget too small for them raises ``ValueError``.

    Returns:
        The :class:`Plan`.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    reserve = margin * budget_seconds
    available = budget_seconds - spent_seconds - costs.evaluation - reserve
    if pretrain_steps is None:
        pretrain_steps = 0
        if max_pretrain_steps > 0 and costs.pretrain_step > 0:
            planned = math.floor(pretrain_share * available / costs.pretrain_step)
            pretrain_steps = min(max_pretrain_steps, max(0, planned))
    train_seconds = available - pretrain_steps * costs.pretrain_step
    epochs = math.floor(10 * train_seconds / (steps_per_epoch * costs.train_step + costs.per_epoch)) / 10
    plan = Plan(epochs, pretrain_steps, steps_per_epoch, budget_seconds, spent_seconds, reserve, costs)
    while plan.epochs >= min_epochs and plan.estimated_seconds > budget_seconds - reserve:
        # a started epoch pays its whole end-of-epoch cost
        plan = replace(plan, epochs=round(plan.epochs - 0.1, 1))
    if plan.epochs < min_epochs:
        raise ValueError(
            f"a {budget_seconds / 60:g}-minute budget leaves {max(0.0, available):.0f} s for training after "
            f"{spent_seconds:.0f} s spent and ~{costs.evaluation:.0f} s of evaluation, less than {min_epochs:g} epochs "
            f"({steps_per_epoch} steps x {costs.train_step:.2f} s each): raise --budget-minutes or give --epochs"
        )
    return plan
