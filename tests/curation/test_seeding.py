"""The seeded sampler: top-p by the book, batch independence, its head shortcut against a full sort, and its
memory peak (measured with the profiler on the CPU, and on CUDA where there is one)."""

import numpy as np
import pytest
import torch

from curation.engines import seeding
from curation.engines.seeding import SAMPLER_PEAK_BYTES_PER_LOGIT, SeededSampler, derive_seed, uniform_table

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_seeded_sampler_top_p_and_greedy():
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    picks = []
    for seed in range(40):
        sampler = SeededSampler([seed, seed, seed], [1.0, 1.0, 0.0], [0.5, 1.0, 1.0], max_steps=1)
        out = sampler(None, scores)
        picks.append(out.argmax(dim=1).tolist())
        assert torch.isinf(out).sum() == 2 * 3  # one finite score per row
    picks = np.array(picks)
    assert (picks[:, 0] == 0).all()  # top_p 0.5 keeps only the 0.7 token
    assert set(picks[:, 1]) == {0, 1, 2}  # full distribution
    assert (picks[:, 2] == 2).all()  # temperature 0 is greedy
    with pytest.raises(RuntimeError, match="made for 1 steps"):
        sampler(None, scores)


def test_uniform_table_is_per_seed_and_step():
    table = uniform_table([1, 2, 3], 5)
    assert table.shape == (3, 5) and table.dtype == np.float32
    assert ((0 <= table) & (table < 1)).all() and len(np.unique(table)) == 15
    assert (uniform_table([2], 5)[0] == table[1]).all()  # a row's numbers do not depend on the others
    assert (uniform_table([1, 2, 3], 3) == table[:, :3]).all()  # nor on how many steps are drawn


def test_sampler_draws_from_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    scores = torch.log(probs).expand(rows, -1).contiguous()
    tokens = SeededSampler(range(rows), [1.0] * rows, [0.85] * rows, 1)(None, scores).argmax(dim=1)
    counts = torch.bincount(tokens, minlength=4).double() / rows
    assert counts[3] == 0  # outside the 0.85 nucleus
    assert torch.allclose(counts[:3], probs[:3].double() / 0.95, atol=0.03)


def test_sampler_is_batch_independent_and_its_shortcut_exact(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(48, 300, generator=generator) * torch.linspace(0.2, 6, 48).unsqueeze(1)
    temps = [0.0 if r % 5 == 0 else 0.5 + (r % 3) * 0.4 for r in range(48)]
    tops = [1.0 if r % 4 == 0 else 0.6 + (r % 4) * 0.1 for r in range(48)]
    seeds = [derive_seed("b", r) for r in range(48)]

    def sample(rows):
        sampler = SeededSampler([seeds[r] for r in rows], [temps[r] for r in rows], [tops[r] for r in rows], 2)
        sampler(None, scores[rows])  # step 0
        return sampler(None, scores[rows]).argmax(dim=1).tolist()  # step 1

    together = sample(list(range(48)))
    assert [sample([r])[0] for r in range(0, 48, 7)] == together[::7]
    assert sample(list(range(47, -1, -1))) == together[::-1]
    # Flat rows have nuclei wider than a 2-token head: the full-sort fallback must pick the same tokens.
    monkeypatch.setattr(seeding, "HEAD_TOKENS", 2)
    assert sample(list(range(48))) == together
    # So must a full sort of every row.
    monkeypatch.setattr(seeding, "_head_threshold", seeding._sorted_threshold)
    assert sample(list(range(48))) == together


def _reference_threshold(row: list[float], top_p: float) -> float:
    """Top-p by the book: the smallest set of most likely tokens with mass >= top_p; its least probability."""
    mass = 0.0
    for value in sorted(row, reverse=True):
        mass += value
        if mass >= top_p:
            return value
    return min(row)


@pytest.mark.parametrize("head", [256, 3])
def test_nucleus_threshold_is_top_p_by_the_book(monkeypatch, head):
    monkeypatch.setattr(seeding, "HEAD_TOKENS", head)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 500, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 8, 32).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    probs[0, :10] = probs[0, 10]  # ties at the cut stay together
    top_p = torch.linspace(0.05, 0.99, 32, dtype=torch.float64)
    expected = torch.tensor([_reference_threshold(r, p) for r, p in zip(probs.tolist(), top_p.tolist())],
                            dtype=torch.float64)
    assert torch.equal(seeding._head_threshold(probs, top_p), expected)
    assert torch.equal(seeding._sorted_threshold(probs, top_p), expected)


def _cpu_peak_bytes(fn) -> int:
    """Peak bytes of live CPU tensors while fn runs, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action in (Action.CREATE, Action.PREEXISTING) else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def test_sampler_memory_stays_within_its_declared_peak():
    rows, vocab = 64, 4000
    flat = torch.randn(rows, vocab) * 0.01  # every nucleus wider than the head: the full sort for all rows
    sampler = SeededSampler(range(rows), [1.0] * rows, [0.95] * rows, 1)
    peak = _cpu_peak_bytes(lambda: sampler(None, flat))
    assert 16 * rows * vocab < peak <= SAMPLER_PEAK_BYTES_PER_LOGIT * rows * vocab


@cuda
def test_sampler_on_cuda_syncs_only_for_top_p_and_fits_its_peak():
    rows, vocab = 256, 49152
    # Peaked and flat rows (nuclei narrower and wider than 256 tokens), greedy, full and top-p rows.
    scores = torch.randn(rows, vocab, device="cuda") * torch.linspace(0.01, 8, rows, device="cuda").unsqueeze(1)
    temps, tops = [0.0, 0.9, 0.9, 1.2] * (rows // 4), [1.0, 1.0, 0.95, 0.5] * (rows // 4)
    full = SeededSampler(range(rows), temps, [1.0] * rows, 2)
    full(None, scores)  # first step: the per-batch tensors go to the device once
    torch.cuda.set_sync_debug_mode("error")
    try:
        full(None, scores)  # later steps without top-p rows: no host-device copy, no synchronisation
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sampler = SeededSampler(range(rows), temps, tops, 2)
    sampler(None, scores)
    tokens = sampler(None, scores).argmax(dim=1)
    on_cpu = SeededSampler(range(rows), temps, tops, 2)
    on_cpu(None, scores.cpu())
    # The same rows sampled on the CPU (head first) pick the same tokens, up to rounding at a cut.
    assert (on_cpu(None, scores.cpu()).argmax(dim=1) == tokens.cpu()).float().mean() > 0.98
    flat = torch.randn(rows, vocab, device="cuda") * 0.01
    sampler = SeededSampler(range(rows), [1.0] * rows, [0.95] * rows, 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sampler(None, flat)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= SAMPLER_PEAK_BYTES_PER_LOGIT * rows * vocab
