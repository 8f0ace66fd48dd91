"""Exact and near-duplicate detection as a deterministic, shard-independent decision.

Dedup is global (a duplicate may sit in any shard), so it is phrased as a
group-by: every pair emits one fingerprint per criterion, fingerprints are
grouped, and in each group the smallest key wins. The winner depends only on
the set of keys, never on arrival order, worker count or which shards a
resumed run still had to write, so a rerun gives identical output.

Keys come first, since they are the pairs' identity downstream. Rows that
share a key (cat.jpg and cat.png became "cat", a list reused a key) are told
apart by their content (image sha256 and caption): the first by shard and
content keeps the key, a later row with the same content is a duplicate
`by=key`, and a row with other content gets the key `<key>~<8 hex of its
content>`, its old key kept in `original_key`. So no row is lost for its key,
and content dedup then runs over keys that are unique.

A pair that loses in several groups keeps the verdict of the strongest
criterion (sha256, then URL, then perceptual hash). Each group decides on
its own, in one pass: a row may lose to a winner that itself lost in another
group (a shares b's URL, b shares c's image: b and c both go, and b's image
with them). Deciding exactly would take connected components over every
group, rounds of GroupByKeys; such chains need two criteria to link three
rows, and cost a row, never a duplicate kept. Near-duplicates use the
pigeonhole trick: two 64-bit hashes within `near_dup_bits` differ in at most
that many of `near_dup_bits + 1` bands, so they share at least one band
exactly, and only pairs that share a band are compared.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from curation.rejects import Reason, reject, rejects_table
from curation.url_lists import normalise_url

# Criterion -> priority (lower wins when a pair loses in several groups).
CRITERIA = {"key": -1, "sha256": 0, "url": 1, "phash": 2}
HASH_BITS = 64
# A fingerprint group's member: (key, shard, content, perceptual hash or None).
Member = tuple[str, int, str, "int | None"]


@dataclass(frozen=True)
class DedupConfig:
    by_sha256: bool = True
    by_url: bool = True
    near_dup_bits: int = -1  # Hamming distance on a 64-bit pHash; -1 turns near-dup detection off

    def __post_init__(self) -> None:
        if not -1 <= self.near_dup_bits < 32:
            raise ValueError(f"near_dup_bits must be in [-1, 31], got {self.near_dup_bits}")


@dataclass(frozen=True, order=True)
class Loser:
    """A pair that is a duplicate: which row (key and content) in which shard, and why."""

    priority: int
    winner: str
    key: str
    shard: int
    criterion: str
    content: str = ""

    @property
    def detail(self) -> str:
        return f"duplicate_of={self.winner} by={self.criterion}"


def perceptual_hash(image: bytes) -> int:
    """64-bit DCT hash (imagehash.phash) of the decoded image, as an int."""
    import imagehash  # only needed when near-dup detection is on

    with Image.open(io.BytesIO(image)) as im:
        return int(str(imagehash.phash(im)), 16)


def _bands(value: int, count: int) -> Iterator[tuple[int, int]]:
    width = -(-HASH_BITS // count)
    for band in range(count):
        yield band, (value >> (band * width)) & ((1 << width) - 1)


def contents(pairs: pa.Table) -> list[str]:
    """What tells a row from another with its key: its image's sha256 and a digest of its caption."""
    captions = pairs.column("caption").to_pylist()
    return [f"{sha}:{hashlib.blake2b((caption or '').encode(), digest_size=8).hexdigest()}"
            for sha, caption in zip(pairs.column("sha256").to_pylist(), captions)]


# A row on its way to the key decision:
# (key, (shard, content, row in the shard, [(content group, phash or None), ...])).
RowPrints = tuple[str, tuple[int, str, int, list[tuple[str, "int | None"]]]]


def row_fingerprints(pairs: pa.Table, shard: int, config: DedupConfig,
                     order_by: str | None = None) -> Iterator[RowPrints]:
    """Each pair under its key, with its content, its place (the `order_by` column, or its index) and the
    content groups it joins (enabled criteria)."""
    keys = pairs.column("key").to_pylist()
    places = pairs.column(order_by).to_pylist() if order_by in pairs.column_names else range(len(keys))
    ids = contents(pairs)
    shas = pairs.column("sha256").to_pylist() if config.by_sha256 else [None] * len(keys)
    urls = pairs.column("url").to_pylist() if config.by_url else [None] * len(keys)
    images = pairs.column("image") if config.near_dup_bits >= 0 else None
    for i, key in enumerate(keys):
        groups: list[tuple[str, int | None]] = []
        if shas[i]:
            groups.append((f"sha256:{shas[i]}", None))
        if urls[i]:
            groups.append((f"url:{normalise_url(urls[i])}", None))
        if images is not None:
            value = perceptual_hash(images[i].as_py())
            groups += [(f"phash{band}:{bits:x}", value) for band, bits in _bands(value, config.near_dup_bits + 1)]
        yield key, (shard, ids[i], places[i], groups)


RENAMED_COLUMN = "original_key"


def _made_key(key: str, content: str, taken: set[str]) -> str:
    """`<key>~<8 hex of the content>`, or 16 hex where 8 are taken by another content of this key (about one
    in 4e9 pairs: expected once where some 100k rows share one key)."""
    made = f"{key}~{hashlib.blake2b(content.encode(), digest_size=4).hexdigest()}"
    return made if made not in taken else f"{key}~{hashlib.blake2b(content.encode(), digest_size=8).hexdigest()}"


