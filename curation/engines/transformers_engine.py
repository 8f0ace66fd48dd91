"""The `transformers` backend: batched `generate` with left padding, on CPU or one GPU.

Loads by hub id, local folder, or a GGUF file inside a folder (dequantised on
load). bf16 on CUDA, fp32 on CPU. Each request is sampled with its own seed
(see seeding.py), so a caption's rewrites do not depend on its batch.

Prefix reuse: prompts are batched in text order, so prompts that share a long
prefix (the rewrite stage's instruction and examples) land in one batch. The
batch's common token prefix is run once, its KV cache is repeated over the
rows, and only each row's own suffix is prefilled; the padding sits between
prefix and suffix, masked out, and positions follow the mask. On CPU this
removes most of the prefill work, as vLLM's prefix cache does on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from curation.engines.base import Generation, SamplingParams, check_paired
from curation.engines.seeding import SeededSampler

CPU_BATCH = 32
MAX_GPU_BATCH = 1024


class TransformersEngine:
    """TextEngine over a causal LM loaded with `from_pretrained`."""

    def __init__(self, model: str, *, gguf_file: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | None = None, max_prompt_tokens: int = 1024, compile: bool = False,
                 reuse_prefix: bool = True, min_prefix_tokens: int = 16, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        if compile:
            self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead")
        self.name = f"transformers:{model}" + (f"/{gguf_file}" if gguf_file else "")
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.reuse_prefix, self.min_prefix_tokens = reuse_prefix, min_prefix_tokens
        self._prefix_cache: dict[tuple[int, ...], object] = {}
        # Prompt tokens computed vs served from a reused prefix, for throughput reports.
        self.stats = {"prompt_tokens": 0, "prefix_reused_tokens": 0}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template, ending with the assistant's turn opened."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @property
    def special_tokens(self) -> list[str]:
        return list(self.tokenizer.all_special_tokens) + [str(t) for t in self.tokenizer.get_added_vocab()]

    def batch_size_for(self, prompt_tokens: int, new_tokens: int) -> int:
        """Rows per `generate` call: fixed if configured, else what fits in free GPU memory (KV cache bound)."""
        if self.batch_size:
            return self.batch_size
        if self.device.type != "cuda":
            return CPU_BATCH
        import torch

        config = self.model.config
        layers = config.num_hidden_layers
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        bytes_per = torch.finfo(self.model.dtype).bits // 8
        per_row = 2 * layers * kv_heads * head_dim * (prompt_tokens + new_tokens) * bytes_per
        # Logits of one step (vocab x fp32, plus the sampler's sorted copies) also scale with the batch.
        per_row += 4 * config.vocab_size * 4
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(MAX_GPU_BATCH, 0.6 * free // per_row)))

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                 stop: Sequence[str] = ()) -> list[Generation]:
        check_paired(prompts, params)
        if not prompts:
            return []
        ids = [row[-self.max_prompt_tokens:] for row in
               self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        # Text order puts prompts with a shared prefix side by side (see the module docstring);
        # the results go back in request order.
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        size = self.batch_size_for(max(map(len, ids)), max(p.max_new_tokens for p in params))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            outs = self._generate_batch([ids[i] for i in chunk], [params[i] for i in chunk], stop)
            for i, out in zip(chunk, outs):
                results[i] = out
        return results  # type: ignore[return-value]

    def _prefix_kv(self, prefix: tuple[int, ...]):
        """The KV cache of `prefix` for one row, computed once and kept for the next batches."""
        import torch

        cache = self._prefix_cache.get(prefix)
        if cache is None:
            if len(self._prefix_cache) >= 16:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)
            cache = self._prefix_cache[prefix] = out.past_key_values
        return cache

    def _generate_batch(self, rows: list[list[int]], params: list[SamplingParams], stop: Sequence[str]) -> list[Generation]:
        import copy

        import torch
        from transformers import LogitsProcessorList

        shared = _common_prefix_length(rows) if self.reuse_prefix else 0
        # Leave at least one token per row to prefill, and only bother for a real shared prefix.
        shared = max(0, min(shared, min(map(len, rows)) - 1))
        pad = self.tokenizer.pad_token_id
        width = max(map(len, rows)) - shared
        input_ids = [row[:shared] + [pad] * (width - len(row) + shared) + row[shared:] for row in rows]
        mask = [[1] * shared + [0] * (width - len(row) + shared) + [1] * (len(row) - shared) for row in rows]
        enc = {"input_ids": torch.tensor(input_ids, device=self.device),
               "attention_mask": torch.tensor(mask, device=self.device)}
        extra_cache = {}
        if shared >= self.min_prefix_tokens:
            cache = copy.deepcopy(self._prefix_kv(tuple(rows[0][:shared])))
            cache.batch_repeat_interleave(len(rows))
            extra_cache = {"past_key_values": cache}
            self.stats["prefix_reused_tokens"] += shared * len(rows)
        self.stats["prompt_tokens"] += sum(map(len, rows))
        max_new = max(p.max_new_tokens for p in params)
        sampler = SeededSampler([p.seed if p.seed is not None else 0 for p in params],
                                [p.temperature for p in params], [p.top_p for p in params])
        extra = {"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                logits_processor=LogitsProcessorList([sampler]), pad_token_id=pad, **extra_cache, **extra)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        eos = _eos_ids(self.model.generation_config, self.tokenizer)
        results = []
        for row, p, n_prompt in zip(new, params, prompt_tokens):
            tokens = _until_eos(row[:p.max_new_tokens], eos)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0] if s in text else text
            results.append(Generation(text=text, prompt_tokens=int(n_prompt), completion_tokens=len(tokens)))
        return results


def _common_prefix_length(rows: list[list[int]]) -> int:
    first, n = rows[0], min(map(len, rows))
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return n


def _eos_ids(generation_config, tokenizer) -> set[int]:
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The generated tokens up to (not including) the first end-of-sequence token."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens
