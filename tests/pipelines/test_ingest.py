import hashlib
import os
import signal
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from curation.demo_data import generate
from curation.shards import finished_shards, iter_batches, read_table, verify_manifest
from pipelines import ingest
from pipelines.common import StageConfigMismatch


def test_ingest_normalises_and_rejects_with_reasons(demo_dir, tmp_path):
    result = ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw")],
                        test_pipeline=BeamTestPipeline(options=beam.options.pipeline_options.PipelineOptions(
                            ["--runner=DirectRunner"])))
    rejects = result.rejects
    assert set(rejects) <= {"undecodable_image", "empty_caption"} and rejects
    assert result.rows + sum(rejects.values()) == 400
    verify_manifest(tmp_path / "raw")
    rows = sum(b.num_rows for _, b in iter_batches(tmp_path / "raw"))  # schema-checked on the way
    assert rows == result.rows
    rejected = read_table(tmp_path / "raw" / "rejects")
    assert set(rejected.column_names) >= {"key", "reason", "detail", "source", "row"}
    assert all(r.startswith("demo-") for r in rejected.column("key").to_pylist())


def test_rerun_is_up_to_date_and_other_config_is_refused(demo_dir, tmp_path):
    argv = ["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw")]
    first = ingest.run(argv)
    again = ingest.run(argv)
    assert again.manifest["shards"] == first.manifest["shards"]
    assert again.manifest["stats"]["resumed_shards"] == 4
    with pytest.raises(StageConfigMismatch, match="--overwrite"):
        ingest.run(argv + ["--max_caption_chars", "10"])
    assert ingest.run(argv + ["--max_caption_chars", "10", "--overwrite"]).rejects["caption_too_long"] > 0


def test_missing_caption_column_names_the_file(demo_dir, tmp_path):
    with pytest.raises(ValueError, match=r"part-00000.parquet: missing column\(s\) \['alt'\]"):
        ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw"), "--caption_column", "alt"])


def _digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_shards(directory)}


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_gives_the_uninterrupted_result(tmp_path):
    generate(tmp_path / "src", n_pairs=1200, n_eval=0, rows_per_shard=15)
    baseline = tmp_path / "baseline"
    ingest.run(["--input", str(tmp_path / "src" / "pool"), "--output", str(baseline)])

    output = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", "--input", str(tmp_path / "src" / "pool"),
           "--output", str(output)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not finished_shards(output) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = finished_shards(output)
    assert 0 < len(written) < 80, "the kill must land in the middle of the stage"
    assert not (output / "manifest.json").exists()
    for path in written:  # every visible shard is complete and readable
        assert sum(b.num_rows for _, b in iter_batches(path)) >= 0

    ingest.run(["--input", str(tmp_path / "src" / "pool"), "--output", str(output)])
    assert _digests(output) == _digests(baseline)
    assert read_table(output).equals(read_table(baseline))
