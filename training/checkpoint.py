"""Checkpoints that let a run continue as if it had never stopped.

A checkpoint is a directory `checkpoints/step-0000123/` holding the weights
(safetensors), the optimizer and schedule state, and `state.json` (step,
data-loader state of every rank, counters, config). It is written under a
temporary name and renamed, so a run killed while saving leaves the previous
checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

CHECKPOINTS = "checkpoints"
WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "optimizer.pt", "state.json"
# `.step-N<_ASIDE><pid>`: where a re-save puts the old step-N until the new one has taken its place.
_ASIDE = ".old-"


def checkpoint_dir(output: str | Path, step: int) -> Path:
    return Path(output) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(output: str | Path) -> list[Path]:
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE).is_file() and p.name[5:].isdigit()]
    # By step, not by name: step-10000000 sorts before step-9999999 as text (pruning deleted the newest).
    return sorted(found, key=lambda p: int(p.name[5:]))


def restore_interrupted_save(output: str | Path) -> list[Path]:
    """Put back a checkpoint that a save of the same step had renamed aside (`save_checkpoint`) when the run
    was killed before the new one took its place, and delete the half-written ones of saves killed before
    their rename (each a copy of weights and optimizer); return what was restored. Call it before any new save."""
    root = Path(output) / CHECKPOINTS
    for unfinished in root.glob(".step-*.tmp-*") if root.is_dir() else []:
        shutil.rmtree(unfinished, ignore_errors=True)
    restored = []
    for aside in sorted(root.glob(f".step-*{_ASIDE}*")) if root.is_dir() else []:
        final = root / aside.name[1:].rsplit(_ASIDE, 1)[0]
        if not final.exists() and (aside / STATE).is_file():
            os.replace(aside, final)
            restored.append(final)
        else:  # the save took its place before the kill (or it is torn): a hidden copy, never to come back
            shutil.rmtree(aside, ignore_errors=True)
    return restored


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(output: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int = 2) -> Path:
    """Write step `step` atomically and keep only the newest `keep` checkpoints."""
    final = checkpoint_dir(output, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2, default=str))
    for name in (WEIGHTS, OPTIMIZER, STATE):  # on disk before the rename: a power loss then leaves no torn step-N
        _fsync(tmp / name)
    # A checkpoint of this step already there (a resumed run saving its last step again) is renamed out of
    # the way whole, then deleted: a kill meanwhile never leaves a half-deleted step-N that still looks complete.
    aside = final.with_name(f".{final.name}{_ASIDE}{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    device: torch.device) -> dict:
    """Restore weights, optimizer and schedule in place; return the saved state.json."""
    path = Path(path)
    load_model(model, str(path / WEIGHTS), device=str(device))
    saved = torch.load(path / OPTIMIZER, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return json.loads((path / STATE).read_text())
