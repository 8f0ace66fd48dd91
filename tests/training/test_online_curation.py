"""Online curation at another t: from matched_entries and the balance stage's counts, found through the stage chain."""

import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.shards import read_table
from training import loop
from training.config import RunMismatch, TrainConfig
from training.data import ShardStream, StreamSpec
from training.online_curation import (
    curation_probabilities, entry_probabilities_for, find_entry_counts, keep_probabilities_of,
)
from training.randomness import unit_uniform
from training.shard_set import inspect_shards
from training.tokenizer import train_bpe

BALANCE_T = 20


def _balance(raw_pairs, demo_dir, output, *flags):
    from pipelines import balance

    balance.run(["--input", str(raw_pairs), "--output", str(output), "--metadata", str(demo_dir / "metadata.json"),
                 "--t", str(BALANCE_T), *flags])
    return output


@pytest.fixture(scope="module")
def online(raw_pairs, demo_dir, tmp_path_factory):
    """The demo pairs balanced with --online_curation: every matched pair kept, with its keep_prob."""
    return _balance(raw_pairs, demo_dir, tmp_path_factory.mktemp("online") / "balanced_pairs", "--online_curation")


@pytest.fixture(scope="module")
def tokenizer(raw_pairs):
    return train_bpe(read_table(raw_pairs, columns=["caption"]).column("caption").to_pylist(), 300, 16)


def _config(source, **kw) -> TrainConfig:
    return TrainConfig(input=str(source), output="unused", online_curation=True, **kw)


def test_at_the_balance_t_the_probabilities_are_the_stored_keep_prob(online):
    p = curation_probabilities(_config(online, t=BALANCE_T))
    table = read_table(online, columns=["matched_entries", "keep_prob"])
    recomputed = keep_probabilities_of(table, p, "test")
    assert np.allclose(recomputed, table.column("keep_prob").to_numpy(), atol=1e-6)
    assert (recomputed < 1).any()  # the demo's head entries are capped at this t


def test_a_smaller_t_keeps_fewer_rows(online, tokenizer):
    shards = inspect_shards(online, ["matched_entries"])
    table = read_table(online, columns=["key", "matched_entries"])
    kept = {}
    for t in (BALANCE_T, 4):
        p = entry_probabilities_for(online, t)
        stream = ShardStream(StreamSpec(shards, 0, 32, 16, online_curation=True, entry_p=p, shuffle_buffer=1),
                             tokenizer, 1)
        kept[t] = {k for item in stream.epoch(0, 1, 0) for k in item.get("keys", [])}
        probs = keep_probabilities_of(table, p, "test")
        keys = table.column("key").to_pylist()
        assert kept[t] == {k for k, prob in zip(keys, probs) if unit_uniform(0, k, 0, "keep") < prob}
    assert len(kept[4]) < len(kept[BALANCE_T])


def test_a_run_trains_at_another_t(online, tmp_path):
    """At t=4 the run curates out more rows than at the balance stage's t=20 (each row's own keep_prob)."""
    curated = {}
    for t in (0, 4):
        result = loop.train(TrainConfig(input=str(online), output=str(tmp_path / f"model-{t}"), online_curation=True,
                                        t=t, preset="tiny", image_size=32, context_length=16, vocab_size=300,
                                        batch_size=16, workers=0, threads=1, steps=3, warmup_steps=1, progress=False,
                                        holdout_fraction=0.0))
        assert result.steps == 3
        curated[t] = result.metrics["curated_out"] / (result.metrics["curated_out"] + result.metrics["samples_seen"])
    assert curated[4] > curated[0] > 0