def decide_key(key: str, rows: Iterable[tuple[int, str, int, list]]
               ) -> tuple[list[Loser], list[tuple[int, str, str]], list[tuple[str, Member]]]:
    """For the rows sharing `key`: the losers (repeats of a content already seen, in a later shard), the
    renames (shard, content, new key) of rows with other content, and every kept row's content
    fingerprints under its final key.

    Of the copies of one content in one shard, `drop_duplicates` keeps the first by place, so its
    fingerprints (its URL, which the other copies may not share) are the ones that go on, whatever
    order the rows arrived in."""
    first: dict[tuple[int, str], list] = {}
    for shard, content, _, groups in sorted(rows, key=lambda row: (row[0], row[2])):
        first.setdefault((shard, content), groups)
    losers, renames, prints, finals = [], [], [], {}  # finals: content -> the key its first row kept
    for (shard, content), groups in sorted(first.items()):
        if content in finals:
            losers.append(Loser(CRITERIA["key"], finals[content], key, shard, "key", content))
            continue
        final = key if not finals else _made_key(key, content, set(finals.values()))
        if finals:
            renames.append((shard, content, final))
        finals[content] = final
        prints += [(group, (final, shard, content, value)) for group, value in groups]
    return losers, renames, prints


def renamed(pairs: pa.Table, renames: Iterable[tuple[str, str, str]]) -> pa.Table:
    """The pairs with the keys `decide_key` gave (key, content, new key) for this shard, old keys kept in
    `original_key`; unchanged when there are none."""
    new_keys = {(key, content): final for key, content, final in renames}
    if not new_keys:
        return pairs
    keys = pairs.column("key").to_pylist()
    finals = [new_keys.get((key, content), key) for key, content in zip(keys, contents(pairs))]
    pairs = pairs.set_column(pairs.column_names.index("key"), "key", pa.array(finals, pa.string()))
    # An input that was renamed before (an ingest output ingested again) keeps its first original keys.
    earlier = pairs.column(RENAMED_COLUMN).to_pylist() if RENAMED_COLUMN in pairs.column_names else [None] * len(keys)
    original = pa.array([before or (old if old != new else None)
                         for before, old, new in zip(earlier, keys, finals)], pa.string())
    if RENAMED_COLUMN in pairs.column_names:
        return pairs.set_column(pairs.column_names.index(RENAMED_COLUMN), RENAMED_COLUMN, original)
    return pairs.append_column(RENAMED_COLUMN, original)


def losers_in_group(group: str, members: Iterable[Member], near_dup_bits: int) -> list[Loser]:
    """Every member but the smallest key in exact groups, or every member with a close neighbour of a
    smaller key (perceptual hash). Members are rows that kept their keys, one per key."""
    criterion = group.split(":", 1)[0]
    ordered = sorted(set(members))
    if len(ordered) < 2:
        return []
    if not criterion.startswith("phash"):
        winner = ordered[0][0]
        return [Loser(CRITERIA[criterion], winner, key, shard, criterion, content)
                for key, shard, content, _ in ordered[1:]]
    losers = []
    for i, (key, shard, content, value) in enumerate(ordered):
        for other_key, _, _, other_value in ordered[:i]:  # smaller keys first: the first close one is the winner
            if other_key != key and bin(value ^ other_value).count("1") <= near_dup_bits:
                losers.append(Loser(CRITERIA["phash"], other_key, key, shard, "phash", content))
                break
    return losers


def strongest(losers: Iterable[Loser]) -> dict[tuple[str, str], Loser]:
    """One verdict per row (key, content): the highest-priority criterion, then the smallest winner."""
    verdicts: dict[tuple[str, str], Loser] = {}
    for loser in losers:
        row = (loser.key, loser.content)
        if row not in verdicts or loser < verdicts[row]:
            verdicts[row] = loser
    return verdicts


def drop_duplicates(pairs: pa.Table, losers: dict[tuple[str, str], Loser], *, stage: str, source: str | None,
                    order_by: str | None = None, origin: tuple[str, str] | None = None) -> tuple[pa.Table, pa.Table]:
    """Pairs without the losers and without a second copy of a row, and a reject `duplicate_of=<key>` for each.

    Sorted first by key and then `order_by` (the rows' place in their input, if the table has one), so
    which of two copies of one row stays never depends on the order the rows arrived in. A reject names
    where its row came from: the `origin` columns (file, row) where the table has them, else `source`."""
    placed = order_by in pairs.column_names
    pairs = pairs.sort_by([("key", "ascending")] + ([(order_by, "ascending")] if placed else []))
    keys = pairs.column("key").to_pylist()
    traced = origin is not None and all(name in pairs.column_names for name in origin)
    files = pairs.column(origin[0]).to_pylist() if traced else [source] * len(keys)
    places = pairs.column(origin[1]).to_pylist() if traced else [None] * len(keys)
    # A reject names the row by the key it came with (a renamed row's original key).
    given = pairs.column(RENAMED_COLUMN).to_pylist() if RENAMED_COLUMN in pairs.column_names else [None] * len(keys)
    keep, rows, seen = [], [], set()
    for key, original, content, file, place in zip(keys, given, contents(pairs), files, places):
        verdict = losers.get((key, content))
        if verdict is not None:
            reason = Reason.NEAR_DUPLICATE if verdict.criterion == "phash" else Reason.DUPLICATE
            rows.append(reject(original or key, stage, reason, verdict.detail, file, place))
        elif (key, content) in seen:
            rows.append(reject(original or key, stage, Reason.DUPLICATE, f"duplicate_of={key} by=key", file, place))
        keep.append(verdict is None and (key, content) not in seen)
        seen.add((key, content))
    return pairs.filter(pa.array(keep, pa.bool_())), rejects_table(rows)
