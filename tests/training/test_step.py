"""The shared training step: a bad step changes nothing, decided on the device; the counters say what happened."""

import math

import pytest
import torch
from torch import nn

from training import step as step_module
from training.model import LOGIT_SCALE_INIT
from training.optim import build_optimizer
from training.optimization import param_groups, warmup_cosine
from training.step import TrainStep


class Towers(nn.Module):
    """A two-tower toy with CLIP's interface: pixels and ids in, normalised features and the scale out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(3 * 4 * 4, 8)
        self.text = nn.Embedding(32, 8)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def forward(self, pixels, ids, mask):
        image = nn.functional.normalize(self.image(pixels.flatten(1)), dim=-1)
        text = nn.functional.normalize((self.text(ids) * mask[..., None]).sum(1), dim=-1)
        return image, text, self.logit_scale.exp()


def _batch(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randint(0, 256, (6, 3, 4, 4), generator=g, dtype=torch.uint8).to(device),
            "input_ids": torch.randint(0, 32, (6, 5), generator=g).to(device),
            "attention_mask": torch.ones(6, 5, dtype=torch.long).to(device)}


def _optimizer(name, model):
    if name == "stable_spam":
        return build_optimizer("stable_spam", param_groups(model, 0.1), lr=1e-2, weight_decay=0.1)
    return build_optimizer("adamw", param_groups(model, 0.1), lr=1e-2, weight_decay=0.1, fused=name == "adamw_fused")


MOMENTS = ("step", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")  # not Stable-SPAM's skip count


def _snapshot(model, optimizer):
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items() if k in MOMENTS}
             for s in optimizer.state.values()]
    return weights, state


def _same(a, b) -> bool:
    (wa, sa), (wb, sb) = a, b
    return all(torch.equal(wa[k], wb[k]) for k in wa) and len(sa) == len(sb) and all(
        all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) for x, y in zip(sa, sb))


@pytest.mark.parametrize("name", ["adamw_fused", "stable_spam", "adamw"])
def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(name, monkeypatch):
    model = Towers()
    optimizer = _optimizer(name, model)
    train_step = TrainStep(model, model, optimizer, warmup_cosine(optimizer, 0, 10), device=torch.device("cpu"),
                           max_bad_steps=3)
    train_step(lambda: _batch(seed=1))  # a good step first, so the optimizer has state to keep
    before = _snapshot(model, optimizer)
    real = step_module.contrastive_loss
    monkeypatch.setattr(step_module, "contrastive_loss", lambda *a: real(*a) * math.nan)
    train_step(lambda: _batch(seed=2))
    assert _same(before, _snapshot(model, optimizer))
    monkeypatch.setattr(step_module, "contrastive_loss", real)
    train_step(lambda: _batch(seed=3))
    assert not _same(before, _snapshot(model, optimizer))
    report = train_step.health.read()
    assert (report.step, report.bad_total, report.bad_in_row, report.stopped_at) == (3, 1, 0, 0)
    assert report.loss is not None and math.isfinite(report.loss)


@pytest.mark.parametrize("name", ["adamw_fused", "stable_spam", "adamw"])
def test_max_bad_steps_in_a_row_freeze_the_weights_until_the_host_looks(name, monkeypatch):
    """After the stop, good steps (finite gradients) must be skipped too: that needs the gate, not the NaNs."""
    model = Towers()
    optimizer = _optimizer(name, model)
    train_step = TrainStep(model, model, optimizer, warmup_cosine(optimizer, 0, 10), device=torch.device("cpu"),
                           max_bad_steps=2, step=10, health={"bad_steps": 4})
    real, calls = step_module.contrastive_loss, {"n": 0}

    def nan_twice(*args):
        calls["n"] += 1
        return real(*args) * (math.nan if calls["n"] in (2, 3) else 1.0)

    monkeypatch.setattr(step_module, "contrastive_loss", nan_twice)
    train_step(lambda: _batch(seed=1))
    after_good = _snapshot(model, optimizer)
    for seed in range(2, 6):  # two bad, then two good ones that must not count any more
        train_step(lambda: _batch(seed=seed))
    assert _same(after_good, _snapshot(model, optimizer))
    report = train_step.health.read()
    assert (report.step, report.bad_total, report.new_bad, report.stopped_at) == (15, 6, 2, 13)
    assert train_step.health.read().new_bad == 0  # new_bad starts again at every read


def test_a_resumed_step_goes_on_with_the_saved_streak_and_loss_window(monkeypatch):
    """A run killed mid-streak needs only the rest of it to stop, and its first log row averages the whole window."""
    model = Towers()
    optimizer = _optimizer("adamw", model)
    first = TrainStep(model, model, optimizer, warmup_cosine(optimizer, 0, 10), device=torch.device("cpu"),
                      max_bad_steps=3)
    first(lambda: _batch(seed=1))
    first_loss = first.health.read(reset_loss=False).loss
    real = step_module.contrastive_loss
    monkeypatch.setattr(step_module, "contrastive_loss", lambda *args: real(*args) * math.nan)
    first(lambda: _batch(seed=2))
    saved = first.health.read(reset_loss=False).resumable()
    assert saved == {"bad_steps": 1, "bad_in_row": 1, "loss_window": [pytest.approx(first_loss), 1]}
    resumed = TrainStep(model, model, optimizer, warmup_cosine(optimizer, 0, 10), device=torch.device("cpu"),
                        max_bad_steps=3, step=2, health=saved)
    resumed(lambda: _batch(seed=3))
    assert resumed.health.read(reset_loss=False).stopped_at == 0
    resumed(lambda: _batch(seed=4))  # the third in a row, counting the one before the checkpoint
    report = resumed.health.read()
    assert (report.step, report.bad_total, report.bad_in_row, report.stopped_at) == (4, 3, 3, 4)
    assert report.loss == pytest.approx(first_loss)  # the window's one good step, from before the resume
    assert report.open_window == (0.0, 0)


def _rank_health(rank: int, world: int, init: str, out: dict) -> None:
    import torch.distributed as dist

    from training.distributed import Dist
    from training.step import StepHealth

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    d = Dist(rank, world, rank, torch.device("cpu"))
    # Rank 1 resumes with a window that holds the rank mean already, as rank 0's checkpoint saved it.
    health = StepHealth(torch.device("cpu"), 5, torch.zeros(()), saved={"loss_window": [3.0, 1]}, dist=d)
    ok = torch.tensor(True)
    health.record(ok, torch.tensor(1.0 + 2 * rank), ok)  # rank 0: 1.0, rank 1: 3.0
    first = health.read(reset_loss=False)
    health.record(ok, torch.tensor(10.0 * (rank + 1)), ok)  # rank 0: 10, rank 1: 20
    out[rank] = (first.loss, first.open_window, health.read().loss, float(health.loss_sum))
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_logged_loss_is_the_mean_over_ranks(tmp_path):
    """Each rank's loss covers its own rows only; a log row of rank 0's alone would be a sample of one rank."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_health, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
        results = dict(out)
    # Window: the resumed 3.0, then the rank mean of (1, 3) = 2, then the rank mean of (10, 20) = 15.
    for first, window, second, after in results.values():
        assert first == pytest.approx((3.0 + 2.0) / 2) and window == (pytest.approx(5.0), 2)
        assert second == pytest.approx((3.0 + 2.0 + 15.0) / 3)
        assert after == 0.0  # the reset window, on every rank


