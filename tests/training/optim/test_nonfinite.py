"""Non-finite gradients, for every spike-aware optimizer: the tensor's step is skipped and counted, its
weights and state untouched bit for bit, and a scheduled reset still applies to it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.training.optim.problems import (NEEDS_TRITON, clone_params, fused_device, gradient_stream, make_params,
                                          set_grads, to_device)
from training.optim import SPAM, StableSPAM


@pytest.mark.parametrize("cls, options", [(StableSPAM, {}), (SPAM, {}),
                                          pytest.param(StableSPAM, {"fused": True}, marks=NEEDS_TRITON)])
@pytest.mark.parametrize("bits", [32, 8])
def test_nonfinite_gradient_skips_that_tensor_only(cls, options, bits):
    check_nonfinite_skip(cls, options, bits, fused_device() if options else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls, options", [(StableSPAM, {}), (SPAM, {}),
                                          pytest.param(StableSPAM, {"fused": True}, marks=NEEDS_TRITON)])
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_nonfinite_gradient_skips_that_tensor_only(cls, options, bits):
    """On CUDA the skip rests on the device's max-abs reduction (_foreach_norm, inf) propagating NaN."""
    check_nonfinite_skip(cls, options, bits, "cuda")


BAD = (1, 2, 4)  # the tensors check_nonfinite_skip gives a NaN, a huge and an inf gradient element


def check_nonfinite_skip(cls, options: dict, bits: int, device: str) -> None:
    params = to_device(make_params(dtype=torch.float32), device)
    stream = gradient_stream(params, 6)
    clean_params = clone_params(params)
    opt = cls(params, lr=1e-2, state_bits=bits, **options)
    clean = cls(clean_params, lr=1e-2, state_bits=bits, **options)
    for t, grads in enumerate(stream):
        set_grads(params, grads)
        set_grads(clean_params, grads)
        if t == 3:
            params[1].grad[2] = float("nan")
            params[4].grad[0, 0] = float("inf")
            params[2].grad.view(-1)[0] = 1e30  # finite, but its square overflows fp32 statistics
            for i in BAD:
                clean_params[i].grad = None
            before = {i: {k: v.clone() for k, v in opt.state[params[i]].items()} for i in BAD}
            frozen = {i: params[i].detach().clone() for i in BAD}
        opt.step()
        clean.step()
        if t == 3:
            for i in BAD:
                torch.testing.assert_close(params[i].detach(), frozen[i], rtol=0, atol=0)
                for k, v in before[i].items():
                    if k != "stats":
                        torch.testing.assert_close(opt.state[params[i]][k], v, rtol=0, atol=0)
            # tensors without bad values stepped exactly as if the bad ones had no gradient
            for i in (0, 3):
                torch.testing.assert_close(params[i], clean_params[i], rtol=0, atol=0)
    assert opt.skipped_steps() == len(BAD)
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if v.is_floating_point())


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, so that torch.equal tells -0.0 from 0.0."""
    return tensor.detach().cpu().contiguous().view(torch.uint8)


@pytest.mark.parametrize("cls, options", [(StableSPAM, {}), (SPAM, {}),
                                          pytest.param(StableSPAM, {"fused": True}, marks=NEEDS_TRITON)])
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(cls, options, bits):
    """The trainer gates a bad step by making every gradient NaN: each such step must leave the weights and
    every state tensor bit for bit as they were, apart from the skip counter. Low-bit moments re-encoded
    from their own decoded values would move some codes a level (stochastic rounding at the exact level
    boundaries), so this runs enough steps and elements that they would."""
    params = to_device(make_params(dtype=torch.float32) + [torch.nn.Parameter(torch.randn(40, 100))],
                       fused_device() if options else "cpu")
    opt = cls(params, lr=1e-2, weight_decay=0.1, reset_interval=None, state_bits=bits, **options)
    skipped = cls.stats_fields.index("skipped")
    steps, bad_steps = 6, 3
    for t, grads in enumerate(gradient_stream(params, steps)):
        set_grads(params, grads)
        opt.step()
        weights = [raw_bits(p) for p in params]
        expected = copy.deepcopy(opt.state_dict()["state"])  # state_dict holds the live tensors
        for entry in expected.values():
            entry["stats"][skipped] += bad_steps
        for _ in range(bad_steps):  # each with a fresh rounding seed
            for p in params:
                p.grad = torch.full_like(p, math.nan)
            opt.step()
        for p, w in zip(params, weights):
            assert torch.equal(raw_bits(p), w), f"step {t}: a weight changed"
        for i, entry in opt.state_dict()["state"].items():
            for name, value in entry.items():
                assert torch.equal(raw_bits(value), raw_bits(expected[i][name])), f"step {t}: param {i} {name} changed"
    assert opt.skipped_steps() == bad_steps * steps * len(params)


@pytest.mark.parametrize("cls", [StableSPAM, SPAM])
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_a_skipped_tensor_is_still_reset_on_schedule(cls, bits):
    """The one change a skipped tensor's moments take: a scheduled reset zeroes them."""
    params = make_params(dtype=torch.float32)
    options = {"clip_delay": 2} if cls is SPAM else {}  # under the interval, or SPAM never clips
    opt = cls(params, lr=1e-2, reset_interval=4, state_bits=bits, **options)
    stream = gradient_stream(params, 4)
    for grads in stream[:3]:
        set_grads(params, grads)
        opt.step()
    set_grads(params, stream[3])
    params[1].grad[0] = math.nan
    opt.step()  # step 4: a reset
    # An all-zero block is coded with scale 0: then the moment decodes to 0 whatever its codes.
    moments = ("exp_avg", "exp_avg_sq") if bits == 32 else ("exp_avg_scale", "exp_avg_sq_scale")
    for name in moments:
        assert opt.state[params[1]][name].count_nonzero() == 0
        assert opt.state[params[0]][name].count_nonzero() > 0
    assert opt.skipped_steps() == 1
