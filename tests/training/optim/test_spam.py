"""SPAM against the plain reference, step by step, and its clipping and warmup rules."""

from __future__ import annotations

import math

import pytest
import torch

from tests.training.optim.problems import assert_same_trajectory, clone_params, gradient_stream, make_params
from tests.training.optim.reference import ReferenceSPAM
from training.optim import SPAM

CONFIGS = [
    dict(reset_interval=9, warmup_steps=4, clip_delay=3, threshold=50.0),
    dict(reset_interval=None, warmup_steps=0, clip_delay=2, threshold=5000.0, weight_decay=0.05, lr=1e-2),
    dict(reset_interval=8, warmup_steps=20, clip_delay=2, threshold=0.0),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference_every_step(config):
    params = make_params()
    ref_params = clone_params(params)
    opt, ref = SPAM(params, **config), ReferenceSPAM(ref_params, **config)
    assert_same_trajectory(opt, params, ref, ref_params, gradient_stream(params, 25, spike_every=3))
    assert ref.clip_events > 0 or not config.get("threshold", 1)


def test_the_smallest_delay_trains_from_the_first_step():
    """With clip_delay=1 (accepted before) a run's m and v stayed 0 and its weights never moved."""
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = SPAM([w], reset_interval=None, warmup_steps=0, clip_delay=2)
    for _ in range(5):
        w.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
    assert (w.detach() < 0).all()


@pytest.mark.parametrize("state_bits", [32, 8])
def test_an_element_first_seen_after_the_clip_delay_trains(state_bits):
    """Its v is still 0, so the spec's bound sqrt(theta * v) clipped each of its gradients to 0: an embedding
    row of a token first seen after the delay stayed frozen until a reset let it in early enough."""
    w = torch.nn.Parameter(torch.zeros(512, 8))
    opt = SPAM([w], reset_interval=None, warmup_steps=0, clip_delay=2, state_bits=state_bits)
    for step in range(10):
        grad = torch.ones(512, 8)
        if step < 5:
            grad[256:] = 0  # rows 256 and up get their first gradient at step 6, past the delay
        w.grad = grad
        opt.step()
    assert (w.detach()[256:] < 0).all() and (w.detach()[:256] < 0).all()


def test_spike_is_clipped_to_the_boundary_after_the_delay():
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = SPAM([w], threshold=1e4, reset_interval=None, warmup_steps=0, clip_delay=3)
    for _ in range(3):
        w.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
    v = opt.state[w]["exp_avg_sq"].clone()
    m = opt.state[w]["exp_avg"].clone()
    w.grad = torch.tensor([1.0, -1e4, 5.0, 1.0], dtype=torch.float64)
    opt.step()
    clipped = torch.tensor([1.0, -(1e4 * v[1]).sqrt().item(), 5.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(opt.state[w]["exp_avg"], 0.9 * m + 0.1 * clipped)


def test_warmup_ramps_the_step_after_each_reset():
    """Against the same run without warmup: factor 0.01 at the reset, the cosine ramp, then 1."""
    def step_sizes(warmup_steps):
        w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = SPAM([w], lr=1.0, reset_interval=10, warmup_steps=warmup_steps, threshold=0.0)
        sizes = []
        for t in range(16):
            w.grad = torch.full((3,), 1.0 + t, dtype=torch.float64)
            before = w.detach().clone()
            opt.step()
            sizes.append((w.detach() - before).abs().max().item())
        return torch.tensor(sizes)

    ratio = step_sizes(5) / step_sizes(0)
    assert ratio[9].item() == pytest.approx(0.01)
    assert ratio[12].item() == pytest.approx(1 - 0.99 * (1 + math.cos(math.pi * 3 / 5)) / 2)
    assert ratio[14].item() == pytest.approx(1.0) and ratio[4].item() == pytest.approx(1.0)
    assert ratio[0].item() == pytest.approx(1 - 0.99 * (1 + math.cos(math.pi / 5)) / 2)


@pytest.mark.parametrize("kwargs", [dict(threshold=-1.0), dict(reset_interval=0), dict(warmup_steps=-1),
                                    dict(clip_delay=1.5), dict(eps=-1.0), dict(eps=0.0),
                                    dict(betas=(0.9, 1.0)), dict(clip_delay=0),
                                    # A delay of 1 clips step 1 against v = 0: nothing trains until a reset.
                                    dict(clip_delay=1), dict(clip_delay=500, reset_interval=500),
                                    dict(state_bits=4, block_size=128.0)])
def test_invalid_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError, match="invalid"):
        SPAM(make_params(), **kwargs)


def test_loading_a_state_saved_with_another_warmup_or_threshold_names_it():
    params = make_params(dtype=torch.float32)
    saved = SPAM(clone_params(params)).state_dict()
    for option, value in (("warmup_steps", 50), ("threshold", 2000.0), ("clip_delay", 5)):
        with pytest.raises(ValueError, match=f"saved with {option}="):
            SPAM(clone_params(params), **{option: value}).load_state_dict(saved)
    SPAM(clone_params(params), lr=0.5).load_state_dict(saved)  # lr is the scheduler's: restored, not refused
