"""Tests of minicenternet.budget and of a training run planned to a time budget."""

from __future__ import annotations

import contextlib
import io
import shlex
import time
from dataclasses import replace

import pytest
import torch

import minicenternet.train as train_module
from minicenternet.budget import MAX_EVAL_SHARE, Costs, mean_seconds, median_seconds, plan_run
from minicenternet.checkpoint import load_checkpoint
from minicenternet.cli import _parser, main
from minicenternet.device import AmpChoice
from minicenternet.train import command_line, default_config, train


def test_plan_by_hand():
    """900 s budget, 60 s spent, 100 s of evaluation, 5 % (45 s) in reserve: 695 s to train.
    Pre-training gets 12 % of it, floor(0.12 * 695 / 0.4) = 208 steps (83.2 s); the 611.8 s left
    are 611.8 / (187 x 0.5) = 6.54 epochs, rounded down to 6.5."""
    plan = plan_run(900, 60, Costs(train_step=0.5, pretrain_step=0.4, evaluation=100), steps_per_epoch=187)
    assert plan.pretrain_steps == 208
    assert plan.epochs == 6.5
    assert plan.train_steps == 1216  # round(6.5 * 187)
    assert plan.estimated_seconds == pytest.approx(60 + 208 * 0.4 + 1216 * 0.5 + 100)
    assert plan.estimated_seconds <= 900 - plan.margin_seconds
    assert "6.5 epochs" in plan.describe() and "208 steps" in plan.describe()


def test_plan_counts_the_end_of_every_epoch():
    """The same numbers with 9.35 s written at the end of every epoch: an epoch costs
    187 x 0.5 + 9.35 = 102.85 s, and 611.8 s hold 5.95 of them, rounded down to 5.9; the
    estimate counts 6 epoch ends."""
    plan = plan_run(900, 60, Costs(train_step=0.5, pretrain_step=0.4, evaluation=100, per_epoch=9.35), 187)
    assert (plan.pretrain_steps, plan.epochs, plan.train_steps) == (208, 5.9, 1103)
    assert plan.estimated_seconds == pytest.approx(60 + 83.2 + 1103 * 0.5 + 6 * 9.35 + 100)
    assert plan.estimated_seconds <= 900 - plan.margin_seconds


def test_plan_pays_for_the_last_started_epoch():
    """50 s at the end of every epoch: 695 s / (93.5 + 50) s = 4.84, so 4.8 epochs by the
    fractions; but 4.8 epochs start 5 epochs, 60 + 898 x 0.5 + 5 x 50 + 100 = 859 s > 855 s, so
    the plan steps back to 4.7 (879 steps: 849.5 s)."""
    plan = plan_run(900, 60, Costs(train_step=0.5, pretrain_step=0.0, evaluation=100, per_epoch=50), 187)
    assert (plan.pretrain_steps, plan.epochs, plan.train_steps) == (0, 4.7, 879)
    assert plan.estimated_seconds == pytest.approx(849.5)


def test_plan_caps_pretraining_and_keeps_fixed_steps():
    fast = Costs(train_step=0.2, pretrain_step=0.1, evaluation=60)
    assert plan_run(900, 40, fast, steps_per_epoch=187).pretrain_steps == 300  # 0.12 * 755 / 0.1 = 906 > 300
    assert plan_run(900, 40, fast, 187, max_pretrain_steps=0).pretrain_steps == 0
    fixed = plan_run(900, 40, fast, 187, pretrain_steps=50)
    assert fixed.pretrain_steps == 50
    # (900 - 40 - 60 - 45 - 5) / (187 x 0.2) = 20.05 epochs
    assert fixed.epochs == 20.0
    assert plan_run(900, 40, Costs(0.2, 0.0, 60), 187).pretrain_steps == 0  # no pre-training measured: none planned


def test_plan_refuses_a_budget_too_small():
    with pytest.raises(ValueError, match="2-minute budget leaves 0 s"):
        plan_run(120, 100, Costs(train_step=1.0, pretrain_step=1.0, evaluation=30), steps_per_epoch=100)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        plan_run(900, 0, Costs(1.0, 1.0, 1.0), steps_per_epoch=0)


def test_timers_count_calls_and_time():
    calls = []
    assert median_seconds(lambda: calls.append(1), warmup=2, repeats=3) >= 0
    assert len(calls) == 5
    calls.clear()
    assert mean_seconds(lambda: calls.append(time.sleep(0.01)), warmup=1, repeats=4) >= 0.01
    assert len(calls) == 5


