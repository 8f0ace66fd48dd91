"""Per-request seeds and per-row seeded sampling for batched `generate`.

Hugging Face `generate` draws from one global RNG for the whole batch, so a
request's output would depend on its batch neighbours. Here each row draws its
own uniform number per step from a counter-based hash of (request seed, step),
and picks its token by inverse CDF over its temperature/top-p distribution:
the token depends only on the row's logits, seed and step.

On a GPU the sampler keeps host work off the step: the whole (rows, steps)
table of uniforms and the per-row settings go to the device once per batch,
and rows with temperature 0 skip sampling. The nucleus is found from the top
HEAD_TOKENS values of each row; only rows whose nucleus is wider are sorted in
full. Finding those rows reads their indices back, one sync, when any row has
top_p < 1: `generate` already reads `unfinished_sequences.max()` back on every
step, so this adds a second small wait per step, where sorting every row's
whole vocabulary instead (the sync-free alternative) costs about twenty
top-256s per row (measured on the CPU: 128 ms against 6.8 ms at 32 x 49152).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Most nuclei of a trained model fit in this many tokens; wider ones fall back to a full sort.
HEAD_TOKENS = 256
# Bytes the sampler holds per logit at its peak (when every top-p row is wider than the head and is sorted):
# its fp32 input copy and scaled logits, the probabilities, the kept-mass weights and their cumulative sum
# (4 + 4 + 4 + 4 + 4), a comparison mask (1), the sort's values and int64 indices (4 + 8) with the sort's
# own scratch (12), the -inf output (4). tests/curation/test_seeding.py measures it with the profiler.
SAMPLER_PEAK_BYTES_PER_LOGIT = 56


# What a checkpoint's generation_config.json may set that picks other tokens than the stage's recorded
# settings (seeded temperature and top-p, or greedy): `generate` fills each from the model's config where the
# call leaves it unset, and applies it ahead of SeededSampler. The sampling fields themselves are passed
# explicitly with every call; token ids, forced tokens and cache settings are the model's own and stay.
CHECKPOINT_DECODING = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "force_words_ids", "constraints", "sequence_bias", "min_length", "min_new_tokens",
    "exponential_decay_length_penalty", "num_beams", "num_beam_groups", "diversity_penalty", "length_penalty",
    "early_stopping", "penalty_alpha", "dola_layers", "guidance_scale", "watermarking_config", "typical_p",
    "min_p", "top_h", "epsilon_cutoff", "eta_cutoff", "renormalize_logits", "num_return_sequences",
    "prompt_lookup_num_tokens", "token_healing")


def drop_checkpoint_decoding(generation_config: Any) -> dict[str, Any]:
    """Unset, in place, the CHECKPOINT_DECODING settings a loaded model came with, and return those that
    differed from transformers' defaults.

    Qwen2.5-Instruct ships repetition_penalty 1.05, captioners often num_beams
    3: kept, they would change every output while the manifest records only
    temperature and top-p, and the vLLM engine (given explicit SamplingParams)
    would write other text for the same seeds.
    """
    from transformers import GenerationConfig

    defaults = GenerationConfig._get_default_generation_params()
    dropped = {}
    for name in CHECKPOINT_DECODING:
        value = getattr(generation_config, name, None)
        if value is not None and value != defaults.get(name):
            dropped[name] = value
        if value is not None:
            setattr(generation_config, name, None)
    return dropped


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, key, rewrite index, attempt): same parts, same seed."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def request_seeds(seeds: Sequence[int | None]) -> list[int]:
    """The seed of each request; one without a seed gets a fresh random one, as vLLM does."""
    return [secrets.randbits(63) if seed is None else seed for seed in seeds]


def uniform_table(seeds: Sequence[int], steps: int) -> np.ndarray:
    """(len(seeds), steps) float32 uniforms in [0, 1): entry [r, s] is splitmix64(seed_r + s) in 24 bits.

    24 bits make every value exact in float32 and strictly below 1, so a row's
    inverse-CDF target always falls inside its kept mass.
    """
    seeds_u = np.asarray([s % (1 << 63) for s in seeds], dtype=np.uint64)[:, None]
    step = np.arange(1, steps + 1, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        z = (seeds_u + step * np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)).reshape(len(seeds_u), steps)


@dataclass
class _DeviceState:
    """What the sampler keeps on the device for one batch (made at the first step)."""

    rows: Any  # indices of the sampled rows (temperature > 0), or None when every row is sampled
    nucleus: Any  # positions among the sampled rows with top_p < 1, or None when all of them
    temperature: Any  # (sampled,) float32
    top_p: Any  # (nucleus rows,) float32
    uniforms: Any  # (sampled, steps) float32
    out: Any  # (rows, vocab) buffer for the returned scores


class SeededSampler:
    """A logits processor that samples each row with its own seed, temperature and top-p.

    It returns scores with every token but the chosen one at -inf, so a greedy
    `generate` (do_sample=False) emits exactly that token. Rows with
    temperature 0 stay greedy. `max_steps` is the batch's max_new_tokens: the
    uniforms of every step are drawn up front.
    """

    def __init__(self, seeds: Sequence[int], temperatures: Sequence[float], top_ps: Sequence[float], max_steps: int):
        if not len(seeds) == len(temperatures) == len(top_ps):
            raise ValueError("seeds, temperatures and top_ps must have one entry per row")
        self.n_rows, self.max_steps = len(seeds), max_steps
        self.sampled = [r for r, t in enumerate(temperatures) if t > 0]
        self.temperatures = [float(temperatures[r]) for r in self.sampled]
        self.nucleus = [j for j, r in enumerate(self.sampled) if top_ps[r] < 1]
        self.top_ps = [float(top_ps[self.sampled[j]]) for j in self.nucleus]
        self.table = uniform_table([seeds[r] for r in self.sampled], max_steps)
        self.step = 0
        self._state: _DeviceState | None = None

    def _device_state(self, scores) -> _DeviceState:
        import torch

        if self._state is None:
            device = scores.device

            def indices(values: list[int], full: int):
                return None if len(values) == full else torch.tensor(values, dtype=torch.long, device=device)

            self._state = _DeviceState(
                rows=indices(self.sampled, self.n_rows), nucleus=indices(self.nucleus, len(self.sampled)),
                temperature=torch.tensor(self.temperatures, dtype=torch.float32, device=device),
                top_p=torch.tensor(self.top_ps, dtype=torch.float32, device=device),
                uniforms=torch.from_numpy(self.table).to(device), out=torch.empty_like(scores))
        return self._state

    def __call__(self, input_ids, scores):
        if self.step >= self.max_steps:
            raise RuntimeError(f"SeededSampler made for {self.max_steps} steps was called for step {self.step + 1}")
        state = self._device_state(scores)
        step, self.step = self.step, self.step + 1
        chosen = scores.argmax(dim=-1)
        if self.sampled:
            logits = scores if state.rows is None else scores.index_select(0, state.rows)
            tokens = self._sample(logits.float(), state, step)
            chosen = tokens if state.rows is None else chosen.index_copy(0, state.rows, tokens)
        out = state.out.fill_(float("-inf"))
        return out.scatter_(1, chosen.unsqueeze(1), 0.0)

    def _sample(self, logits, state: _DeviceState, step: int):
        """One token per sampled row: inverse CDF, in vocabulary order, over the row's nucleus."""
        import torch

        probs = torch.softmax(logits / state.temperature.unsqueeze(1), dim=-1)
        floor = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
        if self.nucleus:
            nucleus_probs = probs if state.nucleus is None else probs.index_select(0, state.nucleus)
            threshold = _head_threshold(nucleus_probs, state.top_p)
            floor = threshold if state.nucleus is None else floor.index_copy(0, state.nucleus, threshold)
        # Every token at least as likely as the nucleus's least likely one is kept, ties included, so the
        # kept set does not depend on how a sort orders equal values.
        weights = torch.where(probs >= floor.unsqueeze(1), probs, 0.0)
        cumulative = weights.cumsum(dim=-1)
        target = state.uniforms[:, step] * cumulative[:, -1]
        position = torch.searchsorted(cumulative, target.unsqueeze(1), right=True).squeeze(1)
        position = position.clamp_max(probs.shape[1] - 1)
        # A parallel cumsum may be off by an ulp; never let that pick a token outside the nucleus.
        inside = weights.gather(1, position.unsqueeze(1)).squeeze(1) > 0
        return torch.where(inside, position, probs.argmax(dim=-1))


