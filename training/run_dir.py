"""A run belongs to its output directory: what marks it, what --overwrite may clear, what a resume continues.

Resuming needs the same settings and the same input shards (the manifest's
sha256s) and online-curation probabilities; anything else would mix two runs
in one folder, so it is refused with what differs. `--overwrite` clears an
earlier run, but never a folder that holds no trainer output or one that
holds what this run reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from curation.shards import OVERWRITE_SENTINEL
from training.checkpoint import CHECKPOINTS, STATE, latest_checkpoint, list_checkpoints
from training.config import RunMismatch, TrainConfig, resolve_precision, resume_mismatches
from training.data import DATA_ORDER
from training.metrics_log import METRICS_CSV

TRAIN_CONFIG = "train_config.json"
# Written first into every output, so a run that died before anything else still marks the folder as its own.
RUN_MARKER = ".clip-curation-train"


def is_trainer_output(output: Path) -> bool:
    """Whether `output` holds what this trainer writes, so that --overwrite may delete it.

    A run writes RUN_MARKER before anything else (its tokenizer, train_config.json, metrics.csv,
    checkpoints/), so one that died early is still recognised, while a folder of someone's files,
    a downloaded tokenizer among them, never is.
    """
    if any((output / name).exists() for name in (RUN_MARKER, TRAIN_CONFIG, CHECKPOINTS, METRICS_CSV)):
        return True
    return not any(path.name != OVERWRITE_SENTINEL for path in output.iterdir())  # the orchestrator's, not a file


def _read_paths(config: TrainConfig) -> list[tuple[str, Path]]:
    """(flag, resolved path) of each local file or folder the run reads."""
    named = [("input", config.input), ("eval", config.eval), ("entry_counts", config.entry_counts),
             ("classes", config.classes_path), ("tokenizer", config.tokenizer)]
    return [(flag, Path(path).resolve()) for flag, path in named if path and Path(path).exists()]


def prepare_output(config: TrainConfig, output: Path) -> None:
    """Clear an earlier run on --overwrite (never what this run reads); refuse to start a second run beside
    an earlier one's checkpoints."""
    if config.overwrite and output.exists():
        if not is_trainer_output(output):
            raise ValueError(f"--overwrite would delete {output}, which holds no trainer output; "
                             f"choose another --output")
        for flag, path in _read_paths(config):
            if path == output.resolve() or output.resolve() in path.parents:
                raise ValueError(f"--overwrite would delete {output}, which holds the --{flag} this run reads "
                                 f"({path}); choose another --output")
        # The marker last: a kill mid-delete leaves a folder --overwrite still recognises as a run's.
        for path in output.iterdir():
            if path.name != RUN_MARKER:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        # The folder itself stays: it may be a link to another disk, which rmtree refuses (after the rest).
        (output / RUN_MARKER).unlink(missing_ok=True)
    elif not config.resume and list_checkpoints(output):
        raise RunMismatch(f"{output} holds checkpoints of an earlier run, which a later resume would mix with this "
                         f"one's; pass --overwrite to start over there, or choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    (output / RUN_MARKER).touch()


def curation_fingerprint(entry_p) -> str | None:
    """One hash of the per-entry keep probabilities online curation at --t trains with (None: each row's
    keep_prob, which the input fingerprint covers): the entry counts are read by path, and counts rebuilt
    in place under an unchanged input would change the keep probabilities of a resumed run silently."""
    return None if entry_p is None else hashlib.sha256(entry_p.astype("<f8").tobytes()).hexdigest()


def resume_checkpoint(config: TrainConfig, output: Path, fingerprint: str, device: torch.device,
                  curation: str | None) -> Path | None:
    """The checkpoint to continue from, after checking it belongs to the same run on the same data.
    `curation` is `curation_fingerprint` of this run's online-curation probabilities."""
    checkpoint = latest_checkpoint(output) if config.resume else None
    if checkpoint is None:
        return None
    saved = json.loads((checkpoint / STATE).read_text())
    if "input" not in saved:  # written before input fingerprints (and the loader's per-reader state) existed
        raise RunMismatch(f"{checkpoint} predates input fingerprints: whether it was trained on {config.input} "
                         f"cannot be checked, and its data-loader state is of an older format. Pass --overwrite "
                         f"to start over there, or use another --output.")
    if saved.get("data_order", 1) != DATA_ORDER:
        raise RunMismatch(f"{checkpoint} was written by a version that ordered the data otherwise (data order "
                         f"{saved.get('data_order', 1)}, this one is {DATA_ORDER}); its data-loader state would "
                         f"repeat or skip rows here. Pass --overwrite to start over there, or use another --output.")
    changed = resume_mismatches(saved["config"], config, diverged=saved.get("diverged", False))
    if "precision" in changed and (resolve_precision(saved["config"]["precision"], device.type)
                                   == resolve_precision(config.precision, device.type)):
        changed.remove("precision")  # "auto" and what it resolves to here train alike
    if saved["input"] != fingerprint:
        changed.append(f"input shards (the contents of {config.input})")
    if saved.get("curation", curation) != curation:  # a checkpoint from before it was recorded is not judged
        changed.append("online-curation probabilities (the entry counts read for --t, rebuilt since)")
    if changed:
        raise RunMismatch(f"{output} holds a run with other settings or data ({', '.join(changed)} differ); resuming "
                         f"would mix two runs. Pass --overwrite to start over there, or use another --output."
                         + _before_own_settings(saved["config"], changed))
    return checkpoint


def _before_own_settings(saved: dict, changed: list[str]) -> str:
    """How to continue a run made before each optimizer took its paper's settings (beta2 and eps were
    AdamW's CLIP recipe for all three, and Stable-SPAM ran its 4-bit set): its checkpoint's optimizer
    state holds those, and loads only into an optimizer built with them."""
    if "spam_gamma1" in saved or not {"beta2", "eps"} & set(changed):
        return ""
    flags = "--beta2 0.98 --eps 1e-6" + {"stable_spam": " --spam_gamma1 0.7 --spam_gamma2 0.9 "
                                                         "--momentum_reset_interval 500"}.get(saved.get("optimizer"), "")
    return f" It was made by a version whose optimizer settings were others; to continue it, pass {flags}."


def trained_to_the_end(config: TrainConfig, output: Path) -> bool:
    """Whether the run would resume at a checkpoint that already holds every step: only the final save and
    evaluation are left, so hashing every input byte again (hours on a large pool, on each rerun of a
    scheduled build) buys nothing. The sizes are still checked, and the manifest's sha256s still name the
    data: a checkpoint of other data is refused as another run (resume_checkpoint)."""
    checkpoint = latest_checkpoint(output) if config.resume and not config.overwrite else None
    return checkpoint is not None and json.loads((checkpoint / STATE).read_text())["step"] >= config.steps
