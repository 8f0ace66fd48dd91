"""The engine factory, and the transformers backend on a tiny saved model and its batch sizing. The openai
backend has its own file, test_engines_openai.py, as has the seeded sampler, test_seeding.py."""

import os

import pytest
import torch

from curation.engines import DEFAULT_MODEL, EngineSpec, SamplingParams, TextEngine, make_text_engine, resolve_model
from curation.engines.seeding import SAMPLER_PEAK_BYTES_PER_LOGIT, derive_seed
from tests.curation.tiny_llm import build_tiny_chat_model, tiny_model  # noqa: F401 - fixture

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def engine(tiny_model):  # noqa: F811
    return make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 4}))


def test_spec_and_default_model():
    with pytest.raises(ValueError, match="unknown engine"):
        EngineSpec(engine="llamafile")
    folder, gguf = resolve_model(DEFAULT_MODEL, None)
    assert gguf.endswith(".gguf") and (__import__("pathlib").Path(folder) / gguf).is_file()
    assert resolve_model("some/model", None) == ("some/model", None)
    with pytest.raises(FileNotFoundError, match=rf"no SmolLM2-135M-Instruct.Q8_0.gguf in .* it holds {gguf}"):
        resolve_model(DEFAULT_MODEL, "SmolLM2-135M-Instruct.Q8_0.gguf")  # loaded the Q4_1 in its place, unsaid
    assert resolve_model(DEFAULT_MODEL, gguf) == (folder, gguf)


def test_transformers_engine_loads_from_a_saved_folder(engine, tiny_model):  # noqa: F811
    assert isinstance(engine, TextEngine)
    assert engine.model.dtype == torch.float32 and engine.tokenizer.padding_side == "left"
    assert engine.has_chat_template and str(tiny_model) in engine.name
    prompts = [engine.format_chat([{"role": "user", "content": c}]) for c in ("a red circle", "two blue squares")]
    gens = engine.generate(prompts, [SamplingParams(max_new_tokens=5, seed=1), SamplingParams(max_new_tokens=3, seed=2)])
    assert [g.prompt_tokens for g in gens] == engine.count_tokens(prompts)
    assert gens[0].completion_tokens <= 5 and gens[1].completion_tokens <= 3


def test_a_checkpoints_own_decoding_settings_are_not_applied(tiny_model, tmp_path, monkeypatch, caplog):  # noqa: F811
    """A generation_config.json asking for a repetition penalty, n-gram blocking and beams (as hub checkpoints
    do) changes no output: the manifest records the stage's sampling settings, and vLLM applies only those."""
    import json
    import shutil

    from curation.engines import transformers_engine

    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_model, shipped)
    config = json.loads((shipped / "generation_config.json").read_text())
    config.update(repetition_penalty=1.5, no_repeat_ngram_size=2, num_beams=3)
    (shipped / "generation_config.json").write_text(json.dumps(config))
    prompts = ["a red circle on a plain white background", "two blue squares"]
    params = [SamplingParams(max_new_tokens=12, temperature=t, seed=7) for t in (0.0, 0.9)]

    def texts(path) -> list[str]:
        engine = make_text_engine(EngineSpec(model=str(path), options={"batch_size": 4}))
        return [g.text for p in params for g in engine.generate(prompts, [p] * len(prompts))]

    clean = texts(tiny_model)
    with caplog.at_level("WARNING"):
        assert texts(shipped) == clean
    assert "ignoring its generation_config's" in caplog.text and "'num_beams': 3" in caplog.text
    # What the penalty and the n-gram blocking would have done (beams crashed the per-row sampler outright).
    monkeypatch.setattr(transformers_engine, "drop_checkpoint_decoding",
                        lambda config: setattr(config, "num_beams", None) or {})
    assert texts(shipped) != clean