def _sorted_threshold(probs, top_p):
    """The threshold from a full sort of every row: no data-dependent branch, one sort per call."""
    return _threshold_in(probs.sort(dim=-1, descending=True).values, top_p)[0]


def _head_threshold(probs, top_p):
    """Per row, the probability of the nucleus's least likely token (top-p: smallest head with mass >= top_p).

    From the top HEAD_TOKENS values; rows whose nucleus is wider are sorted in full. Finding those rows
    reads a value on the host: free on the CPU, one sync per step on a GPU (see the module docstring).
    """
    head = probs.topk(min(HEAD_TOKENS, probs.shape[1]), dim=-1).values
    threshold, covered = _threshold_in(head, top_p)
    if head.shape[1] == probs.shape[1]:
        return threshold
    wide = (~covered).nonzero().squeeze(1)  # the one read-back: how many rows the head misses
    if wide.numel():
        threshold = threshold.index_copy(0, wide, _sorted_threshold(probs.index_select(0, wide),
                                                                     top_p.index_select(0, wide)))
    return threshold


def _threshold_in(values, top_p):
    """For values sorted high to low: the last value of the smallest head reaching top_p, and whether one does."""
    cumulative = values.cumsum(dim=-1)
    # Keep a token while the mass before it is under top_p: the first token is always kept.
    kept = ((cumulative - values) < top_p.unsqueeze(1)).sum(dim=-1)
    threshold = values.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
    return threshold, cumulative[:, -1] >= top_p
