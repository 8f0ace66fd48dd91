"""Each data-quality check fails on the bad data it exists for, and passes on good data."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from assets import checks
from curation.schema import PAIR_SCHEMA
from curation.shards import info_for, read_manifest, write_manifest, write_table_atomic


def _pairs(n: int, *, keys=None, rewrites=None, entries=None) -> pa.Table:
    rows = [{"key": (keys or [f"k{i}" for i in range(n)])[i], "url": None, "caption": f"caption {i}",
             "image": b"\xff\xd8", "width": 8, "height": 8, "sha256": f"{i:064x}", "source": "test",
             "matched_entries": entries[i] if entries else None, "keep_prob": None,
             "rewrites": rewrites[i] if rewrites else None, "synthetic_caption": None, "fused_caption": None}
            for i in range(n)]
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def _dataset(directory, *tables):
    infos = [write_table_atomic(t, directory / f"part-{i:05d}.parquet") for i, t in enumerate(tables)]
    write_manifest(directory, stage="test", config={}, shards=infos)
    return directory


def test_schema_check_catches_a_key_repeated_across_shards(tmp_path):
    good = _dataset(tmp_path / "good", _pairs(3), _pairs(2, keys=["k3", "k4"]))
    assert checks.schema_valid("a", good).passed
    bad = _dataset(tmp_path / "bad", _pairs(3), _pairs(2, keys=["k3", "k0"]))
    result = checks.schema_valid("a", bad)
    assert not result.passed and "duplicate key 'k0'" in result.metadata["error"].value


def test_checksum_check_catches_a_changed_shard(tmp_path):
    data = _dataset(tmp_path / "d", _pairs(3))
    assert checks.checksums_match("a", data).passed
    write_table_atomic(_pairs(2), data / "part-00000.parquet")
    assert info_for(data / "part-00000.parquet").rows == 2
    assert not checks.checksums_match("a", data).passed


def test_an_unreadable_shard_fails_the_schema_check_instead_of_the_step(tmp_path):
    """A corrupt training shard raised out of the check, losing the step's other check results."""
    for training in (False, True):
        data = _dataset(tmp_path / f"d{training}", _pairs(3))
        (data / "part-00000.parquet").write_bytes(b"PAR1 not parquet at all PAR1")
        result = checks.schema_valid("a", data, training=training)
        assert not result.passed and "part-00000.parquet" in result.metadata["error"].value


def test_an_unreadable_shard_fails_the_share_and_balance_checks_through_the_stage_step(tmp_path):
    """They raised out of the step: no result, no failure recorded, the earlier passing evaluation stood."""
    from assets.stages import STAGES, stage_checks
    from tests.assets.helpers import stage_resources

    data = _dataset(tmp_path / "d", _pairs(3, rewrites=[["a new wording"]] * 3))
    (data / "part-00000.parquet").write_bytes(b"PAR1 not parquet at all PAR1")
    gates = stage_resources(tmp_path)["gates"]
    for name, check in (("rewrite", checks.REWRITES), ("caption", checks.CAPTIONS)):
        (stage,) = [s for s in STAGES if s.name == name]
        results = {r.check_name: r for r in stage_checks(stage, data, read_manifest(data), {"reject_ratio": 0.0},
                                                          stage.config(), gates, None)}
        assert not results[check].passed and "cannot be read" in results[check].metadata["error"].value


def test_an_export_s_checksum_check_covers_its_webdataset_tars(tmp_path):
    """Only the Parquet shards were checked: a truncated tar passed."""
    from curation.shards import file_sha256

    data = tmp_path / "export"
    data.mkdir()
    info = write_table_atomic(_pairs(3), data / "part-00000.parquet")
    (data / "webdataset").mkdir()
    tar = data / "webdataset" / "00000.tar"
    tar.write_bytes(b"t" * 1024)
    write_manifest(data, stage="export", config={}, shards=[info], webdataset={
        "directory": "webdataset", "rows": 3, "shards": [{"name": tar.name, "rows": 3, "bytes": 1024,
                                                          "sha256": file_sha256(tar)}]})
    assert checks.checksums_match("a", data, export=True).passed
    tar.write_bytes(b"t" * 512)
    assert checks.checksums_match("a", data).passed  # the Parquet side alone cannot see it
    result = checks.checksums_match("a", data, export=True)
    assert not result.passed and "00000.tar" in result.metadata["error"].value


