"""benchmarks/bench_optim.py runs on the GPU machine, which has no transformers, Beam or Dagster to rely on."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_bench_optim_imports_without_transformers_beam_or_dagster():
    blocked = ("transformers", "apache_beam", "dagster")
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import runpy; "
            "module = runpy.run_path('benchmarks/bench_optim.py', run_name='imported'); "
            "print(sorted(name for name in module['candidates']('cuda', True)))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("AdamW(fused)", "StableSPAM fp32", "StableSPAM fp32 fused", "StableSPAM 8-bit",
                 "StableSPAM 8-bit fused", "SPAM fp32", "reference (per-tensor)"):
        assert name in done.stdout
