import subprocess
import sys

from curation.shards import verify_manifest
from pipelines import cli


def test_help_lists_every_stage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ("demo", "ingest", "balance", "rewrite", "caption", "export", "train"):
        assert stage in out


def test_unknown_stage_is_an_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_entry_point_runs_demo_ingest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--workdir", str(tmp_path),
                           "--pairs", "120", "--eval", "10", "--stages", "ingest"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[ingest]" in proc.stdout and "head concepts" in proc.stdout
    assert verify_manifest(tmp_path / "raw_pairs")["rows"] > 100


def test_a_stages_help_names_the_stage_in_its_usage_line():
    """It said `usage: clip-curation [-h] ...`, which fails when copied."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "balance", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: clip-curation balance [-h]") and "--metadata" in proc.stdout


def test_a_misspelt_flag_is_refused_before_any_work(tmp_path):
    """Beam keeps a flag it does not know: --rewrite_modle ran the default model, without a word."""
    import pytest

    from pipelines import balance, caption, rewrite  # noqa: F401 - caption's options exist in this process

    for run, flag in ((rewrite.run, "--rewrite_modle=Qwen/Qwen2.5-1.5B-Instruct"), (rewrite.run, "--rewrite-model"),
                      (balance.run, "--tt=5")):
        with pytest.raises(ValueError, match=f"unknown flag\\(s\\) {flag.split('=')[0]}"):
            run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), flag, "x"])
    assert not (tmp_path / "out").exists()
    # Beam's own flags are known flags.
    from pipelines.runner import refuse_unknown_flags

    refuse_unknown_flags(["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode",
                          "multi_processing", "--no_pipeline_type_check", "--flink_master=localhost:8081", "--help",
                          "--"], rewrite.RewriteOptions)
    # Another stage's flag is not this stage's, even with that stage imported.
    with pytest.raises(ValueError, match="unknown flag\\(s\\) --caption_shards_per_run"):
        refuse_unknown_flags(["--caption_shards_per_run=1"], rewrite.RewriteOptions)


def test_the_demo_redoes_a_stage_whose_output_another_version_wrote(tmp_path, capsys):
    import json

    from pipelines import demo

    flags = ["--workdir", str(tmp_path), "--pairs", "120", "--eval", "10", "--stages", "ingest"]
    demo.main(flags)
    recorded = tmp_path / "raw_pairs" / "_stage_config.json"
    old = json.loads(recorded.read_text())
    recorded.write_text(json.dumps({**old, "config": {**old["config"], "from": "another version"}}))
    demo.main(flags)
    assert "redoing it" in capsys.readouterr().out
    assert json.loads(recorded.read_text()) == old and verify_manifest(tmp_path / "raw_pairs")["rows"] > 100


def test_the_demo_starts_training_over_when_its_run_was_made_from_other_data(tmp_path, monkeypatch, capsys):
    """A train output of other shards (or settings) is redone with --overwrite, announced."""
    import sys
    import types

    from pipelines import demo
    from training.config import RunMismatch

    calls = []

    def main(flags):
        calls.append(flags)
        if len(calls) == 1:
            raise RunMismatch("holds a run with other settings or data")

    job = types.ModuleType("fake_train")
    job.main, job.demo_flags = main, lambda workdir: ["--steps", "2"]
    monkeypatch.setitem(sys.modules, "fake_train", job)
    monkeypatch.setattr(demo, "STEPS", (("train", "fake_train", "clip_model"),))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "classes.json").write_text("[]")
    demo.main(["--workdir", str(tmp_path), "--stages", "train"])
    assert [c[-1] for c in calls] == ["2", "--overwrite"] and "redoing it" in capsys.readouterr().out


def test_a_demo_stage_subset_reads_the_output_of_the_stage_before_it(tmp_path, monkeypatch):
    """`--stages caption` captioned the raw pool, not the finished outputs of the stages before it."""
    import sys
    import types

    from pipelines import demo

    inputs = {}

    def stage(name):
        job = types.ModuleType(f"fake_{name}")
        job.demo_flags = lambda workdir: []
        job.main = lambda flags: inputs.setdefault(name, flags[flags.index("--input") + 1])
        monkeypatch.setitem(sys.modules, job.__name__, job)
        return name, job.__name__, f"{name}_out"

    monkeypatch.setattr(demo, "STEPS", tuple(stage(name) for name in ("a", "b", "c", "d")))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "classes.json").write_text("[]")
    (tmp_path / "a_out").mkdir()
    (tmp_path / "a_out" / "manifest.json").write_text("{}")
    (tmp_path / "b_out").mkdir()  # unfinished: no manifest
    demo.main(["--workdir", str(tmp_path), "--stages", "c"])
    assert inputs == {"c": str(tmp_path / "a_out")}
    inputs.clear()
    (tmp_path / "b_out" / "manifest.json").write_text("{}")  # finished, but made from a's earlier output
    demo.main(["--workdir", str(tmp_path), "--stages", "a,c"])
    assert inputs == {"a": str(tmp_path / "demo" / "pool"), "c": str(tmp_path / "a_out")}


def test_a_stage_without_its_input_or_output_says_which_flag_it_needs(tmp_path):
    """Without --output, rewrite and caption failed in the overlap check with a bare TypeError."""
    import pytest

    from pipelines import balance, caption, export, rewrite

    for run, needs in ((rewrite.run, []), (caption.run, ["--captioner_model", str(tmp_path / "vlm")]),
                       (balance.run, []), (export.run, [])):
        for argv in (["--input", str(tmp_path)], ["--output", str(tmp_path / "out")]):
            with pytest.raises(ValueError, match=r": --input and --output are required"):
                run([*argv, *needs])
    assert not (tmp_path / "out").exists()


def test_a_count_flag_below_one_is_refused_naming_it(tmp_path, capsys):
    """0 was taken: a batch of no rows, or shards per run of 0 silently made 1."""
    import pytest

    from pipelines import caption, rewrite

    for run, flag in ((rewrite.run, "--rewrite_captions_per_batch"), (rewrite.run, "--rewrite_shards_per_run"),
                      (caption.run, "--caption_shards_per_run"), (rewrite.run, "--batch_rows")):
        with pytest.raises(SystemExit):
            run(["--input", str(tmp_path), "--output", str(tmp_path / "out"), flag, "0"])
        assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_named_by_a_missing_path_is_refused_before_anything_is_written(tmp_path):
    """Read as a hub id, a mistyped folder failed offline in a Beam worker after the stage had recorded its
    config (and the corrected rerun was refused as another one)."""
    import pytest

    from pipelines import caption, rewrite

    base = ["--input", str(tmp_path), "--output", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match=r"--rewrite_model /models/typo: no such model folder"):
        rewrite.run([*base, "--rewrite_model", "/models/typo"])
    with pytest.raises(FileNotFoundError, match=r"--captioner_model \./vlm-typo: no such model folder"):
        caption.run([*base, "--captioner_model", "./vlm-typo"])
    with pytest.raises(FileNotFoundError, match=r"--fusion_model ~/lm-typo: no such model folder"):
        caption.run([*base, "--captioner_model", str(tmp_path), "--fusion_model", "~/lm-typo"])
    assert not (tmp_path / "out").exists()
