"""Optimizer state dicts: a round trip resumes the same trajectory; a state saved with other options,
shapes or dtypes is refused with a clear error; scheduled options are restored as torch does."""

from __future__ import annotations

import io
import re

import pytest
import torch

from tests.training.optim.problems import assert_same_trajectory, clone_params, gradient_stream, make_params, set_grads
from training.optim import SPAM, StableSPAM


@pytest.mark.parametrize("make", [
    lambda p: StableSPAM(p, lr=1e-2, reset_interval=4),
    lambda p: StableSPAM(p, lr=1e-2, reset_interval=4, state_bits=8),
    lambda p: StableSPAM(p, lr=1e-2, reset_interval=4, state_bits=4, code_exact=True),
    lambda p: SPAM(p, lr=1e-2, reset_interval=4, warmup_steps=2, clip_delay=2, state_bits=8),
])
def test_state_dict_round_trip_resumes_identically(make):
    params = make_params(dtype=torch.float32)
    stream = gradient_stream(params, 10)
    opt = make(params)
    for grads in stream[:5]:
        set_grads(params, grads)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_params = clone_params(params)
    resumed = make(resumed_params)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert_same_trajectory(opt, params, resumed, resumed_params, stream[5:], rtol=0, atol=0)
    for s, r in zip(opt.state.values(), resumed.state.values()):
        assert all(s[k].dtype == r[k].dtype for k in s)


def _trained(make, params):
    opt = make(params)
    for grads in gradient_stream(params, 2):
        set_grads(params, grads)
        opt.step()
    return opt.state_dict()


def test_loading_a_mismatched_state_dict_raises():
    params = make_params(dtype=torch.float32)
    eight_bit = _trained(lambda p: StableSPAM(p, state_bits=8), clone_params(params))
    with pytest.raises(ValueError, match="state_bits"):
        StableSPAM(clone_params(params)).load_state_dict(eight_bit)
    spam = _trained(lambda p: SPAM(p), clone_params(params))
    with pytest.raises(ValueError, match="another optimizer"):
        StableSPAM(clone_params(params)).load_state_dict(spam)
    other = [torch.nn.Parameter(torch.zeros(s)) for s in ((5, 7), (13,), (4, 3, 2), (1,), (33, 9))]
    good = _trained(lambda p: StableSPAM(p), clone_params(params))
    with pytest.raises(ValueError, match="shape"):
        StableSPAM(other).load_state_dict(good)
    with pytest.raises(ValueError, match="params"):
        StableSPAM(clone_params(params)[:3]).load_state_dict(good)
    with pytest.raises(ValueError, match="code_exact"):
        StableSPAM(clone_params(params), code_exact=True).load_state_dict(good)


