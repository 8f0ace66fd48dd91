from __future__ import annotations

import pytest

from curation.facts import lost_fact, stated_colours, stated_counts
from curation.validation import OutputReason, check_output


def _lost(source: str, output: str) -> bool:
    return lost_fact(stated_counts(source), stated_colours(source), output)


def test_what_a_source_states():
    assert stated_counts("3 red circles and two blue squares") == {"3", "2"}
    assert stated_counts("1,500 people, rated 3.0 and 3.5 stars") == {"1500", "3", "3.5"}
    assert stated_counts("10,000 people") == set()  # five digits and more: read as an id, which a rewrite drops
    # Ids, file names, times and "one of" state no count; "a" keeps a count only in an output.
    assert stated_counts("IMG_2231.jpg 1920x1080 at 10:30, one of the best, Stock Photo 123456, a dog") == set()
    assert stated_colours("a crimson car, a navy boat and an orange on a golden plate") == {"red", "blue"}


@pytest.mark.parametrize("source, output, lost", [
    ("3 red circles", "5 red circles", True),
    ("3 red circles", "three red circles", False),
    ("a red car", "a blue car", True),
    ("a red car", "a crimson car parked outside", False),  # a shade of the same colour
    ("two red circles", "a red circle", True),
    ("two white mugs of coffee on a wooden table", "a wooden tabletop with a pair of white coffee cups", False),
    ("four red apples", "some red apples", True),
    ("Photo 2019 of Paris", "a picture of Paris", True),
    ("IMG_2231.jpg | black dog on the beach", "a black dog standing on a sandy beach", False),  # a file name
    ("Download free HD wallpaper 1920x1080 snowy mountain peak", "a snow-covered mountain summit", False),
    ("grey cat on a sofa", "a gray cat lying on a couch", False),
    # Not counts or colours: separators and decimals, a pronoun, things named like colours, times, ids.
    ("10,000 people at the stadium", "10000 people in the stadium", False),
    ("rated 3.0 stars", "a 3 star rating", False),
    ("One of the best beaches", "Among the finest beaches", False),
    ("An orange on a table", "A ripe citrus fruit on a table", False),
    ("Golden retriever puppy", "A retriever puppy", False),
    ("Meeting at 10:30", "a meeting at half past ten", False),
    ("Stock Photo 123456 - woman working", "A woman working on her laptop", False),
])
def test_numbers_and_colours_of_the_input_are_kept(source, output, lost):
    """The instruction says keep every number and colour; a SmolLM2 demo run changed the count in 20% and
    the colour in 26% of the rewrites it kept, and those are what the demo's zero-shot classes ask."""
    assert _lost(source, output) is lost
    assert (check_output(source, output) == OutputReason.CHANGED_FACT) is lost


def test_colours_and_counts_may_be_said_in_other_words():
    """Through check_output: a fusion and a rewrite are refused for it by name."""
    assert check_output("black and white photo of a street", "a monochrome shot of a city street") is None
    assert check_output("red and blue photo of a street", "a monochrome shot of a city street") == \
        OutputReason.CHANGED_FACT
    assert check_output("a black cat on a sofa", "a greyscale photo of a cat on a sofa") == OutputReason.CHANGED_FACT
    assert check_output("Nike Air Max 90 shoes", "a pair of Nike Air Max ninety sneakers") is None
    assert check_output("Nike Air Max 90 shoes", "a pair of Nike Air Max sneakers") == OutputReason.CHANGED_FACT


@pytest.mark.parametrize("source, output, added", [
    # Seen in a SmolLM2 demo run: a quarter of its kept rewrites invented a colour or a count.
    ("one yellow pentagon on a plain background", "a sky blue triangle of one yellow pentagon", True),
    ("Photo by Marco Rossi | red crosses", "white, red cross draped over a path to the sea.", True),
    ("brown hexagon - DSC07636", "a brown hexagon with 2 x 2, a 3 x 3 square", True),
    ("a red circle", "three red circles", True),
    ("a man riding a horse", "two men riding horses", True),
    ("children playing in a park", "two children playing in a park", True),
    # Said in other words, or held by the source in its digits: no invention.
    ("a red circle", "one crimson circle", False),
    ("a dozen eggs in a box", "twelve eggs in a carton", False),
    ("black and white photo of a street", "a monochrome shot of a city street", False),
    ("monochrome photo of a street", "a black and white picture of a street", False),
    ("Meeting at 10:30", "a meeting at half past ten", False),
    ("An orange on a table", "an orange fruit on a golden plate", False),  # colour words as often things
    ("a cat sleeping on a sofa", "cats asleep on sofas", False),
])
def test_a_count_or_colour_the_source_does_not_state_is_invented(source, output, added):
    from curation.facts import added_fact

    assert added_fact(source, output) is added
    assert (check_output(source, output) == OutputReason.CHANGED_FACT) is added
