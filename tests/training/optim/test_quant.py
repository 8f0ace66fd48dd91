"""Simulated 4-bit training: quantizer error bounds, outliers, FP4 grids, STE gradients, model swapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.optim.quant import (FP4_GRIDS, QuantConfig, QuantLinear, fp4_groups, int_asym_groups, int_sym_groups,
                                  quantize_activation, quantize_model, quantize_weight, quantized_layers, ste)


def _data(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_int4_weight_error_within_half_a_step_and_on_16_levels():
    groups = _data(40, 256) * 3 + 1
    q = int_asym_groups(groups)
    scale = ((groups.amax(1, keepdim=True) - groups.amin(1, keepdim=True)) / 15).clamp_min(1e-5)
    assert torch.all((q - groups).abs() <= scale / 2 * (1 + 1e-5))
    assert all(row.unique().numel() <= 16 for row in q)
    torch.testing.assert_close(int_asym_groups(q), q)  # values already on the grid stay put


def test_int4_activation_keeps_top2_outliers_exact():
    groups = _data(30, 256)
    groups[:, 5] = 50.0
    groups[:, 9] = -80.0
    q = int_sym_groups(groups, outliers=2, rounding="nearest")
    assert torch.equal(q[:, 5], groups[:, 5]) and torch.equal(q[:, 9], groups[:, 9])
    rest = groups.clone()
    rest[:, [5, 9]] = 0
    scale = rest.abs().amax(1, keepdim=True) / 7
    assert torch.all((q - groups).abs() <= scale / 2 * (1 + 1e-5))
    no_outliers = int_sym_groups(groups, outliers=0, rounding="nearest")
    assert (no_outliers - groups).abs().mean() > 3 * (q - groups).abs().mean()


def test_int4_activations_round_to_nearest_and_floor_truncates_as_the_reference_code_ran():
    """"floor" (the reference code, no longer the default: its bias shifted every quantized layer's output):
    codes floor(x * 7 / absmax), so every error lies in (-step, 0] and averages half a step; with stochastic
    rounding floor(x + U - 0.5) keeps that bias. The default "nearest" is unbiased, stochastic or not."""
    groups = _data(64, 256)
    rest = ~torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, 1).indices, True)
    step = groups.masked_fill(~rest, 0).abs().amax(1, keepdim=True) / 7  # the outliers stay out of the scale
    error = ((int_sym_groups(groups, rounding="floor") - groups) / step)[rest]
    assert torch.all((error <= 1e-5) & (error > -1 - 1e-5))
    assert error.mean().item() == pytest.approx(-0.5, abs=0.03)
    nearest = ((int_sym_groups(groups) - groups) / step)[rest]  # the default, as QuantConfig's
    assert QuantConfig().act_rounding == "nearest"
    assert nearest.abs().max() <= 0.5 + 1e-5 and abs(nearest.mean().item()) < 0.03
    torch.manual_seed(0)
    floor_sr = torch.stack([(int_sym_groups(groups, stochastic=True, rounding="floor") - groups) / step
                            for _ in range(20)])
    nearest_sr = torch.stack([(int_sym_groups(groups, stochastic=True) - groups) / step for _ in range(20)])
    assert floor_sr[:, rest].mean().item() == pytest.approx(-0.5, abs=0.03)
    assert abs(nearest_sr[:, rest].mean().item()) < 0.03


@pytest.mark.parametrize("fmt", sorted(FP4_GRIDS))
def test_fp4_values_lie_on_the_named_grid(fmt):
    groups = _data(20, 256)
    q = fp4_groups(groups, fmt, outliers=2)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, 1).indices, True)
    assert torch.equal(q[mask], groups[mask])
    grid = torch.tensor(FP4_GRIDS[fmt])
    scale = groups.masked_fill(mask, 0).abs().amax(1, keepdim=True) / grid[-1]
    units = (q / scale).abs()[~mask]
    assert torch.all((units[:, None] - grid[None]).abs().min(1).values < 1e-5)
    nearest = (groups / scale).abs()[~mask][:, None].sub(grid[None]).abs().min(1).values
    assert torch.allclose(((q - groups) / scale).abs()[~mask], nearest, atol=1e-5)


@pytest.mark.parametrize("fmt", sorted(FP4_GRIDS))
def test_a_weights_partial_last_group_keeps_its_own_outliers(fmt):
    """260 values in groups of 256: the last group holds 4. Its outliers are its own -5 and 4, and 0.3, the
    absmax of the rest, lands exactly on the grid's top, however the group is padded."""
    w = torch.cat([_data(256), torch.tensor([0.01, -5.0, 0.3, 4.0])])
    tail = quantize_weight(w, fmt, group=256, outliers=2)[256:]
    assert tail[1] == -5.0 and tail[3] == 4.0
    assert tail[2] == pytest.approx(0.3)
    # INT4 min-max pads by repeating the last value: an all-positive tail keeps its range.
    positive = quantize_weight(torch.cat([_data(256), torch.tensor([1.0, 1.5, 2.0])]), "int4", group=256)
    torch.testing.assert_close(positive[256:], torch.tensor([1.0, 1.5, 2.0]), atol=0.5 / 15 + 1e-6, rtol=0)


@pytest.mark.parametrize("fmt, levels", [("fp4_e1m2", [0.0, 0.25, 0.5, 0.75, 1.0]),
                                         ("fp4_e2m1", [0.0, 1 / 12, 1 / 6, 0.25, 1 / 3, 0.5, 2 / 3, 1.0])])
def test_each_fp4_grid_has_exactly_its_levels(fmt, levels):
    """Every level in units of the group's absmax (outliers off), both signs, and nothing else:
    E1M2 as the reference code ran it has 5 magnitudes, the E2M1 hardware format 8."""
    groups = torch.linspace(-1, 1, 4001).view(1, -1)
    values = (fp4_groups(groups, fmt, outliers=0) / groups.abs().max()).unique()
    expected = torch.tensor(sorted({sign * level for level in levels for sign in (-1.0, 1.0)}))
    torch.testing.assert_close(values, expected)


def _reference_e1m2(groups: torch.Tensor) -> torch.Tensor:
    """The reference code's FP4 fake quantizer (utils/act_weight_fp4.py), from its equations: e = 1,
    m = 2, b = 1; alpha = group absmax, alpha_hat = alpha 2^-b, b_hat = 2^e - log2(alpha) + log2(2 - 2^-m) - 1,
    v = 2^max(floor(log2|x| + b_hat) - m, 1 - m), q = alpha_hat v round(x / (alpha_hat v))."""
    e, m, b = 1, 2, 1
    alpha = groups.abs().amax(1, keepdim=True).clamp_min(1e-6)
    alpha_hat = alpha * 2.0 ** -b
    b_hat = 2 ** e - torch.log2(alpha) + math.log2(2 - 2.0 ** -m) - 1
    v = torch.pow(2.0, torch.clamp(torch.floor(torch.log2(groups.abs() + 1e-8) + b_hat) - m, min=1 - m))
    return alpha_hat * v * torch.round(groups / (alpha_hat * v))


def test_e1m2_matches_the_reference_codes_arithmetic():
    groups = _data(40, 256) * torch.exp(_data(40, 1, seed=5))
    torch.testing.assert_close(fp4_groups(groups, "fp4_e1m2", outliers=0), _reference_e1m2(groups))


def test_group_size_is_an_option():
    w = _data(8, 512)
    w[:, :64] *= 100  # one loud group of 64: with groups of 64 the other groups keep their resolution
    err64 = (quantize_weight(w, "int4", group=64) - w)[:, 64:].abs().mean()
    err256 = (quantize_weight(w, "int4", group=256) - w)[:, 64:].abs().mean()
    assert err64 < err256 / 5
    x = _data(4, 100)  # not a multiple of the group: padded, shape kept
    assert quantize_activation(x, "int4", group=64).shape == x.shape


@pytest.mark.parametrize("fmt", ["int4", "fp4_e1m2", "fp4_e2m1"])
def test_ste_gradients_use_quantized_operands(fmt):
    linear = nn.Linear(256, 16)
    layer = QuantLinear.from_linear(linear, QuantConfig(weight_format=fmt, act_format=fmt))
    x = _data(3, 5, 256, seed=1).requires_grad_()
    out = layer(x)
    upstream = _data(3, 5, 16, seed=2)
    out.backward(upstream)
    x_q = quantize_activation(x, fmt)
    w_q = quantize_weight(layer.weight, fmt)
    torch.testing.assert_close(out, x_q @ w_q.T + layer.bias)
    torch.testing.assert_close(x.grad, upstream @ w_q)
    torch.testing.assert_close(layer.weight.grad, upstream.reshape(-1, 16).T @ x_q.reshape(-1, 256))
    torch.testing.assert_close(layer.bias.grad, upstream.sum((0, 1)))


@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1"])
def test_bf16_forward_values_are_exactly_the_quantized_ones(fmt):
    """The STE adds an exact zero: bf16 activations stay on the grid (x + (q - x) rounds twice, off it)."""
    x = _data(4, 1024, seed=3).bfloat16().requires_grad_()
    q = quantize_activation(x.detach(), fmt)
    out = ste(x, q)
    assert torch.equal(out, q)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.ones_like(x))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_model_swaps_block_linears_only(dtype):
    model = _tiny_llama()
    params_before = {id(p) for p in model.parameters()}
    assert quantize_model(model, QuantConfig(weight_group=64, act_group=64), master_dtype=dtype) is model
    names = quantized_layers(model)
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.embed_tokens, nn.Embedding)
    assert {id(p) for p in model.parameters()} == params_before
    assert all(p.dtype == dtype for p in model.parameters())
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_quantize_model_include_and_exclude():
    model = _tiny_llama()
    quantize_model(model, QuantConfig(include=("q_proj", "v_proj"), exclude=("lm_head", "v_proj")))
    names = quantized_layers(model)
    assert len(names) == 2 and all(n.endswith("q_proj") for n in names)


