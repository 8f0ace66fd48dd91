import io
import random

import pyarrow as pa
from PIL import Image, ImageDraw

from curation.dedup import (
    DedupConfig, Loser, drop_duplicates, fingerprints, losers_in_group, perceptual_hash, strongest,
)
from curation.records import make_pair


def picture(seed: int, quality: int = 90, shift: int = 0) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (64, 64), (200, 200, 200))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.randrange(48), rng.randrange(48)
        draw.rectangle((x + shift, y, x + 16 + shift, y + 16), fill=(rng.randrange(256), 0, rng.randrange(256)))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def table(rows: list[tuple[str, bytes, str | None]]) -> pa.Table:
    pairs = [make_pair(key, image, "a caption", source="t", url=url) for key, image, url in rows]
    return pa.Table.from_pylist(pairs)


def decide(tables: dict[int, pa.Table], config: DedupConfig) -> dict[str, Loser]:
    """Verdicts by key (the tests' keys are unique but where said)."""
    return {key: loser for (key, _), loser in decide_rows(tables, config).items()}


def decide_rows(tables: dict[int, pa.Table], config: DedupConfig) -> dict[tuple[str, str], Loser]:
    groups: dict[str, list] = {}
    for shard, t in tables.items():
        for name, member in fingerprints(t, shard, config):
            groups.setdefault(name, []).append(member)
    return strongest(l for name, members in groups.items()
                     for l in losers_in_group(name, members, config.near_dup_bits))


def test_smallest_key_wins_whatever_the_order():
    members = [("k3", 1, "c", None), ("k1", 0, "c", None), ("k2", 2, "c", None)]
    for _ in range(5):
        random.shuffle(members)
        losers = losers_in_group("sha256:abc", members, -1)
        assert [(l.key, l.winner, l.shard) for l in losers] == [("k2", "k1", 2), ("k3", "k1", 1)]
    assert losers_in_group("url:http://a/", [("only", 0, "c", None)], -1) == []


def test_a_key_is_kept_by_one_row_and_every_other_is_a_counted_duplicate():
    """Duplicate keys went through: a verdict by key dropped a unique image with its twin-keyed row, and a row
    repeated byte for byte collapsed into one fingerprint member and was kept twice."""
    p, q, r = picture(1), picture(2), picture(3)
    shards = {0: table([("x", q, None), ("w", p, None)]), 1: table([("x", r, None), ("a", p, None)])}
    verdicts = decide_rows(shards, DedupConfig())
    kept, rejected = [], []
    for index, shard in shards.items():
        pairs, rejects = drop_duplicates(shard, verdicts, stage="ingest", source="t")
        kept += [(index, key) for key in pairs.column("key").to_pylist()]
        rejected += rejects.column("detail").to_pylist()
    assert kept == [(0, "x"), (1, "a")]  # x stays with its first shard's row, a keeps image p
    assert sorted(rejected) == ["duplicate_of=a by=sha256", "duplicate_of=x by=key"]
    # The same row twice in one shard: one copy stays, the other is a duplicate of its key.
    twice = {0: table([("k", p, "http://a/1"), ("k", p, "http://a/1"), ("m", q, None)])}
    kept, rejects = drop_duplicates(twice[0], decide_rows(twice, DedupConfig()), stage="ingest", source="t")
    assert kept.column("key").to_pylist() == ["k", "m"]
    assert rejects.column("detail").to_pylist() == ["duplicate_of=k by=key"]


def test_sha_beats_url_and_urls_are_normalised():
    a, b = picture(1), picture(2)
    shards = {0: table([("k0", a, "http://x.com/a"), ("k2", b, "HTTP://X.com/a#f")]),
              1: table([("k1", a, "http://x.com/other")])}
    verdicts = decide(shards, DedupConfig())
    assert {k: v.detail for k, v in verdicts.items()} == {
        "k1": "duplicate_of=k0 by=sha256", "k2": "duplicate_of=k0 by=url"}
    assert decide(shards, DedupConfig(by_sha256=False, by_url=False)) == {}
    kept, rejects = drop_duplicates(shards[0], decide_rows(shards, DedupConfig()), stage="ingest", source="t")
    assert kept.column("key").to_pylist() == ["k0"]
    assert rejects.to_pylist()[0]["reason"] == "duplicate"


def test_near_duplicates_only_when_asked():
    original, recompressed, other = picture(7, 95), picture(7, 40), picture(8)
    assert original != recompressed
    assert bin(perceptual_hash(original) ^ perceptual_hash(recompressed)).count("1") <= 6
    shard = {0: table([("a", original, None), ("b", recompressed, None), ("c", other, None)])}
    assert decide(shard, DedupConfig()) == {}
    verdicts = decide(shard, DedupConfig(near_dup_bits=6))
    assert list(verdicts) == ["b"] and verdicts["b"].detail == "duplicate_of=a by=phash"
    _, rejects = drop_duplicates(shard[0], decide_rows(shard, DedupConfig(near_dup_bits=6)), stage="ingest",
                                 source="t")
    assert rejects.column("reason").to_pylist() == ["near_duplicate"]
