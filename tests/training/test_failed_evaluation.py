"""An evaluation that fails costs its metrics, never the training: the final one, or one due mid-run."""

import pytest
from transformers import CLIPModel

from training import loop
from training.metrics_log import MetricsLog
from tests.training.fast_runs import FAST, fast_config


def _out_of_memory(*args, **kwargs):
    raise RuntimeError("CUDA out of memory (injected)")


def test_a_failed_final_evaluation_keeps_the_trained_model(raw_pairs, tmp_path, monkeypatch):
    """The model is saved before the evaluation: one that fails (out of memory, say) costs only its metrics."""
    monkeypatch.setattr(loop, "evaluate_all", _out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        loop.train(fast_config(raw_pairs, tmp_path / "run", steps=2, checkpoint_every=2))
    model = CLIPModel.from_pretrained(tmp_path / "run")
    assert model.config.text_config.max_position_embeddings == FAST["context_length"]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_an_evaluation_that_failed_after_its_checkpoint_is_made_on_resume(raw_pairs, tmp_path, monkeypatch):
    """The run dies in the evaluation due at step 4, its checkpoint saved: the resume evaluates those
    weights before it trains on, and its log then holds what a straight run's does. A resume whose
    evaluation is logged does not evaluate again."""
    run = dict(steps=8, checkpoint_every=4, eval_every=4)
    straight = loop.train(fast_config(raw_pairs, tmp_path / "straight", **run))
    real, calls = loop.evaluate_all, []
    monkeypatch.setattr(loop, "evaluate_all", _out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        loop.train(fast_config(raw_pairs, tmp_path / "run", **run))
    assert (tmp_path / "run" / "checkpoints" / "step-0000004").is_dir()
    logged = {r["metric"] for r in MetricsLog.read(tmp_path / "run" / "metrics.csv") if r["step"] == "4"}
    assert "loss" in logged and loop.EVAL_SECONDS not in logged
    monkeypatch.setattr(loop, "evaluate_all", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    resumed = loop.train(fast_config(raw_pairs, tmp_path / "run", **run))
    assert resumed.steps == 8 and len(calls) == 2  # step 4's, then the final one
    series = {name: MetricsLog.series(tmp_path / name / "metrics.csv", "holdout_i2t_r@1")
              for name in ("straight", "run")}
    assert [s for s, _ in series["run"]] == [s for s, _ in series["straight"]] == [4, 8]
    assert series["run"][0][1] == pytest.approx(series["straight"][0][1])
    assert straight.metrics[loop.EVAL_SECONDS] >= 0
    calls.clear()
    loop.train(fast_config(raw_pairs, tmp_path / "stopped", stop_after_steps=4, **run))
    assert len(calls) == 1
    loop.train(fast_config(raw_pairs, tmp_path / "stopped", **run))
    assert len(calls) == 2  # the final one only: step 4's is in the log


def test_an_evaluation_logged_without_its_mark_is_made_again_in_place(raw_pairs, tmp_path):
    """A log from before eval_seconds (or one a kill cut mid-append) holds step 4's metrics without the
    mark: the resume evaluates again, and the log still holds each metric once."""
    import csv

    run = dict(steps=8, checkpoint_every=4, eval_every=4)
    loop.train(fast_config(raw_pairs, tmp_path / "run", stop_after_steps=4, **run))
    path = tmp_path / "run" / "metrics.csv"
    rows = [r for r in MetricsLog.read(path) if r["metric"] != loop.EVAL_SECONDS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    loop.train(fast_config(raw_pairs, tmp_path / "run", **run))
    logged = [(r["step"], r["metric"]) for r in MetricsLog.read(path)]
    assert len(logged) == len(set(logged))
    assert ("4", "holdout_i2t_r@1") in logged and ("4", loop.EVAL_SECONDS) in logged