def test_a_resume_refuses_entry_counts_rebuilt_under_the_same_input(online, tmp_path):
    """The counts are read by path: rebuilt in place, they changed a resumed run's keep probabilities."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = tmp_path / "entry_counts.parquet"
    shutil.copy(online / "entry_counts.parquet", counts)
    run = dict(input=str(online), output=str(tmp_path / "model"), online_curation=True, t=4, entry_counts=str(counts),
               preset="tiny", image_size=32, context_length=16, vocab_size=300, batch_size=16, workers=0, threads=1,
               steps=4, warmup_steps=1, progress=False, holdout_fraction=0.0)
    assert loop.train(TrainConfig(**run, stop_after_steps=2)).stopped_early
    table = pq.read_table(counts)
    doubled = pc.multiply(table.column("count"), pa.scalar(2, table.schema.field("count").type))
    pq.write_table(table.set_column(table.schema.get_field_index("count"), "count", doubled), counts)
    with pytest.raises(RunMismatch, match="online-curation probabilities"):
        loop.train(TrainConfig(**run))
    shutil.copy(online / "entry_counts.parquet", counts)  # the counts it was started with: it resumes
    assert loop.train(TrainConfig(**run)).steps == 4


def test_shards_balanced_offline_are_not_subsampled_again(raw_pairs, demo_dir, tmp_path):
    offline = _balance(raw_pairs, demo_dir, tmp_path / "balanced_pairs")
    with pytest.raises(ValueError, match=r"balanced offline \(balance t=20.0\).*second time"):
        curation_probabilities(_config(offline))
    with pytest.raises(ValueError, match="balanced offline"):
        curation_probabilities(_config(offline, t=5))
    assert curation_probabilities(TrainConfig(input=str(offline), output="unused")) is None  # no online curation


def _copied(source, target):
    """The shards alone: no manifest, no stage chain."""
    target.mkdir()
    for shard in sorted(source.glob("part-*.parquet")):
        shutil.copy(shard, target / shard.name)
    return target


def test_shards_without_a_manifest_are_refused_unless_stated_balanced_online(online, raw_pairs, demo_dir, tmp_path):
    """Offline and online balance write the same columns and counts: only the manifest tells them apart."""
    offline = _copied(_balance(raw_pairs, demo_dir, tmp_path / "balanced_pairs"), tmp_path / "offline")
    counts = str(online / "entry_counts.parquet")
    for copied in (offline, _copied(online, tmp_path / "online")):
        for kw in ({}, {"t": 5, "entry_counts": counts}):
            with pytest.raises(ValueError, match=r"has no manifest.*cannot be checked.*--assume_online_balanced"):
                curation_probabilities(_config(copied, **kw))
    online_copy = tmp_path / "online"
    assert curation_probabilities(_config(online_copy, assume_online_balanced=True)) is None  # each row's keep_prob
    assert curation_probabilities(_config(online_copy, assume_online_balanced=True, t=5, entry_counts=counts)) \
        is not None
    # The statement covers only what cannot be checked: a manifest that says offline still wins.
    with pytest.raises(ValueError, match="balanced offline"):
        curation_probabilities(_config(tmp_path / "balanced_pairs", assume_online_balanced=True))
    with pytest.raises(ValueError, match="--assume_online_balanced is about the input of --online_curation"):
        TrainConfig(assume_online_balanced=True)


def test_an_export_of_shards_copied_without_their_manifest_is_refused_too(raw_pairs, demo_dir, tmp_path):
    """Its own manifest's lineage starts at export: no balance stage says how its rows were sampled."""
    from pipelines import export

    offline = _copied(_balance(raw_pairs, demo_dir, tmp_path / "balanced_pairs"), tmp_path / "offline")
    export.run(["--input", str(offline), "--output", str(tmp_path / "export"), "--allow_small_shards"])
    with pytest.raises(ValueError, match=r"records no balance stage.*--assume_online_balanced"):
        curation_probabilities(_config(tmp_path / "export"))
    assert curation_probabilities(_config(tmp_path / "export", assume_online_balanced=True)) is None


