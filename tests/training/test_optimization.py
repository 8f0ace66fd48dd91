"""The trainer's optimizer wiring: config options reach training.optim, bad combinations fail early."""

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.optim import SPAM, StableSPAM
from training.optimization import make_optimizer, param_groups, warmup_cosine


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
