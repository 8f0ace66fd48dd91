"""The log rows' samples/s and data-wait share: training time only, not the saves and evaluations between."""

import types

from training import loop
from training.metrics_log import MetricsLog
from tests.training.fast_runs import fast_config


def test_checkpoint_and_evaluation_time_is_left_out_of_the_next_row(raw_pairs, tmp_path, monkeypatch):
    """A clock of the loop's own that every read moves by 1 ms, and every evaluation by 1,000 s: a row
    whose window held one had a samples/s a million times smaller than the others."""
    clock = types.SimpleNamespace(now=0.0)

    def perf_counter():
        clock.now += 1e-3
        return clock.now

    real = loop.evaluate_all

    def slow_evaluation(*args, **kwargs):
        clock.now += 1000.0
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(loop, "evaluate_all", slow_evaluation)
    loop.train(fast_config(raw_pairs, tmp_path / "run", steps=8, log_every=2, eval_every=4, checkpoint_every=4))
    rates = dict(MetricsLog.series(tmp_path / "run" / "metrics.csv", "samples_per_s"))
    assert sorted(rates) == [2, 4, 6, 8]
    assert max(rates.values()) < 10 * min(rates.values()), rates
