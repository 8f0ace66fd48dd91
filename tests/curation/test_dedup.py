import io
import random

import pyarrow as pa
from PIL import Image, ImageDraw

from curation.dedup import (
    DedupConfig, Loser, contents, decide_key, drop_duplicates, losers_in_group, perceptual_hash, renamed,
    row_fingerprints, strongest,
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
    return (pa.Table.from_pylist(pairs).append_column("row", pa.array(range(len(pairs)), pa.int64()))
            .append_column("file", pa.array(["in.parquet"] * len(pairs))))


def decide(tables: dict[int, pa.Table], config: DedupConfig) -> dict[str, Loser]:
    """Verdicts by key (the tests' keys are unique but where said)."""
    return {key: loser for verdicts, _ in decide_rows(tables, config).values() for (key, _), loser in verdicts.items()}


def decide_rows(tables: dict[int, pa.Table], config: DedupConfig):
    """What the ingest job does with GroupByKeys (keys first, then content groups over the final keys), each
    verdict routed to its shard: {shard: (losers by (key, content), renames)}."""
    by_key: dict[str, list] = {}
    for shard, t in tables.items():
        for key, row in row_fingerprints(t, shard, config, order_by="row"):
            by_key.setdefault(key, []).append(row)
    losers, renames, groups = [], [], {}
    for key, rows in by_key.items():
        key_losers, key_renames, prints = decide_key(key, rows)
        losers += key_losers
        renames += [(shard, (key, content, final)) for shard, content, final in key_renames]
        for name, member in prints:
            groups.setdefault(name, []).append(member)
    losers += [l for name, members in groups.items() for l in losers_in_group(name, members, config.near_dup_bits)]
    return {shard: (strongest(l for l in losers if l.shard == shard), [r for s, r in renames if s == shard])
            for shard in tables}


def drop(tables: dict[int, pa.Table], shard: int, config: DedupConfig) -> tuple[pa.Table, pa.Table]:
    losers, renames = decide_rows(tables, config)[shard]
    return drop_duplicates(renamed(tables[shard], renames), losers, stage="ingest", source="t", order_by="row",
                           origin=("file", "row"))


def test_smallest_key_wins_whatever_the_order():
    members = [("k3", 1, "c", None), ("k1", 0, "c", None), ("k2", 2, "c", None)]
    for _ in range(5):
        random.shuffle(members)
        losers = losers_in_group("sha256:abc", members, -1)
        assert [(l.key, l.winner, l.shard) for l in losers] == [("k2", "k1", 2), ("k3", "k1", 1)]
    assert losers_in_group("url:http://a/", [("only", 0, "c", None)], -1) == []


def test_a_key_held_by_rows_of_other_content_is_made_unique_and_no_image_is_lost():
    """Duplicate keys went through: a verdict by key dropped a unique image with its twin-keyed row, and a row
    repeated byte for byte collapsed into one fingerprint member and was kept twice."""
    p, q, r = picture(1), picture(2), picture(3)
    shards = {0: table([("x", q, None), ("w", p, None)]), 1: table([("x", r, None), ("a", p, None)])}
    kept, rejected = {}, []
    for index in shards:
        pairs, rejects = drop(shards, index, DedupConfig())
        kept[index] = list(zip(pairs.column("key").to_pylist(), pairs.column("original_key").to_pylist()
                               if "original_key" in pairs.column_names else [None] * pairs.num_rows))
        rejected += rejects.column("detail").to_pylist()
    assert kept[0] == [("x", None)] and rejected == ["duplicate_of=a by=sha256"]  # image p stays as a
    ((renamed_key, original),) = [row for row in kept[1] if row[0] != "a"]
    assert renamed_key.startswith("x~") and len(renamed_key) == 10 and original == "x"  # image r is kept too
    # The reviewer's chain: k's first row loses its image to a, and k's other image still stays.
    shards = {0: table([("k", p, None), ("a", p, None)]), 1: table([("k", q, None)])}
    kept = {i: drop(shards, i, DedupConfig())[0].column("key").to_pylist() for i in shards}
    assert kept[0] == ["a"] and len(kept[1]) == 1 and kept[1][0].startswith("k~")
    assert drop(shards, 0, DedupConfig())[1].column("key").to_pylist() == ["k"]  # rejects name the given key
    # A repeat of renamed content names the key that content kept; an input renamed before keeps its origin.
    losers, renames, _ = decide_key("cat", [(0, "A", 0, []), (0, "B", 1, []), (1, "B", 0, [])])
    ((_, _, final),) = renames
    assert [(l.shard, l.detail) for l in losers] == [(1, f"duplicate_of={final} by=key")]
    first = table([("k", p, None), ("k", q, None)])
    once = renamed(first, [("k", contents(first)[1], "k~1")])
    twice = renamed(once.set_column(0, "key", pa.array(["k~1", "k~1"])), [("k~1", contents(once)[0], "k~1~2")])
    assert twice.column_names.count("original_key") == 1
    assert twice.column("original_key").to_pylist() == ["k~1", "k"]
    # The same row in two shards: the later is a duplicate of the key; twice in one shard: one copy stays,
    # the first by its place in the input, whatever order the copies arrived in.
    shards = {0: table([("k", p, None)]), 1: table([("k", p, None)])}
    assert drop(shards, 1, DedupConfig())[1].column("detail").to_pylist() == ["duplicate_of=k by=key"]
    twice = {0: table([("k", p, "http://a/1"), ("m", q, None), ("k", p, "http://a/1")])}
    twice[0] = twice[0].append_column("licence", pa.array(["cc-by", None, "cc0"]))
    kept, rejects = drop(twice, 0, DedupConfig())
    assert kept.column("key").to_pylist() == ["k", "m"] and kept.column("licence").to_pylist()[0] == "cc-by"
    assert rejects.column("detail").to_pylist() == ["duplicate_of=k by=key"]
    reversed_rows = twice[0].take([2, 1, 0])
    reversed_rows = reversed_rows.set_column(reversed_rows.column_names.index("row"), "row",
                                             pa.array([0, 1, 2], pa.int64()))  # the input in the other order
    assert drop({0: reversed_rows}, 0, DedupConfig())[0].column("licence").to_pylist()[0] == "cc0"


def test_copies_of_one_row_with_other_urls_fingerprint_the_copy_that_stays_in_any_arrival_order():
    """The reviewer's case: k twice with one image and caption but two URLs, and z with k's first URL. The copy
    kept is the first in the input (URL 1), so z is its duplicate by URL, whichever copy arrived first."""
    p, q = picture(1), picture(2)
    rows = table([("k", p, "http://x/1"), ("k", p, "http://x/2"), ("z", q, "http://x/1")])
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        kept, rejects = drop({0: rows.take(order)}, 0, DedupConfig())
        assert kept.column("key").to_pylist() == ["k"] and kept.column("url").to_pylist() == ["http://x/1"]
        assert sorted(zip(rejects.column("detail").to_pylist(), rejects.column("row").to_pylist())) == [
            ("duplicate_of=k by=key", 1), ("duplicate_of=k by=url", 2)]  # each names its row in the input


def test_sha_beats_url_and_urls_are_normalised():
    a, b = picture(1), picture(2)
    shards = {0: table([("k0", a, "http://x.com/a"), ("k2", b, "HTTP://X.com/a#f")]),
              1: table([("k1", a, "http://x.com/other")])}
    verdicts = decide(shards, DedupConfig())
    assert {k: v.detail for k, v in verdicts.items()} == {
        "k1": "duplicate_of=k0 by=sha256", "k2": "duplicate_of=k0 by=url"}
    assert decide(shards, DedupConfig(by_sha256=False, by_url=False)) == {}
    kept, rejects = drop(shards, 0, DedupConfig())
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
    _, rejects = drop(shard, 0, DedupConfig(near_dup_bits=6))
    assert rejects.column("reason").to_pylist() == ["near_duplicate"]


def test_two_contents_whose_short_digests_clash_still_get_two_keys(monkeypatch):
    import hashlib

    from curation import dedup

    real = hashlib.blake2b

    def clashing(data, digest_size):  # every content gets the same 8 hex digits
        return real(b"same", digest_size=4) if digest_size == 4 else real(data, digest_size=digest_size)

    monkeypatch.setattr(dedup.hashlib, "blake2b", clashing)
    _, renames, _ = decide_key("k", [(0, "A", 0, []), (0, "B", 1, []), (0, "C", 2, [])])
    finals = [final for _, _, final in renames]
    assert len(set(finals)) == 2 and len(finals[0]) == 10 and len(finals[1]) == 18
