"""Checkpoint files: written whole or not at all, a step saved again replaces the old one, only the newest kept."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from training.checkpoint import (STATE, checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint,
                                 restore_interrupted_save, save_checkpoint)


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_saving_a_step_again_replaces_it_and_leaves_nothing_behind(tmp_path, monkeypatch):
    first, second = _parts(0), _parts(1)
    save_checkpoint(tmp_path, 5, *first, {"run": "first"})
    deleted = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # by the time anything is deleted, step 5 is the new, complete one
        if Path(path).exists():
            deleted.append(json.loads((tmp_path / "checkpoints" / "step-0000005" / "state.json").read_text())["run"])
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("training.checkpoint.shutil.rmtree", rmtree)
    path = save_checkpoint(tmp_path, 5, *second, {"run": "second"})
    assert deleted and set(deleted) == {"second"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000005"]
    model, optimizer, scheduler = _parts(2)
    assert load_checkpoint(path, model, optimizer, scheduler, torch.device("cpu"))["run"] == "second"
    assert torch.equal(model.weight, second[0].weight)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    parts = _parts(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, *parts, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]


def test_a_checkpoint_renamed_aside_by_a_killed_save_is_put_back(tmp_path, monkeypatch):
    """Killed between the two renames of a re-save: the old step-5 lies hidden, and is the newest again."""
    parts = _parts(0)
    save_checkpoint(tmp_path, 4, *parts, {"run": "four"})
    save_checkpoint(tmp_path, 5, *parts, {"run": "five"})
    real_replace = os.replace

    def killed_after_renaming_aside(src, dst):
        real_replace(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr("training.checkpoint.os.replace", killed_after_renaming_aside)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, *parts, {"run": "five again"})
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004"]
    assert [p.name for p in restore_interrupted_save(tmp_path)] == ["step-0000005"]
    assert json.loads((list_checkpoints(tmp_path)[-1] / "state.json").read_text())["run"] == "five"


def test_a_save_killed_before_its_rename_leaves_nothing_behind(tmp_path, monkeypatch):
    """Its half-written `.step-N.tmp-<pid>` (a full copy of weights and optimizer) goes at the next start."""
    parts = _parts(0)
    save_checkpoint(tmp_path, 4, *parts, {"run": "four"})

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("training.checkpoint.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, *parts, {"run": "five"})
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").glob(".step-*.tmp-*")] == [".step-0000005.tmp-" + str(os.getpid())]
    assert restore_interrupted_save(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004"]


def test_a_copy_left_aside_after_its_save_took_its_place_is_deleted_not_restored_later(tmp_path, monkeypatch):
    """Killed after the new step-5 took its place, before the old copy was deleted: that copy is removed at
    the next start. Kept, it came back as step-5 once pruning had removed the real one."""
    parts = _parts(0)
    save_checkpoint(tmp_path, 5, *parts, {"run": "five"})
    real_rmtree = shutil.rmtree

    def killed_deleting_the_old_copy(path, *args, **kwargs):
        if ".old-" in str(path) and Path(path).exists():
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("training.checkpoint.shutil.rmtree", killed_deleting_the_old_copy)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, *parts, {"run": "five again"})
    monkeypatch.undo()
    assert any(".old-" in p.name for p in (tmp_path / "checkpoints").iterdir())
    assert restore_interrupted_save(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000005"]
    assert json.loads((tmp_path / "checkpoints" / "step-0000005" / "state.json").read_text())["run"] == "five again"


def test_checkpoints_are_ordered_by_step_past_seven_digits(tmp_path):
    for step in (9_999_000, 9_999_999, 10_000_000):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
        (checkpoint_dir(tmp_path, step) / STATE).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-9999000", "step-9999999", "step-10000000"]
    assert latest_checkpoint(tmp_path).name == "step-10000000"
