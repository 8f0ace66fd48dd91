"""A run's output directory (training.run_dir): resume only the same run, overwrite only a run's own files."""

import json
import shutil
from pathlib import Path

import pytest

from curation.shards import OVERWRITE_SENTINEL, read_manifest
from training import loop, run_dir
from training.config import RunMismatch, TrainConfig
from training.data import DATA_ORDER
from training.metrics_log import MetricsLog
from training.shard_set import input_fingerprint
from tests.training.fast_runs import FAST, fast_config as _config


def test_resume_refuses_other_input_and_overwrite_starts_over(demo_pairs, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_pairs[0], data)
    first = loop.train(_config(data, tmp_path / "run", steps=4, checkpoint_every=2))
    assert json.loads((first.checkpoint / "state.json").read_text())["input"] == input_fingerprint(data)
    shutil.rmtree(data)
    shutil.copytree(demo_pairs[1], data)  # same path, re-exported contents
    with pytest.raises(RunMismatch, match=r"input shards .* differ.*--overwrite"):
        loop.train(_config(data, tmp_path / "run", steps=6, checkpoint_every=2))
    again = loop.train(_config(data, tmp_path / "run", steps=6, checkpoint_every=2, overwrite=True))
    assert again.steps == 6
    assert json.loads((again.checkpoint / "state.json").read_text())["input"] == input_fingerprint(data)
    assert [s for s, _ in MetricsLog.series(tmp_path / "run" / "metrics.csv", "loss")] == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    # Starting a second run beside the first one's checkpoints is refused; --overwrite clears them.
    with pytest.raises(RunMismatch, match="checkpoints of an earlier run"):
        loop.train(_config(data, tmp_path / "run", steps=2, resume=False))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="holds no trainer output") as refused:  # not a run: never wiped
        loop.train(_config(data, tmp_path / "other", steps=2, overwrite=True))
    assert not isinstance(refused.value, RunMismatch)
    assert read_manifest(data)["rows"] == 240


def test_a_checkpoint_from_before_input_fingerprints_is_refused_for_what_it_is(demo_pairs, tmp_path):
    first = loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, checkpoint_every=2))
    path = first.checkpoint / "state.json"
    state = json.loads(path.read_text())
    del state["input"]  # as the trainer wrote it then: no fingerprint, and its loader state of another format
    for loader in state["loader"]:
        del loader["epochs"]
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"predates input fingerprints.*--overwrite") as info:
        loop.train(_config(demo_pairs[0], tmp_path / "run", steps=4, checkpoint_every=2))
    assert "differ" not in str(info.value)
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, overwrite=True)).steps == 2


def test_a_checkpoint_of_another_data_order_is_refused(demo_pairs, tmp_path):
    """Its loader state is a position in an order this version no longer draws: resuming would repeat rows."""
    first = loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, checkpoint_every=2, stop_after_steps=2))
    path = first.checkpoint / "state.json"
    state = json.loads(path.read_text())
    state["data_order"] = 2  # as checkpoints were written while units were dealt to readers whole
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=rf"ordered the data otherwise \(data order 2, this one is {DATA_ORDER}\).*--overwrite"):
        loop.train(_config(demo_pairs[0], tmp_path / "run", steps=4, checkpoint_every=2))


def test_an_overwrite_killed_mid_delete_is_still_an_overwrite_of_a_run(demo_pairs, tmp_path, monkeypatch):
    """The marker goes last: killed before it, the folder is still the trainer's, and --overwrite clears it."""
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2)).steps == 2
    real_unlink, kept = Path.unlink, []

    def killed_before_the_marker(path, *args, **kwargs):
        if path.name == run_dir.RUN_MARKER:  # the last delete
            kept.append(sorted(p.name for p in path.parent.iterdir()))
            raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(run_dir.Path, "unlink", killed_before_the_marker)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, overwrite=True))
    monkeypatch.undo()
    assert kept == [[run_dir.RUN_MARKER]]  # everything else was gone first
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, overwrite=True)).steps == 2


def test_overwrite_clears_a_run_in_an_output_linked_to_another_disk(demo_pairs, tmp_path):
    """rmtree refuses a symbolic link: the earlier run was deleted, then --overwrite failed, every time."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "disk")
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=4, checkpoint_every=2)).steps == 4
    again = loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, checkpoint_every=2, overwrite=True))
    assert again.steps == 2 and (tmp_path / "run").is_symlink()
    assert [p.name for p in (tmp_path / "disk" / "checkpoints").iterdir()] == ["step-0000002"]
    assert [s for s, _ in MetricsLog.series(tmp_path / "run" / "metrics.csv", "loss")] == [1, 2]


def test_overwrite_clears_a_run_that_died_after_saving_its_tokenizer(demo_pairs, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "build_model", killed)
        with pytest.raises(RuntimeError, match="killed"):
            loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2))
    left = {p.name for p in (tmp_path / "run").iterdir()}
    assert "tokenizer_config.json" in left and run_dir.TRAIN_CONFIG not in left  # the tokenizer only, and the run's marker
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, overwrite=True)).steps == 2
    # A folder holding only a tokenizer that no run wrote (a downloaded one, say) is not the trainer's.
    shutil.copytree(tmp_path / "run", tmp_path / "tok", ignore=lambda _, names: {n for n in names
                                                                                if "tokenizer" not in n})
    assert {p.name for p in (tmp_path / "tok").iterdir()} >= {"tokenizer_config.json"}
    with pytest.raises(ValueError, match="holds no trainer output"):
        loop.train(_config(demo_pairs[0], tmp_path / "tok", steps=2, overwrite=True))
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    # Nor is a tokenizer this run loads deleted under it, even inside the output it overwrites.
    shutil.copytree(tmp_path / "tok", tmp_path / "run" / "tok")
    with pytest.raises(ValueError, match="holds the --tokenizer this run reads"):
        loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, tokenizer=str(tmp_path / "run" / "tok"),
                           vocab_size=0, overwrite=True))
    assert (tmp_path / "run" / "tok" / "tokenizer_config.json").is_file()
    # Nor the input shards, when a run's output was made their parent folder.
    shutil.copytree(demo_pairs[0], tmp_path / "run" / "shards")
    with pytest.raises(ValueError, match="holds the --input this run reads"):
        loop.train(TrainConfig(input=str(tmp_path / "run" / "shards"), output=str(tmp_path / "run"),
                               **{**FAST, "steps": 2, "overwrite": True}))
    assert read_manifest(tmp_path / "run" / "shards")["rows"] == read_manifest(demo_pairs[0])["rows"]


def test_a_folder_holding_only_the_orchestrators_sentinel_is_the_trainers_to_overwrite(tmp_path):
    """The Dagster step leaves `.overwrite-pending` in an output it will have overwritten: alone, it made the
    folder look like someone's files, and the trainer refused the --overwrite."""
    (tmp_path / OVERWRITE_SENTINEL).write_text("run-1")
    assert run_dir.is_trainer_output(tmp_path)
    (tmp_path / "notes.txt").write_text("someone's")
    assert not run_dir.is_trainer_output(tmp_path)


def test_a_second_run_on_a_live_runs_output_is_refused_and_touches_nothing(demo_pairs, tmp_path):
    from curation.output_lock import OutputBusy, output_lock

    first = loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, checkpoint_every=2))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with output_lock(tmp_path / "run", "train"):  # as a live run holds it
        with pytest.raises(OutputBusy, match=r"run is being written by another run \(train, pid"):
            loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, overwrite=True))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    assert first.checkpoint.exists()
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=2, overwrite=True)).steps == 2  # released
