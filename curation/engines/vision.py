"""Pick a captioner backend by configuration: the vision twin of `make_text_engine`.

It takes the same `EngineSpec` as the text side (engine, model, dtype,
options) and imports the backend only when it is chosen, so the CPU install
never needs vllm or a server client.
"""

from __future__ import annotations

from curation.engines import DEFAULT_MODEL, EngineSpec
from curation.engines.base import VisionEngine


def make_vision_engine(spec: EngineSpec) -> VisionEngine:
    """Build the captioner that `spec` names. `spec.model` must name a VLM (hub id or local folder)."""
    if not spec.model or spec.model == DEFAULT_MODEL:
        raise ValueError("a captioner needs a vision-language model: pass its hub id or local folder "
                         "(the default text model cannot see images)")
    if spec.gguf_file:
        raise ValueError("GGUF files are not supported for captioners; pass a transformers model folder")
    options = dict(spec.options)
    if spec.engine == "transformers":
        from curation.engines.vision_transformers import TransformersVisionEngine
        return TransformersVisionEngine(spec.model, dtype=spec.dtype, **options)
    if spec.engine == "vllm":
        from curation.engines.vision_vllm import VLLMVisionEngine
        return VLLMVisionEngine(spec.model, dtype=spec.dtype, **options)
    from curation.engines.vision_openai import OpenAIVisionEngine
    return OpenAIVisionEngine(spec.model, **options)
