"""StableSPAM(fused=True): the Triton kernels against the foreach path (the reference and non-finite
tests run both paths in test_stable_spam.py).

Without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported): the same kernel source, checked element by element. On CUDA they are compiled.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.fused  # the GPU suite selects these with the `gpu` tests

from tests.training.optim.problems import (assert_same_trajectory, fused_device, gradient_stream,  # noqa: E402
                                          make_params, set_grads, to_device)
from training.optim import StableSPAM  # noqa: E402

DEVICE = fused_device()
BIG_SHAPES = ((3, 1100), (1025,), (2048,), (5,))


@pytest.fixture(scope="module")
def kernels():
    from training.optim import fused_triton
    return fused_triton


def on_device(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return to_device(params, DEVICE)


@pytest.mark.parametrize("bits", [32, 8])
def test_fused_equals_foreach_on_tensors_spanning_many_blocks(bits, kernels):
    assert max(torch.Size(s).numel() for s in BIG_SHAPES) > 2 * kernels.BLOCK
    gen = torch.Generator().manual_seed(3)
    base = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in BIG_SHAPES]
    fused_params, foreach_params = on_device(base), on_device(base)
    fused = StableSPAM(fused_params, fused=True, reset_interval=5, weight_decay=0.1, state_bits=bits)
    foreach = StableSPAM(foreach_params, reset_interval=5, weight_decay=0.1, state_bits=bits)
    assert_same_trajectory(fused, fused_params, foreach, foreach_params, gradient_stream(base, 12))
    for p, q in zip(fused_params, foreach_params):
        for name, value in fused.state[p].items():
            torch.testing.assert_close(value, foreach.state[q][name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter truncates fp32 to bf16 instead of rounding to nearest"))])
def test_fused_low_precision_params_stay_as_close_to_fp64_as_foreach(dtype):
    """Both paths compute in fp32 and round a parameter once per step. In fp32 that keeps the run within 5%
    of how far the fp64 run moved; in bf16 the rounding alone is more (0.039 apart after moving 0.091: a
    step of 1e-2 against a spacing of 0.016 at |p| near 3), so there the two paths must agree to one bf16
    spacing, and neither strays further from fp64 than the other."""
    fused_params = on_device(make_params(dtype=dtype))
    foreach_params = on_device(make_params(dtype=dtype))
    exact_params = [torch.nn.Parameter(p.detach().double()) for p in fused_params]
    runs = [StableSPAM(fused_params, fused=True, lr=1e-2, reset_interval=4),
            StableSPAM(foreach_params, lr=1e-2, reset_interval=4),
            StableSPAM(exact_params, lr=1e-2, reset_interval=4)]
    start = [p.detach().double().clone() for p in exact_params]
    for grads in gradient_stream(fused_params, 10):
        for params in (fused_params, foreach_params, exact_params):
            set_grads(params, [g.to(device=DEVICE, dtype=params[0].dtype) for g in grads])
        for opt in runs:
            opt.step()
    moved = max((p - s).abs().max().item() for p, s in zip(exact_params, start))
    fused_err = max((p.double() - e).abs().max().item() for p, e in zip(fused_params, exact_params))
    foreach_err = max((p.double() - e).abs().max().item() for p, e in zip(foreach_params, exact_params))
    assert all(p.dtype == dtype for p in fused_params)
    if dtype == torch.float32:
        assert fused_err < 0.05 * moved
    else:
        spacing = 2.0 ** (math.floor(math.log2(max(p.abs().max().item() for p in exact_params))) - 7)
        apart = max((a.double() - b.double()).abs().max().item() for a, b in zip(fused_params, foreach_params))
        assert apart <= spacing, (apart, spacing)
    assert fused_err <= 1.5 * foreach_err + 1e-7


@pytest.mark.parametrize("save_fused", [False, True])
def test_resuming_keeps_the_constructors_implementation(save_fused, kernels, monkeypatch):
    """The state layout is the same in both paths: a run may switch at a checkpoint, and the loaded
    optimizer runs the path it was built with (the saved groups used to overwrite it)."""
    params, resumed_params = on_device(make_params()), on_device(make_params())
    first = StableSPAM(params, reset_interval=5, fused=save_fused)
    stream = gradient_stream(params, 12)
    for grads in stream[:6]:
        set_grads(params, grads)
        first.step()
    for p, q in zip(resumed_params, params):
        p.data.copy_(q.data)
    launches = []
    monkeypatch.setattr(kernels, "update", lambda *args, real=kernels.update: launches.append(1) or real(*args))
    resumed = StableSPAM(resumed_params, reset_interval=5, fused=not save_fused)
    resumed.load_state_dict(first.state_dict())
    assert resumed.fused is not save_fused
    launches.clear()
    assert_same_trajectory(resumed, resumed_params, first, params, stream[6:])
    assert len(launches) == 6  # one bucket per step, in whichever of the two runs is fused


def test_a_param_group_cannot_choose_another_implementation():
    params = make_params()
    with pytest.raises(ValueError, match="fused=True but this optimizer was built with fused=False"):
        StableSPAM([{"params": params[:2], "fused": True}, {"params": params[2:]}])
    fused = StableSPAM(on_device(params[:2]), fused=True)
    with pytest.raises(ValueError, match="not contiguous"):
        fused.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 6, device=DEVICE).t())]})
    assert len(fused.param_groups) == 1  # the refused group is not left behind to break the next step


def test_fused_follows_reallocated_gradients_and_moved_parameters(kernels):
    """A transposed gradient is copied to a contiguous one; a gradient replaced by a tensor at another
    address is read there, and a parameter moved to new storage is stepped there, its old storage left
    alone (the cached address table is keyed by the pointers themselves; a table cached by anything else
    would keep stepping the old storage)."""
    base = make_params()
    fused_params, foreach_params = on_device(base), on_device(base)
    fused, foreach = StableSPAM(fused_params, fused=True), StableSPAM(foreach_params)
    kept = []  # keeps every gradient alive, so no new one can reuse an old address
    for grads in gradient_stream(base, 4):
        for params in (fused_params, foreach_params):
            for p, g in zip(params, grads):
                g = g.to(DEVICE)
                p.grad = g.t().contiguous().t() if g.ndim == 2 else g.clone()
                kept.append(p.grad)
        assert not fused_params[0].grad.is_contiguous()
        fused.step()
        foreach.step()
        for p, q in zip(fused_params, foreach_params):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    stream = gradient_stream(base, 2, seed=5)
    set_grads(fused_params, stream[0])
    set_grads(foreach_params, stream[0])
    fused.step()  # caches a table of these gradients' and the parameters' current addresses
    foreach.step()
    old = [p.data for p in fused_params]  # kept alive, so no new tensor can take their addresses
    untouched = [o.clone() for o in old]
    for p, q, g in zip(fused_params, foreach_params, stream[1]):
        p.data = p.data.clone()  # new storage, as a checkpoint loader or a cast makes
        p.grad.copy_(g)  # the same gradient tensors, as when gradients accumulate in place
        q.grad.copy_(g)
    assert kernels.address_table([fused_params], fused_params[0].device).tolist() == [
        p.data_ptr() for p in fused_params]
    fused.step()
    foreach.step()
    for p, q, o, u in zip(fused_params, foreach_params, old, untouched):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert torch.equal(o, u)


def test_fused_refuses_what_the_kernels_cannot_step(kernels, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "need CUDA" in kernels.unsupported_reason(torch.zeros(3))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "dtype" in kernels.unsupported_reason(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="not contiguous"):
        StableSPAM([torch.nn.Parameter(torch.zeros(4, 6).t())], fused=True)
