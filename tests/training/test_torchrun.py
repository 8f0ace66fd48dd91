"""The README's multi-GPU command, `torchrun -m training.cli`, on two CPU ranks (gloo): the whole loop
(rank-split data, gathered loss, DDP, every rank's loader state in the checkpoint) trains, and a resumed
two-rank run continues the straight one, loss for loss and weight for weight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from training import loop
from training.config import TrainConfig
from training.metrics_log import MetricsLog

RANKS, STEPS, BATCH = 2, 6, 8
FLAGS = dict(preset="tiny", image_size=32, context_length=16, vocab_size=400, batch_size=BATCH, workers=0,
             threads=1, warmup_steps=2, lr=1e-3, log_every=1, holdout_fraction=0.05, steps=STEPS,
             checkpoint_every=3)


def _torchrun(raw_pairs: Path, output: Path, ok: bool = True, **extra) -> str:
    """Run the README's torchrun command; return its output. Its process group is killed if it hangs."""
    options = {**FLAGS, "progress": False, **extra}
    flags = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}" for k, v in options.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
               "-m", "training.cli", "--input", str(raw_pairs), "--output", str(output), *flags]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        text, _ = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun still running after 300 s: {run.communicate()[0][-3000:]}") from None
    assert (run.returncode == 0) == ok, text[-3000:]
    return text


@pytest.mark.slow
def test_two_ranks_train_and_a_resumed_run_continues_the_straight_one(raw_pairs, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _torchrun(raw_pairs, straight)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["samples_seen"] == STEPS * BATCH * RANKS
    # The run's counters add up what every rank read, as its final checkpoint recorded it rank by rank.
    ranks = json.loads((straight / "checkpoints" / f"step-{STEPS:07d}" / "state.json").read_text())["loader"]
    assert len(ranks) == RANKS and all(r["counts"]["text_caption"] > 0 for r in ranks)
    assert metrics["text_caption"] == sum(r["counts"]["text_caption"] for r in ranks)
    # Rank 0 refuses to start a second run beside these checkpoints: rank 1 stops with it and says why.
    refused = _torchrun(raw_pairs, straight, ok=False, resume=False)
    assert "holds checkpoints of an earlier run" in refused and "rank 0 failed, so rank 1 stops too" in refused
    # The same when rank 0 fails at the very end, evaluating (an eval split none of whose images decodes).
    (tmp_path / "eval").mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "image": [b"not an image"] * 2, "label": ["x", "y"]}),
                   tmp_path / "eval" / "part-00000.parquet")
    (tmp_path / "classes.json").write_text(json.dumps(["x", "y"]))
    failed = _torchrun(raw_pairs, tmp_path / "undecodable", ok=False, steps=1, eval=tmp_path / "eval")
    assert "none of the 2 images of eval split" in failed and "rank 0 failed, so rank 1 stops too" in failed

    _torchrun(raw_pairs, resumed, stop_after_steps=3)
    saved = json.loads((resumed / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert len(saved["loader"]) == RANKS
    # One process cannot continue what two started: each rank's place in its own shards would be lost.
    with pytest.raises(ValueError, match=f"written by {RANKS} ranks"):
        loop.train(TrainConfig(input=str(raw_pairs), output=str(resumed), progress=False, **FLAGS))
    _torchrun(raw_pairs, resumed)

    losses = [MetricsLog.series(run / "metrics.csv", "loss") for run in (straight, resumed)]
    assert [step for step, _ in losses[1]] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(*losses):
        assert abs(a - b) < 1e-4
    weights = [load_file(run / "model.safetensors") for run in (straight, resumed)]
    for key, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][key], atol=1e-5), key
