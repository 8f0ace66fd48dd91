"""Data the user already has: an img2dataset output folder, or a plain folder of images with captions.

An img2dataset folder is read as it is: its Parquet files are the input
shards (status and error message included, so failed downloads become
rejects), and in webdataset format the image bytes come from the `.tar`
beside each Parquet file. A plain folder of images is staged into Parquet
shards first (sorted paths, so keys and shards are the same on every run);
captions come from a captions file (CSV, TSV, JSONL or Parquet with a file
and a caption column) or from a `.txt` file beside each image.
"""

from __future__ import annotations

import collections
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.ingest import ORIGIN_FILE, ORIGIN_LINE, SCREEN_DETAIL, SCREEN_REASON
from curation.rejects import Reason
from curation.shards import finished_shards, is_complete, shard_name, shard_paths, write_parts_atomic
from curation.url_lists import UrlListError, read_list

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
ENCODE_FORMATS = ("jpg", "png", "webp")
IMAGES_PER_PART = 256  # images read into memory at a time while staging a folder (one row group each)


def input_kind(path: str | Path) -> str:
    """'img2dataset' (a folder with *_stats.json), 'images' (image files, no Parquet) or 'shards'."""
    path = Path(path)
    if path.is_dir() and any(path.glob("*_stats.json")):
        return "img2dataset"
    if path.is_dir() and not any(path.glob("*.parquet")) and any(
            p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        return "images"
    return "shards"


def check_img2dataset_folder(path: Path) -> str:
    """Refuse a folder with unfinished img2dataset shards; return the image column (encode format)."""
    unfinished = [p.name for p in sorted(path.glob("*.parquet")) if not (path / f"{p.stem}_stats.json").is_file()]
    if unfinished:
        raise ValueError(f"{path}: img2dataset shard(s) {unfinished} have no _stats.json: the download did not "
                         f"finish; rerun img2dataset in incremental mode first")
    first = next(iter(sorted(path.glob("*.parquet"))), None)
    names = pq.read_schema(first).names if first else []
    for fmt in ENCODE_FORMATS:
        if fmt in names:
            return fmt
    tar = next(iter(sorted(path.glob("*.tar"))), None)
    if tar is None:  # img2dataset's "files" format (or tfrecord): every image would be an empty_image reject
        raise ValueError(f"{path}: an img2dataset folder without image bytes in its Parquet files and without "
                         f".tar files; only the parquet and webdataset output formats can be ingested")
    with tarfile.open(tar) as archive:
        for member in archive:
            suffix = member.name.rsplit(".", 1)[-1]
            if suffix in ENCODE_FORMATS:
                return suffix
    return ENCODE_FORMATS[0]  # a tar of failed downloads only: no image to tell the format by


def tar_images(parquet_path: str | Path, encode_format: str) -> dict[str, bytes]:
    """key -> image bytes from the webdataset tar beside an img2dataset Parquet file ({} if none)."""
    tar = Path(parquet_path).with_suffix(".tar")
    images: dict[str, bytes] = {}
    if not tar.is_file():
        return images
    with tarfile.open(tar) as archive:
        for member in archive:
            stem, _, suffix = member.name.rpartition(".")
            if suffix == encode_format and member.isfile():
                images[Path(stem).name] = archive.extractfile(member).read()
    return images


def _captions(captions_file: Path | None, file_column: str, caption_column: str) -> dict[str, object]:
    if captions_file is None:
        return {}
    captions, lines = {}, {}
    for row in read_list(captions_file, (file_column, caption_column)):
        name = row.values.get(file_column)
        if not name:
            raise UrlListError(f"{row.file}: line {row.line}: empty {file_column!r}")
        if str(name) in lines:  # which of the two captions is the image's cannot be told
            raise UrlListError(f"{row.file}: line {row.line}: {name!r} has a caption on line {lines[str(name)]} "
                               f"already")
        captions[str(name)], lines[str(name)] = row.values.get(caption_column), row.line
    return captions


def image_files(folder: Path, list_dir: Path) -> list[Path]:
    """The folder's images, sorted (so keys and row numbers are stable), leaving out the stage's own staging."""
    images = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and list_dir not in p.parents)
    if not images:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _staged_image(folder: Path, path: Path, number: int, captions: dict[str, object],
                  stems: collections.Counter) -> dict:
    relative = path.relative_to(folder).as_posix()
    caption = captions.get(relative)
    sidecar = path.with_suffix(".txt")
    if caption is None and sidecar.is_file():
        caption = sidecar.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is no text
    screened = None
    if isinstance(caption, str):
        caption = caption.encode("utf-8", "surrogateescape")
    elif caption is not None and not isinstance(caption, bytes):
        screened, caption = f"caption is {type(caption).__name__}, not text", None
    stem = relative.rsplit(".", 1)[0]
    return {"key": stem if stems[stem] == 1 else relative, "caption": caption, "image": path.read_bytes(),
            ORIGIN_FILE: str(path), ORIGIN_LINE: number,
            SCREEN_REASON: Reason.MISSING_FIELD if screened else None, SCREEN_DETAIL: screened}


