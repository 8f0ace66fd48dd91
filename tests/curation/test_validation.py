"""Output validation: each refusal reason, and that good rewrites pass."""

import pytest

from curation.validation import OutputReason, ValidationConfig, check_output, dominant_script, normalise

SOURCE = "two red circles on a plain background"


def test_good_rewrite_passes():
    assert check_output(SOURCE, "a pair of red circles against an empty backdrop") is None


@pytest.mark.parametrize("output, reason", [
    ("", OutputReason.EMPTY),
    ("   \n ", OutputReason.EMPTY),
    ("circles", OutputReason.TOO_SHORT),
    (" ".join(["red circle"] * 40), OutputReason.TOO_LONG),
    ("Sure! Here is a rewritten caption: two crimson rings", OutputReason.CHATTER),
    ("Here's a new version of the caption", OutputReason.CHATTER),
    ("As an AI language model I cannot see images", OutputReason.CHATTER),
    ("Two red circles, on a plain background!", OutputReason.IDENTICAL),
    ("два красных круга на однотонном фоне", OutputReason.SCRIPT),
    ("deux cercles rouges sur un fond uni", OutputReason.LANGUAGE),
])
def test_each_reason(output, reason):
    assert check_output(SOURCE, output) == reason


def test_echo_of_examples_and_instruction():
    examples = ["a simple blue triangle symbol", "You rewrite image captions. Answer with one new caption."]
    assert check_output(SOURCE, "a simple blue triangle symbol", echo_texts=examples) == OutputReason.ECHO
    assert check_output(SOURCE, "ok so: you rewrite image captions answer with one new caption please",
                        echo_texts=examples) == OutputReason.ECHO
    assert check_output(SOURCE, "a pair of red rings on an empty backdrop", echo_texts=examples) is None


def test_length_limit_scales_with_source():
    config = ValidationConfig(max_words=100, max_length_ratio=2.0, max_extra_words=0)
    assert check_output("red circle", "a big round red circle drawn here", config) == OutputReason.TOO_LONG
    assert check_output("red circle", "round red disc", config) is None


def test_junk_source_is_not_held_to_english():
    # A file-name caption has no language to match; a real rewrite of it must not be refused for that.
    assert check_output("DSC01234 IMG", "a photo file with a numbered name") is None


def test_overlap_callable_refuses_far_meanings():
    def overlap(a, b):
        return 0.9 if "circle" in b else 0.05

    assert check_output(SOURCE, "a pair of red circles", overlap=overlap) is None
    assert check_output(SOURCE, "a yellow taxi in the rain", overlap=overlap) == OutputReason.LOW_OVERLAP


def test_helpers():
    assert normalise("Two  RED circles!") == "two red circles"
    assert dominant_script("hello мир мир") == "CYRILLIC"
    assert dominant_script("1234 !!") is None


@pytest.mark.slow
def test_meaning_overlap_with_minilm():
    from curation.validation import MeaningOverlap

    overlap = MeaningOverlap()
    near = overlap(SOURCE, "a pair of red circles on an empty backdrop")
    far = overlap(SOURCE, "quarterly tax report for small businesses")
    assert near > 0.6 > far
    assert check_output(SOURCE, "quarterly tax report for small businesses", overlap=overlap) == OutputReason.LOW_OVERLAP