def test_the_export_row_check_counts_what_the_files_hold(tmp_path):
    """It compared the manifest's own row counts, which export had already checked: it could not fail."""
    from curation.export import webdataset_bytes

    data = tmp_path / "export"
    (data / "webdataset").mkdir(parents=True)
    tables = [_pairs(3), _pairs(2, keys=["k3", "k4"])]
    infos = [write_table_atomic(t, data / f"part-{i:05d}.parquet") for i, t in enumerate(tables)]

    def exported(*tars: pa.Table) -> dict:
        for i, table in enumerate(tars):
            (data / "webdataset" / f"{i:05d}.tar").write_bytes(webdataset_bytes(table))
        return write_manifest(data, stage="export", config={}, shards=infos, webdataset={
            "directory": "webdataset", "rows": 5, "shards": [{"name": f"{i:05d}.tar"} for i in range(len(tars))]})

    assert checks.rows_conserved("a", data, exported(*tables), 5).passed
    assert not checks.rows_conserved("a", data, exported(*tables), 6).passed  # an upstream row is missing
    one_short = checks.rows_conserved("a", data, exported(tables[0], tables[1].slice(0, 1)), 5)
    assert not one_short.passed and one_short.metadata["webdataset_samples"].value == 4
    merged = tables[1].set_column(0, "key", pa.array(["k3", "k3"]))  # one member stem: webdataset reads 1 sample
    assert not checks.rows_conserved("a", data, exported(tables[0], merged), 5).passed
    extra = checks.rows_conserved("a", data, exported(*tables, tables[1]), 5)  # a tar with no Parquet twin
    assert not extra.passed and extra.metadata["shards_whose_tar_differs"].value == ["00002.tar"]
    (data / "webdataset" / "00002.tar").unlink()
    exported(*tables)
    (data / "webdataset" / "00001.tar").unlink()
    assert "00001.tar" in checks.rows_conserved("a", data, read_manifest(data), 5).metadata["error"].value


def test_rewrite_share_does_not_count_the_original_held_as_a_fallback(tmp_path):
    fallback = [[f"caption {i}", f"caption {i}"] for i in range(4)]
    data = _dataset(tmp_path / "d", _pairs(4, rewrites=fallback[:3] + [["caption 3", "a new wording"]]))
    result = checks.valid_rewrite_share("a", data, threshold=0.5)
    assert not result.passed and result.metadata["rewritten"].value == 1
    assert checks.valid_rewrite_share("a", data, threshold=0.25).passed


def test_rewrite_share_counts_only_the_rows_chosen_for_rewriting(tmp_path):
    """--rewrite_row_fraction 0.4 leaves 60% of rows with null rewrites: with every chosen row rewritten the
    gate of 0.5 passes; a chosen row falling back still counts against it; no chosen row at all fails."""
    chosen = [[f"new wording {i}"] if i < 4 else None for i in range(10)]
    data = _dataset(tmp_path / "d", _pairs(10, rewrites=chosen))
    result = checks.valid_rewrite_share("a", data, threshold=0.5)
    assert result.passed and result.metadata["share"].value == 1.0
    assert result.metadata["rows_not_selected"].value == 6
    chosen[0] = ["caption 0"]
    chosen[1] = ["caption 1"]
    chosen[2] = ["caption 2"]
    assert not checks.valid_rewrite_share("a", _dataset(tmp_path / "e", _pairs(10, rewrites=chosen)), 0.5).passed
    assert not checks.valid_rewrite_share("a", _dataset(tmp_path / "f", _pairs(10)), 0.0).passed


def test_balance_check_holds_each_entry_to_what_its_keep_probabilities_promise(demo_dir, tmp_path):
    """A flat cap near t failed correct output: head entries ride along with their rarer co-entries."""
    import shutil

    from pipelines import balance, ingest

    raw = ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw")]).output
    outputs = []
    for flags in (["--online_curation"], []):  # the stage's own metadata, not the demo's: many co-entries
        output = balance.run(["--input", str(raw), "--output", str(tmp_path / f"balanced{len(flags)}"),
                              "--t", "5", *flags]).output
        result = checks.entries_balanced("a", output, 5.0, slack=0.1, online=bool(flags))
        assert result.passed, result.metadata["entries_over_limit"].value
        assert result.metadata["max_kept"].value > 5 * 1.5 + 4 * 5 ** 0.5  # the old cap's limit
        outputs.append(output)
    # Every matched pair kept where the draw should have dropped most (a broken sampler): flagged, by name.
    online, output = outputs
    for path in sorted(online.glob("part-*.parquet")):
        shutil.copy(path, output / path.name)
    result = checks.entries_balanced("a", output, 5.0, slack=0.1, online=False)
    assert not result.passed and all(v["kept"] > v["expected"] for v in result.metadata["entries_over_limit"].value.values())
    shutil.rmtree(output / "entry_matches")
    result = checks.entries_balanced("a", output, 5.0, slack=0.1)
    assert not result.passed and "nothing to judge" in result.metadata["error"].value


def test_reject_ratio_check_compares_with_the_threshold():
    assert checks.reject_ratio("a", 0.1, 0.2).passed
    assert not checks.reject_ratio("a", 0.3, 0.2).passed
    assert checks.reject_ratio("a", 0.1, 0.2, download=(0.35, 0.5)).passed  # dead links have their own limit
    failed = checks.reject_ratio("a", 0.1, 0.2, download=(0.6, 0.5))
    assert not failed.passed and failed.metadata["download_failure_ratio"].value == 0.6


