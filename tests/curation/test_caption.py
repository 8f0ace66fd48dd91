"""The VeC captioner: greedy then seeded retries, engine failures per image and per run, and its config
(scripted engines). Its output checks are test_vlm_output.py's, the fusion test_fusion.py's."""

import collections

import pytest
from PIL import Image

from curation.caption import (ERROR_WINDOW, ERROR_WINDOW_MIN, IMAGE_ERRORS_IN_ROW, VEC_PROMPT, VLLM_SHARED_GPU,
                              CaptionConfig, Captioner, summarise)
from curation.engines.base import CaptionsFailed, Generation


class ScriptedVision:
    """Answers caption requests from a per-image script (one answer per attempt); records what it was asked."""

    name = "scripted-vision"

    def __init__(self, answers: dict[int, list[str]]):
        self.answers, self.calls = answers, []

    def caption(self, images, prompt, params):
        self.calls.append([(im.width, p) for im, p in zip(images, params)])
        out = []
        for im in images:
            script = self.answers[im.width]
            out.append(Generation(script.pop(0) if len(script) > 1 else script[0], 10, 5))
        return out



def images(*widths):
    return [Image.new("RGB", (w, 20)) for w in widths]



def test_degenerate_rows_are_retried_with_seeded_sampling_then_left_null():
    engine = ScriptedVision({1: ["a red circle on white"], 2: ["the the the the", "two blue squares"],
                             3: ["", "", "", "never used"]})
    config = CaptionConfig(captioner_model="x", retries=2)
    rows = Captioner(engine, config).caption(["k1", "k2", "k3"], images(1, 2, 3), seed=7)
    assert [r.text for r in rows] == ["a red circle on white", "two blue squares", None]
    assert rows[1].stats["vec.kept_after_retry"] == 1 and rows[1].stats["vec.degenerate.repeated_tokens"] == 1
    assert rows[2].stats["vec.null"] == 1 and rows[2].stats["vec.degenerate.empty"] == 3
    first, second, third = engine.calls
    assert [w for w, _ in first] == [1, 2, 3] and all(p.temperature == 0 for _, p in first)
    assert [w for w, _ in second] == [2, 3] and all(p.temperature == config.retry_temperature for _, p in second)
    assert second[0][1].seed != third[0][1].seed  # each attempt draws a fresh seed
    # Seeds depend on (seed, key, attempt) only: the same row asked alone gets the same seed.
    alone = ScriptedVision({3: ["", "", "", ""]})
    Captioner(alone, config).caption(["k3"], images(3), seed=7)
    assert alone.calls[1][0][1].seed == second[1][1].seed


def test_an_image_the_engine_fails_on_costs_only_its_own_caption():
    class Picky(ScriptedVision):
        def caption(self, images, prompt, params):
            if any(im.width == 2 for im in images):
                raise RuntimeError("processor cannot handle this image")
            return super().caption(images, prompt, params)

    engine = Picky({1: ["a red circle on white"], 3: ["two blue squares"]})
    captioner = Captioner(engine, CaptionConfig(captioner_model="x"))
    rows = captioner.caption(["a", "b", "c"], images(1, 2, 3), seed=0)
    assert [r.text for r in rows] == ["a red circle on white", None, "two blue squares"]
    assert rows[1].stats["vec.engine_error"] == 1 and rows[1].stats["vec.null"] == 1
    # Alone in its batch (a shard's last row), the same image costs the same: its caption, not the run.
    (alone,) = captioner.caption(["b"], images(2), seed=0)
    assert alone.text is None and alone.stats["vec.engine_error"] == 1
    # Image after image failing on its own, across batches, is the engine failing: the run stops.
    with pytest.raises(RuntimeError, match=f"{IMAGE_ERRORS_IN_ROW} images in a row failed on their own"):
        for batch in range(IMAGE_ERRORS_IN_ROW):
            captioner.caption([f"b{batch}"], images(2), seed=0)


def test_an_engine_failing_every_other_image_stops_the_run_instead_of_nulling_half_the_captions():
    """No two failures in a row, so the in-a-row stop never came: half the rows kept a null caption that no
    resume asks for again."""
    class Flaky(ScriptedVision):
        def caption(self, images, prompt, params):
            self.calls.append(len(images))
            if len(self.calls) % 2:
                raise RuntimeError("timed out")
            return [Generation("a red circle on white", 3, 5)] * len(images)

    captioner = Captioner(Flaky({}), CaptionConfig(captioner_model="x", engine_retries=0))
    with pytest.raises(RuntimeError, match="of the last 32 images failed on their own"):
        for row in range(ERROR_WINDOW_MIN):
            assert captioner.caption([f"r{row}"], images(1), seed=0)[0].stats["vec.engine_error"] == (row % 2 == 0)
    steady = Captioner(Flaky({}), CaptionConfig(captioner_model="x", engine_retries=1, engine_backoff_s=0))
    assert all(steady.caption([f"r{row}"], images(1), seed=0)[0].text for row in range(2 * ERROR_WINDOW_MIN))
    # The captioner outlives its run in the process (pipelines.model_cache): the resume's run starts its
    # counts afresh. Carried over, the stopped run's failures failed the resume at its first image.
    class Healthy(ScriptedVision):
        def caption(self, images, prompt, params):
            return [Generation("a red circle on white", 3, 5)] * len(images)

    captioner.engine = Healthy({})
    with pytest.raises(RuntimeError, match="of the last"):
        captioner.caption(["after"], images(1), seed=0)
    assert captioner.start_run().caption(["after"], images(1), seed=0)[0].stats["vec.engine_error"] == 0