def test_loading_casts_a_state_dtype_only_where_exact():
    """bf16 moments (as older versions kept for bf16 parameters) load as fp32, value for value; fp64 moments
    into fp32 parameters, or float codes, are refused rather than rounded."""
    params = make_params(dtype=torch.float32)
    old = _trained(lambda p: StableSPAM(p), clone_params(params))
    for entry in old["state"].values():
        for name in ("exp_avg", "exp_avg_sq", "stats"):
            entry[name] = entry[name].bfloat16()
    resumed_params = clone_params(params)
    resumed = StableSPAM(resumed_params)
    resumed.load_state_dict(old)
    for p, entry in zip(resumed_params, old["state"].values()):
        for name, value in entry.items():
            assert resumed.state[p][name].dtype == torch.float32
            assert torch.equal(resumed.state[p][name], value.float())
    wide = _trained(lambda p: StableSPAM(p), make_params(dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.float64, which does not cast exactly to the torch.float32"):
        StableSPAM(clone_params(params)).load_state_dict(wide)
    coded = _trained(lambda p: StableSPAM(p, state_bits=8), clone_params(params))
    coded["state"][2]["exp_avg"] = coded["state"][2]["exp_avg"].float()
    with pytest.raises(ValueError, match="param 2: state 'exp_avg' is torch.float32"):
        StableSPAM(clone_params(params), state_bits=8).load_state_dict(coded)


def test_quantized_states_of_other_code_maps_are_refused_and_fp32_states_need_none():
    """8-bit codes mean something only under the maps that wrote them. Versions before formats were recorded
    wrote the linear v grid's codes or the log grid's under the same keys and shapes, so a quantized state
    dict that records no format is refused too; fp32 states need no format."""
    params = make_params(dtype=torch.float32)
    coded = _trained(lambda p: StableSPAM(p, state_bits=8), clone_params(params))
    assert coded["code_format"] == 3
    StableSPAM(clone_params(params), state_bits=8).load_state_dict(coded)
    coded["code_format"] = 2
    with pytest.raises(ValueError, match="has code format 2, this optimizer reads format 3"):
        StableSPAM(clone_params(params), state_bits=8).load_state_dict(coded)
    del coded["code_format"]
    with pytest.raises(ValueError, match="records no code format"):
        StableSPAM(clone_params(params), state_bits=8).load_state_dict(coded)
    plain = _trained(lambda p: SPAM(p), clone_params(params))
    del plain["code_format"]
    resumed_params = clone_params(params)
    resumed = SPAM(resumed_params)
    resumed.load_state_dict(plain)
    assert torch.equal(resumed.state[resumed_params[0]]["exp_avg"], plain["state"][0]["exp_avg"])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("saved_shape, shape", [((20, 30), (30, 20)), ((300,), (260,))])
def test_a_quantized_state_saved_for_another_shape_is_refused(bits, saved_shape, shape):
    """Codes and scales only depend on the element count in whole blocks: a transposed matrix, or a shorter
    vector padded to the same blocks, would load and permute the moments against the elements."""
    saved = _trained(lambda p: StableSPAM(p, state_bits=bits), [torch.nn.Parameter(torch.randn(saved_shape))])
    with pytest.raises(ValueError, match=rf"saved for a parameter of shape {re.escape(str(saved_shape))}, this "
                                         rf"parameter has shape {re.escape(str(shape))}"):
        StableSPAM([torch.nn.Parameter(torch.zeros(shape))], state_bits=bits).load_state_dict(saved)


def test_load_hooks_run_around_the_checked_load():
    """torch's load_state_dict pre- and post-hooks (used by checkpoint wrappers) run as in torch's own method."""
    params = make_params(dtype=torch.float32)
    saved = _trained(lambda p: StableSPAM(p, reset_interval=4), clone_params(params))
    resumed = StableSPAM(clone_params(params), reset_interval=4)
    calls = []

    def adapt(optimizer, state_dict):
        calls.append("pre")
        return {**state_dict, "param_groups": [{**g, "lr": 0.5} for g in state_dict["param_groups"]]}

    resumed.register_load_state_dict_pre_hook(adapt)
    resumed.register_load_state_dict_post_hook(lambda optimizer: calls.append(optimizer.param_groups[0]["lr"]))
    resumed.load_state_dict(saved)
    assert calls == ["pre", 0.5]


@pytest.mark.parametrize("option, value", [("reset_interval", 7), ("gamma1", 0.85), ("gamma2", 0.99999),
                                           ("theta", 0.99), ("total_T", 1000), ("eta_min", 0.2), ("eps", 1e-6),
                                           ("code_exact", True), ("state_bits", 8)])
def test_loading_a_state_saved_with_another_algorithm_option_names_it(option, value):
    params = make_params(dtype=torch.float32)
    saved = _trained(lambda p: StableSPAM(p, reset_interval=4, total_T=100), clone_params(params))
    options = dict(reset_interval=4, total_T=100) | {option: value}
    with pytest.raises(ValueError, match=f"saved with {option}="):
        StableSPAM(clone_params(params), **options).load_state_dict(saved)


def test_loading_restores_scheduled_options_as_torch_does():
    """lr (any scheduler), betas (OneCycleLR) and weight decay change legitimately during a run: the
    checkpoint's values win, and a scheduler resumed beside the optimizer continues where it stopped."""
    params = make_params(dtype=torch.float32)
    opt = StableSPAM(params, lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for grads in gradient_stream(params, 3):
        set_grads(params, grads)
        opt.step()
        schedule.step()
    resumed = StableSPAM(clone_params(params), lr=1e-2, betas=(0.95, 0.99), weight_decay=0.3)
    resumed_schedule = torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 0.5 ** step)
    resumed.load_state_dict(opt.state_dict())
    resumed_schedule.load_state_dict(schedule.state_dict())
    group = resumed.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["step"]) == (1e-2 / 8, (0.9, 0.999), 0.0, 3)
    resumed_schedule.step()
    assert group["lr"] == pytest.approx(1e-2 / 16)
