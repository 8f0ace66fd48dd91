"""The `transformers` backend: batched `generate` with left padding, on CPU or one GPU.

Loads by hub id, local folder, or a GGUF file inside a folder (dequantised on
load). bf16 on CUDA, fp32 on CPU. Each request is sampled with its own seed
(see seeding.py), so a caption's rewrites do not depend on its batch: exactly in fp32 on CPU; in bf16 on
a GPU the batch's shape changes the kernels' rounding, and with it now and then a sampled token.

Batch size: on a GPU the rows of one `generate` call are what fits in free
memory (`bytes_per_row`: the KV cache, plus the larger of the prefill's
activations and one decode step's logits and sampler temporaries), so a big
GPU runs thousands of rows at once; `preferred_requests_per_call` tells the
caller that number, so it hands over enough requests to fill the batch.

Prefix reuse: prompts are batched in text order, so prompts that share a long
prefix (the rewrite stage's instruction and one example group) sit side by
side. The batch is cut into runs where that shared prefix ends (a run's
prefix: what all its rows share), each run's prefix is run once and kept, and
only each row's own suffix is prefilled. A row's cache is its run's prefix KV,
left-padded to the batch's longest prefix; padding (before the prefix and
between prefix and suffix) is masked out and positions follow the mask, so a
row sees exactly its own prompt.

`cache="static"` preallocates the KV cache (transformers' StaticCache) and,
with `compile=True` on CUDA, lets `generate` compile its decode step with
CUDA graphs, which removes the per-layer kernel-launch overhead of small models.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

from curation.engines.base import ChatTokenizer, Generation, SamplingParams, check_paired, eos_ids, until_eos
from curation.engines.seeding import (SAMPLER_PEAK_BYTES_PER_LOGIT, SeededSampler, drop_checkpoint_decoding,
                                      request_seeds)

log = logging.getLogger(__name__)

CPU_BATCH = 32
# Past this many rows a decode step is bound by memory bandwidth and grows linearly with the rows, so a
# larger batch gains no throughput and only delays the first results.
MAX_GPU_BATCH = 16384
CACHES = ("dynamic", "static")


def bytes_per_row(config: Any, dtype_bytes: int, prompt_tokens: int, new_tokens: int) -> int:
    """GPU memory one row of a `generate` batch needs at its peak, from the model config.

    KV cache: keys and values of every layer for prompt + new tokens (a growing
    cache briefly holds one layer twice while it concatenates). On top of it,
    whichever is larger: the prefill's activations (per prompt token the
    hidden states, q/k/v, the MLP's gate, up and product, and the boolean
    attention mask), or a decode step's logits (the model's output in its
    dtype, generate's fp32 copy) plus the sampler's temporaries.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden, vocab = text.num_hidden_layers, text.hidden_size, text.vocab_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    kv = 2 * layers * kv_heads * head_dim * (prompt_tokens + new_tokens) * dtype_bytes
    kv += kv // layers
    prefill = prompt_tokens * (5 * hidden + 2 * kv_heads * head_dim + 3 * intermediate) * dtype_bytes
    prefill += prompt_tokens * prompt_tokens
    decode = vocab * (dtype_bytes + 4 + SAMPLER_PEAK_BYTES_PER_LOGIT)
    return kv + max(prefill, decode)