def test_grad_accum_averages_the_micro_batch_losses():
    model = Towers()
    optimizer = _optimizer("adamw", model)
    train_step = TrainStep(model, model, optimizer, warmup_cosine(optimizer, 0, 10), device=torch.device("cpu"),
                           grad_accum=2)
    batches = iter([_batch(seed=1), _batch(seed=2)])
    expected = []
    with torch.no_grad():
        for seed in (1, 2):
            b = _batch(seed=seed)
            expected.append(step_module.contrastive_loss(*model(step_module.normalise(b["pixel_values"]),
                                                                b["input_ids"], b["attention_mask"])).item())
    assert train_step(lambda: next(batches)) == 12
    assert train_step.health.read().loss == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_the_health_read_carries_the_clamped_logit_scale():
    model = Towers()
    optimizer = _optimizer("adamw", model)
    train_step = TrainStep(model, model, optimizer, warmup_cosine(optimizer, 0, 10), device=torch.device("cpu"))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100: the step clamps it to log(100)
    train_step(lambda: _batch(seed=1))
    assert train_step.health.read().logit_scale == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    assert train_step.health.read().logit_scale == pytest.approx(math.exp(1.5), rel=1e-6)  # the value now, not a copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw_fused", "stable_spam"])
def test_the_step_never_syncs_with_the_gpu(name, monkeypatch):
    device = torch.device("cuda")
    model = Towers().to(device)
    optimizer = _optimizer(name, model)
    train_step = TrainStep(model, model, optimizer, warmup_cosine(optimizer, 0, 10), device=device, precision="bf16")
    batch = _batch(device)
    train_step(lambda: batch)  # first step: lazy state creation may sync
    torch.cuda.synchronize()
    real = step_module.contrastive_loss
    monkeypatch.setattr(step_module, "contrastive_loss", lambda *a: real(*a) * math.nan)
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(lambda: batch)  # a bad one: skipped on the device
        monkeypatch.setattr(step_module, "contrastive_loss", real)
        train_step(lambda: batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = train_step.health.read()
    assert (report.step, report.bad_total) == (3, 1)
