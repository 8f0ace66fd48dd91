"""One loaded model of each kind per process, reused across a stage's pipeline runs.

The rewrite and caption stages run a few shards per pipeline run, so that a
failure keeps what finished. Each run's RunInference would load its model
afresh (seconds for a small LLM, minutes for a big VLM); this keeps the last
one of each kind, keyed by its config, and drops it before loading another
(RunInference may still hold it: a process that runs several model stages
keeps their models, so big models want a process per stage, as Dagster's
subprocess and k8s launchers give).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

T = TypeVar("T")
_LOADED: dict[str, tuple[str, Any]] = {}


def reused(kind: str, config: Any, load: Callable[[], T], files: list[str | None] | None = None) -> T:
    """The `kind` model loaded for this dataclass `config` and these model `files` fingerprints (a folder
    rebuilt in place under the same path is another model), loading it (and dropping any other) if needed."""
    key = json.dumps([asdict(config), files], sort_keys=True, default=str)
    if kind not in _LOADED or _LOADED[kind][0] != key:
        _LOADED.pop(kind, None)  # free the old one before loading its successor
        _LOADED[kind] = (key, load())
    return _LOADED[kind][1]
