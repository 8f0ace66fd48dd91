"""The rewrite stage end to end on a tiny saved model: column, manifest, resume, failure keeps shards."""

import json

import pyarrow as pa
import pytest

from curation.rewrite import PROMPT_SHA256, PROMPT_VERSION, RewriteConfig
from curation.schema import conform
from curation.shards import ShardWriter, finished_shards, read_table, verify_manifest, write_table_atomic
from pipelines import rewrite
from pipelines.common import StageConfigMismatch
from tests.curation.tiny_llm import tiny_model  # noqa: F401 - fixture

CAPTIONS = ["two red circles", "blue star icon", "IMG_0001.jpg | green squares", "some rings", "Photo by Jane Doe",
            "a photo of four brown hexagons", "", "orange diamonds, flat illustration", "three pink crosses"]


@pytest.fixture
def pairs(tmp_path):
    """Three pair shards of three rows (one caption empty after cleaning: it must fall back)."""
    writer = ShardWriter(tmp_path / "pairs", rows_per_shard=3, resume=False)
    rows = [{"key": f"r{i:03d}", "url": None, "caption": c or "<|im_end|>", "image": b"jpeg", "width": 8, "height": 8,
             "sha256": f"{i:064x}", "source": "test"} for i, c in enumerate(CAPTIONS)]
    writer.write(conform(pa.Table.from_pylist(rows)))
    writer.close()
    return tmp_path / "pairs"


def _flags(pairs, out, model, *extra):
    """The tiny model has random weights, so its outputs share no word with a caption: without the off-topic
    check some pass, and the stage's keeping, counting and determinism have rewrites to work on."""
    return ["--input", str(pairs), "--output", str(out), "--seed", "1", "--rewrite_model", str(model),
            "--rewrites_per_caption", "2", "--rewrite_max_new_tokens", "6", "--rewrite_max_attempts", "2",
            "--rewrite_shards_per_run", "1", "--rewrite_min_shared_words", "0", *extra]


def test_rewrite_stage_writes_rewrites_and_manifest(pairs, tmp_path, tiny_model):  # noqa: F811
    out = tmp_path / "rewritten"
    result = rewrite.run(_flags(pairs, out, tiny_model))
    manifest = verify_manifest(out)
    assert manifest["config"]["model"] == str(tiny_model) and manifest["config"]["prompt_version"] == PROMPT_VERSION
    table = read_table(out)
    assert table.column("key").to_pylist() == sorted(f"r{i:03d}" for i in range(9))
    original = dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    for key, rewrites in zip(table.column("key").to_pylist(), table.column("rewrites").to_pylist()):
        assert len(rewrites) == 2 and all(rewrites)
    stats = result.manifest["stats"]
    assert stats["rows"] == 9
    assert stats["kept"] > 0 and stats["kept"] + stats["fallback"] + stats["fallback.empty_caption"] == 18
    assert stats["fallback.empty_caption"] == 2
    rejected = sum(v for k, v in stats.items() if k.startswith("rejected."))
    assert stats["requests"] == stats["kept"] + rejected and stats["prompt_tokens"] > 0
    # Measured by the engine (its reused prefix KV), beside the estimate of what a prefix cache could serve.
    assert 0 < stats["prefix_reused_tokens"] < stats["prompt_tokens"]
    assert stats["prefix_reused_share"] == round(stats["prefix_reused_tokens"] / stats["prompt_tokens"], 4)
    assert 0 < stats["prefix_token_share_estimate"] < 1
    assert stats["fallback_share"] == round((stats["fallback"] + 2) / 18, 4)
    assert table.column("rewrites").to_pylist()[6] == [original["r006"]] * 2
    # Same seed, same input: a second run elsewhere writes the same rewrites, however its shards are read.
    again = rewrite.run(_flags(pairs, tmp_path / "again", tiny_model, "--batch_rows", "2"))
    assert read_table(again.output).column("rewrites").to_pylist() == table.column("rewrites").to_pylist()
    # A rerun of a finished output does nothing, and keeps the manifest that says how the shards were made.
    rerun = rewrite.run(_flags(pairs, out, tiny_model))
    assert rerun.up_to_date and rerun.manifest == result.manifest
    # The seed and the prompts' texts are part of the run: a resume under another seed would mix two runs.
    assert manifest["config"]["seed"] == 1 and manifest["config"]["prompt_sha256"] == PROMPT_SHA256
    (out / "part-00001.parquet").unlink()
    with pytest.raises(StageConfigMismatch, match=r"\(config\.seed differ\)"):
        rewrite.run([*_flags(pairs, out, tiny_model), "--seed", "2"])
    # How the run goes is not what it writes: the usual recovery settings resume, and no key is recorded.
    resumed = rewrite.run([*_flags(pairs, out, tiny_model), "--rewrite_engine_retries", "5",
                           "--rewrite_engine_backoff_s", "10", "--rewrite_requests_per_call", "8",
                           "--rewrite_engine_options", json.dumps({"threads": 1, "batch_size": 4})])
    assert resumed.manifest["stats"]["resumed_shards"] == 2 and resumed.manifest["stats"]["shards_processed"] == 1
    assert read_table(out).column("rewrites").to_pylist() == table.column("rewrites").to_pylist()
    served = RewriteConfig(engine="openai", engine_options={"api_key": "sk-secret", "base_url": "http://x/v1"})
    assert served.recorded()["engine_options"] == {}  # a server's key never reaches a manifest


