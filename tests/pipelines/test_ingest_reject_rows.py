"""A reject's `row` is 1-based in every input kind: the line of a CSV/TSV/JSONL list (a header row counts), the
row of a Parquet list, pair shard or img2dataset file, an image's place in its folder's sorted listing."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.rejects import REJECT_SCHEMA
from curation.shards import read_table
from pipelines import ingest


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _rows_by_key(output) -> dict[str, tuple[str, int, str]]:
    return {r["key"]: (r["reason"], r["row"], r["source"]) for r in read_table(output / "rejects").to_pylist()}


# Private hosts are screened out (no --allow_private_network), so nothing is downloaded: every row is a reject.
URLS = [("a", "http://10.0.0.1/a.jpg"), ("b", "javascript:alert(1)"), ("c", "http://10.0.0.3/c.jpg")]


def _write_list(path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(pa.table({"key": [k for k, _ in URLS], "url": [u for _, u in URLS],
                                 "caption": ["thing"] * 3}), path)
    elif fmt == "jsonl":  # a blank line is still a line of the file
        lines = [json.dumps({"key": k, "url": u, "caption": "thing"}) for k, u in URLS]
        path.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text("\n".join([sep.join(("key", "url", "caption")),
                                   *(sep.join((k, u, "thing")) for k, u in URLS)]) + "\n")


@pytest.mark.parametrize("fmt, lines", [("csv", (2, 3, 4)), ("tsv", (2, 3, 4)), ("jsonl", (1, 3, 4)),
                                        ("parquet", (1, 2, 3))])
def test_a_url_lists_rejects_name_its_1_based_lines(tmp_path, fmt, lines):
    listing = tmp_path / f"list.{fmt}"
    _write_list(listing, fmt)
    result = ingest.run(["--url_list", str(listing), "--output", str(tmp_path / "raw")])
    assert result.rejects == {"bad_url": 3}
    rows = _rows_by_key(tmp_path / "raw")
    assert {k: rows[k][1] for k in "abc"} == dict(zip("abc", lines))
    assert rows["b"][0] == "bad_url" and rows["b"][2] == str(listing)


def test_pair_shards_rejects_and_duplicates_name_1_based_rows_across_batches(tmp_path):
    """Batches of two rows: the third row is the first of the second batch, where an offset counted from 0
    named row 2 (an empty caption) and the fourth row (a copy of the first image) row 3."""
    (tmp_path / "in").mkdir()
    images = [_jpeg((200, 0, 0)), _jpeg((0, 200, 0)), _jpeg((0, 0, 200)), _jpeg((200, 0, 0))]
    pq.write_table(pa.table({"key": ["k1", "k2", "k3", "k4"], "caption": ["red", "green", " ", "red again"],
                             "image": images}), tmp_path / "in" / "part-00000.parquet")
    result = ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "raw"), "--batch_rows", "2"])
    assert result.rejects == {"empty_caption": 1, "duplicate": 1}
    rows = _rows_by_key(tmp_path / "raw")
    assert rows["k3"][:2] == ("empty_caption", 3) and rows["k4"][:2] == ("duplicate", 4)
    assert rows["k4"][2] == str(tmp_path / "in" / "part-00000.parquet")


def test_an_img2dataset_folders_failed_download_names_its_1_based_row(tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"], "caption": ["a", "b", "c"],
                             "url": ["http://x/0", "http://x/1", "http://x/2"],
                             "jpg": [_jpeg((9, 9, 9)), None, _jpeg((90, 9, 9))],
                             "status": ["success", "failed_to_download", "success"],
                             "error_message": [None, "HTTP Error 404: Not Found", None]}),
                   folder / "00000.parquet")
    (folder / "00000_stats.json").write_text("{}")
    result = ingest.run(["--input", str(folder), "--output", str(tmp_path / "raw")])
    assert result.rows == 2 and result.rejects == {"download_failed": 1}
    assert _rows_by_key(tmp_path / "raw")["000000001"][:2] == ("download_failed", 2)


def test_an_image_folders_rejects_name_each_images_1_based_place(tmp_path):
    """Staged two images a shard: the third image is the first of the second staged shard."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff not really")
    Image.new("RGB", (20, 20), (0, 0, 200)).save(folder / "c.jpg")
    for name in ("a", "b"):
        (folder / f"{name}.txt").write_text(f"photo {name}")
    result = ingest.run(["--input", str(folder), "--output", str(tmp_path / "raw"), "--list_shard_rows", "2"])
    assert result.rejects == {"undecodable_image": 1, "empty_caption": 1}
    rows = _rows_by_key(tmp_path / "raw")
    assert rows["b"][:2] == ("undecodable_image", 2) and rows["c"][:2] == ("empty_caption", 3)


def test_the_rejects_files_say_how_rows_are_counted(tmp_path):
    (tmp_path / "list.csv").write_text("url,caption\njavascript:x,thing\n")
    ingest.run(["--url_list", str(tmp_path / "list.csv"), "--output", str(tmp_path / "raw")])
    (path,) = (tmp_path / "raw" / "rejects").glob("part-*.parquet")
    description = pq.read_schema(path).field("row").metadata[b"description"].decode()
    assert description == REJECT_SCHEMA.field("row").metadata[b"description"].decode()
    assert description.startswith("1-based")
