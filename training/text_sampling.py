"""Which text a row trains on at a given visit: LaCLIP rewrites, VeCLIP fused captions, synthetic captions.

One uniform draw per (seed, key, epoch) splits the unit interval:
- [0, synthetic_ratio): the synthetic caption (MetaCLIP 1.2's "syn_ratio"; ALIP trains on both texts at
  every step with consistency gates, which this trainer does not do);
- next fused_ratio: the fused caption (VeCLIP's alt-text / VeCap mix);
- the rest: uniform over the caption and the row's k rewrite slots (LaCLIP), or the caption alone.
As in LaCLIP, a drawn slot under two words is replaced by the caption, and so
is a null slot; a slot holding the caption itself (where the rewrite stage
fell back) is the caption too. The caption is drawn (1 + such slots)/(k + 1)
of the time, and a rewrite in two slots twice as often as one in one, as
LaCLIP draws them.
A row drawn for its fused or synthetic caption that has none trains on the
alt-text under the source `fused_missing` or `synthetic_missing`, so a run
says how often it trained on what it was asked to.
"""

from __future__ import annotations

from dataclasses import dataclass

from curation.export import is_rewrite, usable_text
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
    slots = [caption, *(row.get("rewrites") or ())] if sampling.use_rewrites else [caption]
    # Rescale the rest of the interval onto the slots, so the choice uses the same single draw.
    low = sampling.synthetic_ratio + sampling.fused_ratio
    drawn = slots[min(int((u - low) / max(1.0 - low, 1e-12) * len(slots)), len(slots) - 1)]
    return (drawn.strip(), "rewrite") if is_rewrite(caption, drawn) else (caption, "caption")
