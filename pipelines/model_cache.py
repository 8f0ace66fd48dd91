"""One loaded model of each kind per process, reused across a stage's pipeline runs.

The rewrite and caption stages run a few shards per pipeline run, so that a
failure keeps what finished. Each run's RunInference would load its model
afresh (seconds for a small LLM, minutes for a big VLM); this keeps the last
one of each kind, keyed by its config, and frees it before loading another.
A stage that starts frees the other stages' models (`keep_only`): run one
after another in one process (`clip-curation demo`, a notebook), the
rewriter's GPU memory would otherwise still be held while the captioner loads.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

T = TypeVar("T")
_LOADED: dict[str, tuple[str, Any]] = {}


def reused(kind: str, config: Any, load: Callable[[], T]) -> T:
    """The `kind` model loaded for this dataclass `config`, loading it (and dropping any other) if needed."""
    key = json.dumps(asdict(config), sort_keys=True, default=str)
    if kind not in _LOADED or _LOADED[kind][0] != key:
        _LOADED.pop(kind, None)  # free the old one before loading its successor
        _LOADED[kind] = (key, load())
    return _LOADED[kind][1]


def keep_only(*kinds: str) -> None:
    """Free every loaded model not of these kinds, and the GPU memory it held."""
    dropped = [kind for kind in _LOADED if kind not in kinds]
    for kind in dropped:
        del _LOADED[kind]
    if dropped:
        gc.collect()
        torch = sys.modules.get("torch")  # only where a model loaded it: never import torch for this
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
