"""benchmarks/bench_resume.py: the keys-only fast-forward reaches the baseline's batch with fewer bytes read."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_resume.py"


def test_the_resume_benchmark_reads_fewer_bytes_to_the_same_batch(capsys):
    runpy.run_path(str(SCRIPT), run_name="imported")["main"](["--rows", "1200", "--image_kb", "4", "--row_group", "32",
                                                                        "--shuffle_buffer", "16"])
    out = capsys.readouterr().out
    full, keys = (float(x) for x in re.findall(r"([\d.]+) MB read", out))
    assert keys < full / 2, out  # the script itself asserts both reach the same first batch