def test_a_prompt_past_max_prompt_tokens_is_cut_and_said(tiny_model, caplog):  # noqa: F811
    cut = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 4, "max_prompt_tokens": 8}))
    prompts = ["a red circle", "two blue squares on a plain white background, " * 3]
    with caplog.at_level("WARNING"):
        gens = cut.generate(prompts, [SamplingParams(max_new_tokens=2, seed=1)] * 2)
    assert [g.prompt_tokens for g in gens] == [min(n, 8) for n in cut.count_tokens(prompts)]
    assert "1 of 2 prompts are longer than 8 tokens" in caplog.text
    positions = cut.model.config.max_position_embeddings  # a model with fewer: cut where they end
    wide = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 4}))
    long_prompt = "two blue squares on a plain white background, " * positions
    (gen,) = wide.generate([long_prompt], [SamplingParams(max_new_tokens=4, seed=1)])
    assert gen.prompt_tokens == positions - 4
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        wide.generate(["a red circle"], [SamplingParams(max_new_tokens=positions, seed=1)])


def test_outputs_depend_on_the_request_only(engine):
    prompts = [engine.format_chat([{"role": "user", "content": f"caption number {i} of some rings"}]) for i in range(7)]
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=derive_seed("t", i)) for i in range(7)]
    together = [g.text for g in engine.generate(prompts, params)]  # two batches of 4 and 3
    assert together == [g.text for g in engine.generate(prompts, params)]
    alone = [engine.generate([p], [s])[0].text for p, s in zip(prompts[:3], params[:3])]
    assert alone == together[:3]
    reseeded = [engine.generate([prompts[0]], [SamplingParams(max_new_tokens=6, temperature=1.0, seed=s)])[0].text
                for s in range(6)]
    assert len(set(reseeded)) > 1


def _chat_prompts(engine, captions, system="rewrite image captions in other words " * 4):
    return [engine.format_chat([{"role": "system", "content": system}, {"role": "user", "content": c}])
            for c in captions]


MIXED = [SamplingParams(max_new_tokens=6, temperature=t, top_p=p, seed=i)
         for i, (t, p) in enumerate([(1.0, 0.9), (0.0, 1.0), (0.7, 1.0), (1.3, 0.5)])]


def test_shared_prefix_reuse_changes_nothing_but_work(tiny_model):  # noqa: F811
    engine = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 8}))
    prompts = _chat_prompts(engine, ("a red circle", "two blue squares on white", "some rings"))
    params = [SamplingParams(max_new_tokens=6, seed=i) for i in range(3)]
    reused = engine.generate(prompts, params)
    assert engine.stats["prefix_reused_tokens"] > 0
    assert all(0 < g.cached_tokens < g.prompt_tokens for g in reused)  # measured per request
    assert sum(g.cached_tokens for g in reused) == engine.stats["prefix_reused_tokens"]
    engine.enable_prefix_caching = False
    alone = engine.generate(prompts, params)
    assert [g.text for g in alone] == [g.text for g in reused] and all(g.cached_tokens == 0 for g in alone)


def test_each_prefix_group_in_a_batch_is_reused(tiny_model):  # noqa: F811
    """Two example groups in one batch: every row reuses its own group's prefix, not just what all share."""
    engine = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 8}))
    captions = ("a red circle", "two blue squares on white", "some rings")
    first = _chat_prompts(engine, captions, system="rewrite image captions in other words " * 4)
    second = _chat_prompts(engine, captions, system="rewrite image captions in other words " +
                           "Each image caption below is followed by a fresh rewording of it: " * 2)
    prompts = [p for pair in zip(first, second) for p in pair]  # interleaved: the engine regroups them
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i) for i in range(6)]
    gens = engine.generate(prompts, params)
    common = engine.count_tokens([os.path.commonprefix(prompts)])[0]
    assert all(g.cached_tokens > common + 10 for g in gens), [g.cached_tokens for g in gens]
    for cache in ("dynamic", "static"):
        plain = make_text_engine(EngineSpec(model=str(tiny_model), options={
            "batch_size": 8, "enable_prefix_caching": False, "cache": cache}))
        assert [g.text for g in plain.generate(prompts, params)] == [g.text for g in gens]


