import collections
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.schema import SCHEMA_VERSION_KEY, SchemaError
from curation.failed_checks import FailedChecksError, record_failed_checks
from curation.shards import read_manifest, read_table, shard_name
from training.data import LoaderState, ShardStream, StreamSpec, readers_for, train_batches
from training.randomness import unit_uniform
from training.shard_set import REQUIRED_COLUMNS, ShardSet, Unit, has_values, inspect_shards, is_holdout
from training.text_sampling import TextSampling
from training.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer(raw_pairs):
    return train_bpe(read_table(raw_pairs, columns=["caption"]).column("caption").to_pylist(), 300, 16)


def _spec(source, **kw) -> StreamSpec:
    needed = kw.pop("needed", [])
    defaults = dict(holdout_fraction=0.1, shuffle_buffer=50)
    defaults.update(kw)
    return StreamSpec(inspect_shards(source, needed), 0, 32, 16, **defaults)


def _epoch(spec, tokenizer, *, rank=0, world=1, readers=1, epoch=0, batch_size=16) -> list[dict]:
    """One epoch of every reader of a rank, reader after reader: batches and end markers."""
    stream = ShardStream(spec, tokenizer, batch_size, rank=rank, world_size=world)
    return [item for reader in range(readers) for item in stream.epoch(reader, readers, epoch)]


def _keys(spec, tokenizer, **kw) -> list[str]:
    return [k for item in _epoch(spec, tokenizer, **kw) for k in item.get("keys", [])]


def test_shards_are_split_across_ranks_and_workers_without_overlap(raw_pairs, tokenizer):
    spec = _spec(raw_pairs)
    every = [k for k in read_table(raw_pairs, columns=["key"]).column("key").to_pylist()]
    train_keys = {k for k in every if not is_holdout(k, 0.1)}
    assert 0 < len(every) - len(train_keys) < 0.2 * len(every)
    rank0, rank1 = (_keys(spec, tokenizer, rank=r, world=2, readers=2, batch_size=1) for r in (0, 1))
    pieces = [p for r in (0, 1) for reader in (0, 1)
              for p in ShardStream(spec, tokenizer, 1, rank=r, world_size=2)._pieces(reader, 2, 0)]
    assert any(not p.whole for p in pieces)  # some row group is cut between two readers, each reading its part
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert len(rank0) + len(rank1) == len(train_keys) and set(rank0) | set(rank1) == train_keys
    held = _keys(_spec(raw_pairs, train=False), tokenizer)
    assert set(held) == set(every) - train_keys


def test_every_reader_of_every_rank_gets_an_equal_share_of_rows():
    """Row groups of uneven size (a shard's last one is small) are cut, not dealt whole. Dealt whole, 5
    shards of 100 + 20 rows gave 4 ranks x 2 readers 80, 200, 200 and 120 rows in one epoch: ranks drifted
    epochs apart, rows of the small ranks were seen more often, and one rank ran out of full batches."""
    units = [Unit(f"s{i // 2}", f"s{i // 2}", i % 2, 100 if i % 2 == 0 else 20) for i in range(10)]
    spec = StreamSpec(ShardSet(units, list(REQUIRED_COLUMNS), 600, {u.path: frozenset() for u in units},
                               {u.path: frozenset() for u in units}), 0, 32, 16)
    every = sorted((u.path, u.row_group, i) for u in units for i in range(u.rows))
    for world, readers in [(4, 2), (3, 2), (2, 4), (1, 7)]:
        for epoch in range(3):
            shares = [ShardStream(spec, None, 8, rank=r, world_size=world)._pieces(reader, readers, epoch)
                      for r in range(world) for reader in range(readers)]
            sizes = [sum(p.stop - p.start for p in share) for share in shares]
            assert max(sizes) - min(sizes) <= 1, (world, readers, epoch, sizes)
            assert sorted((p.unit.path, p.unit.row_group, i) for share in shares for p in share
                          for i in range(p.start, p.stop)) == every
    first, second = (ShardStream(spec, None, 8, world_size=4)._pieces(0, 2, e) for e in (0, 1))
    assert first != second  # each epoch deals other rows to a reader


