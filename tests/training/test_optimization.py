"""The trainer's optimizer wiring: config options reach training.optim, bad combinations fail early."""

import math

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.optim import SPAM, StableSPAM
from training.optimization import make_optimizer, param_groups, rescale_schedule, warmup_cosine


def model(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, 2))


def test_default_is_stable_spam_with_decay_only_on_matrices():
    opt = make_optimizer(model(), TrainConfig(weight_decay=0.3))
    assert isinstance(opt, StableSPAM)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


@pytest.mark.parametrize("name, cls", [("stable_spam", StableSPAM), ("spam", SPAM)])
def test_low_bit_states_from_the_config(name, cls):
    net = model(width=512)  # blocks of 256: small tensors would be mostly padding
    opt = make_optimizer(net, TrainConfig(optimizer=name, optimizer_state_bits=8, lr=1e-2))
    assert isinstance(opt, cls)
    net(torch.randn(4, 512)).sum().backward()
    opt.step()
    assert opt.state_bytes_per_param() < 2.5  # fp32 states would be 8
    assert all(state["exp_avg"].dtype == torch.uint8 for state in opt.state.values())


@pytest.mark.parametrize("settings", [dict(optimizer="adamw", optimizer_state_bits=8), dict(optimizer_state_bits=16),
                                      dict(optimizer="spam", fused_optimizer=True)])
def test_unsupported_optimizer_settings_fail_before_training(settings):
    with pytest.raises(ValueError, match="invalid training settings"):
        TrainConfig(**settings)


def test_each_optimizer_gets_its_papers_settings_unless_given():
    """The trainer gave Stable-SPAM AdamW's CLIP betas and eps (0.98, 1e-6), and the paper's 4-bit gamma1,
    gamma2 and reset interval to a run in full precision, with no way to change them."""
    def options(**kw):
        group = make_optimizer(model(), TrainConfig(**kw)).param_groups[0]
        return {k: group[k] for k in ("betas", "eps", "gamma1", "gamma2", "theta", "reset_interval") if k in group}

    assert options() == dict(betas=(0.9, 0.999), eps=1e-8, gamma1=0.85, gamma2=0.99999, theta=0.999,
                             reset_interval=1000)  # the spec's BF16 runs
    assert options(quantize="int4") == dict(betas=(0.9, 0.999), eps=1e-8, gamma1=0.7, gamma2=0.9, theta=0.999,
                                            reset_interval=500)  # its 4-bit runs
    assert options(optimizer="spam") == dict(betas=(0.9, 0.999), eps=1e-6, reset_interval=500)
    assert options(optimizer="adamw") == dict(betas=(0.9, 0.98), eps=1e-6)  # CLIP's recipe
    assert options(beta2=0.95, eps=1e-7, spam_gamma1=0.5, spam_gamma2=0.6, spam_theta=0.7,
                   momentum_reset_interval=9) == dict(betas=(0.9, 0.95), eps=1e-7, gamma1=0.5, gamma2=0.6,
                                                       theta=0.7, reset_interval=9)
    for settings in (dict(optimizer="adamw", spam_gamma1=0.5), dict(optimizer="spam", spam_theta=0.9),
                     dict(optimizer="adamw", momentum_reset_interval=100)):
        with pytest.raises(ValueError, match="not a setting of --optimizer"):
            TrainConfig(**settings)
    with pytest.raises(ValueError, match="quantize='int8'"):
        TrainConfig(quantize="int8")


@pytest.mark.parametrize("flags, expected", [
    ([], dict(beta2=0.999, eps=1e-8, spam_gamma1=0.85, momentum_reset_interval=1000)),
    (["--quantize", "int4"], dict(beta2=0.999, eps=1e-8, spam_gamma1=0.7, momentum_reset_interval=500)),
    (["--optimizer", "spam"], dict(beta2=0.999, eps=1e-6, spam_gamma1=0.0, momentum_reset_interval=500)),
    (["--optimizer", "adamw"], dict(beta2=0.98, eps=1e-6, spam_gamma1=0.0, momentum_reset_interval=0)),
])
def test_the_command_line_leaves_each_optimizer_its_own_settings(flags, expected):
    """The flags' defaults came from a resolved TrainConfig(): every run passed Stable-SPAM's BF16 set as if
    typed, so --optimizer adamw and spam were refused and --quantize trained with the BF16 set."""
    from training.cli import parse_args
    from training.config import config_from_args

    config = config_from_args(parse_args(["--input", "in", "--output", "out", *flags]))
    assert {name: getattr(config, name) for name in expected} == expected


def test_the_quantize_choices_are_the_quantizers_formats():
    from training.config import QUANTIZE
    from training.optim.quant import FORMATS

    assert set(QUANTIZE) == {"none", *FORMATS}


def test_param_groups_skip_frozen_parameters():
    net = model()
    net[0].weight.requires_grad_(False)
    groups = param_groups(net, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters())) - 1


@pytest.mark.parametrize("final_ratio", [0.0, 0.1])
def test_warmup_cosine_ramps_then_decays_to_the_floor(final_ratio):
    opt = torch.optim.SGD(model().parameters(), lr=2.0)
    schedule = warmup_cosine(opt, warmup_steps=4, total_steps=14, final_ratio=final_ratio)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[9] == pytest.approx(2.0 * (final_ratio + (1 - final_ratio) * 0.5))  # half-way through the decay
    assert lrs[14:] == pytest.approx([2.0 * final_ratio] * 2)


def test_a_rescaled_schedule_keeps_each_groups_ratio_and_its_shape():
    """A diverged run resumed at a lower --lr: every group's peak scales, the warmup/cosine shape stays."""
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 1e-2}])
    schedule = warmup_cosine(optimizer, warmup_steps=2, total_steps=10)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    before = [group["lr"] for group in optimizer.param_groups]
    rescale_schedule(schedule, 1.0)
    assert [group["lr"] for group in optimizer.param_groups] == before
    rescale_schedule(schedule, 0.5)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([b / 2 for b in before])
    assert schedule.get_last_lr() == [group["lr"] for group in optimizer.param_groups]
    optimizer.step()
    schedule.step()
    factor = 0.5 * (1 + math.cos(math.pi * 3 / 8))  # step 5 of a cosine from step 2 to 10
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4 * factor, 5e-3 * factor])
