import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import curation.shards
from curation.demo_data import generate
from curation.export import PLAN_FILE, TRAINING_COLUMNS, WEBDATASET_DIR, validate_training_table, verify_export
from curation.schema import SchemaError
from curation.shards import ManifestError, read_manifest, read_table, write_manifest, write_table_atomic
from pipelines import export, ingest
from pipelines.common import STAGE_CONFIG, StageConfigMismatch

TARGET_MB = 0.1  # about 30 demo rows per shard


def _captioned(raw: Path, out: Path) -> Path:
    """Pair shards as the caption stage leaves them: every stage column filled, manifest with lineage."""
    manifest = read_manifest(raw)
    shards = []
    for i, shard in enumerate(manifest["shards"]):
        table = pq.read_table(raw / shard["name"])
        n, keys = table.num_rows, table.column("key").to_pylist()
        table = table.set_column(table.schema.get_field_index("matched_entries"), "matched_entries",
                                 pa.array([[j % 7, 3] for j in range(n)], pa.list_(pa.int32())))
        table = table.set_column(table.schema.get_field_index("keep_prob"), "keep_prob",
                                 pa.array([0.25] * n, pa.float32()))
        table = table.set_column(table.schema.get_field_index("rewrites"), "rewrites",
                                 pa.array([[f"a rewrite of {k}", f"another view of {k}"] for k in keys]))
        table = table.set_column(table.schema.get_field_index("synthetic_caption"), "synthetic_caption",
                                 pa.array([f"a picture ({k})" for k in keys]))
        table = table.set_column(table.schema.get_field_index("fused_caption"), "fused_caption",
                                 pa.array([f"{c} with shapes" for c in table.column("caption").to_pylist()]))
        shards.append(write_table_atomic(table, out / shard["name"]))
    write_manifest(out, stage="caption", config={"fake": True}, shards=shards, lineage=manifest["lineage"],
                   stats={"rows_in": manifest["rows"]})
    (out / STAGE_CONFIG).write_text(json.dumps({"stage": "caption", "input": str(raw), "config": {}}))
    return out