def stage_image_folder(folder: Path, list_dir: Path, *, captions_file: Path | None, file_column: str = "file",
                       caption_column: str = "caption", shard_rows: int = 1000,
                       before_writing: Callable[[], None] | None = None) -> int:
    """Write Parquet shards (key, caption, image, origin) for every image of the folder; returns the shard count.

    The key is the image's path relative to the folder, without suffix (with
    it where two images differ only in suffix: cat.jpg and cat.png). An
    image with no caption still gets a row (with a null caption), so it is
    counted as a reject rather than skipped. `before_writing`: as for `download.stage_url_list`.
    """
    folder = Path(folder)
    captions = _captions(captions_file, file_column, caption_column)
    images = image_files(folder, list_dir)
    known = {p.relative_to(folder).as_posix() for p in images}
    stems = collections.Counter(name.rsplit(".", 1)[0] for name in known)
    unknown = sorted(set(captions) - known)
    if unknown:
        raise ValueError(f"{captions_file}: {len(unknown)} captioned file(s) not in {folder}, e.g. {unknown[:3]}")
    # Captions as bytes: one that is not UTF-8 (a sidecar's bytes, a captions file's surrogates) is then a
    # non_utf8_caption reject at normalisation; one that is not text at all is screened out here.
    schema = pa.schema([("key", pa.string()), ("caption", pa.binary()), ("image", pa.binary()),
                        (ORIGIN_FILE, pa.string()), (ORIGIN_LINE, pa.int64()),
                        (SCREEN_REASON, pa.string()), (SCREEN_DETAIL, pa.string())])
    done = {p.name for p in finished_shards(list_dir)}
    shards = 0
    for start in range(0, len(images), shard_rows):
        name = shard_name(shards)
        shards += 1
        if name not in done:
            numbered = list(enumerate(images[start:start + shard_rows], start=start + 1))
            parts = (pa.Table.from_pylist([_staged_image(folder, path, number, captions, stems)
                                           for number, path in numbered[first:first + IMAGES_PER_PART]],
                                          schema=schema)
                     for first in range(0, len(numbered), IMAGES_PER_PART))
            if before_writing is not None:
                before_writing()
            write_parts_atomic(parts, schema, list_dir / name)
    return shards


def refuse_unread_parquet(folder: Path) -> None:
    """A folder without a manifest, read by its part-NNNNN shards, that also holds other Parquet files: their
    rows were never read, without a word. (A manifest names the shards: files beside them, such as balance's
    entry counts, are no rows.)"""
    if not folder.is_dir() or is_complete(folder):
        return
    read = {path.name for path in shard_paths(folder)}
    unread = sorted(p.name for p in folder.glob("*.parquet") if not p.name.startswith(".") and p.name not in read)
    if unread:
        raise ValueError(f"ingest: {folder} holds Parquet files beside its part-NNNNN.parquet shards that would "
                         f"not be read ({', '.join(unread[:5])}{', ...' if len(unread) > 5 else ''}): name every "
                         f"shard part-NNNNN.parquet, or move the others out")
