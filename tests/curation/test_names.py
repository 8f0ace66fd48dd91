"""Which words of an alt-text are names a fusion must keep, and when a fusion kept them."""

import pytest

from curation.names import Names, names_in


@pytest.mark.parametrize("alt, names", [
    ("A red Ford truck parked in Texas", Names(("Ford", "Texas"))),
    ("Three red circles. Photo by Ana Lima", Names(("Ana", "Lima"))),  # a sentence's first word is no name
    ("IMG_0042.jpg", Names()),  # a file name is no name
    ("my new iPhone beside a BMW at McDonald's, 2019", Names(("iPhone", "BMW", "McDonald", "2019"))),
    ("BIG SALE ON NIKE SHOES 2021", Names(("2021",))),  # all capitals: only the year says anything
    ("A cold bottle of Coca-Cola with Conan O'Brien", Names(("Coca-Cola", "Conan", "O'Brien"))),
    ("The old town of Zürich and a street in São Paulo", Names(("Zürich", "São", "Paulo"))),
    ("Ein Hund spielt im Garten von Anna, 2020", Names(("2020",))),  # German nouns all have capitals
    # Shop shouting and file tags are no acronyms; the real ones beside them still are.
    ("Download free HD wallpaper of a mountain lake PNG", Names()),
    ("NEW leather wallet by BMW - FREE SHIPPING", Names(("BMW",))),
    ("Sunset over the Golden Gate Bridge, San Francisco 2019",
     Names(("2019",), ("Golden", "Gate", "Bridge", "San", "Francisco"))),  # every content word capitalised
])
def test_names_by_shape_and_by_capitals_in_sentence_case(alt, names):
    assert names_in(alt) == names


def test_a_title_case_alt_text_needs_half_its_capitalised_words_less_what_the_vec_describes():
    names = names_in("Old Ford Truck On Our Farm In Texas", seen="a rusty red truck next to a wooden barn")
    assert names == Names((), ("Ford", "Farm", "Texas"))  # On, Our, In are function words; the VeC says truck
    assert names.lost_in("A rusty red Ford truck by a barn in Texas") == []
    assert names.lost_in("A rusty red truck on a farm") == ["Ford", "Texas"]  # one of three is too few


def test_a_name_is_kept_only_as_a_whole_word_in_any_case():
    names = names_in("A red Ford truck parked in Texas")
    assert names.lost_in("we cannot afford a truck in texas") == ["Ford"]
    assert names.lost_in("FORD's red truck, parked in Texas.") == []
