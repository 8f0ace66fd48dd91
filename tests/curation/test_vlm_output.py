"""A VLM generation as a caption: cleaned of openers, and refused when it cannot stand as one."""

import pytest

from curation.caption import VEC_PROMPT
from curation.vlm_output import Degenerate, clean_vlm_output, degenerate_reason


@pytest.mark.parametrize("raw,clean", [
    ("The image shows a red car on a street.", "A red car on a street."),
    ("In this picture, two cats sleep on a sofa", "Two cats sleep on a sofa"),
    ("  \"a yellow kite in the sky\"  \nsecond line", "a yellow kite in the sky"),
    ("a bowl of fruit. USER: and now?", "a bowl of fruit."),
    ("The image of a cat on a sofa", "A cat on a sofa"),
    ("In the image, there is a red car", "A red car"),
    # Not openers: the noun is the caption's own subject.
    ("The picture frame hangs on a white wall", "The picture frame hangs on a white wall"),
    ("The scene is a busy street market at dusk", "The scene is a busy street market at dusk"),
    ("The photo booth at a wedding party", "The photo booth at a wedding party"),
    # Refused as small talk before: a common VLM opening, and a sign's words cut as a chat turn.
    ("This image is a close-up of a pink flower.", "A close-up of a pink flower."),
    ("A man holding a sign that says 'System: online'.", "A man holding a sign that says 'System: online'."),
    ("A dog on a beach. User: describe it more", "A dog on a beach."),
])
def test_clean_vlm_output(raw, clean):
    assert clean_vlm_output(raw) == clean


@pytest.mark.parametrize("text,reason", [
    ("", Degenerate.EMPTY),
    ("...", Degenerate.EMPTY),
    ("faces faces faces", Degenerate.REPEATED),
    ("a dog on a dog on a dog on a", Degenerate.REPEATED),
    (VEC_PROMPT, Degenerate.ECHO),
    ("Write one short sentence, under 20 words, saying what", Degenerate.ECHO),
    ("USER: describe", Degenerate.ECHO),
    ("dog", Degenerate.TOO_SHORT),
    ("a brown dog runs on a sandy beach near the sea", None),
    ("a plate with a red apple, a green apple and a yellow apple", None),
    ("a small house with a red roof, a red door and a red fence", None),  # three red things, no loop
    ("a man in a red shirt and a woman in a blue shirt sitting in a park", None),
    ("a red car a red car a red car", Degenerate.REPEATED),
    # An instruct VLM's refusals and small talk: trained on, CLIP would learn "sorry" for photos of people.
    ("I'm sorry, but I can't help with identifying people in images.", Degenerate.CHATTER),
    ("As an AI language model, I cannot see images.", Degenerate.CHATTER),
    ("The image is too blurry to describe.", Degenerate.CHATTER),
    ("Sure! Here is a short sentence: a brown dog lying on green grass.", Degenerate.CHATTER),
    ("a sorry-looking dog lying on wet grass", None),
    ("I\u2019m sorry, I can\u2019t identify the people in this image.", Degenerate.CHATTER),  # typographic quotes
    ("I'm not able to see any details in this picture", Degenerate.CHATTER),
    ("Hat is visible", None),  # "...what is visible" of the prompt holds "hat is visible", but not as words
    # The prompt's later sentence echoed before a caption; a sentence of five or more words said twice; a
    # VLM saying it has no usable picture: all were kept as VeCs.
    ("Only mention what is visible. A dog on a beach.", Degenerate.ECHO),
    ("A red car parked on a street. A red car parked on a street.", Degenerate.REPEATED),
    ("a dog on the beach with a ball a dog on the beach with a ball", Degenerate.REPEATED),
    ("There is no image provided.", Degenerate.CHATTER),
    ("The image is not clear enough to describe.", Degenerate.CHATTER),
    ("I cannot see the picture you sent.", Degenerate.CHATTER),
    ("No photo frames hang on the bare white wall", None),
    ("Sure-footed mountain goats on a rocky cliff.", None),  # "sure" as a word of the caption, not an answer
    ("Sure, a dog on a beach.", Degenerate.CHATTER),
    ("A man holding a sign that says 'System: online'.", None),
    ("A red car parked on a street next to a red car parked on a driveway", None),  # no phrase twice in a row
])
def test_degenerate_reason(text, reason):
    assert degenerate_reason(text, VEC_PROMPT) == reason