def test_counts_that_cannot_be_found_are_a_clear_error(online, tmp_path):
    copied = _copied(online, tmp_path / "copied")
    with pytest.raises(FileNotFoundError, match=r"no balance stage is reachable .*--entry_counts"):
        find_entry_counts(copied)
    with pytest.raises(FileNotFoundError, match="no balance stage"):
        curation_probabilities(_config(copied, t=5, assume_online_balanced=True))
    p = curation_probabilities(_config(copied, t=5, entry_counts=str(online / "entry_counts.parquet"),
                                       assume_online_balanced=True))
    counts = pq.read_table(online / "entry_counts.parquet", columns=["count"]).column("count").to_numpy()
    assert np.allclose(p, 5 / np.maximum(counts, 5))


def test_t_without_online_curation_is_refused():
    with pytest.raises(ValueError, match="--online_curation --t"):
        TrainConfig(t=5)
    with pytest.raises(ValueError, match="--online_curation --t"):
        TrainConfig(online_curation=True, entry_counts="x.parquet")


def test_a_shard_without_the_curation_column_is_refused(online, raw_pairs, tmp_path):
    """Read as nulls it was kept whole (no keep_prob) or dropped whole (no matched_entries under --t)."""
    from curation.schema import SchemaError
    from training.online_curation import check_curation_column

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(sorted(online.glob("part-*.parquet"))[0], mixed / "part-00000.parquet")
    shutil.copy(sorted(raw_pairs.glob("part-*.parquet"))[0], mixed / "part-00001.parquet")
    shards = inspect_shards(mixed, ["keep_prob"])  # one shard with values satisfies the column check
    for t, column in ((0.0, "keep_prob"), (5.0, "matched_entries")):
        with pytest.raises(SchemaError, match=f"online curation reads {column} from every shard, and 1 of 2 lack it"):
            check_curation_column(shards, t)
    check_curation_column(inspect_shards(online, ["keep_prob"]), 5.0)


def test_an_entry_id_that_names_no_entry_is_refused_not_read_from_the_end():
    """-1 was read as the last entry's probability, and a null id crashed the reader mid-epoch."""
    import pyarrow as pa

    p = np.array([1.0, 0.5, 0.25])
    for ids in ([[0], [-1]], [[1], [None]]):
        table = pa.table({"matched_entries": pa.array(ids, pa.list_(pa.int32()))})
        with pytest.raises(ValueError, match="shard.parquet: matched_entries holds a null or negative entry id"):
            keep_probabilities_of(table, p, "shard.parquet")
    table = pa.table({"matched_entries": pa.array([[0], [1, 2]], pa.list_(pa.int32()))})
    assert np.allclose(keep_probabilities_of(table, p, "shard.parquet"), [1.0, 1 - 0.5 * 0.75])


def test_entry_ids_beyond_the_counts_are_refused_before_training(online, tmp_path):
    """A counts file of other metadata was found only when the stream reached the row, checkpoints in."""
    from curation.schema import SchemaError
    from training.online_curation import check_entry_ids

    shards = inspect_shards(online, ["matched_entries"])
    highest = pc.max(pc.list_flatten(read_table(online, columns=["matched_entries"]).column("matched_entries")))
    check_entry_ids(shards, np.ones(highest.as_py() + 1))
    with pytest.raises(SchemaError, match=rf"entry id {highest.as_py()}, which is not one of the "
                                          rf"{highest.as_py()} entry counts.*part-0000\d\.parquet"):
        check_entry_ids(shards, np.ones(highest.as_py()))
    # Without footer statistics the column is read.
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in sorted(online.glob("part-*.parquet")):
        pq.write_table(pq.read_table(shard), bare / shard.name, write_statistics=False)
    with pytest.raises(SchemaError, match=rf"entry id {highest.as_py()}"):
        check_entry_ids(inspect_shards(bare, ["matched_entries"]), np.ones(highest.as_py()))
    with pytest.raises(SchemaError, match="entry counts"):
        loop.train(TrainConfig(input=str(online), output=str(tmp_path / "run"), online_curation=True, t=5,
                               entry_counts=str(_short_counts(online, tmp_path, highest.as_py())), steps=2))
    assert not (tmp_path / "run").exists()
    # A null id (which footers do not tell from a null list) is refused here too, naming its row; a null
    # list alone is no id at all.
    import pyarrow as pa

    nulled = tmp_path / "nulled"
    nulled.mkdir()
    for i, shard in enumerate(sorted(online.glob("part-*.parquet"))):
        table = pq.read_table(shard)
        if i == 1:
            lists = table.column("matched_entries").to_pylist()
            lists[0], lists[2] = None, [lists[2][0], None]
            index = table.schema.get_field_index("matched_entries")
            table = table.set_column(index, table.schema.field(index), pa.array(lists, table.schema.field(index).type))
        pq.write_table(table, nulled / shard.name)
    with pytest.raises(SchemaError, match=r"null entry id.*part-00001\.parquet, column 'matched_entries', row 3"):
        check_entry_ids(inspect_shards(nulled, ["matched_entries"]), np.ones(highest.as_py() + 1))