def gpu_rows(config: Any, dtype_bytes: int, prompt_tokens: int, new_tokens: int, device: Any, *,
             memory_fraction: float, max_rows: int) -> int:
    """Rows per `generate` call that fit in `memory_fraction` of the device's free memory.

    Free counts what torch's caching allocator holds but does not use: the driver sees it as taken, yet
    the next batch gets it first. Without it every batch after the first would be sized by what the first
    left reserved, a fraction of the GPU.
    """
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_row = bytes_per_row(config, dtype_bytes, prompt_tokens, new_tokens)
    return int(max(1, min(max_rows, memory_fraction * free // per_row)))


class TransformersEngine(ChatTokenizer):
    """TextEngine over a causal LM loaded with `from_pretrained`."""

    def __init__(self, model: str, *, gguf_file: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | None = None, max_batch_size: int = MAX_GPU_BATCH, memory_fraction: float = 0.8,
                 max_prompt_tokens: int = 2048, cache: str = "dynamic", compile: bool = False,
                 enable_prefix_caching: bool = True, min_prefix_tokens: int = 16, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        if compile and cache != "static":
            raise ValueError("compile=True needs cache='static': a growing cache changes shape every step")
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads and self.device.type == "cpu":
            # Process-wide. On busy shared cores one thread avoids OpenMP barrier stalls that cost
            # several times the compute on the many small matmuls of decoding.
            torch.set_num_threads(threads)
        torch_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        load = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left", **load)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, **load).to(self.device).eval()
        self.name = f"transformers:{model}" + (f"/{gguf_file}" if gguf_file else "")
        if dropped := drop_checkpoint_decoding(self.model.generation_config):
            log.warning("%s: ignoring its generation_config's %s; outputs follow the stage's sampling settings "
                        "alone, as on vLLM", self.name, dropped)
        self.batch_size, self.max_batch_size, self.memory_fraction = batch_size, max_batch_size, memory_fraction
        self.max_prompt_tokens, self.cache, self.compile = max_prompt_tokens, cache, compile
        self.enable_prefix_caching, self.min_prefix_tokens = enable_prefix_caching, min_prefix_tokens
        self._prefix_cache: dict[tuple[int, ...], Any] = {}
        # Where a row's completion ends: EOS, or the padding generate writes after a row that ended on a stop string.
        self._eos = eos_ids(self.model.generation_config, self.tokenizer) | {self.tokenizer.pad_token_id}
        # Prompt tokens computed vs served from a reused prefix, for throughput reports.
        self.stats = {"prompt_tokens": 0, "prefix_reused_tokens": 0}

    def batch_size_for(self, prompt_tokens: int, new_tokens: int) -> int:
        """Rows per `generate` call: fixed if configured, else what fits in free GPU memory."""
        if self.batch_size:
            return self.batch_size
        if self.device.type != "cuda":
            return CPU_BATCH
        import torch

        dtype_bytes = torch.finfo(self.model.dtype).bits // 8
        return gpu_rows(self.model.config, dtype_bytes, prompt_tokens, new_tokens, self.device,
                        memory_fraction=self.memory_fraction, max_rows=self.max_batch_size)

    @property
    def sizes_by_prompt_length(self) -> bool:
        """Whether preferred_requests_per_call needs the prompt length: only when free GPU memory sizes the batch."""
        return not self.batch_size and self.device.type == "cuda"

    def preferred_requests_per_call(self, prompt_tokens: int, new_tokens: int) -> int:
        """One full batch: fewer requests leave the GPU idle, more only queue behind it."""
        return self.batch_size_for(min(prompt_tokens, self.max_prompt_tokens), new_tokens)

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                 stop: Sequence[str] = ()) -> list[Generation]:
        check_paired(prompts, params)
        if not prompts:
            return []
        # vLLM's max_model_len by default: the stages cap what they put in a prompt well under it (600 bytes
        # a caption), so a cut, which loses the instruction at the prompt's head, says those caps were raised.
        # A model with fewer positions than that cuts where its positions end, new tokens counted.
        limit = self.max_prompt_tokens
        if positions := getattr(self.model.config, "max_position_embeddings", None):
            limit = min(limit, positions - max(p.max_new_tokens for p in params))
            if limit <= 0:
                raise ValueError(f"max_new_tokens {max(p.max_new_tokens for p in params)} leaves no room for a "
                                 f"prompt in {self.name}'s {positions} positions")
        ids = self.prompt_ids(prompts)
        if cut := sum(len(row) > limit for row in ids):
            log.warning("%d of %d prompts are longer than %d tokens (max_prompt_tokens, or the model's positions "
                        "less max_new_tokens) and lose their head, the instruction: lower the caption caps",
                        cut, len(ids), limit)
            ids = [row[-limit:] for row in ids]
        seeds = request_seeds([p.seed for p in params])
        # Text order puts prompts with a shared prefix side by side (see the module docstring);
        # the results go back in request order.
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        size = self.batch_size_for(max(map(len, ids)), max(p.max_new_tokens for p in params))
        # Equal batches rather than full ones and a small remainder.
        size = math.ceil(len(order) / math.ceil(len(order) / size))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            outs = self._generate_batch([ids[i] for i in chunk], [params[i] for i in chunk],
                                        [seeds[i] for i in chunk], stop)
            for i, out in zip(chunk, outs):
                results[i] = out
        return results  # type: ignore[return-value]

    def _prefix_kv(self, prefix: tuple[int, ...]):
        """The KV cache of `prefix` for one row, computed once and kept for the next batches."""
        import torch

        cache = self._prefix_cache.get(prefix)
        if cache is None:
            if len(self._prefix_cache) >= 32:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            # Only the cache is wanted: skip the logits of every prefix position where the model allows it.
            keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True, **keep)
            cache = self._prefix_cache[prefix] = out.past_key_values
        return cache

    def _prefix_runs(self, rows: list[list[int]]) -> list[tuple[int, int, int]]:
        """(start, end, prefix length) of each run of rows sharing a prefix; prefix 0 where none is worth it.

        A run ends where neighbours share clearly less (by min_prefix_tokens)
        than the pair before or after them: in the rewrite stage, where one
        example group ends and the next begins, whose prompts share only the
        instruction. A row alone in its run reuses the longest prefix kept
        from earlier batches, if any.
        """
        if not self.enable_prefix_caching:
            return [(0, len(rows), 0)]
        least = self.min_prefix_tokens
        shared = [_common_prefix_length([a, b]) for a, b in zip(rows, rows[1:])]
        around = [max(shared[i - 1] if i else 0, shared[i + 1] if i + 1 < len(shared) else 0)
                  for i in range(len(shared))]
        bounds = [0] + [i + 1 for i, n in enumerate(shared) if n < least or n + least <= around[i]] + [len(rows)]
        # Per run: start, end, what its rows share, its shortest row. Two runs together share the least of
        # theirs and of what their neighbouring rows share, so a merge costs no pass over the rows again.
        runs: list[tuple[int, int, int, int]] = []
        for start, end in zip(bounds, bounds[1:]):
            block = rows[start:end]
            run = (start, end, _common_prefix_length(block), min(map(len, block)))
            if runs:
                before = runs[-1]
                merged = (before[0], end, min(before[2], run[2], shared[start - 1]), min(before[3], run[3]))
                if self._merge(self._reused(rows, before), self._reused(rows, run), before, run, merged):
                    runs[-1] = merged
                    continue
            runs.append(run)
        return [(run[0], run[1], self._reused(rows, run)) for run in runs]

    def _reused(self, rows: list[list[int]], run: tuple[int, int, int, int]) -> int:
        """The prefix a run reuses: what its rows share, less one token each to prefill (a lone row: the
        longest kept prefix it starts with); 0 under min_prefix_tokens."""
        start, end, common, shortest = run
        length = self._kept_prefix(rows[start]) if end - start == 1 else min(common, shortest - 1)
        return length if length >= self.min_prefix_tokens else 0

    def _merge(self, before_length: int, after_length: int, before: tuple[int, int, int, int],
               after: tuple[int, int, int, int], merged: tuple[int, int, int, int]) -> bool:
        """Whether two neighbouring runs go better as one. Repeated captions share more than the rest of
        their example group and cut it into runs of a few rows (600 in 4,096 demo prompts), each a prefix of
        its own to compute one row at a time, with lone rows between them that have no prefix at all. As
        one, they reuse their common prefix: worth it when the tokens that then get prefilled instead of
        reused, over both runs, are at most twice the longer prefix."""
        common = min(merged[2], merged[3] - 1)
        lost = sum(max(0, length - common) * (run[1] - run[0])
                   for run, length in ((before, before_length), (after, after_length)))
        return common >= self.min_prefix_tokens and lost <= 2 * max(before_length, after_length)

    def _kept_prefix(self, row: list[int]) -> int:
        """The length of the longest kept prefix KV that `row` starts with (and does not end with)."""
        fits = [len(key) for key in self._prefix_cache if len(key) < len(row) and tuple(row[:len(key)]) == key]
        return max(fits, default=0)

    def _batch_cache(self, rows: list[list[int]], runs: list[tuple[int, int, int]], width: int,
                     max_cache_len: int) -> dict[str, Any]:
        """generate's cache arguments: every row's run prefix KV, left-padded to `width` tokens."""
        import torch
        from transformers import DynamicCache, StaticCache

        if width == 0:
            return {"cache_implementation": "static"} if self.cache == "static" else {}
        sources = {(start, length): self._prefix_kv(tuple(rows[start][:length])) for start, _, length in runs if length}
        template = next(iter(sources.values()))
        cache = (StaticCache(config=self.model.config, max_cache_len=max_cache_len) if self.cache == "static"
                 else DynamicCache(config=self.model.config))
        positions = {"cache_position": torch.arange(width, device=self.device)}
        for index, layer in enumerate(template.layers):
            parts: dict[str, list] = {"keys": [], "values": []}
            for start, end, length in runs:
                for name in parts:
                    block = getattr(layer, name)
                    pad = block.new_zeros((end - start, block.shape[1], width - length, block.shape[3]))
                    own = getattr(sources[(start, length)].layers[index], name) if length else block[:, :, :0]
                    parts[name].append(torch.cat([pad, own.expand(end - start, -1, -1, -1)], dim=2))
            cache.update(torch.cat(parts["keys"]), torch.cat(parts["values"]), index, positions)
        return {"past_key_values": cache}

    def _generate_batch(self, rows: list[list[int]], params: list[SamplingParams], seeds: list[int],
                        stop: Sequence[str]) -> list[Generation]:
        import torch
        from transformers import CompileConfig, LogitsProcessorList

        runs = self._prefix_runs(rows)
        prefixed = [i for start, end, length in runs if length for i in range(start, end)]
        if prefixed and len(prefixed) < len(rows):
            # A row without a prefix holds its whole prompt in the part after the prefixes: beside prefixed
            # rows it would widen every row to the longest prefix plus the longest prompt. Its own call.
            bare = [i for start, end, length in runs if not length for i in range(start, end)]
            results: list[Generation | None] = [None] * len(rows)
            for part in (prefixed, bare):
                outs = self._generate_batch([rows[i] for i in part], [params[i] for i in part],
                                            [seeds[i] for i in part], stop)
                for i, out in zip(part, outs):
                    results[i] = out
            return results  # type: ignore[return-value]
        prefix = [length for start, end, length in runs for _ in range(start, end)]
        pad = self.tokenizer.pad_token_id
        head = max(prefix)
        tail = max(len(row) - n for row, n in zip(rows, prefix))
        max_new = max(p.max_new_tokens for p in params)
        if self.sizes_by_prompt_length:
            # Padding between prefix and suffix can make the rows wider than their longest prompt, which
            # sized the batch: then run it in pieces that fit, rather than run out of memory.
            fits = self.batch_size_for(head + tail, max_new)
            if len(rows) > fits:
                return [out for start in range(0, len(rows), fits) for out in self._generate_batch(
                    rows[start:start + fits], params[start:start + fits], seeds[start:start + fits], stop)]
        input_ids = [[pad] * (head - n) + row[:n] + [pad] * (tail - len(row) + n) + row[n:]
                     for row, n in zip(rows, prefix)]
        mask = [[0] * (head - n) + [1] * n + [0] * (tail - len(row) + n) + [1] * (len(row) - n)
                for row, n in zip(rows, prefix)]
        enc = {"input_ids": torch.tensor(input_ids, device=self.device),
               "attention_mask": torch.tensor(mask, device=self.device)}
        cache = self._batch_cache(rows, runs, head, head + tail + max_new)
        self.stats["prefix_reused_tokens"] += sum(prefix)
        self.stats["prompt_tokens"] += sum(map(len, rows))
        sampler = SeededSampler(seeds, [p.temperature for p in params], [p.top_p for p in params], max_new)
        extra = {"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}
        compiled = {"compile_config": CompileConfig()} if self.compile else {"disable_compile": True}
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                logits_processor=LogitsProcessorList([sampler]), pad_token_id=pad, **cache, **compiled, **extra)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        results = []
        for row, p, prompt, cached in zip(new, params, rows, prefix):
            tokens = until_eos(row[:p.max_new_tokens], self._eos)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0]
            results.append(Generation(text=text, prompt_tokens=len(prompt), completion_tokens=len(tokens),
                                      cached_tokens=cached))
        return results


def _common_prefix_length(rows: list[list[int]]) -> int:
    first, n = rows[0], min(map(len, rows))
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return n