# A 50-minute budget with made-up costs chosen so that the run's real start-up time (up to about a
# minute) cannot move the plan: reserve 150 s, evaluation 571 s, so 2279 s minus what is spent;
# pre-training floor(0.12 * 2279 / 100) = 2 steps (200 s); 2079 s / (2 steps x 400 s) = 2.59
# epochs, rounded down to 2.5: 5 steps of the tiny set's 2 per epoch.
FAKE_COSTS = Costs(train_step=400.0, pretrain_step=100.0, evaluation=571.0)


def _planned_config(tiny_shapes, out, amp, **overrides):
    """The CPU preset on the tiny set, planned to 50 minutes; ResNet-18 (the CPU default has no
    trunk to pre-train) unless ``overrides`` name another arch."""
    return default_config(
        "cpu", data=str(tiny_shapes), out=str(out), input_size=64, batch_size=4, amp=amp, budget_minutes=50.0,
        **{"arch": "resnet18", **overrides},
    )


@pytest.mark.parametrize("enabled", [False, True])
def test_the_plan_and_its_command_for_each_precision_choice(tiny_shapes, tmp_path, monkeypatch, enabled):
    """Either precision choice gives the same plan arithmetic, and the printed command pins the
    choice (``--amp`` / ``--no-amp``), so the plan repeats on a machine that would decide otherwise."""
    monkeypatch.setattr(train_module, "_measure", lambda *args: FAKE_COSTS)
    cfg = _planned_config(tiny_shapes, tmp_path, "auto")
    train_src, val_src, _ = train_module._datasets(cfg)
    loader = train_module._loader(cfg, train_src, torch.device("cpu"))
    choice = AmpChoice(enabled, torch.bfloat16 if enabled else None, "forced by the test")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        settled = train_module._settle_length(
            cfg, None, loader, train_src, val_src, torch.device("cpu"), choice, 0, time.perf_counter()
        )
    assert (settled.epochs, settled.pretrain_steps) == (2.5, 2)
    text = printed.getvalue()
    assert (
        "2.5 epochs (5 steps x 400.000 s, 0.0 s per epoch to save) + trunk pre-training 2 steps (x 100.000 s) "
        "+ evaluation ~571 s" in text
    )
    command = next(line for line in text.splitlines() if line.startswith("the same run without planning: "))
    assert command.endswith("--epochs 2.5 --pretrain-steps 2 " + ("--amp" if enabled else "--no-amp"))
    assert command.split(": ", 1)[1] == command_line(settled, enabled)


def test_the_cpu_default_spends_no_time_on_pretraining(tiny_shapes, tmp_path, monkeypatch):
    """hourglass-small, the CPU default, has no classification trunk: the 2279 s left (minus the
    start-up, under a minute) all go to epochs of 2 steps x 400 s: 2.8 epochs would round to 6
    steps (2400 s), over, so the plan takes 2.7 (5 steps)."""
    monkeypatch.setattr(train_module, "_measure", lambda *args: FAKE_COSTS)
    cfg = _planned_config(tiny_shapes, tmp_path, False, arch=default_config("cpu").arch)
    settled, text = _settled(cfg)
    assert (settled.arch, settled.epochs, settled.pretrain_steps) == ("hourglass-small", 2.7, 0)
    assert "2.7 epochs (5 steps x 400.000 s, 0.0 s per epoch to save) + trunk pre-training 0 steps" in text
    assert "affords only" not in text


