import collections

import pytest

from training.text_sampling import TextSampling, choose_text


def _rows(n, **extra):
    return [{"key": f"k{i}", "caption": "the original alt text", **extra} for i in range(n)]


def test_laclip_is_uniform_over_caption_and_valid_rewrites():
    rows = _rows(5000, rewrites=["first rewrite here", "second rewrite here", "third rewrite here"])
    texts = collections.Counter(choose_text(r, TextSampling(), seed=0, epoch=0)[0] for r in rows)
    assert set(texts) == {"the original alt text", "first rewrite here", "second rewrite here", "third rewrite here"}
    for count in texts.values():
        assert abs(count / 5000 - 0.25) < 0.03


def test_one_word_or_missing_rewrites_fall_back_to_the_caption():
    rows = _rows(2000, rewrites=["word", None])
    picks = [choose_text(r, TextSampling(), seed=0, epoch=0) for r in rows]
    assert {t for t, _ in picks} == {"the original alt text"}
    assert {s for _, s in picks} == {"caption"}
    no_rewrites = [choose_text(r, TextSampling(), 0, 0)[0] for r in _rows(50)]
    assert set(no_rewrites) == {"the original alt text"}


@pytest.mark.parametrize("rewrites, real_slots", [
    (["the original alt text", "the original alt text ", "a real rewrite here", "the original alt text"], 1),
    ([None, "", "a real rewrite here"], 1),
    (["ok", "a real rewrite here", "a real rewrite here"], 2),
    (["a real rewrite here", "a real rewrite here ", " a real rewrite here"], 3),  # whitespace makes no new one
    (["一只黑猫", "a real rewrite here"], 2),  # two characters of Chinese make a word, as validation counts them
])
def test_a_drawn_slot_that_is_no_rewrite_trains_on_the_caption_as_laclip_draws(rewrites, real_slots):
    """LaCLIP draws uniformly over [caption, rewrite_1..k] and replaces a drawn text under two words by the
    caption: a copy of the caption (the rewrite stage's fallback), an empty or one-word slot keeps its share
    for the caption (before: the draw was spread over the distinct valid rewrites alone, so a row with one
    good rewrite of four trained on it half the time instead of a fifth)."""
    picks = [choose_text(r, TextSampling(), seed=0, epoch=0) for r in _rows(6000, rewrites=rewrites)]
    sources = collections.Counter(source for _, source in picks)
    real = {t.strip() for t in rewrites if t and t.strip() in ("a real rewrite here", "一只黑猫")}
    assert {t for t, s in picks if s == "rewrite"} == real
    assert {t for t, s in picks if s == "caption"} == {"the original alt text"}
    assert abs(sources["rewrite"] / 6000 - real_slots / (len(rewrites) + 1)) < 0.03
    assert sources["caption"] + sources["rewrite"] == 6000


def test_veclip_mix_follows_the_ratio_and_synthetic_ratio_too():
    rows = _rows(4000, fused_caption="a fused caption", synthetic_caption="a synthetic caption")
    sampling = TextSampling(use_rewrites=False, fused_ratio=0.5, synthetic_ratio=0.15)
    sources = collections.Counter(choose_text(r, sampling, seed=3, epoch=1)[1] for r in rows)
    assert abs(sources["fused"] / 4000 - 0.5) < 0.03
    assert abs(sources["synthetic"] / 4000 - 0.15) < 0.02
    assert abs(sources["caption"] / 4000 - 0.35) < 0.03


def test_null_fused_caption_falls_back_and_choice_is_reproducible_per_epoch():
    sampling = TextSampling(fused_ratio=1.0)
    assert choose_text({"key": "a", "caption": "alt text", "fused_caption": None}, sampling, 0, 0) == (
        "alt text", "fused_missing")
    synthetic = TextSampling(synthetic_ratio=1.0)
    assert choose_text({"key": "a", "caption": "alt text", "synthetic_caption": " "}, synthetic, 0, 0) == (
        "alt text", "synthetic_missing")
    rows = _rows(200, rewrites=["one more text", "another more text"])
    first = [choose_text(r, TextSampling(), 7, 0) for r in rows]
    assert first == [choose_text(r, TextSampling(), 7, 0) for r in rows]
    assert first != [choose_text(r, TextSampling(), 7, 1) for r in rows]  # a fresh draw every epoch


def test_ratios_that_do_not_fit_are_refused():
    with pytest.raises(ValueError):
        TextSampling(fused_ratio=0.7, synthetic_ratio=0.5)