def test_an_image_whose_request_failed_on_its_own_is_named_in_the_log(caplog):
    """It was only counted (vec.engine_error): which row kept a null VeC, nothing said."""
    class FailsOnce(ScriptedVision):
        def caption(self, images, prompt, params):
            self.calls.append(len(images))
            if len(self.calls) == 1:
                raise RuntimeError("timed out")
            return [Generation("a red circle on white", 3, 5)] * len(images)

    captioner = Captioner(FailsOnce({}), CaptionConfig(captioner_model="x", engine_retries=0))
    with caplog.at_level("WARNING", logger="curation.caption"):
        rows = captioner.caption(["lost-key"], images(1), seed=0)
    assert rows[0].text is None and rows[0].stats["vec.engine_error"] == 1
    assert "no VeC for key 'lost-key'" in caplog.text


def test_each_run_of_the_caption_stage_starts_the_cached_captioners_error_counts_afresh(monkeypatch):
    from pipelines import caption as stage

    dirty = Captioner(ScriptedVision({}), CaptionConfig(captioner_model="x"))
    dirty.errors_in_row, dirty.recent_errors = 5, collections.deque([True] * 40, maxlen=ERROR_WINDOW)
    monkeypatch.setattr(stage, "reused", lambda kind, config, load, files=None: dirty)
    loaded = stage.CaptionModelHandler(CaptionConfig(captioner_model="x"), seed=0).load_model()
    assert loaded is dirty and loaded.errors_in_row == 0 and not loaded.recent_errors


def test_captions_a_failed_call_did_finish_are_kept_and_only_its_unsent_images_go_again_as_a_batch():
    class Partial(ScriptedVision):
        retries_requests = True  # as a server's client: each request retried already, the batch is not

        def caption(self, images, prompt, params):
            out = super().caption(images, prompt, params)
            if len(self.calls) == 1:  # image 2 failed after its client's retries; 3 and 4 were not sent
                raise CaptionsFailed([out[0], None, None, None, out[4]], [1], TimeoutError("timed out"))
            return out

    engine = Partial({w: [f"a picture {w} pixels wide"] for w in range(1, 6)})
    rows = Captioner(engine, CaptionConfig(captioner_model="x", retries=0)).caption(
        list("abcde"), images(1, 2, 3, 4, 5), seed=0)
    assert [r.text for r in rows] == ["a picture 1 pixels wide", None, "a picture 3 pixels wide",
                                      "a picture 4 pixels wide", "a picture 5 pixels wide"]
    assert rows[1].stats["vec.engine_error"] == 1 and not rows[2].stats["vec.engine_error"]
    assert [[width for width, _ in call] for call in engine.calls] == [[1, 2, 3, 4, 5], [3, 4]]


def test_a_captioner_that_cannot_reach_its_server_stops_at_once():
    class Down(ScriptedVision):
        def caption(self, images, prompt, params):
            self.calls.append(len(images))
            raise ConnectionError("connection refused")

    engine = Down({})
    with pytest.raises(ConnectionError):
        Captioner(engine, CaptionConfig(captioner_model="x", engine_retries=0)).caption(["a", "b"], images(1, 3), seed=0)
    assert engine.calls == [2]  # no image-by-image round after the batch


def test_summarise_reports_shares():
    stats = collections.Counter({"vec.kept": 3, "vec.null": 1, "fusion.kept": 1, "fusion.fallback_to_vec": 2})
    out = summarise(stats)
    assert out["vec_null_share"] == 0.25 and out["fusion_fallback_share"] == round(2 / 3, 4)


def test_config_refuses_nonsense():
    with pytest.raises(ValueError):
        CaptionConfig(retries=1, retry_temperature=0)
    with pytest.raises(ValueError):
        CaptionConfig(fusion_prompt_format="poem")
    with pytest.raises(ValueError):
        CaptionConfig(prompt="  ")
    with pytest.raises(ValueError, match="captioner options: the transformers captioner has no option max_num_seqs"):
        CaptionConfig(captioner_options={"max_num_seqs": 4})
    with pytest.raises(ValueError, match="fusion options: the openai engine has no option threads"):
        CaptionConfig(fusion_engine="openai", fusion_options={"threads": 2})
    assert CaptionConfig(fuse=False, fusion_options={"threads": 2}).fusion_options  # no fusion engine is built


def test_two_vllm_engines_in_one_caption_run_share_the_gpu():
    both = CaptionConfig(captioner_engine="vllm", captioner_model="x", fusion_engine="vllm",
                         fusion_options={"gpu_memory_utilization": 0.3})
    assert both.captioner_spec().options["gpu_memory_utilization"] == VLLM_SHARED_GPU
    assert both.fusion_spec().options["gpu_memory_utilization"] == 0.3  # what the user set stands
    alone = CaptionConfig(captioner_engine="vllm", captioner_model="x", fuse=False)
    assert "gpu_memory_utilization" not in alone.captioner_spec().options  # the engine's own default


@pytest.mark.parametrize("settings, message", [
    (dict(fusion_top_p=0), "top_p must be in"), (dict(temperature=-1), "temperature must be >= 0"),
    (dict(fusion_max_new_tokens=0), "max_new_tokens must be positive"),
    (dict(fusion_temperature=0), "with fusion_temperature 0 a fusion retry repeats"),
])
def test_caption_sampling_settings_are_refused_with_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        CaptionConfig(captioner_model="x", **settings)
    assert CaptionConfig(captioner_model="x", fusion_temperature=0, fusion_attempts=1).fusion_temperature == 0
