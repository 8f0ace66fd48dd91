"""Counter-free randomness for the trainer: every draw is a hash of its parts.

A draw for (seed, key, epoch, purpose) is the same whichever worker, rank or
restart computes it, so data order, crops, text choice and online curation
are reproducible and survive a resume without carrying RNG state around.
"""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 53)


def derive_seed(*parts: object) -> int:
    """A 63-bit integer from any parts: same parts, same integer."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def unit_uniform(*parts: object) -> float:
    """A float in [0, 1) determined by the parts."""
    return (derive_seed(*parts) >> 10) / _SCALE
