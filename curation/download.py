"""From a URL list to downloaded images: screening, staging and img2dataset.

The list is first staged as Parquet shards of `shard_rows` rows (shard j holds
list rows [j*shard_rows, (j+1)*shard_rows)), each row with its key, its origin
(file and line) and the screening verdict. The rows that pass screening go to
img2dataset, one input file per list shard, so img2dataset shard k is the
download of exactly one list shard and the ingest output shard j is made from
list shard j. img2dataset keeps its own distributor (processes x threads) and
its own resume: in `incremental` mode a rerun skips the shards whose
`_stats.json` exists, so killing a run and starting it again downloads only
what is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.ingest import ERROR, ORIGIN_FILE, ORIGIN_LINE, SCREEN_DETAIL, SCREEN_REASON, STATUS
from curation.records import MAX_CAPTION_CHARS, MAX_IMAGE_PIXELS, Rejected, clean_caption
from curation.shards import finished_shards, shard_name, write_table_atomic
from curation.url_lists import Layout, UrlListError, list_files, read_list, screen_url

ROW = "_row"  # the row's index in the staged list, carried through img2dataset to join the results back
FIXED_TYPES = {"key": pa.string(), "url": pa.string(), "caption": pa.string(), ROW: pa.int64(),
               ORIGIN_FILE: pa.string(), ORIGIN_LINE: pa.int64(), SCREEN_REASON: pa.string(),
               SCREEN_DETAIL: pa.string()}
# What staging and the download write into each row: a list's own column of one of these names would
# overwrite the screened value, or the download's verdict, without a word.
RESERVED = frozenset({*FIXED_TYPES, STATUS, ERROR, "image"})


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset's options, passed through as they are named there."""

    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    processes_count: int = 1
    thread_count: int = 32
    timeout: int = 10
    retries: int = 0
    min_image_size: int = 0
    max_image_area: float = float(MAX_IMAGE_PIXELS)  # decompression bombs fail in img2dataset, not later
    max_aspect_ratio: float = 0.0  # 0: no bound (img2dataset's inf, kept out of the JSON config)
    incremental_mode: str = "incremental"
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")

    def __post_init__(self) -> None:
        if self.incremental_mode not in ("incremental", "overwrite"):
            raise ValueError(f"incremental_mode must be 'incremental' or 'overwrite', got {self.incremental_mode!r}")
        if self.resize_mode not in ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"):
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        if self.processes_count < 1 or self.thread_count < 1:
            raise ValueError("processes_count and thread_count must be >= 1")


@dataclass(frozen=True)
class ListConfig:
    """How to read and screen a URL list."""

    path: str
    format: str | None = None
    url_column: str = "url"
    caption_column: str = "caption"
    key_column: str = "key"
    shard_rows: int = 10_000
    max_caption_chars: int = MAX_CAPTION_CHARS
    allow_private_network: bool = False
    allow_file_urls: bool = False
    layout: Layout = Layout()

    def __post_init__(self) -> None:
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")


def _text(value: object) -> object:
    """A list's text as Parquet can hold it: bytes that were not UTF-8 (kept as surrogates) become U+FFFD."""
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _staged_row(row, number: int, config: ListConfig, stem: str) -> dict:
    values = dict(row.values)
    url, caption = values.pop(config.url_column, None), values.pop(config.caption_column, None)
    key = values.pop(config.key_column, None)
    clash = sorted(RESERVED & values.keys())
    if clash:
        raise UrlListError(f"{row.file}: line {row.line}: column(s) {clash} would be overwritten by what "
                           f"staging writes; rename them in the list, or name them with --url_column / "
                           f"--caption_column / --key_column")
    verdict = screen_url(url, allow_private_network=config.allow_private_network,
                         allow_file_urls=config.allow_file_urls)
    fetch = verdict if isinstance(verdict, str) else None  # the screened URL, without surrounding space
    if fetch is not None:
        verdict = clean_caption(caption, config.max_caption_chars)  # no download for a pair that cannot be one
    rejected = verdict if isinstance(verdict, Rejected) else None
    staged = {key_name: _text(value) for key_name, value in values.items()}
    staged.update({"key": _text(str(key)) if key not in (None, "") else f"{stem}-{row.line:09d}",
                   "url": fetch or (_text(url) if isinstance(url, str) else None),
                   # the cleaned caption; a rejected row's may be megabytes, and its reject says what was wrong
                   "caption": verdict if rejected is None else None, ROW: number,
                   ORIGIN_FILE: row.file, ORIGIN_LINE: row.line,
                   SCREEN_REASON: rejected.reason if rejected else None,
                   SCREEN_DETAIL: rejected.detail if rejected else None})
    return staged