def _short_counts(online, tmp_path, entries):
    path = tmp_path / "short_counts.parquet"
    pq.write_table(pq.read_table(online / "entry_counts.parquet").slice(0, entries), path)
    return path


def test_counts_of_a_balance_output_rebuilt_with_other_metadata_are_refused(raw_pairs, demo_dir, tmp_path):
    """The stage chain leads to the balance output as it is now; rebalanced with --overwrite and another
    metadata list, its counts number other entries, and were used without a word."""
    import json

    from pipelines import export

    balanced = _balance(raw_pairs, demo_dir, tmp_path / "balanced_pairs", "--online_curation")
    export.run(["--input", str(balanced), "--output", str(tmp_path / "export"), "--allow_small_shards"])
    assert find_entry_counts(tmp_path / "export") == balanced / "entry_counts.parquet"
    reversed_metadata = tmp_path / "reversed.json"
    reversed_metadata.write_text(json.dumps(json.loads((demo_dir / "metadata.json").read_text())[::-1]))
    from pipelines import balance

    balance.run(["--input", str(raw_pairs), "--output", str(balanced), "--metadata", str(reversed_metadata),
                 "--t", str(BALANCE_T), "--online_curation", "--overwrite"])
    with pytest.raises(ValueError, match=r"was rebuilt since .*export was made from it \(its shards are not the "
                                         r"ones the lineage names\)"):
        find_entry_counts(tmp_path / "export")
    # A lineage written before it named the shards: held to the settings the entry ids depend on.
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    for record in manifest["lineage"]:
        record.pop("shards_fingerprint")
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"was rebuilt since .*export was made from it \(metadata_sha256 "):
        find_entry_counts(tmp_path / "export")
    p = curation_probabilities(_config(tmp_path / "export", t=5, entry_counts=str(balanced / "entry_counts.parquet")))
    assert len(p) == len(json.loads(reversed_metadata.read_text()))  # a named file is the user's word


def test_counts_of_a_balance_output_rebuilt_over_another_pool_are_refused(raw_pairs, demo_dir, tmp_path):
    """Same metadata, other pairs: the entry ids agree, the counts do not."""
    from pipelines import balance, export

    balanced = _balance(raw_pairs, demo_dir, tmp_path / "balanced_pairs", "--online_curation")
    export.run(["--input", str(balanced), "--output", str(tmp_path / "export"), "--allow_small_shards"])
    smaller = tmp_path / "smaller"
    smaller.mkdir()
    for shard in sorted(raw_pairs.glob("part-*.parquet"))[:2]:
        shutil.copy(shard, smaller / shard.name)
    balance.run(["--input", str(smaller), "--output", str(balanced), "--metadata", str(demo_dir / "metadata.json"),
                 "--t", str(BALANCE_T), "--online_curation", "--overwrite"])
    with pytest.raises(ValueError, match=r"its shards are not the ones the lineage names"):
        curation_probabilities(_config(tmp_path / "export", t=5))