def _settled(cfg, state=None):
    """``cfg`` after :func:`_settle_length`, and what it printed."""
    train_src, val_src, _ = train_module._datasets(cfg)
    loader = train_module._loader(cfg, train_src, torch.device("cpu"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        settled = train_module._settle_length(
            cfg, state, loader, train_src, val_src, torch.device("cpu"), AmpChoice(False, None, "off"), 0,
            time.perf_counter(),
        )
    return settled, printed.getvalue()


def test_a_test_too_dear_for_the_budget_drops_its_extra_scales(tiny_shapes, tmp_path, monkeypatch):
    """The 3-scale test measured at 750 s is 25 % of a 50-minute budget, above MAX_EVAL_SHARE: the run
    tests at scale 1 (measured again, 150 s) and plans with that. 150 s and the reserve leave 2700 s
    minus the start-up s (under a minute); pre-training floor(0.12 * (2700 - s) / 100) = 3 steps;
    (2400 - s) / 800 rounds down to 2.9 epochs, whose 6 steps end 2850 + s seconds in, past the
    reserve, so the plan steps back to 2.7 (5 steps)."""
    measured = []

    def fake_measure(cfg, source, val_src, device, amp, test_config, test_images):
        measured.append(test_config["scales"])
        return replace(FAKE_COSTS, evaluation=750.0 if len(test_config["scales"]) > 1 else 150.0)

    monkeypatch.setattr(train_module, "_measure", fake_measure)
    cfg = _planned_config(tiny_shapes, tmp_path, False)
    assert cfg.eval_scales == (0.75, 1.0, 1.25) and 750 / 3000 > MAX_EVAL_SHARE
    settled, text = _settled(cfg)
    assert measured == [(0.75, 1.0, 1.25), (1.0,)]
    assert settled.eval_scales == (1.0,) and settled.eval_flip
    assert (settled.epochs, settled.pretrain_steps) == (2.7, 3)
    assert "the 3-scale test would take ~750 s (25% of the budget): testing at scale 1 only" in text
    assert "+ evaluation ~150 s" in text
    assert "resnet18 affords only 2.7 epochs here" in text and "--arch hourglass-small (the CPU default)" in text
    assert "affords only" not in _settled(replace(cfg, arch="dla-small"))[1]  # not a ResNet: no advice
    command = next(line for line in text.splitlines() if line.startswith("the same run without planning: "))
    assert " --eval-scales 1 " in command
    # a test within the share keeps its scales; a run with its epochs given is never re-planned
    monkeypatch.setattr(train_module, "_measure", lambda *args: replace(FAKE_COSTS, evaluation=599.0))
    assert _settled(cfg)[0].eval_scales == (0.75, 1.0, 1.25)
    monkeypatch.setattr(train_module, "_measure", lambda *args: pytest.fail("an explicit epochs must not plan"))
    assert _settled(replace(cfg, epochs=2.0))[0].eval_scales == (0.75, 1.0, 1.25)
    # a resumed planned run keeps the test its plan chose
    stored = {"train_config": {"epochs": 3.0, "pretrain_steps": 3, "eval_scales": [1.0]}}
    assert _settled(cfg, stored)[0].eval_scales == (1.0,)


def test_eval_scales_on_the_command_line():
    assert command_line(replace(default_config("cpu"), eval_scales=(1.0, 1.5), epochs=2.0, pretrain_steps=0), False) == (
        "minicenternet train --eval-scales 1 1.5 --device cpu --epochs 2 --pretrain-steps 0 --no-amp"
    )
    args = _parser().parse_args(["train", "--eval-scales", "0.5", "1"])
    assert args.eval_scales == [0.5, 1.0]


def test_a_planned_run_follows_its_plan(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_measure", lambda *args: FAKE_COSTS)
    cfg = _planned_config(tiny_shapes, tmp_path / "planned", False, eval_flip=False, eval_scales=(1.0,))
    assert cfg.epochs is None and cfg.pretrain_steps is None  # the CPU preset plans both
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(cfg, progress=False)
    assert "mixed precision: off (fp32) (switched off)" in printed.getvalue()
    last = load_checkpoint(tmp_path / "planned" / "last.pt")
    assert last["train_config"]["epochs"] == 2.5 and last["train_config"]["pretrain_steps"] == 2
    # the last epoch stops part-way; the lr schedule is laid on the 5 planned steps
    assert last["scheduler"]["last_epoch"] == 5 and last["epoch"] == 3
    assert all(s["step"] == 5 for s in last["optimizer"]["state"].values())
    assert [r["epoch"] for r in last["history"]] == [1, 2, 3]
    assert (tmp_path / "planned" / "trunk_pretrained.pt").is_file()


@pytest.mark.parametrize("arch, max_pretrain_steps, length", [("resnet18", 300, (2.5, 2)), ("hourglass-small", 0, (2.7, 0))])
def test_the_printed_command_repeats_the_planned_run(tiny_shapes, tmp_path, monkeypatch, arch, max_pretrain_steps, length):
    """Planning measures on throwaway models and a throwaway loader and restores the RNG: the
    printed command, run with no planning, ends with the same weights, for a ResNet (its arch on
    the command line, pre-training) and for the CPU default (no --arch, none). The measurement is
    real here; only the plan is fixed, so the test does not depend on this machine's speed."""
    fixed = plan_run(3000, 0, FAKE_COSTS, steps_per_epoch=2, max_pretrain_steps=max_pretrain_steps)
    assert (fixed.epochs, fixed.pretrain_steps) == length
    monkeypatch.setattr(train_module, "plan_run", lambda *args, **kwargs: fixed)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(_planned_config(tiny_shapes, tmp_path / "planned", False, arch=arch), progress=False)
    line = next(x for x in printed.getvalue().splitlines() if x.startswith("the same run without planning: "))
    assert "(and in TrainConfig" not in line  # everything this run sets has a flag
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[:2] == ["minicenternet", "train"] and ("--arch" in argv) == (arch != default_config("cpu").arch)
    argv = argv[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "repeat")
    monkeypatch.setattr(train_module, "_measure", lambda *args: pytest.fail("an explicit --epochs must not plan"))
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    planned = load_checkpoint(tmp_path / "planned" / "last.pt")
    repeat = load_checkpoint(tmp_path / "repeat" / "last.pt")
    assert (repeat["train_config"]["epochs"], repeat["train_config"]["pretrain_steps"]) == length
    assert repeat["model_config"]["arch"] == arch
    for name, value in planned["model"].items():
        assert torch.equal(value, repeat["model"][name]), name


def test_settings_the_command_line_cannot_set_are_named(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_measure", lambda *args: FAKE_COSTS)
    cfg = _planned_config(tiny_shapes, tmp_path, False, eval_flip=False, warmup_iters=3)
    assert train_module.config_only_settings(cfg) == ["warmup_iters=3", "eval_flip=False"]
    train_src, val_src, _ = train_module._datasets(cfg)
    loader = train_module._loader(cfg, train_src, torch.device("cpu"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_module._settle_length(
            cfg, None, loader, train_src, val_src, torch.device("cpu"), AmpChoice(False, None, "off"), 0,
            time.perf_counter(),
        )
    assert "--no-amp (and in TrainConfig: warmup_iters=3, eval_flip=False)" in printed.getvalue()


def test_measure_times_real_steps(tiny_shapes, tmp_path):
    """The real measurement on the tiny set: positive costs, evaluation scaled to the val images."""
    cfg = default_config("cpu", arch="resnet18", data=str(tiny_shapes), out=str(tmp_path), input_size=64, batch_size=4,
                         amp=False)
    source_train, source_val, _ = train_module._datasets(cfg)
    test_config = {"input_size": None, "flip": True, "scales": (1.0,), "pad_variant": "minimal", "amp": False}
    state = torch.random.get_rng_state()
    off = AmpChoice(False, None, "off")
    costs = train_module._measure(cfg, source_train, source_val, torch.device("cpu"), off, test_config, 0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert costs.train_step > 0 and costs.pretrain_step > 0 and costs.per_epoch > 0
    no_trunk = train_module._measure(replace(cfg, arch="hourglass-small"), source_train, source_val, torch.device("cpu"),
                                     off, test_config, 0)
    assert no_trunk.pretrain_step == 0.0 and no_trunk.train_step > 0  # nothing to pre-train, nothing timed
    assert not list(tmp_path.glob(".planning*"))  # the checkpoint and curves written to time them are gone
    assert costs.evaluation > len(source_val) * train_module.COCOEVAL_SECONDS_PER_IMAGE
    # validating every second epoch adds half an evaluation to every epoch
    halves = train_module._measure(
        replace(cfg, val_every=2), source_train, source_val, torch.device("cpu"), off, test_config, 0
    )
    assert halves.per_epoch > 0.5 * halves.evaluation


def test_the_final_evaluation_counts_the_test_split(tiny_shapes, tmp_path, monkeypatch):
    """With every timed call fixed at 1 s: the final evaluation is (val + test images) x (1 s +
    COCOeval's share), and a validation every second epoch adds half the val share to each epoch."""
    monkeypatch.setattr(train_module, "mean_seconds", lambda *args, **kwargs: 1.0)
    cfg = default_config("cpu", data=str(tiny_shapes), out=str(tmp_path), input_size=64, batch_size=4, amp=False,
                         pretrain_steps=0, val_every=2)
    source_train, source_val, source_test = train_module._datasets(cfg)
    assert (len(source_val), len(source_test)) == (4, 4)
    test_config = {"input_size": None, "flip": False, "scales": (1.0,), "pad_variant": "minimal", "amp": False}
    costs = train_module._measure(
        cfg, source_train, source_val, torch.device("cpu"), AmpChoice(False, None, "off"), test_config, len(source_test)
    )
    per_image = 1.0 + train_module.COCOEVAL_SECONDS_PER_IMAGE
    assert (costs.train_step, costs.pretrain_step) == (1.0, 0.0)
    assert costs.evaluation == pytest.approx(8 * per_image)
    assert 4 * per_image / 2 < costs.per_epoch < 4 * per_image / 2 + 1.0  # + writing the checkpoint and curves
