"""Reading (url, alt-text) lists the way LAION, DataComp and CC12M ship them, and screening their URLs.

A list is Parquet, CSV, TSV or JSONL. A file that cannot be read as a list
(missing column, no rows, broken CSV quoting, a line that is not JSON) stops
the run with an error naming the file and the line, because a silently
truncated list would look like a successful, smaller download. A single bad
*row* (empty or non-HTTP URL, private address, huge caption) is instead a
reject: one bad link must not stop a 400M-row build.

Screening is the SSRF guard: img2dataset fetches whatever URL it is given,
including `file:///etc/passwd` or `http://169.254.169.254/` (the cloud
metadata service), and stores the answer as "image bytes" in shards that get
shared. So `file://` and private, loopback and link-local addresses are
refused unless the user opts in.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.parquet as pq

from curation.records import Rejected, is_utf8
from curation.rejects import Reason

FORMATS = ("parquet", "csv", "tsv", "jsonl")
MAX_URL_CHARS = 4096
# The csv module refuses fields above 128 KiB by default; a long caption must be a reject, not a crash.
CSV_FIELD_LIMIT = 1 << 30


class UrlListError(ValueError):
    """A URL list that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class ListRow:
    file: str
    line: int  # 1-based line in the file (CSV/TSV/JSONL) or 1-based row (Parquet)
    values: dict