def test_ingest_judges_dead_links_apart_from_the_rows_that_downloaded():
    """A URL list that lost 35% of its links to dead URLs failed the one 20% limit: an ordinary crawl."""
    from assets.resources import QualityGatesResource
    from assets.stages import STAGES, stage_checks

    ingest = next(stage for stage in STAGES if stage.name == "ingest")
    manifest = {"rows": 585, "stats": {"rows_in": 1000},
                "rejects": {"rows": 415, "by_reason": {"download_failed": 350, "empty_caption": 65}}}

    def judge(gates):
        return next(r for r in stage_checks(ingest, Path("/nonexistent"), manifest, {}, None, gates, None)
                    if r.check_name == checks.REJECT_RATIO)
    result = judge(QualityGatesResource())
    assert result.passed and result.metadata["reject_ratio"].value == 0.1  # 65 of the 650 that downloaded
    assert result.metadata["download_failure_ratio"].value == 0.35
    assert not judge(QualityGatesResource(max_download_failure_ratio=0.3)).passed
    assert not judge(QualityGatesResource(max_reject_ratio=0.05)).passed


def test_an_export_s_metadata_counts_its_webdataset_twin(tmp_path):
    """Its tars are about as many bytes again as its Parquet files: the metadata left them out."""
    from assets.report import stage_metadata

    data = _dataset(tmp_path / "d", _pairs(3))
    twin = {"directory": "webdataset", "pattern": "webdataset/{00000..00001}.tar", "bytes": 2048,
            "shards": [{"name": "00000.tar"}, {"name": "00001.tar"}]}
    manifest = {**read_manifest(data), "webdataset": twin}
    metadata = stage_metadata(manifest, data, str(data))
    assert metadata["bytes"] == manifest["bytes"] and metadata["webdataset_bytes"] == 2048
    assert metadata["webdataset_shards"] == 2 and metadata["webdataset_pattern"].endswith("{00000..00001}.tar")
    assert "webdataset_bytes" not in stage_metadata(read_manifest(data), data, str(data))


def test_balance_check_reads_each_kept_rows_entries_and_keep_prob(demo_dir, tmp_path):
    """Counted per entry alone, rows whose matched_entries were nulled counted for nothing, and keep_prob
    (what the trainer draws with under online curation) was never read: an online output with every
    keep_prob at 1.0, or half its rows gone, passed."""
    import shutil

    from pipelines import balance, ingest

    raw = ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw")]).output

    def balanced(name, *flags):
        return balance.run(["--input", str(raw), "--output", str(tmp_path / name), "--t", "5", *flags]).output

    def damaged(source, name, change):
        target = tmp_path / name
        shutil.copytree(source, target)
        for path in sorted(target.glob("part-*.parquet")):
            pq.write_table(change(pq.read_table(path)), path)
        return target

    def nulled(table, column):
        i = table.schema.get_field_index(column)
        return table.set_column(i, table.schema.field(i), pa.nulls(table.num_rows, table.schema.field(i).type))

    def wrong(output, online):
        result = checks.entries_balanced("a", output, 5.0, slack=0.1, online=online)
        return None if result.passed else result.metadata

    for online, flags in ((True, ["--online_curation"]), (False, [])):
        good = balanced(f"good{online}", *flags)
        assert wrong(good, online) is None
        lost = wrong(damaged(good, f"lost{online}", lambda t: nulled(nulled(t, "matched_entries"), "keep_prob")), online)
        assert lost["kept_rows_wrong"].value.keys() == {"with_other_matched_entries", "with_a_wrong_keep_prob"}
        half = wrong(damaged(good, f"half{online}", lambda t: t.slice(0, t.num_rows // 2)), online)
        if online:
            assert half["kept_rows_wrong"].value["matched_pairs_missing"] > 0
        else:  # within every entry's limit, but far fewer rows than the draw keeps
            assert half["rows_kept"].value < half["rows_expected"].value / 1.5
    ones = damaged(balanced("online", "--online_curation"), "ones", lambda t: t.set_column(
        t.schema.get_field_index("keep_prob"), "keep_prob", pa.array([1.0] * t.num_rows, pa.float32())))
    assert wrong(ones, True)["kept_rows_wrong"].value["with_a_wrong_keep_prob"] > 0


def test_an_output_of_many_shards_lists_the_first_thousand_paths_in_its_metadata():
    """Every path went into each materialisation's event: some 10 MB at 160,000 shards."""
    from assets.report import SHARD_PATHS_SHOWN, location_metadata

    manifest = {"shards": [{"name": f"part-{i:05d}.parquet"} for i in range(SHARD_PATHS_SHOWN + 5)]}
    metadata = location_metadata(manifest, "s3://bucket/b1/raw_pairs")
    assert len(metadata["shard_paths"].value) == SHARD_PATHS_SHOWN
    assert metadata["shard_paths"].value[0] == "s3://bucket/b1/raw_pairs/part-00000.parquet"
    assert metadata["shard_paths_not_shown"] == 5
    assert "shard_paths_not_shown" not in location_metadata({"shards": manifest["shards"][:3]}, "/b1/raw_pairs")