def test_a_rebuilt_input_under_the_same_path_is_not_resumed_into(pairs, tmp_path, tiny_model):  # noqa: F811
    """Shards are matched by index: an input rebuilt in place (other rows, fewer shards) kept the old output."""
    out = tmp_path / "rewritten"
    rewrite.run(_flags(pairs, out, tiny_model, "--rewrite_max_attempts", "1"))
    # An input that grew by a shard, its others unchanged, resumes: only the new shard is done.
    first = read_table(pairs / "part-00000.parquet")
    renamed = pa.array([f"new-{key}" for key in first.column("key").to_pylist()])  # keys stay unique
    write_table_atomic(first.set_column(first.schema.get_field_index("key"), "key", renamed),
                       pairs / "part-00003.parquet")
    grown = rewrite.run(_flags(pairs, out, tiny_model, "--rewrite_max_attempts", "1"))
    assert grown.manifest["stats"]["resumed_shards"] == 3 and grown.manifest["stats"]["shards_processed"] == 1
    (out / "part-00000.parquet").unlink()
    for shard in sorted(pairs.glob("part-*.parquet"))[1:]:
        shard.unlink()
    with pytest.raises(StageConfigMismatch, match=r"\(input_shards differ\)"):
        rewrite.run(_flags(pairs, out, tiny_model, "--rewrite_max_attempts", "1"))


def test_a_model_rebuilt_in_place_is_neither_resumed_into_nor_kept_loaded(pairs, tmp_path):
    """Recorded by path alone, other weights under the same folder resumed the old output (two models' rewrites
    in one dataset), and the process that had loaded the old model went on using it."""
    from tests.curation.tiny_llm import build_tiny_chat_model

    model, out = tmp_path / "model", tmp_path / "rewritten"
    build_tiny_chat_model(model, seed=0)
    first = read_table(rewrite.run(_flags(pairs, out, model)).output).column("rewrites").to_pylist()
    build_tiny_chat_model(model, seed=1)  # same files, same sizes, other weights
    (out / "part-00001.parquet").unlink()
    with pytest.raises(StageConfigMismatch, match=r"\(config\.model_files differ\)"):
        rewrite.run(_flags(pairs, out, model))
    again = rewrite.run([*_flags(pairs, out, model), "--overwrite"])
    assert read_table(again.output).column("rewrites").to_pylist() != first  # the new weights, loaded afresh


def test_persistent_engine_failure_keeps_finished_shards(pairs, tmp_path, tiny_model, monkeypatch):  # noqa: F811
    """A real engine that fails on one caption: retried, split down to that request, then a clear error."""
    from curation.engines.transformers_engine import TransformersEngine

    out = tmp_path / "rewritten"
    real = TransformersEngine.generate
    calls: list[tuple[int, bool]] = []

    def failing(self, prompts, params, stop=()):
        bad = any("Photo by Jane Doe" in p for p in prompts)  # row r004, in shard 1
        calls.append((len(prompts), bad))
        if bad:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(self, prompts, params, stop)

    monkeypatch.setattr(TransformersEngine, "generate", failing)
    flags = _flags(pairs, out, tiny_model, "--rewrite_engine_backoff_s", "0")
    with pytest.raises(Exception, match=r"failed on 1 request\(s\) after 3 attempts: RuntimeError: CUDA out of "
                                        r"memory \(injected\) \(prompt ending '.*Photo by Jane Doe"):
        rewrite.run(flags)
    failed = [size for size, bad in calls if bad]
    # Retried at full size, then halved (each half retried) until the one bad request failed alone 3 times.
    assert failed[:3] == [failed[0]] * 3 and failed[0] > 1 and failed[-3:] == [1, 1, 1]
    assert failed == sorted(failed, reverse=True)
    assert any(not bad and size < failed[0] for size, bad in calls)  # the good half of a split went through
    kept = [p.name for p in finished_shards(out)]
    assert kept == ["part-00000.parquet"]  # shard 0 ran in its own pipeline run before shard 1 failed
    monkeypatch.setattr(TransformersEngine, "generate", real)
    result = rewrite.run(flags)
    assert result.manifest["stats"]["resumed_shards"] == 1 and result.manifest["stats"]["shards_processed"] == 2
    assert result.manifest["stats"]["rows"] == 9  # counts cover the shards of both runs


