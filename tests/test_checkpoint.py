"""Tests of minicenternet.checkpoint: round trip, atomic writes and clear errors."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch

from minicenternet.checkpoint import check_same_model, load_checkpoint, load_run_checkpoint, save_checkpoint


def _state() -> dict:
    torch.manual_seed(0)
    return {
        "model": {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7)},
        "epoch": 3,
        "best_ap": 0.25,
        "history": [{"epoch": 1, "AP": 0.1}, {"epoch": 2, "AP": 0.25}],
        "model_config": {"arch": "resnet18", "num_classes": 5, "dcn": False, "class_names": ["a", "b"]},
    }


def test_round_trip(tmp_path):
    state = _state()
    path = save_checkpoint(state, tmp_path / "sub" / "dir" / "last.pt")  # parents are created
    assert path == tmp_path / "sub" / "dir" / "last.pt" and path.is_file()
    loaded = load_checkpoint(str(path))
    assert set(loaded) == set(state)
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["epoch"] == 3 and loaded["best_ap"] == 0.25
    assert loaded["history"] == state["history"] and loaded["model_config"] == state["model_config"]
    # written with plain types only: readable by torch.load with weights_only=True
    torch.load(path, weights_only=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("exception", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, exception):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(), path)
    original = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, handle, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, handle)  # some bytes reach the file ...
        handle.write(b"\x00" * 100)
        raise exception  # ... then the write fails

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(exception)):
        save_checkpoint({"epoch": 99}, path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 3


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.pt"):
        load_checkpoint(tmp_path / "nothing_here.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint file


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        load_checkpoint(text)

    truncated = tmp_path / "truncated.pt"
    save_checkpoint(_state(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(truncated)

    # a pickle with arbitrary classes is refused by weights_only=True
    pickled = tmp_path / "pickled.pt"
    with open(pickled, "wb") as handle:
        pickle.dump(collections.Counter(a=1), handle, protocol=2)
    with pytest.raises(ValueError, match="pickled.pt"):
        load_checkpoint(pickled)


def test_check_same_model_names_every_difference():
    stored = {"arch": "resnet18", "num_classes": 5, "dcn": False, "class_names": ["a"]}  # no "task": an old checkpoint
    check_same_model(stored, {"arch": "resnet18", "task": "centernet", "num_classes": 5, "dcn": False}, "old.pt")
    with pytest.raises(ValueError) as info:
        check_same_model(stored, {"arch": "hourglass-small", "task": "cornernet", "num_classes": 80, "dcn": False}, "x.pt")
    message = str(info.value)
    assert message.startswith("x.pt: the checkpoint holds a different model")
    for part in ("arch 'resnet18' in the checkpoint, 'hourglass-small' here", "task 'centernet' in the checkpoint, "
                 "'cornernet' here", "num_classes 5 in the checkpoint, 80 here"):
        assert part in message
    assert message.endswith("(resume with the settings it was trained with: --arch resnet18 --task centernet)")
    assert "dcn" not in message


def test_resuming_with_another_model_is_a_clear_error(tiny_shapes, tmp_path):
    from minicenternet.train import TrainConfig, train

    cfg = TrainConfig(data=str(tiny_shapes), out=str(tmp_path / "run"), input_size=64, epochs=1, batch_size=4,
                      num_workers=0, val_every=0, dcn=False, amp=False, device="cpu")
    train(cfg, progress=False)
    other = TrainConfig(**{**cfg.__dict__, "arch": "dla-small", "epochs": 2})
    with pytest.raises(ValueError, match=r"last.pt: the checkpoint holds a different model: arch 'resnet18'"):
        train(other, resume=True, progress=False)


def test_a_readable_file_without_a_model_is_not_a_run_checkpoint(tmp_path):
    path = save_checkpoint({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a minicenternet training checkpoint"):
        load_run_checkpoint(path)
