"""How a text is written: words, script and language, the facts every validation check starts from."""

import pytest

from curation.languages import (
    dominant_script, is_function_word, language_shares, languages_of, likely_languages, main_language, word_count,
    words_of,
)


@pytest.mark.parametrize("text, words", [
    ("two red circles", 3),
    ("  spaced   out ", 2),
    ("", 0),
    ("一只白色的猫坐在窗台上", 6),  # 11 characters of an unspaced script: one word per two
    ("hello 世界 world", 3),
    ("แมวสีขาว", 4),
])
def test_word_count_counts_unspaced_scripts_by_characters(text, words):
    assert word_count(text) == words


@pytest.mark.parametrize("text, script", [
    ("hello мир мир", "CYRILLIC"),
    ("Ελληνικά hello", "GREEK"),
    ("ＮＩＫＥ ｒｕｎｎｉｎｇ ｓｈｏｅｓ", "LATIN"),  # fullwidth letters are Latin after NFKC
    ("窓辺に白い猫", "CJK"),  # kanji and kana are one script
    ("1234 !!", None),
])
def test_dominant_script(text, script):
    assert dominant_script(text) == script


def test_words_are_casefolded_letters_from_the_nfkc_form():
    assert words_of("ＮＩＫＥ Don't 42 x_y") == ["nike", "don't", "x", "y"]


def test_function_words_are_the_most_frequent_of_their_language():
    assert is_function_word("the") and is_function_word("im", "de") and not is_function_word("im")
    assert not is_function_word("truck") and not is_function_word("garten", "de")


def test_a_word_belongs_to_the_languages_it_is_common_in():
    assert languages_of("the") == {"en"}
    assert {"en", "fr", "de"} <= languages_of("orange")
    assert languages_of("xqzt") == frozenset()  # no language knows it


def test_main_language_needs_three_known_words_and_a_majority():
    assert main_language("zwei rote Kreise auf einem Tisch") == "de"
    assert language_shares("zwei rote Kreise auf einem Tisch")["de"] == 1.0
    assert main_language("DSC01234 IMG") is None and language_shares("DSC01234 IMG") is None
    assert main_language("a cat on the sofa") == "en"
    mixed = "a dog with the ball und der Hund im Garten"  # 6 of 10 known words German, 5 English
    assert main_language(mixed) == "de" and main_language(mixed, min_share=0.7) is None


def test_likely_languages_of_a_short_text_keep_ties():
    assert likely_languages(words_of("orange cat")) == {"en"}
    assert {"en", "fr"} <= likely_languages(words_of("chat orange"))
    assert likely_languages(words_of("xqzt vbnmq")) == frozenset()  # wordfreq knows neither word