@pytest.fixture(scope="module")
def pairs(demo_dir, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("export_input")
    ingest.run(["--input", str(demo_dir / "pool"), "--output", str(base / "raw")])
    return {"raw": base / "raw", "captioned": _captioned(base / "raw", base / "captioned")}


def _argv(source: Path, output: Path, *extra: str) -> list[str]:
    return ["--input", str(source), "--output", str(output), "--shard_mb", str(TARGET_MB), "--allow_small_shards",
            "--row_group_mb", "0.02", "--seed", "7", *extra]


def _digests(directory: Path) -> dict[str, str]:
    files = sorted(directory.glob("part-*.parquet")) + sorted((directory / WEBDATASET_DIR).glob("*.tar"))
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def exported(pairs, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("exported") / "training_shards"
    export.run(_argv(pairs["captioned"], output, "--webdataset"))
    return output


def test_parquet_round_trip_keeps_every_row_and_only_training_columns(pairs, exported):
    manifest = verify_export(exported)
    source = read_table(pairs["captioned"]).sort_by("key")
    table = read_table(exported)
    assert table.column_names == list(TRAINING_COLUMNS)
    assert manifest["rows"] == table.num_rows == source.num_rows
    assert table.sort_by("key").equals(source.select(list(TRAINING_COLUMNS)).sort_by("key").cast(table.schema))
    for shard in manifest["shards"]:
        validate_training_table(pq.ParquetFile(exported / shard["name"]).schema_arrow, file=shard["name"])
    assert pq.ParquetFile(exported / manifest["shards"][0]["name"]).metadata.num_row_groups > 1
    assert manifest["seed"] == 7 and manifest["schema_version"] == "1.0"
    assert [step["stage"] for step in manifest["lineage"]] == ["demo_pool", "ingest", "caption", "export"]
    assert all(step["code_version"] for step in manifest["lineage"])


def test_every_column_but_the_image_is_zstd_with_statistics_list_leaves_too(pairs, exported, tmp_path):
    """Options named by top-level column never reached "rewrites.list.element": its text went uncompressed,
    and without statistics the trainer took an all-null list column for one holding values."""
    from training.shard_set import has_values

    footer = pq.ParquetFile(exported / "part-00000.parquet").metadata.row_group(0)
    chunks = {footer.column(i).path_in_schema: footer.column(i) for i in range(footer.num_columns)}
    assert {"rewrites.list.element", "matched_entries.list.element"} <= chunks.keys()
    for path, chunk in chunks.items():
        assert (chunk.compression, chunk.is_stats_set) == (("UNCOMPRESSED", False) if path == "image"
                                                            else ("ZSTD", True)), path
    assert has_values(exported, "rewrites")
    raw = tmp_path / "raw_export"  # ingest's pairs: no rewrites, no matches
    export.run(_argv(pairs["raw"], raw))
    assert not has_values(raw, "rewrites") and not has_values(raw, "matched_entries")


def test_shards_stay_within_ten_percent_of_the_byte_target(exported):
    manifest = read_manifest(exported)
    target = TARGET_MB * 1024 * 1024
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) >= 5
    assert all(abs(size - target) <= 0.1 * target for size in sizes[:-1]), sizes
    assert sizes[-1] <= 1.1 * target


def test_shuffle_mixes_the_input_order_and_is_reproducible(pairs, exported, tmp_path):
    source_order = read_table(pairs["captioned"], columns=["key"]).column("key").to_pylist()  # input shard order
    position = {k: i for i, k in enumerate(source_order)}
    out = [position[k] for k in read_table(exported, columns=["key"]).column("key").to_pylist()]
    assert sorted(out) == list(range(len(source_order)))
    assert abs(np.corrcoef(np.arange(len(out)), out)[0, 1]) < 0.2
    first = read_table(exported / "part-00000.parquet", columns=["key"]).column("key").to_pylist()
    assert len({position[k] // 100 for k in first}) == 4  # the first shard draws from every input shard
    other = tmp_path / "seed8"
    export.run([*_argv(pairs["captioned"], other), "--seed", "8"])
    assert read_table(other, columns=["key"]).column("key").to_pylist() != [source_order[i] for i in out]


def test_webdataset_twin_reads_back_with_the_open_clip_brace_pattern(pairs, exported):
    manifest = read_manifest(exported)
    twin = manifest["webdataset"]
    assert twin["pattern"] == f"{WEBDATASET_DIR}/{{00000..{len(manifest['shards']) - 1:05d}}}.tar"
    source = {row["key"]: row for row in read_table(pairs["captioned"]).to_pylist()}
    dataset = wds.WebDataset(str(exported / twin["pattern"]), shardshuffle=False).decode("pil")
    seen = []
    for sample in dataset:
        meta = sample["json"]
        row = source[meta["key"]]
        assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].size == (row["width"], row["height"])
        assert sample["txt"] == row["caption"]
        assert meta["rewrites"] == row["rewrites"] and meta["fused_caption"] == row["fused_caption"]
        assert meta["synthetic_caption"] == row["synthetic_caption"] and meta["keep_prob"] == pytest.approx(0.25)
        seen.append(meta["key"])
    assert seen == read_table(exported, columns=["key"]).column("key").to_pylist()  # same rows, same order
    assert [s["rows"] for s in twin["shards"]] == [s["rows"] for s in manifest["shards"]]


def test_a_tampered_shard_or_tar_is_refused(exported, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    tar = copy / WEBDATASET_DIR / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:-1] + b"x")
    with pytest.raises(ManifestError, match="00001.tar"):
        verify_export(copy)
    shard = copy / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-9] + b"x" * 9)
    with pytest.raises(ManifestError, match="part-00002"):
        verify_export(copy)


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.1])
def test_a_keep_probability_outside_0_1_is_refused_naming_its_row(pairs, tmp_path, value):
    source = tmp_path / "bad"
    source.mkdir()
    table = pq.read_table(pairs["captioned"] / "part-00000.parquet")
    probs = [0.25] * table.num_rows
    probs[3] = value
    table = table.set_column(table.schema.get_field_index("keep_prob"), "keep_prob", pa.array(probs, pa.float32()))
    write_manifest(source, stage="caption", config={}, shards=[write_table_atomic(table, source / "part-00000.parquet")])
    with pytest.raises(SchemaError, match=r"keep_prob .* is not in \[0, 1\].*row 4"):
        export.run(_argv(source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_row_group_size_that_is_not_positive_is_refused(pairs, tmp_path, value):
    with pytest.raises(ValueError, match=f"--row_group_mb must be positive, got {value}"):
        export.run(_argv(pairs["captioned"], tmp_path / "out", "--row_group_mb", value))
    assert not (tmp_path / "out").exists()


def test_an_input_whose_checks_failed_is_refused_before_it_is_planned(pairs, tmp_path, monkeypatch):
    import shutil

    from curation.failed_checks import FailedChecksError, record_failed_checks

    source = tmp_path / "captioned"
    shutil.copytree(pairs["captioned"], source)
    record_failed_checks(source, read_manifest(source), ["valid_rewrite_share"])
    monkeypatch.setattr(export, "plan_export", lambda *args: pytest.fail("planned from every row"))
    with pytest.raises(FailedChecksError, match="valid_rewrite_share"):
        export.run(_argv(source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_data_card_and_plots_sit_beside_the_shards(exported):
    manifest = read_manifest(exported)
    card = (exported / manifest["datacard"]["file"]).read_text()
    assert manifest["stats"]["plots"] == manifest["datacard"]["plots"]
    for plot in manifest["stats"]["plots"]:
        assert (exported / plot).stat().st_size > 1000 and f"]({plot})" in card
    assert "datacard_contact_sheet.png" in manifest["stats"]["plots"]
    assert "| ingest |" in card and "| caption |" in card and "| export |" in card
    assert "Entry counts: not available" in card and "Rewrite acceptance: not available" in card
    assert manifest["stats"]["caption_lengths"]["rewrites"]["count"] == 2 * manifest["rows"]


def test_kill_then_rerun_gives_the_uninterrupted_bytes(pairs, exported, tmp_path, monkeypatch):
    output = tmp_path / "killed"
    export.run(_argv(pairs["captioned"], output, "--webdataset"))
    baseline = _digests(exported)
    assert _digests(output) == baseline
    # What a kill leaves: no manifest, some shards, a tar without its Parquet commit point, a temp file.
    (output / "manifest.json").unlink()
    for name in ("part-00001.parquet", "part-00003.parquet", f"{WEBDATASET_DIR}/00004.tar"):
        (output / name).unlink()
    (output / "part-00004.parquet").unlink()
    (output / ".part-00005.parquet.tmp-123").write_bytes(b"half")
    result = export.run(_argv(pairs["captioned"], output, "--webdataset"))
    assert result.manifest["stats"]["resumed_shards"] == len(result.manifest["shards"]) - 3
    # Its throughput counts the three shards it wrote, not the kept ones it took no time over.
    stats, redone = result.manifest["stats"], {"part-00001.parquet", "part-00003.parquet", "part-00004.parquet"}
    redone_mb = sum(s["bytes"] for s in result.manifest["shards"] if s["name"] in redone) / 2 ** 20
    assert abs(stats["mb_per_s"] * stats["seconds"] - redone_mb) <= 0.005 * stats["seconds"] + 1e-3
    assert _digests(output) == baseline
    assert not list(output.glob(".*.tmp-*"))
    # Once finished, a rerun finds nothing to do and leaves the manifest and the data card as they are,
    # reading no input row and hashing no byte (planning would read every image).
    written = {name: (output / name).read_bytes() for name in ("manifest.json", result.manifest["datacard"]["file"])}
    monkeypatch.setattr(export, "plan_export", lambda *a, **k: pytest.fail("an up-to-date rerun planned"))
    monkeypatch.setattr(curation.shards, "file_sha256", lambda path: pytest.fail(f"an up-to-date rerun hashed {path}"))
    again = export.run(_argv(pairs["captioned"], output, "--webdataset"))
    assert again.up_to_date and again.manifest == json.loads(written["manifest.json"])
    assert {name: (output / name).read_bytes() for name in written} == written
    (output / f"{WEBDATASET_DIR}/00001.tar").unlink()  # a twin lost: not up to date, made again
    monkeypatch.undo()
    assert not export.run(_argv(pairs["captioned"], output, "--webdataset")).up_to_date
    assert _digests(output) == baseline
    # Damaged since (a bad copy): every file is there, but one shard and one twin have other sizes than the
    # manifest records. They were called up to date, and the trainer then refused the export on every rerun.
    with open(output / "part-00002.parquet", "ab") as f:
        f.write(b"\0" * 100)
    tar = output / WEBDATASET_DIR / "00003.tar"
    tar.write_bytes(tar.read_bytes()[:1024])
    again = export.run(_argv(pairs["captioned"], output, "--webdataset"))
    assert not again.up_to_date and again.manifest["stats"]["resumed_shards"] == len(again.manifest["shards"]) - 2
    assert _digests(output) == baseline
    verify_export(output)


def test_a_partial_export_of_other_rows_is_refused(pairs, tmp_path):
    output = tmp_path / "partial"
    export.run(_argv(pairs["captioned"], output))
    plan = json.loads((output / PLAN_FILE).read_text())
    plan["shard_rows"][0] += 1
    (output / PLAN_FILE).write_text(json.dumps(plan))
    (output / "manifest.json").unlink()  # partial: its shards were cut by another plan
    with pytest.raises(StageConfigMismatch, match="--overwrite"):
        export.run(_argv(pairs["captioned"], output))
    rerun = export.run(_argv(pairs["captioned"], output, "--overwrite"))
    assert rerun.rows == read_manifest(pairs["captioned"])["rows"]


def test_straight_after_an_earlier_stage_with_null_captions_and_optional_columns(pairs, tmp_path):
    result = export.run(_argv(pairs["raw"], tmp_path / "out", "--export_columns", "url,sha256"))
    table = read_table(tmp_path / "out")
    assert table.column_names == [*TRAINING_COLUMNS, "url", "sha256"]
    assert table.column("fused_caption").null_count == table.num_rows == result.rows
    card = (tmp_path / "out" / "datacard.md").read_text()
    assert "| fused | 0 |" in card


def test_shards_of_core_columns_only_export_with_null_stage_columns(pairs, tmp_path):
    """The pair schema's stage columns are optional: a shard without them failed with a bare KeyError."""
    from curation.schema import CORE_FIELDS

    (tmp_path / "core").mkdir()
    for path in sorted(pairs["raw"].glob("part-*.parquet")):
        pq.write_table(pq.read_table(path, columns=[f.name for f in CORE_FIELDS]), tmp_path / "core" / path.name)
    result = export.run(_argv(tmp_path / "core", tmp_path / "out"))
    table = read_table(tmp_path / "out")
    assert table.num_rows == result.rows == read_manifest(pairs["raw"])["rows"]
    assert table.column("rewrites").null_count == table.num_rows


def _break(raw: Path, out: Path, edit) -> Path:
    import shutil
    shutil.copytree(raw, out)
    path = out / "part-00001.parquet"
    table = edit(pq.read_table(path))
    pq.write_table(table, path)
    return out


def test_bad_input_is_refused_before_anything_is_written(pairs, tmp_path):
    def no_image(table):
        images = table.column("image").to_pylist()
        images[5] = b""
        return table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))

    cases = {
        "missing image": (_break(pairs["raw"], tmp_path / "a", no_image), SchemaError, r"missing image.*row 6\)"),
        "schema": (_break(pairs["raw"], tmp_path / "b", lambda t: t.drop_columns(["caption"])), SchemaError,
                   r"part-00001.parquet.*'caption'"),
        "null": (_break(pairs["raw"], tmp_path / "c", lambda t: t.set_column(
            2, "caption", pc.if_else(pc.equal(t.column("key"), t.column("key")[3]), None, t.column("caption")))),
                 SchemaError, r"null.*'caption'.*row 4\)"),
    }
    for name, (source, error, message) in cases.items():
        (source / "manifest.json").unlink()  # the schema checks, not the checksums, must catch these
        with pytest.raises(error, match=message):
            export.run(_argv(source, tmp_path / f"out-{name}"))
        assert not (tmp_path / f"out-{name}").exists(), name
    tampered = _break(pairs["raw"], tmp_path / "d", lambda t: t)
    with pytest.raises(ManifestError, match="checksum"):
        export.run(_argv(tampered, tmp_path / "out-checksum"))
    assert not (tmp_path / "out-checksum").exists()


def test_byte_target_outside_the_range_is_refused(pairs, tmp_path):
    with pytest.raises(ValueError, match="allow_small_shards"):
        export.run(["--input", str(pairs["raw"]), "--output", str(tmp_path / "x"), "--shard_mb", "8"])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sigkill_mid_export_then_rerun_gives_the_uninterrupted_bytes(tmp_path):
    generate(tmp_path / "src", n_pairs=1000, n_eval=0, rows_per_shard=250, broken_fraction=0)
    ingest.run(["--input", str(tmp_path / "src" / "pool"), "--output", str(tmp_path / "raw")])
    argv = ["--input", str(tmp_path / "raw"), "--shard_mb", "0.01", "--allow_small_shards", "--webdataset"]
    export.run(argv + ["--output", str(tmp_path / "baseline")])

    output = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "export", *argv, "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(output.glob("part-*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(output.glob("part-*.parquet")))
    total = len(read_manifest(tmp_path / "baseline")["shards"])
    assert 0 < written < total, "the kill must land in the middle of the export"
    assert not (output / "manifest.json").exists()
    export.run(argv + ["--output", str(output)])
    assert _digests(output) == _digests(tmp_path / "baseline")