def test_a_prompt_without_a_shared_prefix_gets_its_own_call(tiny_model, monkeypatch):  # noqa: F811
    """Beside prefixed rows, a row with no prefix widened all of them to the longest prefix plus its own
    whole prompt (1.7x the KV cache and attention of a 224-token batch): it now runs apart, same outputs."""
    from curation.engines.transformers_engine import TransformersEngine

    engine = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 8}))
    grouped = _chat_prompts(engine, ("a red circle", "two blue squares on white", "some rings"),
                            system="rewrite image captions in other words " * 6)
    loner = engine.format_chat([{"role": "user", "content": "three green triangles on white " * 3}])
    prompts = [*grouped, loner]
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, seed=i) for i in range(4)]
    calls: list[tuple[int, int]] = []
    real = TransformersEngine._batch_cache

    def spy(self, rows, runs, width, cache_tokens):
        calls.append((len(rows), cache_tokens - 4))  # rows, and their padded width
        return real(self, rows, runs, width, cache_tokens)

    monkeypatch.setattr(TransformersEngine, "_batch_cache", spy)
    gens = engine.generate(prompts, params)
    lengths = [len(r) for r in engine.prompt_ids(prompts)]
    assert sorted(calls) == [(1, lengths[3]), (3, max(lengths[:3]))]  # nobody padded past their own prompt
    assert gens[3].cached_tokens == 0 and all(g.cached_tokens > 0 for g in gens[:3])
    alone = [engine.generate([p], [q])[0].text for p, q in zip(prompts, params)]
    assert [g.text for g in gens] == alone


@pytest.mark.parametrize("prefix", [True, False])
def test_static_cache_gives_the_dynamic_tokens(tiny_model, prefix):  # noqa: F811
    """cache='static' (the path compiled on a GPU) samples exactly what the growing cache does."""
    spec = {"batch_size": 4, "enable_prefix_caching": prefix}
    dynamic = make_text_engine(EngineSpec(model=str(tiny_model), options=spec))
    static = make_text_engine(EngineSpec(model=str(tiny_model), options=spec | {"cache": "static"}))
    prompts = _chat_prompts(dynamic, ("a red circle", "two blue squares on white", "some rings", "x"))
    expected = [g.text for g in dynamic.generate(prompts, MIXED)]
    got = static.generate(prompts, MIXED)
    assert [g.text for g in got] == expected and len(set(expected)) > 1
    assert (sum(g.cached_tokens for g in got) > 0) == prefix
    with pytest.raises(ValueError, match="needs cache='static'"):
        make_text_engine(EngineSpec(model=str(tiny_model), options={"compile": True}))


def test_requests_without_a_seed_get_fresh_ones(engine):
    prompt = engine.format_chat([{"role": "user", "content": "a red circle"}])
    unseeded = [SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0)] * 4
    texts = [g.text for g in engine.generate([prompt] * 4, unseeded)]
    assert len(set(texts)) > 1  # seed 0 for all would give four identical samples
    seeded = [SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=9)] * 4
    assert len({g.text for g in engine.generate([prompt] * 4, seeded)}) == 1


SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152)