def test_readers_are_as_many_as_the_rows_can_fill_with_batches():
    units = [Unit("s", "s", g, 100) for g in range(6)]
    shards = ShardSet(units, list(REQUIRED_COLUMNS), 600, {"s": frozenset()}, {"s": frozenset()})
    assert readers_for(shards, 8, 4, 64) == 2  # 150 rows a rank: two workers' shares still fill a batch
    assert readers_for(shards, 0, 1, 64) == 1 and readers_for(shards, 3, 1, 64) == 3
    with pytest.raises(ValueError, match=r"600 rows in 1 shards give each of 4 rank\(s\) 150, fewer than a batch "
                                         r"of 200; lower --batch_size"):
        readers_for(shards, 2, 4, 200)


def test_order_is_reproducible_and_reshuffled_every_epoch(raw_pairs, tokenizer):
    spec = _spec(raw_pairs)
    first = _keys(spec, tokenizer, epoch=0, batch_size=1)
    assert first == _keys(spec, tokenizer, epoch=0, batch_size=1)
    second = _keys(spec, tokenizer, epoch=1, batch_size=1)
    assert second != first and sorted(second) == sorted(first)


def test_order_does_not_depend_on_where_the_shards_are_or_how_the_path_is_spelled(raw_pairs, tokenizer, tmp_path,
                                                                                   monkeypatch):
    moved = tmp_path / "elsewhere" / "pairs"
    shutil.copytree(raw_pairs, moved)
    monkeypatch.chdir(moved.parent)
    orders = [_keys(_spec(source), tokenizer, epoch=1, batch_size=1) for source in (raw_pairs, moved, "pairs")]
    assert orders[0] == orders[1] == orders[2]


def test_resume_mid_run_gives_the_batches_of_an_uninterrupted_run(raw_pairs, tokenizer):
    spec = _spec(raw_pairs)
    state = LoaderState()
    batches = train_batches(spec, tokenizer, state, workers=2, batch_size=16)
    straight = [next(batches)["keys"] for _ in range(27)]
    batches.close()
    state = LoaderState()
    batches = train_batches(spec, tokenizer, state, workers=2, batch_size=16)
    head = [next(batches)["keys"] for _ in range(13)]
    saved = state.to_dict()
    batches.close()
    assert saved["next_reader"] == 1  # an odd count: the resumed loader must start with the other reader
    resumed_state = LoaderState.from_dict(saved)
    resumed = train_batches(spec, tokenizer, resumed_state, workers=2, batch_size=16)
    tail = [next(resumed)["keys"] for _ in range(14)]  # crosses into the next epoch
    resumed.close()
    assert resumed_state.epoch == 1
    assert head + tail == straight


def test_a_resumed_reader_skips_row_groups_without_reading_their_images(raw_pairs, tokenizer, tmp_path, monkeypatch):
    """Fast-forwarding past most of an epoch reads the skipped row groups' keys only; the batches after the
    resume point are those of the straight epoch, and so are their counters."""
    import training.data

    small_groups = tmp_path / "small-groups"
    small_groups.mkdir()
    for i, path in enumerate(sorted(raw_pairs.glob("part-*.parquet"))):
        table = _set_column(pq.read_table(path), "keep_prob", [0.5] * pq.read_metadata(path).num_rows)
        pq.write_table(table, small_groups / shard_name(i), row_group_size=16)
    spec = _spec(small_groups, online_curation=True, needed=["keep_prob"], shuffle_buffer=20)
    reads, real = [], training.data.read_unit
    monkeypatch.setattr(training.data, "read_unit", lambda shards, unit, columns, rows=None: (
        reads.append("image" in columns), real(shards, unit, columns, rows))[1])
    stream = ShardStream(spec, tokenizer, 8)
    straight = list(stream.epoch(0, 1, 0))
    image_reads = sum(reads)
    reads.clear()
    at = len(straight) - 4  # near the end: a row may wait long in the shuffle buffer, so its group is read
    resumed = list(stream.epoch(0, 1, 0, skip=straight[at]["stream_end"]))
    assert [b.get("keys") for b in resumed] == [b.get("keys") for b in straight[at + 1:]]
    assert [b["counts"] for b in resumed] == [b["counts"] for b in straight[at + 1:]]
    assert 0 < sum(reads) < image_reads / 2


