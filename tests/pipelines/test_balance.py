import hashlib
import json
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from curation.balancing import count_matches
from curation.matching import Matcher
from curation.metadata import MetadataError
from curation.schema import SchemaError
from curation.shards import MANIFEST, finished_shards, iter_batches, read_manifest, read_table, verify_manifest
from pipelines import balance, ingest
from pipelines.balance import COUNTS_FILE, MATCHES_DIR, PLOT_FILE
from pipelines.common import StageConfigMismatch


@pytest.fixture(scope="module")
def raw_pairs(demo_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("balance") / "raw_pairs"
    ingest.run(["--input", str(demo_dir / "pool"), "--output", str(output)])
    return output


@pytest.fixture(scope="module")
def balanced(raw_pairs, demo_dir, tmp_path_factory):
    """One balance run on the demo at a small t, shared by the tests that only read it."""
    output = tmp_path_factory.mktemp("balanced") / "out"
    argv = ["--input", str(raw_pairs), "--output", str(output), *balance.demo_flags(demo_dir.parent), "--seed", "5"]
    argv[argv.index("--metadata") + 1] = str(demo_dir / "metadata.json")
    result = balance.run(argv, test_pipeline=BeamTestPipeline(
        options=beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"])))
    return result, argv


def _digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_shards(directory)}


def test_balance_writes_kept_pairs_counts_plot_and_stats(balanced, raw_pairs, demo_dir):
    result, _ = balanced
    output, stats = result.output, result.manifest["stats"]
    verify_manifest(output)
    assert sum(b.num_rows for _, b in iter_batches(output)) == result.rows  # schema-checked on the way
    raw = read_table(raw_pairs)
    assert stats["rows_in"] == raw.num_rows
    assert stats["rows_in"] == result.rows + stats["rows_rejected"] + stats["rows_dropped_by_sampling"]
    assert set(result.rejects) <= {"no_metadata_match", "empty_caption"} and result.rejects["no_metadata_match"] > 0
    assert 0 < result.rows < raw.num_rows and stats["rows_dropped_by_sampling"] > 0

    kept = read_table(output)
    assert all(kept.column("matched_entries").to_pylist()) and min(kept.column("keep_prob").to_pylist()) > 0

    # The saved counts are the pool's counts: recount by matching every caption directly.
    entries = json.loads((demo_dir / "metadata.json").read_text())
    direct = count_matches(Matcher(entries).match_array(raw.column("caption")), len(entries))
    counts = pq.read_table(output / COUNTS_FILE)
    assert counts.column("count").to_numpy().tolist() == direct.tolist()
    assert counts.column("kept").to_numpy().tolist() == count_matches(kept.column("matched_entries"),
                                                                      len(entries)).tolist()
    assert stats["before_head_entries"] > 0 and stats["after_head_matches"] < stats["before_head_matches"]
    assert stats["before_matches"] == int(direct.sum())
    assert stats["plots"] == [PLOT_FILE] and (output / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    # The matches index covers every input shard, row for row.
    assert len(finished_shards(output / MATCHES_DIR)) == len(finished_shards(raw_pairs))


def test_same_seed_same_bytes_other_seed_other_sample(balanced, tmp_path):
    result, argv = balanced
    again = list(argv)
    again[again.index("--output") + 1] = str(tmp_path / "again")
    assert _digests(balance.run(again).output) == _digests(result.output)
    other = list(again)
    other[other.index("--output") + 1] = str(tmp_path / "other")
    other[other.index("--seed") + 1] = "6"
    other_keys = set(read_table(balance.run(other).output).column("key").to_pylist())
    assert other_keys != set(read_table(result.output).column("key").to_pylist())


def test_two_worker_processes_give_identical_shards(balanced, tmp_path):
    result, argv = balanced
    parallel = list(argv)
    parallel[parallel.index("--output") + 1] = str(tmp_path / "parallel")
    out = balance.run(parallel + ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]).output
    assert _digests(out) == _digests(result.output)
    assert _digests(out / "rejects") == _digests(result.output / "rejects")
    assert pq.read_table(out / COUNTS_FILE).equals(pq.read_table(result.output / COUNTS_FILE))


def test_rerun_after_a_kill_gives_the_uninterrupted_result(balanced, tmp_path):
    result, argv = balanced
    killed = tmp_path / "killed"
    shutil.copytree(result.output, killed)
    # A kill in pass 2 after shard 0: manifest, counts and later shards are missing; one matches file was mid-write.
    (killed / MANIFEST).unlink()
    (killed / COUNTS_FILE).unlink()
    for path in finished_shards(killed)[1:]:
        path.unlink()
    (killed / MATCHES_DIR / "part-00002.parquet").unlink()
    (killed / MATCHES_DIR / ".part-00002.parquet.tmp-123").write_bytes(b"half a file")
    rerun = list(argv)
    rerun[rerun.index("--output") + 1] = str(killed)
    resumed = balance.run(rerun)
    assert resumed.manifest["stats"]["resumed_shards"] == 1
    assert not list((killed / MATCHES_DIR).glob(".*.tmp-*"))  # the killed write's temp file is gone
    assert resumed.manifest["stats"]["rows_per_second"] is None  # part of the pool: no whole-pool rate
    assert _digests(killed) == _digests(result.output)
    assert pq.read_table(killed / COUNTS_FILE).equals(pq.read_table(result.output / COUNTS_FILE))
    skip = {"seconds", "rows_per_second", "resumed_shards"}
    assert ({k: v for k, v in resumed.manifest["stats"].items() if k not in skip}
            == {k: v for k, v in result.manifest["stats"].items() if k not in skip})


def test_an_up_to_date_rerun_reads_no_keys_and_a_rerun_with_work_checks_them_first(balanced, raw_pairs, tmp_path,
                                                                                    monkeypatch):
    """Refusing null or repeated keys reads every key of the pool: a rerun with nothing to do skipped nothing."""
    result, argv = balanced
    output = tmp_path / "out"
    shutil.copytree(result.output, output)
    rerun = list(argv)
    rerun[rerun.index("--output") + 1] = str(output)
    events = []
    read_table, pipeline_for = pq.read_table, balance.pipeline_for

    def counting_read(source, *args, **kwargs):
        if kwargs.get("columns") == ["key"]:
            events.append(("keys", Path(source).name))
        return read_table(source, *args, **kwargs)

    def counting_pipeline(*args, **kwargs):
        events.append(("pipeline", None))
        return pipeline_for(*args, **kwargs)

    monkeypatch.setattr(pq, "read_table", counting_read)
    monkeypatch.setattr(balance, "pipeline_for", counting_pipeline)
    assert balance.run(rerun).up_to_date and events == []
    # Finished, but a shard deleted since: work to do, so every input shard's keys are read before the job.
    (output / "part-00001.parquet").unlink()
    assert not balance.run(rerun).up_to_date
    inputs = [("keys", p.name) for p in finished_shards(raw_pairs)]
    assert events == inputs + [("pipeline", None)]
    assert _digests(output) == _digests(result.output)


def test_online_curation_keeps_every_matched_pair(balanced, tmp_path):
    result, argv = balanced
    online = list(argv)
    online[online.index("--output") + 1] = str(tmp_path / "online")
    out = balance.run(online + ["--online_curation"])
    assert out.manifest["stats"]["rows_dropped_by_sampling"] == 0
    assert out.rows == result.manifest["stats"]["rows_in"] - result.manifest["stats"]["rows_rejected"]
    probs = np.array(read_table(out.output).column("keep_prob").to_pylist())
    assert (probs > 0).all() and (probs < 1).any()
    # Its "after" is what a draw keeps on average: the offline run's figures, to sampling noise, not the pool's.
    stats, offline = out.manifest["stats"], result.manifest["stats"]
    assert stats["after_is_expected"] and stats["after_matches"] < stats["before_matches"]
    assert abs(stats["after_matches"] - offline["after_matches"]) < 0.1 * offline["after_matches"]
    counts = pq.read_table(out.output / "entry_counts.parquet")
    assert counts.column("kept").to_numpy().max() <= counts.column("count").to_numpy().max()


def _write_metadata(tmp_path, content) -> str:
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("content, flags, error, message", [
    ([], [], MetadataError, "metadata is empty"),
    (["red", " "], [], MetadataError, "entry 1 is empty or whitespace"),
    (["red"], ["--t", "0"], ValueError, "--t must be positive"),
    (["red"], ["--t", "-5"], ValueError, "--t must be positive"),
])
def test_bad_config_fails_before_any_work(raw_pairs, tmp_path, content, flags, error, message):
    output = tmp_path / "out"
    with pytest.raises(error, match=message):
        balance.run(["--input", str(raw_pairs), "--output", str(output), "--metadata",
                     _write_metadata(tmp_path, content), *flags])
    assert not output.exists()


def test_null_empty_and_huge_captions_are_counted_not_fatal(tmp_path):
    source = tmp_path / "pairs"
    source.mkdir()
    huge = "lorem " * 200_000 + "red dog"
    table = pa.table({"key": ["a", "b", "c", "d", "e"],
                      "caption": pa.array([None, "", "  ", huge, "a red dog"], pa.string())})
    pq.write_table(table, source / "part-00000.parquet")
    result = balance.run(["--input", str(source), "--output", str(tmp_path / "out"),
                          "--metadata", _write_metadata(tmp_path, ["red", "dog", "red dog"]), "--t", "100"])
    assert result.rejects == {"empty_caption": 3}
    assert read_table(result.output).column("key").to_pylist() == ["d", "e"]
    assert result.manifest["stats"]["long_captions"] == 1
    assert result.manifest["stats"]["before_matches"] == 6


def test_metaclip2_padding_balances_captions_written_without_spaces(tmp_path):
    """With MetaCLIP 1's padding a Chinese or Thai caption never matches its entry and is rejected."""
    source = tmp_path / "pairs"
    source.mkdir()
    table = pa.table({"key": ["a", "b", "c"], "caption": ["一只猫在睡觉", "แมวสีดำบนโซฟา", "a red dog"]})
    pq.write_table(table, source / "part-00000.parquet")
    metadata = _write_metadata(tmp_path, ["猫", "แมว", "dog"])
    argv = ["--input", str(source), "--metadata", metadata, "--t", "100"]
    padded = balance.run([*argv, "--output", str(tmp_path / "v1")])
    assert padded.rejects == {"no_metadata_match": 2}
    open_edges = balance.run([*argv, "--output", str(tmp_path / "v2"), "--metaclip2_padding"])
    assert not open_edges.rejects and open_edges.manifest["config"]["metaclip2_padding"] is True
    kept = read_table(open_edges.output)
    assert dict(zip(kept.column("key").to_pylist(), kept.column("matched_entries").to_pylist())) == {
        "a": [0], "b": [1], "c": [2]}


def test_keys_are_text_unique_and_present_and_large_strings_are_text(tmp_path):
    """Polars writes large_string: pass 2 compared it with pass 1's string keys by type and refused every
    run as "the input changed". A null key crashed a worker; a repeated one shared its draw."""
    source = tmp_path / "pairs"
    source.mkdir()
    argv = ["--input", str(source), "--metadata", _write_metadata(tmp_path, ["red"]), "--t", "100"]
    large = pa.table({"key": pa.array(["a", "b"], pa.large_string()),
                      "caption": pa.array(["a red dog", "red"], pa.large_string())})
    pq.write_table(large, source / "part-00000.parquet")
    assert balance.run([*argv, "--output", str(tmp_path / "large")]).rows == 2
    for keys, message in (([None, "b"], r"no key .*row 1"), (["a", "a"], "'a'"), ([1, 2], "column holds int64")):
        pq.write_table(pa.table({"key": keys, "caption": ["a red dog", "red"]}), source / "part-00000.parquet")
        with pytest.raises(SchemaError, match=message):
            balance.run([*argv, "--output", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()


def test_a_batch_whose_keys_differ_from_its_matches_names_its_rows_from_1(tmp_path):
    """The input changed between the passes: the refusal names the batch's rows as rejects count them."""
    from curation.balancing import BalanceConfig
    from curation.shards import shard_name

    (tmp_path / MATCHES_DIR).mkdir()
    matches = pa.table({"key": ["a", "b", "c", "d"], balance.MATCHES_COLUMN: [[0]] * 4, "caption_chars": [1] * 4},
                       schema=balance.MATCH_SCHEMA)
    pq.write_table(matches, tmp_path / MATCHES_DIR / shard_name(0))
    batch = pa.record_batch({"key": ["c", "x"], "caption": ["red", "red"]})  # the third and fourth rows
    sample = balance.SampleBatch(str(tmp_path), BalanceConfig(metadata="m", metadata_sha256="0"))
    with pytest.raises(RuntimeError, match=r"part-00000.parquet: rows 3\.\.4 differ from "):
        list(sample.process((0, ("part-00000.parquet", 2, batch)), np.ones(1, np.uint64)))


def test_missing_caption_column_names_the_file(tmp_path):
    source = tmp_path / "pairs"
    source.mkdir()
    pq.write_table(pa.table({"key": ["a"], "alt": ["red"]}), source / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) caption; balance reads pair shards.*part-00000.parquet"):
        balance.run(["--input", str(source), "--output", str(tmp_path / "out"),
                     "--metadata", _write_metadata(tmp_path, ["red"])])


def test_demo_flags_point_at_the_demo_metadata(tmp_path):
    flags = balance.demo_flags(tmp_path)
    assert flags[flags.index("--metadata") + 1] == str(tmp_path / "demo" / "metadata.json")
    assert 0 < float(flags[flags.index("--t") + 1]) < 100


def test_a_grown_or_unfinished_input_is_not_balanced_into_an_old_output(balanced, raw_pairs, tmp_path):
    """Counts are over the whole pool: shards balanced before the input grew were sampled at other counts."""
    result, argv = balanced
    grown, output = tmp_path / "grown", tmp_path / "out"
    shutil.copytree(raw_pairs, grown)
    flags = list(argv)
    flags[flags.index("--input") + 1], flags[flags.index("--output") + 1] = str(grown), str(output)
    balance.run(flags)
    # Up to date: nothing is written again, not even the counts and the plot.
    written = {p: p.stat().st_mtime_ns for p in (output / MANIFEST, output / COUNTS_FILE, output / PLOT_FILE)}
    assert balance.run(flags).up_to_date and {p: p.stat().st_mtime_ns for p in written} == written
    (grown / MANIFEST).unlink()  # a stage's output without its manifest: that stage has not finished
    with pytest.raises(ValueError, match="has not finished"):
        balance.run(flags)
    (grown / "_stage_config.json").unlink()  # plain shards, grown by one
    more = pq.read_table(grown / "part-00000.parquet")
    more = more.set_column(more.schema.get_field_index("key"), "key",
                           pa.array([f"more-{k}" for k in more.column("key").to_pylist()]))
    pq.write_table(more, grown / "part-00009.parquet")
    with pytest.raises(StageConfigMismatch, match="input_shards"):
        balance.run(flags)


def test_an_input_rebuilt_to_the_same_sizes_is_not_taken_for_the_old_one(raw_pairs, demo_dir, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    table = pq.read_table(raw_pairs / "part-00000.parquet")
    captions = [f"{c} zqxw" for c in table.column("caption").to_pylist()]
    table = table.set_column(table.column_names.index("caption"), "caption", pa.array(captions))
    pq.write_table(table, pool / "part-00000.parquet", compression="none", use_dictionary=False)
    argv = ["--input", str(pool), "--output", str(tmp_path / "out"), "--metadata", str(demo_dir / "metadata.json"),
            "--t", "5"]
    balance.run(argv)
    shard = pool / "part-00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b"zqxw", b"zqxv"))  # other captions, the same size to the byte
    assert shard.stat().st_size == len(data) and shard.read_bytes() != data
    with pytest.raises(StageConfigMismatch, match="input_shards"):
        balance.run(argv)


def test_an_output_recorded_by_an_earlier_version_still_resumes(raw_pairs, demo_dir, tmp_path):
    """Earlier versions recorded each input shard as [name, size], and no option added since: such an output
    must not be refused."""
    import json

    argv = ["--input", str(raw_pairs), "--output", str(tmp_path / "out"), "--metadata",
            str(demo_dir / "metadata.json"), "--t", "5"]
    first = balance.run(argv)
    recorded = json.loads((tmp_path / "out" / "_stage_config.json").read_text())
    recorded["input_shards"] = [shard[:2] for shard in recorded["input_shards"]]
    del recorded["config"]["metaclip2_padding"]  # an option added since, which this run leaves off
    (tmp_path / "out" / "_stage_config.json").write_text(json.dumps(recorded))
    assert balance.run(argv).manifest == first.manifest
    # Turned on, it is another config: refused, not mixed into the old output.
    with pytest.raises(StageConfigMismatch, match="metaclip2_padding"):
        balance.run([*argv, "--metaclip2_padding"])


def test_a_pool_whose_checks_failed_is_refused_before_its_keys_are_read(balanced, raw_pairs, tmp_path, monkeypatch):
    from curation.failed_checks import FailedChecksError, record_failed_checks

    _, argv = balanced
    pool = tmp_path / "raw_pairs"
    shutil.copytree(raw_pairs, pool)
    record_failed_checks(pool, read_manifest(pool), ["reject_ratio_under_threshold"])
    run = list(argv)
    run[run.index("--input") + 1], run[run.index("--output") + 1] = str(pool), str(tmp_path / "out")
    read = []
    monkeypatch.setattr(pq, "read_table", lambda *args, **kwargs: read.append(args) or pytest.fail("read the pool"))
    with pytest.raises(FailedChecksError, match="reject_ratio_under_threshold"):
        balance.run(run)
    assert read == [] and not (tmp_path / "out").exists()
