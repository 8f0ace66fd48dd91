"""Exact and near-duplicate detection as a deterministic, shard-independent decision.

Dedup is global (a duplicate may sit in any shard), so it is phrased as a
group-by: every pair emits one fingerprint per criterion, fingerprints are
grouped, and in each group the smallest key wins. The winner depends only on
the set of keys, never on arrival order, worker count or which shards a
resumed run still had to write, so a rerun gives identical output.

Keys are the pairs' identity downstream, so they are made unique here too:
every row emits its key, and of the rows that share one (cat.jpg and cat.png
became "cat", a list reused a key) the first by shard and content keeps it.
A row is told apart from another with its key by its content (image sha256
and caption), so a verdict drops exactly the rows it is about; a row repeated
byte for byte within one shard keeps one copy.

A pair that loses in several groups keeps the verdict of the strongest
criterion (sha256, then URL, then perceptual hash, then key). Near-duplicates use the
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
CRITERIA = {"sha256": 0, "url": 1, "phash": 2, "key": 3}
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


def fingerprints(pairs: pa.Table, shard: int, config: DedupConfig) -> Iterator[tuple[str, Member]]:
    """(group, (key, shard, content, phash or None)) for every pair: its key, and every enabled criterion."""
    keys = pairs.column("key").to_pylist()
    ids = contents(pairs)
    shas = pairs.column("sha256").to_pylist() if config.by_sha256 else [None] * len(keys)
    urls = pairs.column("url").to_pylist() if config.by_url else [None] * len(keys)
    images = pairs.column("image") if config.near_dup_bits >= 0 else None
    for i, key in enumerate(keys):
        yield f"key:{key}", (key, shard, ids[i], None)
        if shas[i]:
            yield f"sha256:{shas[i]}", (key, shard, ids[i], None)
        if urls[i]:
            yield f"url:{normalise_url(urls[i])}", (key, shard, ids[i], None)
        if images is not None:
            value = perceptual_hash(images[i].as_py())
            for band, bits in _bands(value, config.near_dup_bits + 1):
                yield f"phash{band}:{bits:x}", (key, shard, ids[i], value)


def losers_in_group(group: str, members: Iterable[Member], near_dup_bits: int) -> list[Loser]:
    """Every member but the smallest (key, shard, content) in exact groups, or every member with a close
    neighbour of a smaller key (perceptual hash)."""
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


def drop_duplicates(pairs: pa.Table, losers: dict[tuple[str, str], Loser], *, stage: str,
                    source: str | None) -> tuple[pa.Table, pa.Table]:
    """Pairs without the losers and without a second copy of a row, and a reject `duplicate_of=<key>` for each.

    Sorted first (key, image, caption, URL), so which of two identical copies stays never depends on the
    order the rows arrived in."""
    pairs = pairs.sort_by([("key", "ascending"), ("sha256", "ascending"), ("caption", "ascending"),
                           ("url", "ascending")])
    keep, rows, seen = [], [], set()
    for key, content in zip(pairs.column("key").to_pylist(), contents(pairs)):
        verdict = losers.get((key, content))
        if verdict is not None:
            reason = Reason.NEAR_DUPLICATE if verdict.criterion == "phash" else Reason.DUPLICATE
            rows.append(reject(key, stage, reason, verdict.detail, source))
        elif (key, content) in seen:
            rows.append(reject(key, stage, Reason.DUPLICATE, f"duplicate_of={key} by=key", source))
        keep.append(verdict is None and (key, content) not in seen)
        seen.add((key, content))
    return pairs.filter(pa.array(keep, pa.bool_())), rejects_table(rows)
