import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from curation.schema import SCHEMA_VERSION_KEY, SchemaError
from curation.shards import read_table, shard_name
from training.data import LoaderState, ShardStream, StreamSpec, inspect_shards, is_holdout, train_batches
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


def _keys(spec, tokenizer, *, rank=0, world=1, workers=0, epoch=0) -> list[str]:
    stream = ShardStream(spec, tokenizer, rank=rank, world_size=world, epoch=epoch)
    loader = DataLoader(stream, batch_size=16, num_workers=workers, collate_fn=stream.collate)
    return [k for batch in loader for k in batch["keys"]]


def test_shards_are_split_across_ranks_and_workers_without_overlap(raw_pairs, tokenizer):
    spec = _spec(raw_pairs)
    every = [k for k in read_table(raw_pairs, columns=["key"]).column("key").to_pylist()]
    train_keys = {k for k in every if not is_holdout(k, 0.1)}
    assert 0 < len(every) - len(train_keys) < 0.2 * len(every)
    rank0, rank1 = (_keys(spec, tokenizer, rank=r, world=2, workers=2) for r in (0, 1))
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert len(rank0) + len(rank1) == len(train_keys) and set(rank0) | set(rank1) == train_keys
    held = _keys(_spec(raw_pairs, train=False), tokenizer)
    assert set(held) == set(every) - train_keys


def test_order_is_reproducible_and_reshuffled_every_epoch(raw_pairs, tokenizer):
    spec = _spec(raw_pairs)
    first = _keys(spec, tokenizer, epoch=0)
    assert first == _keys(spec, tokenizer, epoch=0)
    second = _keys(spec, tokenizer, epoch=1)
    assert second != first and sorted(second) == sorted(first)


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


def _write_variant(raw_pairs, directory, change) -> None:
    """Copy the ingest shards, applying change(table, index) -> table."""
    directory.mkdir(parents=True)
    for i, path in enumerate(sorted(raw_pairs.glob("part-*.parquet"))):
        pq.write_table(change(pq.read_table(path), i), directory / shard_name(i))


def _set_column(table, name, values):
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), pa.array(values, type=table.schema.field(name).type))


def test_corrupt_image_mid_epoch_is_skipped_and_counted(raw_pairs, tokenizer, tmp_path):
    def corrupt(table, shard):
        images = table.column("image").to_pylist()
        if shard == 1:
            for row in (10, 40):
                images[row] = images[row][: len(images[row]) // 3]
        return _set_column(table, "image", images)

    _write_variant(raw_pairs, tmp_path / "broken", corrupt)
    spec = _spec(tmp_path / "broken", holdout_fraction=0.0)
    state = LoaderState()
    batches = train_batches(spec, tokenizer, state, workers=0, batch_size=8)
    seen = 0
    while state.epoch == 0:
        seen += len(next(batches)["keys"])
    assert state.counts["corrupt_images"] == 2
    assert seen >= spec.shards.rows - 2 - 8  # everything else trained on (bar the dropped last partial batch)


def test_online_curation_keeps_rows_with_their_keep_prob(raw_pairs, tokenizer, tmp_path):
    def probs(table, shard):
        keys = table.column("key").to_pylist()
        return _set_column(table, "keep_prob", [0.0 if k.endswith(("0", "2", "4")) else 0.5 for k in keys])

    _write_variant(raw_pairs, tmp_path / "curated", probs)
    spec = _spec(tmp_path / "curated", holdout_fraction=0.0, online_curation=True, needed=["keep_prob"])
    epochs = [_keys(spec, tokenizer, epoch=e) for e in (0, 1)]
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
    with pytest.raises(SchemaError, match="schema version 0.3"):
        inspect_shards(tmp_path / "old")
    _write_variant(raw_pairs, tmp_path / "typed", lambda t, i: _set_column(
        t.drop_columns(["keep_prob"]).append_column("keep_prob", pa.array(["x"] * t.num_rows)), "keep_prob", ["x"] * t.num_rows))
    with pytest.raises(SchemaError, match="column 'keep_prob'"):
        inspect_shards(tmp_path / "typed")
    with pytest.raises(SchemaError, match="fused_caption"):
        inspect_shards(raw_pairs, ["fused_caption"])


def test_pair_schema_subset_without_optional_columns_streams(raw_pairs, tokenizer, tmp_path):
    _write_variant(raw_pairs, tmp_path / "subset", lambda t, i: t.select(["key", "image", "caption"]))
    spec = _spec(tmp_path / "subset", sampling=TextSampling(use_rewrites=True))
    assert spec.shards.columns == ["key", "image", "caption"]
    assert len(_keys(spec, tokenizer)) > 300
