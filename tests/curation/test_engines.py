"""The engine factory, the transformers backend on a tiny saved model, seeded sampling, a dead server."""

import socket

import numpy as np
import pytest
import torch

from curation.engines import DEFAULT_MODEL, EngineSpec, SamplingParams, TextEngine, make_text_engine, resolve_model
from curation.engines.recovery import EngineFailure, generate_with_recovery
from curation.engines.seeding import SeededSampler, derive_seed, uniforms
from tests.curation.tiny_llm import build_tiny_chat_model, tiny_model  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def engine(tiny_model):  # noqa: F811
    return make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 4}))


def test_spec_and_default_model():
    with pytest.raises(ValueError, match="unknown engine"):
        EngineSpec(engine="llamafile")
    folder, gguf = resolve_model(DEFAULT_MODEL, None)
    assert gguf.endswith(".gguf") and (__import__("pathlib").Path(folder) / gguf).is_file()
    assert resolve_model("some/model", None) == ("some/model", None)


def test_transformers_engine_loads_from_a_saved_folder(engine, tiny_model):  # noqa: F811
    assert isinstance(engine, TextEngine)
    assert engine.model.dtype == torch.float32 and engine.tokenizer.padding_side == "left"
    assert engine.has_chat_template and str(tiny_model) in engine.name
    prompts = [engine.format_chat([{"role": "user", "content": c}]) for c in ("a red circle", "two blue squares")]
    gens = engine.generate(prompts, [SamplingParams(max_new_tokens=5, seed=1), SamplingParams(max_new_tokens=3, seed=2)])
    assert [g.prompt_tokens for g in gens] == engine.count_tokens(prompts)
    assert gens[0].completion_tokens <= 5 and gens[1].completion_tokens <= 3


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


def test_shared_prefix_reuse_changes_nothing_but_work(tiny_model):  # noqa: F811
    engine = make_text_engine(EngineSpec(model=str(tiny_model), options={"batch_size": 8}))
    prefix = [{"role": "system", "content": "rewrite image captions in other words " * 4}]
    prompts = [engine.format_chat(prefix + [{"role": "user", "content": c}])
               for c in ("a red circle", "two blue squares on white", "some rings")]
    params = [SamplingParams(max_new_tokens=6, seed=i) for i in range(3)]
    reused = engine.generate(prompts, params)
    assert engine.stats["prefix_reused_tokens"] > 0
    engine.reuse_prefix = False
    assert [g.text for g in engine.generate(prompts, params)] == [g.text for g in reused]


def test_stop_strings_cut_the_completion(engine):
    prompt = "a red circle =>"
    full = engine.generate([prompt], [SamplingParams(max_new_tokens=12, seed=5)])[0].text
    stop = next((ch for ch in full[1:] if ch.strip()), None)
    if stop is None:
        pytest.skip("the random model wrote only spaces")
    cut = engine.generate([prompt], [SamplingParams(max_new_tokens=12, seed=5)], stop=[stop])[0].text
    assert stop not in cut and full.startswith(cut)


def test_model_without_chat_template_uses_completion(tmp_path):
    from curation.rewrite import RewriteConfig, Rewriter

    path = build_tiny_chat_model(tmp_path / "base", with_chat_template=False)
    engine = make_text_engine(EngineSpec(model=str(path)))
    assert not engine.has_chat_template
    assert Rewriter(engine, RewriteConfig()).format_name == "completion"
    with pytest.raises(ValueError, match="no chat template"):
        Rewriter(engine, RewriteConfig(prompt_format="chat"))


def test_seeded_sampler_top_p_and_greedy():
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    picks = []
    for seed in range(40):
        sampler = SeededSampler([seed, seed, seed], [1.0, 1.0, 0.0], [0.5, 1.0, 1.0])
        out = sampler(None, scores)
        picks.append(out.argmax(dim=1).tolist())
        assert torch.isinf(out).sum() == 2 * 3  # one finite score per row
    picks = np.array(picks)
    assert (picks[:, 0] == 0).all()  # top_p 0.5 keeps only the 0.7 token
    assert set(picks[:, 1]) == {0, 1, 2}  # full distribution
    assert (picks[:, 2] == 2).all()  # temperature 0 is greedy
    u = uniforms(np.array([1, 2, 3], dtype=np.uint64), 0)
    assert ((0 <= u) & (u < 1)).all() and len(set(u)) == 3
    assert (uniforms(np.array([1], dtype=np.uint64), 4) == uniforms(np.array([1], dtype=np.uint64), 4)).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_engine_reports_a_dead_server():
    engine = make_text_engine(EngineSpec(engine="openai", model="none", options={
        "base_url": f"http://127.0.0.1:{_free_port()}/v1", "retries": 1, "backoff_s": 0.01, "timeout": 2}))
    assert not engine.has_chat_template  # no local tokenizer named "none"
    with pytest.raises(EngineFailure, match="failed on a request"):
        generate_with_recovery(engine, ["a"], [SamplingParams(seed=1)], retries=1, backoff_s=0.01)