def test_gpu_batch_size_follows_free_memory(monkeypatch, engine):
    from transformers import LlamaConfig

    from curation.engines import transformers_engine as te

    config = LlamaConfig(**SMOLLM2_135M)
    per_row = te.bytes_per_row(config, 2, 160, 64)
    kv = 2 * 30 * 3 * 64 * (160 + 64) * 2
    # Honest: the KV cache plus at least ~40 bytes per logit for the sampler's fp32 temporaries.
    assert per_row >= kv + 40 * 49152 and per_row == kv + kv // 30 + 49152 * (2 + 4 + SAMPLER_PEAK_BYTES_PER_LOGIT)
    assert te.bytes_per_row(config, 2, 1024, 64) > per_row  # longer prompts: more KV, bigger prefill
    free = {"bytes": 139 * 2 ** 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 * 2 ** 30))
    rows = te.gpu_rows(config, 2, 160, 64, "cuda:0", memory_fraction=0.8, max_rows=10 ** 6)
    assert rows == int(0.8 * 139 * 2 ** 30 // per_row) and rows > 10_000  # far past the old 1024 cap
    free["bytes"] //= 2
    assert te.gpu_rows(config, 2, 160, 64, "cuda:0", memory_fraction=0.8, max_rows=10 ** 6) in (rows // 2, rows // 2 - 1)
    assert te.gpu_rows(config, 2, 160, 64, "cuda:0", memory_fraction=0.8, max_rows=4096) == 4096
    free["bytes"] = 1
    assert te.gpu_rows(config, 2, 160, 64, "cuda:0", memory_fraction=0.8, max_rows=4096) == 1
    # What the caching allocator keeps reserved after a batch is the next batch's to use.
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 100 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 ** 30)
    assert te.gpu_rows(config, 2, 160, 64, "cuda:0", memory_fraction=0.8, max_rows=10 ** 6) == int(
        0.8 * (1 + 99 * 2 ** 30) // per_row)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    # The engine asks the same question of its own model when it sits on a GPU, and tells callers.
    free["bytes"] = 2 ** 30
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(engine, "batch_size", 4)
    assert not engine.sizes_by_prompt_length  # a fixed batch size: callers need not count prompt tokens
    monkeypatch.setattr(engine, "batch_size", None)
    assert engine.sizes_by_prompt_length
    expected = int(0.8 * 2 ** 30 // te.bytes_per_row(engine.model.config, 4, 100, 20))
    assert engine.batch_size_for(100, 20) == engine.preferred_requests_per_call(100, 20) == expected


def test_stop_strings_cut_the_completion(engine):
    prompt = "a red circle =>"
    full = engine.generate([prompt], [SamplingParams(max_new_tokens=12, seed=5)])[0].text
    stop = next((ch for ch in full[1:] if ch.strip()), None)
    if stop is None:
        pytest.skip("the random model wrote only spaces")
    cut = engine.generate([prompt], [SamplingParams(max_new_tokens=12, seed=5)], stop=[stop])[0].text
    assert stop not in cut and full.startswith(cut)


def test_completion_tokens_of_a_request_do_not_depend_on_its_batch(tiny_model):  # noqa: F811
    """A row that ends on a stop string is padded until the batch ends: padding is not part of its completion."""
    engine = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 8}))
    assert engine.tokenizer.pad_token_id != engine.tokenizer.eos_token_id
    prompts = [f"a red circle {i} =>" for i in range(6)]
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, seed=s) for s in range(6)]
    full = engine.generate(prompts, params)
    stop = next(ch for g in full for ch in g.text[1:] if ch.strip())
    batch = engine.generate(prompts, params, stop=[stop])
    alone = [engine.generate([p], [q], stop=[stop])[0] for p, q in zip(prompts, params)]
    assert [g.text for g in batch] == [g.text for g in alone]
    assert [g.completion_tokens for g in batch] == [g.completion_tokens for g in alone]
    assert any(g.completion_tokens < 20 for g in batch)


