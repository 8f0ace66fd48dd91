"""Which text a row trains on at a given visit: LaCLIP rewrites, VeCLIP fused captions, synthetic captions.

One uniform draw per (seed, key, epoch) splits the unit interval:
- [0, synthetic_ratio): the synthetic caption (MetaCLIP 1.2's "syn_ratio"; ALIP trains on both texts at
  every step with consistency gates, which this trainer does not do);
- next fused_ratio: the fused caption (VeCLIP's alt-text / VeCap mix);
- the rest: uniform over the caption and its valid rewrites (LaCLIP), or the caption alone.
A valid rewrite has two words or more and differs from the caption: the
rewrite stage writes the caption itself into a slot whose every attempt was
refused, and such a copy is no rewrite. Repeats count once. A row left with
fewer valid rewrites draws among fewer texts, where LaCLIP, which always has
k, gives the caption 1/(k+1).
A row drawn for its fused or synthetic caption that has none trains on the
alt-text under the source `fused_missing` or `synthetic_missing`, so a run
says how often it trained on what it was asked to.
"""

from __future__ import annotations

from dataclasses import dataclass

from curation.export import usable_text, valid_rewrites
from training.randomness import unit_uniform

SOURCES = ("caption", "rewrite", "fused", "synthetic", "fused_missing", "synthetic_missing")


@dataclass(frozen=True)
class TextSampling:
    use_rewrites: bool = True
    fused_ratio: float = 0.0
    synthetic_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.fused_ratio <= 1 and 0 <= self.synthetic_ratio <= 1
                and self.fused_ratio + self.synthetic_ratio <= 1):
            raise ValueError(f"text ratios must lie in [0, 1] and sum to at most 1: {self}")

    @property
    def columns(self) -> list[str]:
        """Optional columns this sampling reads."""
        wanted = ["rewrites"] if self.use_rewrites else []
        wanted += ["fused_caption"] if self.fused_ratio else []
        wanted += ["synthetic_caption"] if self.synthetic_ratio else []
        return wanted


def choose_text(row: dict, sampling: TextSampling, seed: int, epoch: int) -> tuple[str, str]:
    """(text, source) for this row at this epoch, from one draw; see the module docstring for the sources."""
    caption = row["caption"]
    u = unit_uniform(seed, row["key"], epoch, "text")
    if u < sampling.synthetic_ratio:
        text = row.get("synthetic_caption")
        return (text, "synthetic") if usable_text(text) else (caption, "synthetic_missing")
    if u < sampling.synthetic_ratio + sampling.fused_ratio:
        text = row.get("fused_caption")
        return (text, "fused") if usable_text(text) else (caption, "fused_missing")
    pool = [caption, *valid_rewrites(caption, row.get("rewrites"))] if sampling.use_rewrites else [caption]
    # Rescale the rest of the interval onto the pool, so the choice uses the same single draw.
    low = sampling.synthetic_ratio + sampling.fused_ratio
    index = min(int((u - low) / max(1.0 - low, 1e-12) * len(pool)), len(pool) - 1)
    return (caption, "caption") if index == 0 else (pool[index], "rewrite")
