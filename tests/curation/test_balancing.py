import math
import random

import numpy as np
import pyarrow as pa
import pytest

from curation.balancing import (
    BalanceConfig, balance_table, count_matches, count_summary, entry_count_table, entry_probabilities,
    keep_probabilities, plot_entry_counts, uniform_draws,
)
from curation.rejects import Reason


def _lists(rows: list[list[int] | None]) -> pa.ListArray:
    return pa.array(rows, pa.list_(pa.int32()))


def test_probabilities_are_one_in_the_tail_and_t_over_count_in_the_head():
    counts = np.array([0, 1, 20_000, 20_001, 1_000_000], np.uint64)
    p = entry_probabilities(counts, 20_000)
    assert p.tolist()[:3] == [1.0, 1.0, 1.0]
    assert p[3] == pytest.approx(20_000 / 20_001) and p[4] == pytest.approx(0.02)


def test_keep_probability_is_one_minus_the_product_of_misses():
    # The spec's worked example: dog 1,000,000, red 300,000, red dog 5,000, park 50,000 at t = 20,000.
    p = entry_probabilities(np.array([1_000_000, 300_000, 5_000, 50_000]), 20_000)
    prob = keep_probabilities(_lists([[0, 1, 2, 3], [0, 3], [], None, [1]]), p)
    assert prob[0] == 1.0  # a tail entry keeps the pair for sure
    assert prob[1] == pytest.approx(1 - 0.98 * 0.6)
    assert prob[2] == 0.0 and prob[3] == 0.0
    assert prob[4] == pytest.approx(20_000 / 300_000)


def test_a_tiny_keep_probability_is_not_rounded_to_zero():
    """1 - exp(x) is 0 below about 1e-16: a matched pair was then rejected as matching nothing."""
    p = entry_probabilities(np.array([10**9]), 1e-8)
    prob = keep_probabilities(_lists([[0], [0, 0]]), p)
    assert prob[0] == pytest.approx(1e-17) and prob[1] == pytest.approx(2e-17)
    table = pa.table({"key": ["a"], "caption": ["a cat"]})
    _, rejects = balance_table(table, _lists([[0]]), p, BalanceConfig("m.json", "0" * 64, t=1e-8),
                               file="f", row_offset=0)
    assert rejects.num_rows == 0  # matched: dropped by the draw, which is balancing, not a reject


def test_counts_are_per_caption_per_entry():
    counts = count_matches(pa.chunked_array([_lists([[0, 2], [2], None]), _lists([[], [1, 2]])]), 4)
    assert counts.dtype == np.uint64 and counts.tolist() == [1, 1, 3, 0]


def test_draws_depend_only_on_seed_and_key():
    keys = [f"k{i}" for i in range(20_000)]
    u = uniform_draws(keys, seed=7)
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.1).mean() - 0.1) < 0.01
    shuffled = keys[::-1]
    assert np.array_equal(uniform_draws(shuffled, seed=7)[::-1], u)
    assert not np.array_equal(uniform_draws(keys, seed=8), u)


@pytest.mark.parametrize("t", [0, -1, float("nan"), float("inf")])
def test_bad_t_is_refused(t):
    with pytest.raises(ValueError, match="t must be a positive"):
        BalanceConfig("m.json", "0" * 64, t=t)


