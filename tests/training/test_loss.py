import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.loss import contrastive_loss

# Heavy imports (transformers) stay inside the tests: the DDP test's spawned ranks re-import this module.


def _features(n=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1), F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def test_single_process_loss_is_the_symmetric_clip_loss():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    from training.model import LOGIT_SCALE_INIT

    image, text = _features()
    scale = torch.tensor(math.exp(LOGIT_SCALE_INIT))
    expected = image_text_contrastive_loss(scale * text @ image.T)  # transformers' own CLIP loss
    assert torch.allclose(contrastive_loss(image, text, scale), expected, atol=1e-6)
    # Matching pairs lower the loss.
    assert contrastive_loss(image, image, scale) < contrastive_loss(image, text, scale)


def test_logit_scale_starts_at_1_over_007_and_is_clamped_at_100():
    from training.model import LOGIT_SCALE_MAX, build_model, clamp_logit_scale, clip_config

    model = build_model(clip_config("tiny", vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1), seed=0)
    assert abs(model.logit_scale.exp().item() - 1 / 0.07) < 1e-3
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    clamp_logit_scale(model)
    assert abs(model.logit_scale.exp().item() - 100.0) < 1e-4 and abs(model.logit_scale.item() - LOGIT_SCALE_MAX) < 1e-6


def _rank_grads(rank: int, world: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    image, text = _features(n=8 * world)
    local_image = image[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    local_text = text[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    loss = contrastive_loss(local_image, local_text, torch.tensor(10.0))
    loss.backward()
    out[rank] = (loss.item(), local_image.grad.clone(), local_text.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_loss_across_two_ranks_matches_one_big_batch(tmp_path):
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_grads, args=(world, f"file://{tmp_path / 'rendezvous'}", out), nprocs=world)
        results = dict(out)
    image, text = _features(n=8 * world)
    image.requires_grad_(True)
    text.requires_grad_(True)
    full = contrastive_loss(image, text, torch.tensor(10.0))
    full.backward()
    assert abs(sum(r[0] for r in results.values()) / world - full.item()) < 1e-5
    for rank, (_, grad_image, grad_text) in results.items():
        # Each rank's local gradient includes the other rank's loss (gather with gradient); DDP then averages.
        assert torch.allclose(grad_image / world, image.grad[rank * 8:(rank + 1) * 8], atol=1e-6)
        assert torch.allclose(grad_text / world, text.grad[rank * 8:(rank + 1) * 8], atol=1e-6)