def test_every_backend_feeds_a_prompt_its_bos_once():
    """A base model's completion prompt gets the BOS its tokenizer adds; text that starts with it (a chat
    template writing BOS itself) is not given a second."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from curation.engines.base import ChatTokenizer

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "red": 3, "circle": 4, "=>": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    with_bos = ChatTokenizer()
    with_bos.tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    assert with_bos.prompt_ids(["a red circle =>", "<s> a red circle =>"]) == [[0, 2, 3, 4, 5]] * 2
    raw.post_processor = None
    without = ChatTokenizer()
    without.tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    assert without.prompt_ids(["a red circle =>"]) == [[2, 3, 4, 5]]


def test_gpu_batches_widened_by_prefix_padding_run_in_pieces_that_fit(tiny_model, monkeypatch):  # noqa: F811
    """Rows of two prefix groups padded to the longest prefix plus the longest suffix are wider than the
    longest prompt the batch was sized for: the engine splits such a batch, with the same outputs."""
    from curation.engines.transformers_engine import TransformersEngine

    engine = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 8}))
    short, long = ("a red circle", "some rings", "two blue squares"), "two blue squares on white " * 4
    prompts = (_chat_prompts(engine, short, system="rewrite image captions in other words " * 6)
               + _chat_prompts(engine, (long, *short[:2]), system="rewrite image captions"))
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, seed=i) for i in range(6)]
    expected = [g.text for g in engine.generate(prompts, params)]
    longest = max(map(len, engine.prompt_ids(prompts)))
    widths: list[tuple[int, int]] = []
    real = TransformersEngine._batch_cache

    def spy(self, rows, runs, width, cache_tokens):
        widths.append((len(rows), cache_tokens - 4))  # the padded prompt width: prefix, padding, suffix
        return real(self, rows, runs, width, cache_tokens)

    budget = 6 * (longest + 4)  # rows x tokens that "fit": the longest prompt's six rows, and no more
    monkeypatch.setattr(TransformersEngine, "_batch_cache", spy)
    monkeypatch.setattr(TransformersEngine, "sizes_by_prompt_length", property(lambda self: True))
    monkeypatch.setattr(TransformersEngine, "batch_size_for", lambda self, tokens, new: max(1, budget // (tokens + new)))
    rows = sorted(engine.prompt_ids(prompts), key=lambda r: engine.tokenizer.decode(r))
    prefix = [n for start, end, n in engine._prefix_runs(rows) for _ in range(start, end)]
    assert max(prefix) + max(len(r) - n for r, n in zip(rows, prefix)) > longest  # one batch of six: too wide
    assert [g.text for g in engine.generate(prompts, params)] == expected
    assert len(widths) > 1 and sum(n for n, _ in widths) == 6
    assert all(rows * (width + 4) <= budget for rows, width in widths)


def test_model_without_chat_template_uses_completion(tmp_path):
    from curation.rewrite import RewriteConfig, Rewriter

    path = build_tiny_chat_model(tmp_path / "base", with_chat_template=False)
    engine = make_text_engine(EngineSpec(model=str(path)))
    assert not engine.has_chat_template
    assert Rewriter(engine, RewriteConfig()).format_name == "completion"
    with pytest.raises(ValueError, match="no chat template"):
        Rewriter(engine, RewriteConfig(prompt_format="chat"))


@cuda
def test_static_compiled_decoding_on_cuda_matches_the_dynamic_path(tiny_model):  # noqa: F811
    spec = EngineSpec(model=str(tiny_model), dtype="float32", options={"batch_size": 4})
    dynamic = make_text_engine(spec)
    compiled = make_text_engine(EngineSpec(model=str(tiny_model), dtype="float32",
                                           options={"batch_size": 4, "cache": "static", "compile": True}))
    prompts = _chat_prompts(dynamic, ("a red circle", "two blue squares on white", "some rings", "x"))
    greedy = [SamplingParams(max_new_tokens=8, temperature=0.0, seed=i) for i in range(4)]
    expected = [g.text for g in dynamic.generate(prompts, greedy)]
    assert [g.text for g in compiled.generate(prompts, greedy)] == expected


# A Gemma-style template: no system role, and (as Llama 3's) today's date unless given one.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<model date={{ date_string | default('today') }}>{% endif %}")


def test_a_template_without_a_system_role_gets_the_instruction_in_the_first_user_turn(tiny_model):  # noqa: F811
    from transformers import AutoTokenizer

    from curation.engines.base import TEMPLATE_DATE, ChatTokenizer

    class Chat(ChatTokenizer):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    Chat.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    messages = [{"role": "system", "content": "Rewrite the caption."}, {"role": "user", "content": "a red circle"},
                {"role": "assistant", "content": "one red ring"}, {"role": "user", "content": "two blue squares"}]
    assert Chat().format_chat(messages) == (
        "<user>Rewrite the caption.\n\na red circle</user><assistant>one red ring</assistant>"
        f"<user>two blue squares</user><model date={TEMPLATE_DATE}>")