def _extras_as_text(rows: list[dict], fixed: set[str]) -> None:
    """JSONL and CSV extras become strings, so every list shard has the same schema."""
    for row in rows:
        for name, value in row.items():
            if name not in fixed and value is not None and not isinstance(value, str):
                row[name] = json.dumps(value, ensure_ascii=False)


def _parquet_types_agree(files: list) -> bool:
    """Whether the Parquet lists' columns have types Arrow can unify (int32 and int64, string and
    large_string do): only then do the extras keep their types. A column that is a float in one file and
    text in another becomes text, as CSV and JSONL extras do (typed, it failed in Arrow, naming no file)."""
    schemas = []
    for file in files:
        try:
            schemas.append(pq.read_schema(file).remove_metadata())
        except Exception:  # noqa: BLE001 - read_list says what is wrong with the file, naming it
            continue
    try:
        pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return False
    return True


def stage_url_list(config: ListConfig, list_dir: Path, fetch_dir: Path,
                   before_writing: Callable[[], None] | None = None) -> int:
    """Write the list shards and the img2dataset inputs (only missing ones); returns the shard count.

    Rows keep their list order, so the shards, keys and download inputs are
    the same on every run over the same list. `before_writing` is called before each shard is written
    (the caller records what the staging is cut from).
    """
    required = (config.url_column, config.caption_column)
    fixed = set(FIXED_TYPES)
    done = {p.name for p in finished_shards(list_dir)}
    files = list_files(config.path, config.format)
    keep_types = all(str(f).endswith(".parquet") for f in files) and _parquet_types_agree(files)
    shard, rows, number = 0, [], 0

    def flush() -> None:
        nonlocal shard, rows
        name = shard_name(shard)
        if name not in done:  # directories only now: a list that fails on its first line leaves nothing behind
            if before_writing is not None:
                before_writing()
            if not keep_types:
                _extras_as_text(rows, fixed)
            columns = dict.fromkeys(column for row in rows for column in row)  # JSONL rows need not share keys
            table = pa.Table.from_pylist([{column: row.get(column) for column in columns} for row in rows])
            for column, kind in FIXED_TYPES.items():
                table = table.set_column(table.schema.get_field_index(column), column, table.column(column).cast(kind))
            ok = table.filter(pc.is_null(table.column(SCREEN_REASON)))
            if ok.num_rows:
                write_table_atomic(ok.select(["url", ROW]), fetch_dir / name)
            write_table_atomic(table, list_dir / name)  # last: its presence means this shard is staged
        shard, rows = shard + 1, []

    for file in files:
        stem = Path(file).stem
        for row in read_list(file, required, config.format, config.layout):
            rows.append(_staged_row(row, number, config, stem))
            number += 1
            if len(rows) == config.shard_rows:
                flush()
    if rows:
        flush()
    return shard


def run_img2dataset(fetch_dir: Path, download_dir: Path, config: DownloadConfig, shard_rows: int) -> None:
    """Download every staged fetch file with img2dataset's own distributor, as Parquet."""
    if not any(fetch_dir.glob("*.parquet")):
        return
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # img2dataset compares an image's area with max_image_area only after OpenCV decoded all of it: a 109 KB
    # PNG bomb took 1.7 GB a worker. OpenCV's own limit, read from its header, refuses it first.
    if config.max_image_area:
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(int(config.max_image_area))
    from img2dataset import download

    options = asdict(config)
    directives = list(options.pop("disallowed_header_directives"))
    options["max_aspect_ratio"] = options["max_aspect_ratio"] or float("inf")
    download(url_list=str(fetch_dir), input_format="parquet", url_col="url", output_folder=str(download_dir),
             output_format="parquet", save_additional_columns=[ROW], number_sample_per_shard=shard_rows,
             extract_exif=False, enable_wandb=False, disallowed_header_directives=directives, **options)