def test_the_output_head_is_quantized_only_when_asked():
    """The head is found by get_output_embeddings, or by its name in a model without that method."""
    assert "lm_head" in quantized_layers(quantize_model(_tiny_llama(), QuantConfig(quantize_head=True)))
    assert "lm_head" not in quantized_layers(quantize_model(_tiny_llama()))
    def plain():
        return nn.ModuleDict({"body": nn.Linear(8, 8), "lm_head": nn.Linear(8, 4)})
    assert quantized_layers(quantize_model(plain())) == ["body"]
    assert quantized_layers(quantize_model(plain(), QuantConfig(quantize_head=True))) == ["body", "lm_head"]
    assert quantized_layers(quantize_model(plain(), QuantConfig(quantize_head=True, exclude=("body",)))) == ["lm_head"]


def test_a_model_swapped_in_eval_mode_stays_deterministic():
    """The new layers came up in training mode, so stochastic rounding stayed on in an evaluation."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)).eval()
    quantize_model(model, QuantConfig(stochastic_round=True))
    assert not any(layer.training for layer in model.modules())
    x = torch.randn(8, 16)
    assert torch.equal(model(x), model(x))
    assert all(layer.training for layer in quantize_model(nn.Sequential(nn.Linear(16, 16)).train()).modules())


@pytest.mark.parametrize("kwargs", [dict(weight_format="int8"), dict(act_format="fp8"), dict(weight_group=0),
                                    dict(act_rounding="ceil"),
                                    dict(outliers=-1), dict(outliers=300), dict(weight_group=256.0),
                                    dict(act_group=128.0), dict(outliers=1.5)])
def test_invalid_quant_config_raises(kwargs):
    with pytest.raises(ValueError, match="invalid"):
        QuantConfig(**kwargs)


def test_invalid_master_dtype_raises():
    with pytest.raises(ValueError, match="master_dtype"):
        quantize_model(_tiny_llama(), master_dtype=torch.float16)
