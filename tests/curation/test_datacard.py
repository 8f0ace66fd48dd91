import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.datacard import (
    CONTACT_SHEET, DATACARD, ENTRY_COUNTS_PLOT, REWRITE_PLOT, rewrite_acceptance, stage_count_rows, upstream_stages,
    write_datacard,
)
from curation.export import ExportConfig, export_schema, parquet_bytes
from curation.shards import STAGE_CONFIG, write_manifest


def _stage(directory: Path, stage: str, rows: int, upstream: Path | None, **extra) -> Path:
    directory.mkdir(parents=True)
    write_manifest(directory, stage=stage, config={}, shards=[], **extra)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["rows"] = rows  # no shard files are needed for the card
    (directory / "manifest.json").write_text(json.dumps(manifest))
    if upstream is not None:
        (directory / STAGE_CONFIG).write_text(json.dumps({"stage": stage, "input": str(upstream), "config": {}}))
    return directory


def _chain(root: Path) -> Path:
    raw = _stage(root / "raw", "ingest", 90, None, rejects={"rows": 10, "by_reason": {"empty_caption": 6,
                                                                                       "undecodable_image": 4}})
    balanced = _stage(root / "balanced", "balance", 40, raw,
                      stats={"rows_in": 90, "entry_counts": "entry_counts.parquet"})
    pq.write_table(pa.table({"entry_id": pa.array([0, 1, 2, 3], pa.int32()),
                             "entry": ["red circle", "blue square", "dog", "unseen"],
                             "count": pa.array([50, 30, 2, 0], pa.uint64()), "p": [0.2, 0.33, 1.0, 1.0],
                             "kept": pa.array([10, 10, 2, 0], pa.uint64())}), balanced / "entry_counts.parquet")
    rewritten = _stage(root / "rewritten", "rewrite", 40, balanced,
                       stats={"rewrite": {"kept": 60, "rejected.echo": 15, "rejected.too_short": 5, "requests": 80,
                                          "fallback_share": 0.1}})
    return _stage(root / "captioned", "caption", 40, rewritten)


