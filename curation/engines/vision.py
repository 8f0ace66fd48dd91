"""Pick a captioner backend by configuration: the vision twin of `make_text_engine`.

It takes the same `EngineSpec` as the text side (engine, model, dtype,
options) and imports the backend only when it is chosen, so the CPU install
never needs vllm or a server client.
"""

from __future__ import annotations

from curation.engines import DEFAULT_MODEL, EngineSpec, backend
from curation.engines.base import VisionEngine


def make_vision_engine(spec: EngineSpec) -> VisionEngine:
    """Build the captioner that `spec` names. `spec.model` must name a VLM (hub id or local folder)."""
    if not spec.model or spec.model == DEFAULT_MODEL:
        raise ValueError("a captioner needs a vision-language model: pass its hub id or local folder "
                         "(the default text model cannot see images)")
    if spec.gguf_file:
        raise ValueError("GGUF files are not supported for captioners; pass a transformers model folder")
    fixed = {} if spec.engine == "openai" else {"dtype": spec.dtype}
    return backend("vision", spec.engine)(spec.model, **fixed, **dict(spec.options))
