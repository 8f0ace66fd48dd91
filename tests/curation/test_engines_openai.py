"""The openai backend against a fake local server: concurrency, timeouts, one retry layer, a failing request
named, the token ids it sends, a dead server, the server address."""

import pytest

from curation.engines import EngineSpec, SamplingParams, make_text_engine
from curation.engines.recovery import EngineFailure, generate_with_recovery
from tests.curation.servers import FakeCompletionsServer, free_port


def _openai(base_url: str, **options):
    return make_text_engine(EngineSpec(engine="openai", model="served", options={"base_url": base_url, **options}))


def _seeded(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens=4, seed=i) for i in range(n)]


def test_openai_engine_sends_requests_concurrently():
    # The server holds every request until 8 are in flight together; a serial client would be answered 500.
    with FakeCompletionsServer(gather=8) as server:
        engine = _openai(server.base_url, concurrency=8, retries=0, timeout=60)
        gens = generate_with_recovery(engine, [f"caption {i}" for i in range(8)], _seeded(8))
    assert server.max_in_flight == 8
    assert [g.text for g in gens] == [f" rewrite of caption {i}" for i in range(8)]
    assert all(g.prompt_tokens == 2 and g.completion_tokens == 3 and g.cached_tokens == 1 for g in gens)


def test_openai_engine_retries_a_request_that_timed_out():
    with FakeCompletionsServer(stall={"slow one": 3.0}) as server:
        engine = _openai(server.base_url, timeout=0.5, retries=1)
        gens = generate_with_recovery(engine, ["slow one", "fast one"], _seeded(2))
    assert server.requests == {"slow one": 2, "fast one": 1}  # only the timed-out request went again
    assert [g.text for g in gens] == [" rewrite of slow one", " rewrite of fast one"]


def test_openai_engine_has_one_retry_layer():
    """A failing server sees each request 1 + retries times: the recovery layer neither retries nor splits."""
    with FakeCompletionsServer(status=503) as server:
        engine = _openai(server.base_url, retries=2, timeout=5)
        with pytest.raises(EngineFailure, match="engine's own retries, in a call of 4 request"):
            generate_with_recovery(engine, ["a", "b", "c", "d"], _seeded(4), retries=2, backoff_s=0)
    assert server.requests == {"a": 3, "b": 3, "c": 3, "d": 3}


def test_openai_engine_names_the_failing_request():
    """Every request of a call goes at once: the error says which one failed for good, and how many did."""
    from curation.engines.openai_engine import RequestsFailed

    prompts = [f"caption {i}" for i in range(6)]
    with FakeCompletionsServer(fail_on=("caption 3", "caption 5")) as server:
        engine = _openai(server.base_url, concurrency=8, retries=1, timeout=5)
        with pytest.raises(EngineFailure, match=r"2 of 6 requests failed; first: request 3 \(prompt ending "
                                                r"'caption 3'\): InternalServerError") as caught:
            generate_with_recovery(engine, prompts, _seeded(6))
    assert caught.value.__cause__.failed == [3, 5] and isinstance(caught.value.__cause__, RequestsFailed)
    assert server.requests == {p: 2 if p in ("caption 3", "caption 5") else 1 for p in prompts}
    # Past a request that failed for good the run stops: what is not sent yet is not sent at all.
    with FakeCompletionsServer(fail_on=("caption 1",)) as server:
        engine = _openai(server.base_url, concurrency=1, retries=0, timeout=5)
        with pytest.raises(EngineFailure, match=r"1 of 6 requests failed, [34] not sent; first: request 1 "):
            generate_with_recovery(engine, prompts, _seeded(6))
    assert server.requests["caption 0"] == server.requests["caption 1"] == 1 and sum(server.requests.values()) <= 3


def test_openai_engine_sends_the_token_ids_the_local_backends_run(tmp_path):
    """With the model's tokenizer here, a request carries ChatTokenizer.prompt_ids: a chat template that writes
    BOS itself reaches the server with that one BOS, where a server tokenizing the text would add a second."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "red": 3, "circle": 4, "=>": 5}, unk_token="</s>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "<s>{% for m in messages %}{{ m['content'] }} {% endfor %}=>"
    tokenizer.save_pretrained(tmp_path)
    with FakeCompletionsServer() as server:
        engine = _openai(server.base_url, tokenizer=str(tmp_path), retries=0)
        chat = engine.format_chat([{"role": "user", "content": "a red circle"}])
        gens = engine.generate([chat, "a red circle =>"], _seeded(2))
        assert set(server.requests) == {(0, 2, 3, 4, 5)}  # both: one BOS, then the same tokens
        assert [g.prompt_tokens for g in gens] == [5, 5]
        server.requests.clear()
        text_only = _openai(server.base_url, tokenizer=str(tmp_path), retries=0, token_ids=False)
        text_only.generate([chat], _seeded(1))
        assert set(server.requests) == {chat}


def test_openai_engine_reports_a_dead_server():
    engine = _openai(f"http://127.0.0.1:{free_port()}/v1", retries=1, timeout=2)
    assert not engine.has_chat_template and engine.special_tokens == []  # no local tokenizer named "served"
    with pytest.raises(EngineFailure, match=r"in a call of 1 request\(s\): RequestsFailed: 1 of 1 requests failed; "
                                            r"first: request 0 \(prompt ending 'a'\): APIConnectionError"):
        generate_with_recovery(engine, ["a"], [SamplingParams(seed=1)], retries=1, backoff_s=0.01)


def test_openai_engine_reads_the_server_address_from_openai_base_url(monkeypatch):
    """As the vision engine and the resource check do; an explicit base_url still wins."""
    with FakeCompletionsServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        engine = make_text_engine(EngineSpec(engine="openai", model="served", options={"retries": 0}))
        assert [g.text for g in engine.generate(["a"], _seeded(1))] == [" rewrite of a"]
        assert engine.name == f"openai:{server.base_url}:served"
    elsewhere = _openai("http://127.0.0.1:9/v1")
    assert elsewhere.name.startswith("openai:http://127.0.0.1:9/v1")
