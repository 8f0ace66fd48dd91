"""Exact and near-duplicate detection as a deterministic, shard-independent decision.

Dedup is global (a duplicate may sit in any shard), so it is phrased as a
group-by: every pair emits one fingerprint per criterion, fingerprints are
grouped, and in each group the smallest key wins. The winner depends only on
the set of keys, never on arrival order, worker count or which shards a
resumed run still had to write, so a rerun gives identical output.

A pair that loses in several groups keeps the verdict of the strongest
criterion (sha256, then URL, then perceptual hash). Near-duplicates use the
pigeonhole trick: two 64-bit hashes within `near_dup_bits` differ in at most
that many of `near_dup_bits + 1` bands, so they share at least one band
exactly, and only pairs that share a band are compared.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from curation.rejects import Reason, reject, rejects_table
from curation.url_lists import normalise_url

# Criterion -> priority (lower wins when a pair loses in several groups).
CRITERIA = {"sha256": 0, "url": 1, "phash": 2}
HASH_BITS = 64


@dataclass(frozen=True)
class DedupConfig:
    by_sha256: bool = True
    by_url: bool = True
    near_dup_bits: int = -1  # Hamming distance on a 64-bit pHash; -1 turns near-dup detection off

    def __post_init__(self) -> None:
        if not -1 <= self.near_dup_bits < 32:
            raise ValueError(f"near_dup_bits must be in [-1, 31], got {self.near_dup_bits}")

    @property
    def enabled(self) -> bool:
        return self.by_sha256 or self.by_url or self.near_dup_bits >= 0


@dataclass(frozen=True, order=True)
class Loser:
    """A pair that is a duplicate: which shard it is in, and why."""

    priority: int
    winner: str
    key: str
    shard: int
    criterion: str

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


def fingerprints(pairs: pa.Table, shard: int, config: DedupConfig) -> Iterator[tuple[str, tuple[str, int, int | None]]]:
    """(group, (key, shard, phash or None)) for every pair and every enabled criterion."""
    keys = pairs.column("key").to_pylist()
    shas = pairs.column("sha256").to_pylist() if config.by_sha256 else [None] * len(keys)
    urls = pairs.column("url").to_pylist() if config.by_url else [None] * len(keys)
    images = pairs.column("image") if config.near_dup_bits >= 0 else None
    for i, key in enumerate(keys):
        if shas[i]:
            yield f"sha256:{shas[i]}", (key, shard, None)
        if urls[i]:
            yield f"url:{normalise_url(urls[i])}", (key, shard, None)
        if images is not None:
            value = perceptual_hash(images[i].as_py())
            for band, bits in _bands(value, config.near_dup_bits + 1):
                yield f"phash{band}:{bits:x}", (key, shard, value)


def losers_in_group(group: str, members: Iterable[tuple[str, int, int | None]], near_dup_bits: int) -> list[Loser]:
    """Every member but the smallest key (exact groups), or every member with a close smaller neighbour."""
    criterion = group.split(":", 1)[0]
    ordered = sorted(set(members))
    if len(ordered) < 2:
        return []
    if not criterion.startswith("phash"):
        winner = ordered[0][0]
        return [Loser(CRITERIA[criterion], winner, key, shard, criterion) for key, shard, _ in ordered[1:]]
    losers = []
    for i, (key, shard, value) in enumerate(ordered):
        for other_key, _, other_value in ordered[:i]:  # smaller keys first: the first close one is the winner
            if other_key != key and bin(value ^ other_value).count("1") <= near_dup_bits:
                losers.append(Loser(CRITERIA["phash"], other_key, key, shard, "phash"))
                break
    return losers


def strongest(losers: Iterable[Loser]) -> dict[str, Loser]:
    """One verdict per key: the highest-priority criterion, then the smallest winner."""
    verdicts: dict[str, Loser] = {}
    for loser in losers:
        if loser.key not in verdicts or loser < verdicts[loser.key]:
            verdicts[loser.key] = loser
    return verdicts


def drop_duplicates(pairs: pa.Table, losers: dict[str, Loser], *, stage: str,
                    source: str | None) -> tuple[pa.Table, pa.Table]:
    """Pairs without the losers, and a reject row `duplicate_of=<key>` for each loser."""
    if not losers:
        return pairs, rejects_table([])
    keys = pairs.column("key").to_pylist()
    keep = [key not in losers for key in keys]
    rows = [reject(key, stage, Reason.DUPLICATE if losers[key].criterion != "phash" else Reason.NEAR_DUPLICATE,
                   losers[key].detail, source) for key in keys if key in losers]
    return pairs.filter(pa.array(keep, pa.bool_())), rejects_table(rows)
