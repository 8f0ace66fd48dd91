"""Blockwise 8/4-bit moment storage: error bounds, zero handling, bytes per parameter, training close to fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.training.optim.problems import clone_params, gradient_stream, make_params, set_grads
from training.optim import SPAM, StableSPAM
from training.optim import lowbit_state as lb


def _heavy_tailed(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))


@pytest.mark.parametrize("bits,block", [(8, 256), (8, 2048), (4, 128)])
def test_signed_error_bound_per_element(bits, block):
    x = _heavy_tailed(5000).view(50, 100)
    layout = lb.StateLayout(bits, block, x.numel())
    codes, scale = lb.quantize_signed(x, layout)
    assert codes.dtype == torch.uint8 and codes.numel() == layout.code_bytes
    back = lb.dequantize_signed(codes, scale, layout, x.shape, torch.float32)
    absmax = torch.repeat_interleave(scale, block)[: x.numel()].view(x.shape)
    delta = 0.5 / (2 ** (bits - 1) - 1)
    root = (x.abs() / absmax).sqrt()
    bound = absmax * (2 * root * delta + delta ** 2)  # companding: error of s^2 when s is off by <= delta
    assert torch.all((back - x).abs() <= bound * (1 + 1e-5) + 1e-30)
    assert torch.equal(back.sign() * (back != 0), x.sign() * (back != 0))  # sign kept wherever non-zero
    top = x.view(-1)[: (x.numel() // block) * block].view(-1, block).abs().argmax(dim=1)
    full = back.view(-1)[: (x.numel() // block) * block].view(-1, block)
    exact = x.view(-1)[: (x.numel() // block) * block].view(-1, block)
    torch.testing.assert_close(full.gather(1, top[:, None]), exact.gather(1, top[:, None]))  # absmax exact


@pytest.mark.parametrize("bits", [8, 4])
def test_nonneg_sqrt_is_never_zero_and_bounded(bits):
    v = _heavy_tailed(3000, seed=1).square()
    v[::7] = 0.0
    layout = lb.StateLayout(bits, 256, v.numel())
    codes, scale = lb.quantize_nonneg_sqrt(v, layout)
    back = lb.dequantize_nonneg_sqrt(codes, scale, layout, v.shape, torch.float32)
    top = torch.repeat_interleave(scale, 256)[: v.numel()]
    assert torch.all(back > 0)
    assert torch.all((back.sqrt() - v.sqrt()).abs() <= top / 2 ** bits * (1 + 1e-5))
    zeros = torch.zeros(300)
    layout = lb.StateLayout(bits, 256, 300)
    assert torch.equal(lb.dequantize_nonneg_sqrt(*lb.quantize_nonneg_sqrt(zeros, layout), layout, zeros.shape,
                                                 torch.float32), zeros)


def test_four_bit_packing_round_trips():
    codes = torch.randint(0, 16, (512,), dtype=torch.uint8)
    assert torch.equal(lb._unpack(lb._pack(codes, 4), 4), codes)


@pytest.mark.parametrize("bits,limit", [(8, 2.1), (4, 1.1)])
def test_bytes_per_parameter(bits, limit):
    w = torch.nn.Parameter(torch.randn(256, 512))
    opt = StableSPAM([w], state_bits=bits)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state_bytes_per_param() <= limit
    fp32 = StableSPAM([w])
    fp32.step()
    assert fp32.state_bytes_per_param() == pytest.approx(8.0, abs=0.01)


@pytest.mark.parametrize("cls", [StableSPAM, SPAM])
def test_eight_bit_states_track_fp32_states(cls):
    """Same least-squares problem: the 8-bit run ends within a few percent of the fp32 run's loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 32, generator=gen)
    target = x @ torch.randn(32, 16, generator=gen) + 0.1 * torch.randn(128, 16, generator=gen)
    losses = {}
    for bits in (32, 8):
        w = torch.nn.Parameter(torch.zeros(32, 16))
        extra = dict(warmup_steps=5) if cls is SPAM else {}
        opt = cls([w], lr=5e-2, state_bits=bits, reset_interval=40, **extra)
        for _ in range(60):
            opt.zero_grad()
            loss = ((x @ w - target) ** 2).mean()
            loss.backward()
            opt.step()
        losses[bits] = loss.item()
    start = (target ** 2).mean().item()
    assert losses[32] < 0.2 * start
    assert abs(losses[8] - losses[32]) < 0.03 * losses[32]


def test_eight_bit_step_matches_fp32_step_on_dequantized_state():
    """One quantized step equals an fp32 step from the dequantized moments, then re-quantized."""
    params = make_params(dtype=torch.float32)
    stream = gradient_stream(params, 4)
    opt = StableSPAM(params, state_bits=8, reset_interval=None)
    for grads in stream[:3]:
        set_grads(params, grads)
        opt.step()
    mirror_params = clone_params(params)
    mirror = StableSPAM(mirror_params, reset_interval=None)
    mirror.load_state_dict(_as_fp32(opt, params))
    set_grads(params, stream[3])
    set_grads(mirror_params, stream[3])
    opt.step()
    mirror.step()
    for p, q in zip(params, mirror_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _as_fp32(opt: StableSPAM, params: list[torch.Tensor]) -> dict:
    state = copy.deepcopy(opt.state_dict())
    for i, p in enumerate(params):
        s, layout = state["state"][i], lb.StateLayout(8, 256, p.numel())
        m = lb.dequantize_signed(s.pop("exp_avg"), s.pop("exp_avg_scale"), layout, p.shape, torch.float32)
        v = lb.dequantize_nonneg_sqrt(s.pop("exp_avg_sq"), s.pop("exp_avg_sq_scale"), layout, p.shape, torch.float32)
        s["exp_avg"], s["exp_avg_sq"] = m, v
    for g in state["param_groups"]:
        g["state_bits"], g["block_size"] = 32, None
    return state