def _sample(matched: list[list[int]], n_entries: int, t: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lists = _lists(matched)
    counts = count_matches(lists, n_entries)
    prob = keep_probabilities(lists, entry_probabilities(counts, t))
    kept = uniform_draws([f"row-{i}" for i in range(len(matched))], seed) < prob
    return counts, prob, kept


def test_single_entry_pool_keeps_about_min_count_t_per_entry():
    t, n_entries = 300, 60
    counts_wanted = [int(30_000 / (e + 1) ** 1.3) + 1 for e in range(n_entries)]  # a long tail
    matched = [[e] for e, c in enumerate(counts_wanted) for _ in range(c)]
    random.Random(0).shuffle(matched)
    counts, _, kept = _sample(matched, n_entries, t, seed=0)
    assert counts.tolist() == counts_wanted
    kept_per_entry = count_matches(_lists([m for m, k in zip(matched, kept) if k]), n_entries)
    for e in range(n_entries):
        c = counts_wanted[e]
        if c <= t:
            assert kept_per_entry[e] == c  # the tail is untouched
        else:
            sd = math.sqrt(t * (1 - t / c))  # Binomial(c, t / c)
            assert abs(int(kept_per_entry[e]) - t) <= 5 * sd + 1, (e, c, kept_per_entry[e])


def test_multi_entry_pool_matches_its_expectation_and_flattens_the_head():
    rng = random.Random(1)
    t, n_entries = 200, 400
    weights = [1 / (e + 1) ** 1.1 for e in range(n_entries)]
    matched = [sorted(set(rng.choices(range(n_entries), weights, k=rng.randint(1, 4)))) for _ in range(40_000)]
    counts, prob, kept = _sample(matched, n_entries, t, seed=3)
    # Total kept vs sum of keep probabilities (the expected size).
    assert abs(kept.sum() - prob.sum()) <= 5 * math.sqrt((prob * (1 - prob)).sum())
    kept_per_entry = count_matches(_lists([m for m, k in zip(matched, kept) if k]), n_entries)
    rows_of = {e: [] for e in range(n_entries)}
    for i, m in enumerate(matched):
        for e in m:
            rows_of[e].append(i)
    for e in np.flatnonzero(counts > t):
        expected = prob[rows_of[e]].sum()  # >= t: pairs also come in through their other entries
        sd = math.sqrt((prob[rows_of[e]] * (1 - prob[rows_of[e]])).sum())
        assert expected >= t - 1e-6
        assert abs(int(kept_per_entry[e]) - expected) <= 5 * sd + 1
    top = int(np.argmax(counts))  # the head is cut (overlap with tail entries keeps ~half of it here)
    assert kept_per_entry[top] / counts[top] < 0.6
    assert (kept_per_entry[counts <= t] == counts[counts <= t]).all()


def test_same_seed_same_sample_other_seed_other_sample():
    rng = random.Random(2)
    matched = [[rng.randrange(5)] for _ in range(5000)]
    _, _, first = _sample(matched, 5, t=100, seed=11)
    _, _, again = _sample(matched, 5, t=100, seed=11)
    _, _, other = _sample(matched, 5, t=100, seed=12)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def _pairs(captions: list[str | None]) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(len(captions))], "caption": pa.array(captions, pa.string())})


def test_balance_table_rejects_empty_and_unmatched_and_keeps_columns():
    table = _pairs(["red dog", None, "  ", "nothing", "dog"])
    matched = _lists([[0, 1], None, [], [], [1]])
    p = np.array([1.0, 1.0])
    config = BalanceConfig("m.json", "0" * 64, t=5)
    pairs, rejects = balance_table(table, matched, p, config, file="part-0.parquet", row_offset=100)
    assert pairs.column("key").to_pylist() == ["k0", "k4"]
    assert pairs.column("matched_entries").to_pylist() == [[0, 1], [1]]
    assert pairs.column("keep_prob").to_pylist() == [1.0, 1.0]
    assert pairs.schema.field("keep_prob").type == pa.float32()
    assert rejects.column("reason").to_pylist() == [Reason.EMPTY_CAPTION, Reason.EMPTY_CAPTION, Reason.NO_MATCH]
    assert rejects.column("row").to_pylist() == [102, 103, 104]  # 1-based, as every stage counts
    assert set(rejects.column("source").to_pylist()) == {"part-0.parquet"}


def test_online_curation_keeps_every_matched_pair_with_its_probability():
    table = _pairs([f"c{i}" for i in range(1000)])
    matched = _lists([[0]] * 1000)
    p = np.array([0.1])
    offline, _ = balance_table(table, matched, p, BalanceConfig("m", "0", t=1), file="f", row_offset=0)
    online, _ = balance_table(table, matched, p, BalanceConfig("m", "0", t=1, online_curation=True), file="f",
                              row_offset=0)
    assert online.num_rows == 1000
    assert online.column("keep_prob").to_pylist() == [pytest.approx(0.1)] * 1000
    assert 50 <= offline.num_rows <= 150


def test_summary_table_and_plot(tmp_path):
    counts = np.array([500, 100, 30, 5, 0], np.uint64)
    kept = np.array([60, 40, 30, 5, 0], np.uint64)
    summary = count_summary(counts, 50, "before_")
    assert summary["before_head_entries"] == 2 and summary["before_entries_matched"] == 4
    assert summary["before_head_matches"] == 600 and summary["before_tail_matches"] == 35
    assert summary["before_tail_proportion"] == pytest.approx(35 / 635, abs=1e-6)
    table = entry_count_table(["a", "b", "c", "d", "e"], counts, kept, 50)
    assert table.column("p").to_pylist() == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert table.column("kept").to_pylist() == kept.tolist()
    path = tmp_path / "curve.png"
    plot_entry_counts(counts, kept, 50, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_case_variants_under_case_fold_share_one_cap():
    """The reviewer's case: 20,000 captions "red", t = 100, entries "red" and "Red". Folded as two entries,
    each took p = t / count, and a caption kept with 1 - (1 - p)^2: twice the cap (210 kept, not ~100)."""
    from curation.matching import Matcher

    captions = pa.array(["red"] * 20_000)
    for entries in (["red"], ["red", "Red"]):
        matched = Matcher(entries, case_fold=True).match_array(captions)
        counts = count_matches(matched, len(entries))
        keep = keep_probabilities(matched, entry_probabilities(counts, 100))
        assert keep.sum() == pytest.approx(100, rel=1e-6), entries
