"""Per-request seeds and per-row seeded sampling for batched `generate`.

Hugging Face `generate` draws from one global RNG for the whole batch, so a
request's output would depend on its batch neighbours. Here each row draws its
own uniform number per step from a counter-based hash of (request seed, step),
and picks its token by inverse-CDF over the temperature/top-p distribution. The
result depends only on the request, and the whole step stays one vectorised
operation on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, key, rewrite index, attempt): same parts, same seed."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """One float in [0, 1) per seed for decoding step `step` (splitmix64 of seed + step)."""
    with np.errstate(over="ignore"):
        z = (seeds.astype(np.uint64) + np.uint64(step + 1) * np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SeededSampler:
    """A logits processor that samples each row with its own seed, temperature and top-p.

    It returns scores with every token but the sampled one at -inf, so a greedy
    `generate` (do_sample=False) emits exactly the sampled token. Rows with
    temperature 0 stay greedy.
    """

    def __init__(self, seeds: Sequence[int], temperatures: Sequence[float], top_ps: Sequence[float]):
        self.seeds = np.asarray([s % (1 << 63) for s in seeds], dtype=np.uint64)
        self.temperatures = list(temperatures)
        self.top_ps = list(top_ps)
        self.step = 0

    def __call__(self, input_ids, scores):
        import torch

        device = scores.device
        temperature = torch.tensor(self.temperatures, dtype=torch.float32, device=device)
        top_p = torch.tensor(self.top_ps, dtype=torch.float32, device=device)
        u = torch.tensor(uniforms(self.seeds, self.step), dtype=torch.float32, device=device)
        self.step += 1
        logits = scores.float()
        greedy = logits.argmax(dim=-1)
        scaled = logits / temperature.clamp_min(1e-5).unsqueeze(1)
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep the smallest head whose mass reaches top_p (always at least one token).
        keep = (cumulative - sorted_probs) < top_p.unsqueeze(1)
        sorted_probs = sorted_probs * keep
        cumulative = sorted_probs.cumsum(dim=-1)
        target = u * cumulative[:, -1]
        position = torch.searchsorted(cumulative, target.unsqueeze(1)).clamp_max(cumulative.shape[1] - 1)
        sampled = order.gather(1, position).squeeze(1)
        chosen = torch.where(temperature > 0, sampled, greedy)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1), 0.0)
        return out