def _write_variant(raw_pairs, directory, change) -> None:
    """Copy the ingest shards, applying change(table, index) -> table."""
    directory.mkdir(parents=True)
    for i, path in enumerate(sorted(raw_pairs.glob("part-*.parquet"))):
        pq.write_table(change(pq.read_table(path), i), directory / shard_name(i))


def _set_column(table, name, values):
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), pa.array(values, type=table.schema.field(name).type))


def _corrupt(table, shard, rows=(10, 40)):
    images = table.column("image").to_pylist()
    if shard == 1:
        for row in rows:
            images[row] = images[row][: len(images[row]) // 3]
    return _set_column(table, "image", images)


def _totals(items) -> collections.Counter:
    totals = collections.Counter()
    for item in items:
        totals.update(item["counts"])
    return totals


def test_corrupt_image_mid_epoch_is_skipped_and_counted(raw_pairs, tokenizer, tmp_path):
    _write_variant(raw_pairs, tmp_path / "broken", _corrupt)
    spec = _spec(tmp_path / "broken", holdout_fraction=0.0)
    items = _epoch(spec, tokenizer, batch_size=8)
    seen = sum(len(item.get("keys", [])) for item in items)
    assert _totals(items)["corrupt_images"] == 2
    assert spec.shards.rows - 2 - 8 < seen <= spec.shards.rows - 2  # all else, bar the dropped partial batch
    assert items[-1]["end"] and not any(item.get("end") for item in items[:-1])


def test_counts_of_rows_after_the_last_full_batch_are_not_lost(raw_pairs, tokenizer, tmp_path):
    """Unshuffled, one reader: the last row of the epoch's last unit falls in the dropped partial batch."""
    _write_variant(raw_pairs, tmp_path / "tail", lambda t, i: t)
    spec = _spec(tmp_path / "tail", holdout_fraction=0.0, shuffle_buffer=1)
    batch = next(b for b in (7, 9, 11, 13) if spec.shards.rows % b)
    last = ShardStream(spec, tokenizer, batch)._pieces(0, 1, 0)[-1].unit
    table = pq.read_table(last.path)
    assert pq.ParquetFile(last.path).metadata.num_row_groups == 1
    pq.write_table(_corrupt(table, 1, rows=(table.num_rows - 1,)), last.path)
    items = _epoch(_spec(tmp_path / "tail", holdout_fraction=0.0, shuffle_buffer=1), tokenizer, batch_size=batch)
    assert _totals(items)["corrupt_images"] == 1
    assert sum(len(item.get("keys", [])) for item in items) == (spec.shards.rows - 1) // batch * batch


def _curation_variant(raw_pairs, directory, **kw):
    """Half the rows kept by online curation, two corrupt images."""
    def change(table, shard):
        table = _set_column(table, "keep_prob", [0.5] * table.num_rows)
        return _corrupt(table, shard)

    _write_variant(raw_pairs, directory, change)
    return _spec(directory, holdout_fraction=0.1, online_curation=True, needed=["keep_prob"], **kw)


def test_every_row_is_counted_once_per_epoch(raw_pairs, tokenizer, tmp_path):
    """One unshuffled reader: every training row is trained on, curated out, corrupt, or in the dropped last batch.

    The counters include the events among the dropped batch's rows (its end marker carries them).
    """
    spec = _curation_variant(raw_pairs, tmp_path / "curated", shuffle_buffer=1)
    keys = read_table(tmp_path / "curated", columns=["key"]).column("key").to_pylist()
    shard1 = pq.read_table(tmp_path / "curated" / shard_name(1), columns=["key"]).column("key").to_pylist()
    broken = {shard1[row] for row in (10, 40)}  # _corrupt's rows
    training = [k for k in keys if not is_holdout(k, 0.1)]
    for epoch in (0, 1):
        kept = {k for k in training if unit_uniform(0, k, epoch, "keep") < 0.5}
        corrupt = len(kept & broken)
        survivors = len(kept) - corrupt
        items = _epoch(spec, tokenizer, readers=1, epoch=epoch, batch_size=8)
        totals = _totals(items)
        assert totals["curated_out"] == len(training) - len(kept) and totals["corrupt_images"] == corrupt
        trained = sum(len(item.get("keys", [])) for item in items)
        assert sum(totals[f"text_{s}"] for s in ("caption", "rewrite", "fused", "synthetic")) == trained
        assert trained == survivors - survivors % 8  # all but the dropped partial last batch
        assert totals["dropped_partial"] == survivors % 8


def test_counters_after_a_resume_equal_an_uninterrupted_runs(raw_pairs, tokenizer, tmp_path):
    spec = _curation_variant(raw_pairs, tmp_path / "curated")
    state = LoaderState()
    batches = train_batches(spec, tokenizer, state, workers=2, batch_size=8)
    items = [next(batches) for _ in range(30)]
    batches.close()
    straight = [item["keys"] for item in items]
    assert state.epoch == 1  # the run crossed an epoch end, whose markers carry counts
    # A reader whose epoch ended first goes on into the next one, in its turn, while the other finishes:
    # no batch waits in the main process for the readers to meet at an epoch's end (that queue grew
    # with every epoch's difference, without bound over a long run).
    epochs = [item["epoch"] for item in items]
    assert epochs != sorted(epochs)
    assert [item["reader"] for item in items[:2]] == [0, 1]
    head_state = LoaderState()
    batches = train_batches(spec, tokenizer, head_state, workers=2, batch_size=8)
    head = [next(batches)["keys"] for _ in range(9)]
    batches.close()
    resumed_state = LoaderState.from_dict(head_state.to_dict())
    resumed = train_batches(spec, tokenizer, resumed_state, workers=2, batch_size=8)
    tail = [next(resumed)["keys"] for _ in range(21)]
    resumed.close()
    assert head + tail == straight
    assert resumed_state.counts == state.counts and state.counts["curated_out"] > 0


def test_online_curation_keeps_rows_with_their_keep_prob(raw_pairs, tokenizer, tmp_path):
    def probs(table, shard):
        keys = table.column("key").to_pylist()
        return _set_column(table, "keep_prob", [0.0 if k.endswith(("0", "2", "4")) else 0.5 for k in keys])

    _write_variant(raw_pairs, tmp_path / "curated", probs)
    spec = _spec(tmp_path / "curated", holdout_fraction=0.0, online_curation=True, needed=["keep_prob"])
    epochs = [_keys(spec, tokenizer, epoch=e, batch_size=1) for e in (0, 1)]
    for keys in epochs:
        assert not any(k.endswith(("0", "2", "4")) for k in keys)
    eligible = sum(not k.endswith(("0", "2", "4")) for k in read_table(raw_pairs, columns=["key"]).column("key").to_pylist())
    assert 0.35 * eligible < len(epochs[0]) < 0.65 * eligible
    assert set(epochs[0]) != set(epochs[1])  # a fresh draw every epoch


def test_bad_shards_are_refused_before_training(raw_pairs, tmp_path):
    _write_variant(raw_pairs, tmp_path / "nocaption", lambda t, i: t.drop_columns(["caption"]))
    with pytest.raises(SchemaError, match=r"missing required column.*part-00000.parquet.*'caption'"):
        inspect_shards(tmp_path / "nocaption")

    def old_version(table, shard):
        return table.replace_schema_metadata({SCHEMA_VERSION_KEY: b"0.3"})

    _write_variant(raw_pairs, tmp_path / "old", old_version)
    with pytest.raises(SchemaError, match=r"schema version b'0\.3' is not compatible"):
        inspect_shards(tmp_path / "old")
    # No version at all: refused too, as the export's validate_training_table refuses it (one rule).
    _write_variant(raw_pairs, tmp_path / "unversioned", lambda t, i: t.replace_schema_metadata({}))
    with pytest.raises(SchemaError, match=r"schema version None .*part-00000\.parquet"):
        inspect_shards(tmp_path / "unversioned")
    _write_variant(raw_pairs, tmp_path / "typed", lambda t, i: _set_column(
        t.drop_columns(["keep_prob"]).append_column("keep_prob", pa.array(["x"] * t.num_rows)), "keep_prob", ["x"] * t.num_rows))
    with pytest.raises(SchemaError, match="column 'keep_prob'"):
        inspect_shards(tmp_path / "typed")
    with pytest.raises(SchemaError, match="fused_caption"):
        inspect_shards(raw_pairs, ["fused_caption"])

    def null_caption(table, shard):  # as another tool writes it: a nullable caption column with a null
        captions = table.column("caption").to_pylist()
        index = table.schema.get_field_index("caption")
        return table.set_column(index, pa.field("caption", pa.string()),
                                pa.array(captions[:5] + [None] + captions[6:], pa.string())) if shard == 1 else table

    _write_variant(raw_pairs, tmp_path / "nullcaption", null_caption)
    with pytest.raises(SchemaError, match=r"1 row\(s\) have no caption.*part-00001\.parquet, column 'caption', row 6"):
        inspect_shards(tmp_path / "nullcaption")
    # A stage's output without its manifest is unfinished: part of its rows.
    shutil.copytree(raw_pairs, tmp_path / "unfinished")
    (tmp_path / "unfinished" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="has not finished"):
        inspect_shards(tmp_path / "unfinished")
    shutil.copytree(raw_pairs, tmp_path / "failed")
    record_failed_checks(tmp_path / "failed", read_manifest(tmp_path / "failed"), ["schema_valid"])
    with pytest.raises(FailedChecksError, match=r"failed its quality checks \(schema_valid\)"):
        inspect_shards(tmp_path / "failed")


def test_pair_schema_subset_without_optional_columns_streams(raw_pairs, tokenizer, tmp_path):
    _write_variant(raw_pairs, tmp_path / "subset", lambda t, i: t.select(["key", "image", "caption"]))
    spec = _spec(tmp_path / "subset", sampling=TextSampling(use_rewrites=True))
    assert spec.shards.columns == ["key", "image", "caption"]
    assert len(_keys(spec, tokenizer)) > 300


def test_shards_that_lack_an_optional_column_stream_with_nulls(raw_pairs, tokenizer, tmp_path):
    """One shard has rewrites, the others lack the column: every row streams, only that shard's rows use them."""
    def some_rewrites(table, shard):
        if shard:
            return table.drop_columns(["rewrites"])
        return _set_column(table, "rewrites", [[f"a long rewrite number {i}"] for i in range(table.num_rows)])

    _write_variant(raw_pairs, tmp_path / "mixed", some_rewrites)
    spec = _spec(tmp_path / "mixed", holdout_fraction=0.0, sampling=TextSampling(use_rewrites=True))
    assert "rewrites" in spec.shards.columns
    items = _epoch(spec, tokenizer, batch_size=1)
    first_shard = sorted((tmp_path / "mixed").glob("*.parquet"))[0]
    first = set(read_table(first_shard, columns=["key"]).column("key").to_pylist())
    rewritten = {k for item in items if item.get("texts") and item["texts"][0].startswith("a long rewrite")
                 for k in item["keys"]}
    assert sum(len(item.get("keys", [])) for item in items) == spec.shards.rows
    assert rewritten and rewritten <= first


def test_has_values_reads_the_footers_of_every_shard(raw_pairs, tmp_path):
    assert not has_values(raw_pairs, "fused_caption")  # ingest leaves the stage columns null
    assert has_values(raw_pairs, "caption")
    _write_variant(raw_pairs, tmp_path / "fused", lambda t, i: t if i < 3 else _set_column(
        t, "fused_caption", ["fused"] + [None] * (t.num_rows - 1)))
    assert has_values(tmp_path / "fused", "fused_caption")
    _write_variant(raw_pairs, tmp_path / "gone", lambda t, i: t.drop_columns(["fused_caption"]))
    assert not has_values(tmp_path / "gone", "fused_caption")


def test_a_list_column_with_null_elements_still_has_values(raw_pairs, tmp_path):
    """A list column's footer null count also counts null elements: one rewrite beside two nulls in the
    first row, and null lists elsewhere, give more nulls than rows; the rewrite must still be read."""
    _write_variant(raw_pairs, tmp_path / "sparse", lambda t, i: _set_column(
        t, "rewrites", [["a good rewrite", None, None]] + [None] * (t.num_rows - 1)))
    assert has_values(tmp_path / "sparse", "rewrites")
    assert "rewrites" in inspect_shards(tmp_path / "sparse", ["rewrites"]).columns
    _write_variant(raw_pairs, tmp_path / "empty", lambda t, i: _set_column(
        t, "rewrites", [[None, None], []] + [None] * (t.num_rows - 2)))
    assert not has_values(tmp_path / "empty", "rewrites")
