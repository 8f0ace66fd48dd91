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
