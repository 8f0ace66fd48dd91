"""benchmarks/stability.py: the quantization formats it is asked for are the ones its model runs and its rows name."""

from __future__ import annotations

import math
import re
import runpy
from pathlib import Path

from training.optim.quant import quantized_layers

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "stability.py"


def test_an_fp4_run_quantizes_with_fp4_and_says_so(capsys):
    stability = runpy.run_path(str(SCRIPT), run_name="imported")
    stability["main"](["--quick", "--steps", "4", "--lrs", "1e-2", "--optimizers", "adamw", "stable_spam",
                       "--weight-format", "fp4_e2m1", "--act-format", "fp4_e1m2", "--log-every", "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lr=")]
    assert len(rows) == 2
    for row in rows:
        assert "W fp4_e2m1/g256, A fp4_e1m2/g256" in row
        assert math.isfinite(float(re.search(r"final\s+(\S+)", row).group(1)))
    args = stability["argparse"].Namespace(weight_format="fp4_e2m1", act_format="fp4_e1m2", weight_group=64,
                                           act_group=32, outliers=1, act_rounding="nearest", stochastic_round=False)
    model = stability["build_model"](50, 64, 1, 0, stability["quant_config"](args))
    modules = dict(model.named_modules())
    configs = {(modules[name].config.weight_format, modules[name].config.act_format, modules[name].config.outliers)
               for name in quantized_layers(model)}
    assert configs == {("fp4_e2m1", "fp4_e1m2", 1)}