def _image(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(out, format="JPEG")
    return out.getvalue()


def _shard(path: Path, n: int) -> Path:
    rows = [{"key": f"k{i}", "image": _image("red" if i % 2 else "blue"), "caption": "a red thing " * (1 + i % 3),
             "rewrites": ["one two three", "four five"], "synthetic_caption": "vec",
             "fused_caption": "fused words here",
             "keep_prob": 1.0, "matched_entries": [0]} for i in range(n)]
    table = pa.Table.from_pylist(rows, schema=export_schema(ExportConfig().columns))
    path.write_bytes(parquet_bytes(table, 1 << 20))
    return path


def test_upstream_chain_is_followed_oldest_first_and_counted(tmp_path):
    records = upstream_stages(_chain(tmp_path), STAGE_CONFIG)
    assert [r.stage for r in records] == ["ingest", "balance", "rewrite", "caption"]
    counts = stage_count_rows(records)
    assert counts[0] == {"stage": "ingest", "rows_in": 100, "rows_out": 90, "rejected": 10, "dropped": 0,
                         "by_reason": {"empty_caption": 6, "undecodable_image": 4}}
    assert [(c["rows_in"], c["rows_out"]) for c in counts[1:]] == [(90, 40), (40, 40), (40, 40)]
    assert [c["dropped"] for c in counts[1:]] == [50, 0, 0]  # balance's draw: no rejects, yet 50 rows fewer
    records[1].manifest["stats"]["rows_dropped_by_sampling"] = 48  # balance's own count wins (2 rows are not)
    records[2].manifest["rows"] = 38  # a rewrite that lost 2 rows without a reject: shown, not hidden
    assert [c["dropped"] for c in stage_count_rows(records)[1:]] == [48, 2, -2]
    assert rewrite_acceptance(records) == {"accepted": 60, "rejected_by_reason": {"echo": 15, "too_short": 5}}


def test_rewrite_acceptance_reads_nested_reason_counts():
    from curation.datacard import StageRecord
    record = StageRecord("rewrite", Path("."), {"stats": {"accepted_rewrites": 7, "rejected_by_reason": {"echo": 2},
                                                          "rejected.chatter": 1}})
    assert rewrite_acceptance([record]) == {"accepted": 7, "rejected_by_reason": {"chatter": 1, "echo": 2}}
    assert rewrite_acceptance([StageRecord("rewrite", Path("."), {"stats": {"seconds": 3}})]) is None


def test_write_datacard_with_every_section_available(tmp_path):
    records = upstream_stages(_chain(tmp_path / "chain"), STAGE_CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    shards = [_shard(out / "part-00000.parquet", 10), _shard(out / "part-00001.parquet", 10)]
    card = write_datacard(out, records=records, shards=shards, export_summary={
        "rows": 20, "shards": 2, "bytes": 1000, "seed": 0, "schema_version": "1.0", "target_bytes": 1 << 20})
    text = (out / DATACARD).read_text()
    assert set(card["plots"]) >= {ENTRY_COUNTS_PLOT, REWRITE_PLOT, CONTACT_SHEET}
    for plot in card["plots"]:
        assert (out / plot).is_file() and f"]({plot})" in text
    assert "| ingest | 100 | 90 | 10 | 0 | empty_caption: 6, undecodable_image: 4 |" in text
    assert "| balance | 90 | 40 | 0 | 50 | - |" in text
    # Export's row ends the table (it sat below the footnote, outside it, one cell short).
    assert "| caption | 40 | 40 | 0 | 0 | - |\n| export | 20 | 20 | 0 | 0 | - |\n\nDropped, no reject" in text
    assert "top before: [50, 30, 2], top after: [10, 10, 2]" in text
    assert "Accepted 60 of 80 generated rewrites (75.0%)" in text and "| echo | 15 | 18.8% |" in text
    assert card["caption_lengths"]["alt_text"] == {"count": 20, "mean": 5.7, "median": 6.0, "p95": 9.0}
    with Image.open(out / CONTACT_SHEET) as sheet:
        assert sheet.size[0] > 800
    assert "first 16 rows" in text


def test_datacard_says_not_available_without_upstream(tmp_path):
    shard = _shard(tmp_path / "part-00000.parquet", 3)
    card = write_datacard(tmp_path, records=[], shards=[shard], export_summary={
        "rows": 3, "shards": 1, "bytes": 1, "seed": 0, "schema_version": "1.0", "target_bytes": 1 << 20})
    text = (tmp_path / DATACARD).read_text()
    assert text.count("not available") >= 3 and ENTRY_COUNTS_PLOT not in card["plots"]
    assert "first 3 rows" in text


def test_caption_lengths_count_words_as_validation_does_and_only_the_rewrites_training_draws(tmp_path):
    from curation.datacard import caption_lengths

    rows = [{"key": "a", "image": _image("red"), "caption": "一只红色的狗在草地上奔跑",
             "rewrites": ["一只红狗在绿色草地上跑", "一只红色的狗在草地上奔跑"]},  # the second: a fallback copy
            {"key": "b", "image": _image("blue"), "caption": "a red dog", "rewrites": ["a red dog", " a red dog "]}]
    table = pa.Table.from_pylist(rows, schema=export_schema(("key", "image", "caption", "rewrites", "fused_caption")))
    (tmp_path / "part-00000.parquet").write_bytes(parquet_bytes(table, 1 << 20))
    lengths = caption_lengths([tmp_path / "part-00000.parquet"])
    assert lengths.alt_text.tolist() == [6, 3]  # twelve characters make six words, as word_count counts
    assert lengths.rewrites.tolist() == [6]  # neither copy of a caption is a rewrite