def downloads_by_list_shard(download_dir: Path, shard_rows: int) -> dict[int, Path]:
    """List shard index -> the img2dataset output holding its downloads (finished shards only)."""
    found: dict[int, Path] = {}
    if not download_dir.is_dir():
        return found
    for stats in sorted(download_dir.glob("*_stats.json")):
        path = download_dir / f"{stats.name.split('_')[0]}.parquet"
        rows = pq.read_table(path, columns=[ROW]).column(ROW)
        if len(rows):
            found[rows[0].as_py() // shard_rows] = path
    return found


def unfinished_shards(fetch_dir: Path, found: dict[int, Path]) -> list[str]:
    """List shards that had URLs to fetch but whose img2dataset shard did not finish."""
    return [p.name for p in finished_shards(fetch_dir) if int(p.stem.split("-")[1]) not in found]


def drop_torn_shards(download_dir: Path) -> list[str]:
    """Delete every file of each img2dataset shard whose `_stats.json` a kill cut short, and return their ids.

    img2dataset writes the stats file in place, last; its incremental resume skips every shard that has one,
    so a torn one was never downloaded again, and its counts could not be read. Such a shard belongs to a
    download that was killed, before any ingest shard was made from it: fetching it again mixes nothing.
    """
    torn = []
    for stats in sorted(download_dir.glob("*_stats.json")) if download_dir.is_dir() else []:
        try:
            json.loads(stats.read_text())
            continue
        except json.JSONDecodeError:
            shard = stats.name.split("_")[0]
        for path in download_dir.glob(f"{shard}[._]*"):  # 00003.parquet, 00003_stats.json; not 000030.parquet
            path.unlink()
        torn.append(shard)
    return torn


def download_stats(download_dir: Path) -> dict:
    """img2dataset's own counts, summed over its finished shards, with the success rate."""
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "duration": 0.0}
    for stats in sorted(download_dir.glob("*_stats.json")) if download_dir.is_dir() else []:
        try:
            data = json.loads(stats.read_text())
        except json.JSONDecodeError as exc:  # cut short by a kill (drop_torn_shards), or damaged since
            raise ValueError(f"{stats} is not valid JSON ({exc}); delete it and its .parquet, then rerun to "
                             f"download that shard again") from exc
        for name in totals:
            totals[name] += data.get(name, 0)
    return {
        "download_attempted": totals["count"], "download_succeeded": totals["successes"],
        "download_failed": totals["failed_to_download"], "download_failed_to_resize": totals["failed_to_resize"],
        "download_success_rate": round(totals["successes"] / totals["count"], 4) if totals["count"] else None,
        # Inside img2dataset's workers, without process start-up: the rate one worker process sustains.
        "download_worker_images_per_s":
            round(totals["successes"] / totals["duration"], 2) if totals["duration"] else None,
    }


def join_downloads(batch_rows: Iterable[dict], downloads: dict[int, dict], encode_format: str) -> list[dict]:
    """List rows with their download outcome: image bytes on success, img2dataset's status otherwise."""
    joined = []
    for row in batch_rows:
        row = dict(row)
        if not row.get(SCREEN_REASON):
            got = downloads.get(row[ROW])
            if got is None:
                raise RuntimeError(f"{row[ORIGIN_FILE]}: line {row[ORIGIN_LINE]}: no download result for key "
                                   f"{row['key']}; rerun to let img2dataset finish")
            row[STATUS], row[ERROR] = got[STATUS], got[ERROR]
            row["image"] = got.get(encode_format)
        joined.append(row)
    return joined


def read_downloads(path: Path | None, encode_format: str) -> dict[int, dict]:
    if path is None:
        return {}
    table = pq.read_table(path, columns=[ROW, STATUS, ERROR, encode_format])
    return {row[ROW]: row for row in table.to_pylist()}