def test_a_server_failing_one_request_stops_the_run_naming_it_and_keeps_finished_shards(pairs, tmp_path):
    """The openai engine sends a whole batch at once: one request failing for good names itself, and shard 0 stays."""
    from tests.curation.servers import FakeCompletionsServer

    out = tmp_path / "rewritten"

    def flags(server):
        options = json.dumps({"base_url": server.base_url, "retries": 0, "timeout": 10})
        return _flags(pairs, out, "served", "--rewrite_engine", "openai", "--rewrite_engine_options", options)

    with FakeCompletionsServer(fail_on=("Photo by Jane Doe",)) as server:  # row r004, in shard 1
        with pytest.raises(Exception, match=r"2 of 6 requests failed(, \d+ not sent)?; first: request \d+ "
                                            r"\(prompt ending '.*Photo by Jane Doe =>'\): InternalServerError"):
            rewrite.run(flags(server))
        assert [p.name for p in finished_shards(out)] == ["part-00000.parquet"]
        server.fail_on = ()  # the server is well again: a rerun resumes after the kept shard
        result = rewrite.run(flags(server))
    assert result.manifest["stats"]["resumed_shards"] == 1 and result.manifest["stats"]["rows"] == 9


def test_engine_options_must_be_a_json_object(pairs, tmp_path):
    with pytest.raises(ValueError, match="JSON object"):
        rewrite.run(["--input", str(pairs), "--output", str(tmp_path / "x"), "--rewrite_engine_options", "[1]"])
    with pytest.raises(ValueError, match=r"--rewrite_engine_options is not valid JSON .*'\{max_num_seqs: 8\}'"):
        rewrite.run(["--input", str(pairs), "--output", str(tmp_path / "x"), "--rewrite_engine_options",
                     "{max_num_seqs: 8}"])
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_demo_flags_parse():
    options = rewrite.RewriteOptions(["--input", "a", "--output", "b", *rewrite.demo_flags(None)])
    config = rewrite.config_from(options)
    assert config.k >= 1 and config.max_new_tokens <= 32 and 0.5 < config.row_fraction <= 1
    assert json.loads(options.rewrite_engine_options) == {}


def test_row_fraction_rewrites_a_fixed_share(pairs, tmp_path, tiny_model):  # noqa: F811
    from curation.rewrite import selected

    result = rewrite.run(_flags(pairs, tmp_path / "half", tiny_model, "--rewrite_row_fraction", "0.5"))
    table = read_table(result.output)
    chosen = [selected(1, k, 0.5) for k in table.column("key").to_pylist()]
    assert 0 < sum(chosen) < len(chosen)
    assert [r is not None for r in table.column("rewrites").to_pylist()] == chosen
    assert result.manifest["stats"]["rows_not_selected"] == chosen.count(False)
    stats = result.manifest["stats"]  # the rate counts the captions rewritten, not the rows left out
    assert stats["captions_per_s_this_run"] == pytest.approx(sum(chosen) / stats["seconds"], rel=0.02)


def test_a_repeated_key_or_a_null_caption_is_refused_before_anything_is_written(pairs, tmp_path,
                                                                                tiny_model):  # noqa: F811
    """Rewrites are joined back by key: a key in two rows gave one row the other's rewrites, silently. A
    null caption crashed a worker after the model loaded, then was rewritten as "" k times (an output the
    trainer refuses, for its null caption): it is refused naming its row, as the caption stage does."""
    from curation.schema import SchemaError

    table = read_table(pairs)
    doubled = tmp_path / "doubled"
    write_table_atomic(table.slice(0, 2), doubled / "part-00000.parquet")
    write_table_atomic(table.slice(1, 2), doubled / "part-00001.parquet")  # r001 again
    with pytest.raises(SchemaError, match=r"duplicate key 'r001'.*part-00001.parquet.*row 1"):
        rewrite.run(_flags(doubled, tmp_path / "out", tiny_model))
    assert not (tmp_path / "out").exists()
    nulls = tmp_path / "nulls"
    captions = pa.array([None, "two red circles"], pa.string())
    write_table_atomic(table.slice(0, 2).set_column(table.schema.get_field_index("caption"), "caption", captions),
                       nulls / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"no caption \(1 null in all\).*part-00000.parquet.*row 1"):
        rewrite.run(_flags(nulls, tmp_path / "rewritten", tiny_model))
    assert not (tmp_path / "rewritten").exists()