def list_format(path: str | Path, explicit: str | None = None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise UrlListError(f"{path}: unknown URL list format {explicit!r}; use one of {FORMATS}")
        return explicit
    suffix = Path(path).suffix.lower().lstrip(".")
    fmt = {"json": "jsonl", "ndjson": "jsonl", "txt": None}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise UrlListError(f"{path}: cannot tell the URL list format from the extension; pass --url_list_format")
    return fmt


def known_format(path: Path) -> str | None:
    """The list format its extension names, or None (not a list file: .txt, .md, ...)."""
    try:
        return list_format(path)
    except UrlListError:
        return None


def list_files(path: str | Path, fmt: str | None = None) -> list[Path]:
    """The list itself, or every list file of a directory (sorted, so row numbers are stable)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UrlListError(f"{path}: no such URL list")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise UrlListError(f"{path}: directory holds no URL list files")
    # Every file is read, or the run is refused naming it: a skipped file (a .csv.gz beside the .csv, a .tsv
    # under --url_list_format csv) lost its rows without a word. --url_list_format names the format of
    # files whose extension does not say; one whose extension says another format is refused.
    def read_as_list(p: Path) -> bool:
        return known_format(p) is not None if fmt is None else known_format(p) in (None, fmt)

    unread = [p.name for p in files if not read_as_list(p)]
    if unread:
        raise UrlListError(f"{path}: {', '.join(unread[:5])}{', ...' if len(unread) > 5 else ''}: "
                           + (f"not {fmt} by its extension, and --url_list_format {fmt} reads every file of the "
                              f"directory" if fmt else "the extension names no URL list format (csv, tsv, jsonl, "
                              "parquet); pass --url_list_format, or move the file out") + " (names starting with "
                           "'.' or '_' are left out)")
    # A made key is <file stem>-<line>: a.csv and a.tsv would make the same keys.
    stems: dict[str, str] = {}
    for p in files:
        if (other := stems.setdefault(p.stem, p.name)) != p.name:
            raise UrlListError(f"{path}: {other} and {p.name} share the stem {p.stem!r}, from which keys of rows "
                               f"without one are made; rename one")
    return files


def is_url_list(path: str | Path, image_column: str = "image") -> bool:
    """A single CSV/TSV/JSONL file, or a Parquet file without image bytes: what `--input` may name instead of shards."""
    path = Path(path)
    fmt = known_format(path) if path.is_file() else None
    if fmt == "parquet":
        try:
            return image_column not in pq.read_schema(path).names
        except Exception:
            return False
    return fmt is not None


@dataclass(frozen=True)
class Layout:
    """How a CSV or TSV list is written, where it is not the common case.

    `columns`: the column names by position, for a list with no header row (CC3M's and CC12M's TSVs);
    empty: the first line is the header. `quoting`: "csv" reads `"..."` fields as CSV quoting, "none"
    reads quotes as text; None: "csv" for CSV and "none" for TSV, since web TSVs are not quoted and a
    caption that starts with `"` would otherwise swallow the tab after it."""

    columns: tuple[str, ...] = ()
    quoting: str | None = None

    def __post_init__(self) -> None:
        if self.quoting not in (None, "csv", "none"):
            raise UrlListError(f"quoting must be 'csv' or 'none', got {self.quoting!r}")
        if len(set(self.columns)) != len(self.columns) or any(not c for c in self.columns):
            raise UrlListError(f"column names must be distinct and non-empty, got {list(self.columns)}")


# Invalid UTF-8 is kept as surrogates, so a caption holding it becomes a `non_utf8_caption` reject
# instead of a silent U+FFFD; "-sig" drops the byte-order mark Excel writes before the header.
TEXT_ENCODING = dict(encoding="utf-8-sig", errors="surrogateescape")


def read_list(path: str | Path, required: tuple[str, ...], fmt: str | None = None,
              layout: Layout = Layout()) -> Iterator[ListRow]:
    """Every row of one list file, in file order; raises UrlListError naming the file and line."""
    path = Path(path)
    fmt = list_format(path, fmt)
    if path.stat().st_size == 0:
        raise UrlListError(f"{path}: line 1: the file is empty")
    if fmt in ("csv", "tsv"):
        rows = _read_delimited(path, required, "\t" if fmt == "tsv" else ",", layout.columns,
                               layout.quoting or ("none" if fmt == "tsv" else "csv"))
    else:
        rows = {"parquet": _read_parquet, "jsonl": _read_jsonl}[fmt](path, required)
    count = 0
    for row in rows:
        count += 1
        yield row
    if count == 0:
        raise UrlListError(f"{path}: line 2: no rows after the header" if fmt in ("csv", "tsv") and not layout.columns
                           else f"{path}: line 1: no rows")


def _missing(path: Path, names: list[str], required: tuple[str, ...], line: int) -> None:
    """Refuse a list without the required columns; line 0: the names came from --url_list_columns."""
    missing = [c for c in required if c not in names]
    if missing:
        where = "--url_list_columns" if line == 0 else f"line {line}"
        raise UrlListError(f"{path}: {where}: missing column(s) {missing}; found {names}. Name them with "
                           f"--url_column / --caption_column, or, for a list with no header row, give its "
                           f"columns with --url_list_columns.")


@contextlib.contextmanager
def _csv_field_limit(limit: int):
    previous = csv.field_size_limit()
    csv.field_size_limit(min(limit, sys.maxsize))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_delimited(path: Path, required: tuple[str, ...], delimiter: str, columns: tuple[str, ...],
                    quoting: str) -> Iterator[ListRow]:
    records = _unquoted_records(path, delimiter) if quoting == "none" else _csv_records(path, delimiter)
    header = list(columns)
    if not header:
        first = next(records, None)
        if not first or not first[1]:
            raise UrlListError(f"{path}: line 1: no header row")
        header = first[1]
    _missing(path, header, required, 0 if columns else 1)
    if repeated := sorted({name for name in header if header.count(name) > 1}):  # dict(zip()) kept the last
        where = "--url_list_columns" if columns else "line 1"
        raise UrlListError(f"{path}: {where}: column name(s) {repeated} repeated; each column needs its own name")
    for line, fields in records:
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # a blank line, or one of spaces
        if len(fields) != len(header):
            raise UrlListError(f"{path}: line {line}: {len(fields)} fields, but {len(header)} "
                               f"columns are named (broken quoting or a stray delimiter?)")
        yield ListRow(str(path), line, dict(zip(header, fields)))


def _unquoted_records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each line: fields are the text between delimiters, and a record ends at "\n"
    (or "\r\n") only. csv's reader, even unquoted, also ends one at a bare "\r": a caption holding one was
    cut there, and its rest read as a row of its own, with every later line misnumbered."""
    with open(path, newline="\n", **TEXT_ENCODING) as f:
        for line, text in enumerate(f, start=1):
            text = text.removesuffix("\n").removesuffix("\r")
            yield line, text.split(delimiter) if text else []


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each record, named by the line it starts on, as `sed -n Np` counts: a quoted field
    may hold newlines, and `reader.line_num` (the lines read so far) would name such a record by its last."""
    with open(path, newline="", **TEXT_ENCODING) as f, _csv_field_limit(CSV_FIELD_LIMIT):
        reader = csv.reader(f, delimiter=delimiter, strict=True, quoting=csv.QUOTE_MINIMAL)
        consumed = 0  # lines before the record being read, which starts on the next one
        try:
            for fields in reader:
                line, consumed = consumed + 1, reader.line_num
                yield line, fields
        except csv.Error as exc:
            raise UrlListError(f"{path}: line {consumed + 1}: broken CSV: {exc}") from exc


def _read_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[ListRow]:
    """Lines end at "\n" only, as JSON Lines has it: a bare "\r" is JSON whitespace, not a line end.

    A record without a required field is a row like any other (its pair is rejected as a blank URL or
    caption); a list in which no record has one is refused, at its end."""
    seen: set[str] = set()
    any_record = False
    with open(path, newline="\n", **TEXT_ENCODING) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                values = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UrlListError(f"{path}: line {number}: not valid JSON: {exc}") from exc
            if not isinstance(values, dict):
                raise UrlListError(f"{path}: line {number}: expected a JSON object, got {type(values).__name__}")
            any_record = True
            seen.update(values)
            yield ListRow(str(path), number, values)
    if any_record and (never := [c for c in required if c not in seen]):
        raise UrlListError(f"{path}: no record has column(s) {never}; found {sorted(seen)}. Name them with "
                           f"--url_column / --caption_column.")


def _read_parquet(path: Path, required: tuple[str, ...]) -> Iterator[ListRow]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise UrlListError(f"{path}: line 1: not a readable Parquet file: {exc}") from exc
    _missing(path, parquet.schema_arrow.names, required, 1)
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for values in batch.to_pylist():
            number += 1
            yield ListRow(str(path), number, values)


def normalise_url(url: str) -> str:
    """The form two URLs share when they name the same resource: for dedup by URL.

    Lower-cases scheme and host, drops the default port, the fragment and
    surrounding space, and gives an empty path "/". The query is kept as is:
    its order can matter to the server.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # a malformed port or IPv6 host: no canonical form, so it is only equal to itself
        return url.strip()
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets: the port is apart
    port = port if port and (scheme, port) not in (("http", 80), ("https", 443)) else None
    netloc = host if port is None else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def _host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a literal host names, in every spelling the resolver accepts (`2130706433`, `0x7f.1`)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def resolver_name(host: str) -> str | None:
    """The ASCII name the resolver looks a host up by, or None if it cannot be encoded.

    A non-ASCII host is IDNA-encoded first, whose nameprep folds compatibility characters: full-width or
    superscript digits become ASCII ones and "。" separates labels, so `１２７．０．０．１` and `¹27.0.0.¹`
    are 127.0.0.1. Screened as written, they passed as names.
    """
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d),
    NAT64 (64:ff9b::a.b.c.d) or 6to4 (2002:a.b.c.d::)."""
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if int(address) >> 32 == 0 or any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_private_host(host: str) -> bool:
    """Loopback, private, link-local, reserved or unspecified addresses, and `localhost` names, however
    the host is spelled (see `resolver_name`; a host that cannot be encoded is refused too)."""
    name = resolver_name(host)
    if name is None:
        return True
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _host_address(name)
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(address)) is not None:
        if not embedded.is_global or embedded.is_multicast:
            return True
    return not address.is_global or address.is_multicast


def screen_url(url: object, *, allow_private_network: bool = False, allow_file_urls: bool = False) -> str | Rejected:
    """The URL to fetch, or why it must not be fetched."""
    if url is None or not isinstance(url, str) or not url.strip():
        return Rejected(Reason.BAD_URL, "empty URL")
    url = url.strip()
    if not is_utf8(url):
        return Rejected(Reason.BAD_URL, "URL holds bytes that are not UTF-8")
    if len(url) > MAX_URL_CHARS:
        return Rejected(Reason.BAD_URL, f"URL of {len(url)} characters > {MAX_URL_CHARS}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        return Rejected(Reason.BAD_URL, f"unparsable URL: {exc}")
    scheme = parts.scheme.lower()
    if scheme == "file":
        return url if allow_file_urls else Rejected(Reason.BAD_URL, "file:// URL refused (pass --allow_file_urls)")
    if scheme not in ("http", "https"):
        return Rejected(Reason.BAD_URL, f"scheme {scheme or 'none'!r} is not http(s)")
    if not parts.hostname:
        return Rejected(Reason.BAD_URL, "URL has no host")
    name = resolver_name(parts.hostname)
    if name is None:
        return Rejected(Reason.BAD_URL, f"host {parts.hostname!r} has no IDNA form for the resolver")
    if not allow_private_network and is_private_host(parts.hostname):
        spelled = "" if name == parts.hostname else f" (the resolver's {name!r})"
        return Rejected(Reason.BAD_URL, f"private-network host {parts.hostname!r}{spelled} refused "
                                        f"(pass --allow_private_network)")
    return url
