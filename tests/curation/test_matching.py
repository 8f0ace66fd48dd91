import json
import random
import re

import pyarrow as pa
import pytest

from curation.matching import MAX_CODE_LETTERS, Matcher, matcher_for, token_codes
from curation.metadata import can_match, load_metadata
from tests.curation.matching_reference import (
    automaton_match, metaclip2_key, metaclip_automaton, naive_match, naive_match_metaclip2,
)


ENTRIES = [
    "dog", "red dog", "red", "New York", "York", "New", "new", "T-shirt", "U.S.", "e.g.", "a, b", "C++", "dog's",
    "Dog", "York City", "New York City", "café", "東京", "東京 タワー", "İstanbul", "straße", "🔥", "x  y", " lead",
    "trail ", "tab\there", "0", "99", "a", "A", "?", "rock 'n' roll", "-", "ice cream", "ice", "cream", "ice cream cone",
    "cone", "dog", "ǅemal", "I", "ı",
]
ADVERSARIAL = [
    "A red dog in the park.", "Dog", "dog's bed", "(dog)", "dog-friendly", "dogs", "red  dog", "red\tdog", "red\ndog",
    "New York City, New York!", "I ❤ New York", "U.S. army", "e.g. this", "a, b, c", "a,b", "C++ code", "café au lait",
    "東京 タワー", "東京タワー", "İstanbul by night", "STRASSE straße", "🔥🔥 hot 🔥", "x  y", "x y", " lead", "lead",
    "trail ", "trail", "tab\there", "0 99 100", "rock 'n' roll", "-", "ice cream cone?", "ice-cream", "", " ", "\t\n",
    "?", "a?", "ǅemal ǆemal", "I ı i İ", "`dog`", ";dog;", "New York.York", "x\u00a0y", "dog\r\ndog",
]


def _alphabet() -> list[str]:
    pieces = {piece for entry in ENTRIES for piece in entry.split(" ")} | set(",.;:?!` \t\n\r-'()")
    return sorted(pieces | {"  ", "X", "é", "ß", "SS"})


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = _alphabet()
    return [rng.choice(["", " "]).join(rng.choices(alphabet, k=rng.randint(0, 14))) for _ in range(n)]


@pytest.mark.parametrize("case_fold", [False, True])
def test_equals_naive_reference_on_adversarial_and_random_text(case_fold):
    matcher = Matcher(ENTRIES, case_fold=case_fold)
    texts = ADVERSARIAL + _random_texts(3000, seed=1) + [None]
    got = matcher.match_array(pa.array(texts, pa.string())).to_pylist()
    want = [naive_match(ENTRIES, t, case_fold) for t in texts]
    mismatches = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not mismatches, mismatches[:5]


def test_metaclip_semantics_examples():
    matcher = Matcher(ENTRIES)

    def names(text):
        return {ENTRIES[i] for i in matcher.match_text(text)}

    assert names("A red dog in the park.") == {"A", "red", "dog", "red dog"}
    assert "Dog" in names("Dog") and "dog" not in names("Dog")  # case-sensitive
    assert names("dog's bed") == {"dog's"}  # the apostrophe is not split
    assert names("(dog)") == set() and names("dog-friendly") == set() and names("dogs") == set()
    assert "red dog" not in names("red  dog")  # a double space breaks a phrase
    assert names("red\tdog") >= {"red dog"}  # a tab is a space
    assert {"New York", "York", "New", "New York City", "York City"} <= names("New York City, yes")
    assert names("U.S. army") == set()  # spacing splits "U.S." into "U . S ."
    assert names("T-shirt!") == {"T-shirt"}
    assert names("ice cream cone") == {"ice", "cream", "ice cream", "ice cream cone", "cone"}
    assert ENTRIES.count("dog") == 2 and set(matcher.match_text("dog")) == {0, ENTRIES.index("dog", 1)}


def test_can_match_says_which_entries_some_caption_matches():
    """A caption is spaced and an entry is not: "St. Louis" or "a.m." is never found, "St . Louis" is."""
    entries = list(dict.fromkeys(ENTRIES + ["St. Louis", "St . Louis", "x . . y", "x .  . y", ". x", "x .", "a.m.",
                                            "line\nbreak", "`dog`", " ` dog ` ", "x  .  y"]))
    # Each entry with one space taken off each side of each mark: spacing puts them back, so where
    # can_match says yes, this caption matches.
    witnesses = [re.sub(r" ?([,.;:?!`]) ?", r"\1", entry) for entry in entries]
    texts = entries + witnesses + ADVERSARIAL + _random_texts(3000, seed=4)
    matched = {i for ids in Matcher(entries).match_array(pa.array(texts)).to_pylist() for i in ids}
    assert {i for i, entry in enumerate(entries) if can_match(entry)} == matched
    assert {"St . Louis", "x .  . y", "?"} <= {entries[i] for i in matched}
    assert not {"St. Louis", "a.m.", "x . . y", "U.S.", "a, b", "tab\there"} & {entries[i] for i in matched}


def test_case_fold_is_an_option_and_case_variants_are_one_entry():
    """As two entries, "dog" and "Dog" each got the full count, and a dog caption twice the keep probability."""
    folded = Matcher(ENTRIES, case_fold=True)
    first_dog = min(ENTRIES.index("dog"), ENTRIES.index("Dog"))
    assert folded.match_text("DOG") == [first_dog]
    names = {ENTRIES[i] for i in folded.match_text("new york")}
    assert "New York" in names and len(names & {"new", "New"}) == 1


def test_equals_metaclip_aho_corasick_loop_on_a_larger_vocabulary():
    rng = random.Random(3)
    words = [f"w{i}" for i in range(6000)]  # more phrase tokens than one- and two-letter codes cover
    phrases = [" ".join(rng.sample(words, rng.randint(2, 4))) for _ in range(6000)]
    entries = list(dict.fromkeys(words[::2] + phrases))  # odd words occur only inside phrases
    automaton = metaclip_automaton(entries)
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 30))) + rng.choice(["", ".", "!"]) for _ in range(1500)]
    texts += [" ".join(rng.choice(phrases).split(" ")[rng.randint(0, 1):]) + " " + rng.choice(phrases)
              for _ in range(1500)]  # phrases, overlapping and cut
    got = Matcher(entries).match_array(pa.array(texts)).to_pylist()
    want = [automaton_match(automaton, t) for t in texts]
    assert got == want


def test_null_empty_and_one_megabyte_captions():
    matcher = Matcher(ENTRIES)
    huge = ("filler " * 150_000) + "red dog"
    assert len(huge) > 1_000_000
    result = matcher.match_array(pa.array([None, "", "   ", huge], pa.string()))
    assert result.to_pylist()[:3] == [None, [], []]
    assert {ENTRIES[i] for i in result[3].as_py()} == {"red", "dog", "red dog"}
    assert result.type == pa.list_(pa.int32())


def test_accepts_chunked_and_large_string_arrays_and_empty_batches():
    matcher = Matcher(ENTRIES)
    chunked = pa.chunked_array([pa.array(["red dog"]), pa.array(["York"])])
    assert matcher.match_array(chunked).to_pylist() == [naive_match(ENTRIES, "red dog"), naive_match(ENTRIES, "York")]
    assert matcher.match_array(pa.array(["red"], pa.large_string())).to_pylist() == [[ENTRIES.index("red")]]
    assert len(matcher.match_array(pa.array([], pa.string()))) == 0
    assert matcher.match_array(pa.array(["nothing here"])).to_pylist() == [[]]
    with pytest.raises(TypeError, match="string array"):
        matcher.match_array(pa.array([1, 2]))


def test_matcher_is_built_once_per_metadata_and_refuses_a_changed_file(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(["red", "dog"]))
    metadata = load_metadata(path)
    first = matcher_for(str(path), metadata.sha256)
    assert matcher_for(str(path), metadata.sha256) is first
    assert matcher_for(metadata, case_fold=True) is not first
    path.write_text(json.dumps(["cat"]))
    with pytest.raises(ValueError, match="changed since the stage started"):
        matcher_for(str(path), "0" * 64)


def test_token_codes_are_aligned_and_prefix_free():
    n = 256 + 64 * 64 + 2 * 64 * 64 + 5  # every code length, and a partly used last start letter
    codes = token_codes(n)
    spelled = [tuple(c for c in row if c >= 0) for row in codes.tolist()]
    assert len(set(spelled)) == n and codes.shape == (n, MAX_CODE_LETTERS)
    starts = {code[0] for code in spelled}
    continuations = {c for code in spelled for c in code[1:]}
    assert not starts & continuations and 0 not in starts | continuations  # 0 is the separator
    length_of_start = {}
    for code in spelled:  # the start letter alone says how long the code is: no code is a prefix of another
        assert length_of_start.setdefault(code[0], len(code)) == len(code)
    assert [len(code) for code in spelled] == sorted(len(code) for code in spelled)  # frequent ranks shortest


def test_repeated_captions_are_matched_once_and_put_back_in_place():
    matcher = Matcher(ENTRIES)
    texts = ["red dog", None, "New York City", "red dog", None, "", "New York City", "red dog"]
    got = matcher.match_array(pa.array(texts)).to_pylist()
    assert got == [naive_match(ENTRIES, t) for t in texts]


@pytest.mark.parametrize("entries", [["red", "dog", "cat"], ["red dog", "big cat", "big red dog"]])
def test_only_words_or_only_phrases(entries):
    texts = ["a big red dog", "big cat, red dog.", "dog cat red", "big  cat", "", "big", "cat", "big red", "dog"]
    got = Matcher(entries).match_array(pa.array(texts)).to_pylist()  # no phrase runs on into the next caption
    assert got == [naive_match(entries, t) for t in texts]


CJK_ENTRIES = ["猫", "东京", "東京タワー", "タワー", "แมว", "ແມວ", "ကြောင်", "ឆ្មា", "ཞི་མི", "「猫」", "C++", "(dog)",
               "dog", "red dog", "New York", "T-shirt", "a", "猫 dog", "dog 猫", "—", "，"]
CJK_TEXTS = ["一只猫在睡觉", "猫", "我在东京", "東京タワーの夜景", "แมวสีดำ", "ແມວ", "ကြောင်လေး", "ឆ្មាខ្មៅ", "ཞི་མིའི",
             "「猫」です", "C++ code", "C+++", "a C++", "(dog) and dogs", "red dog", "a red dog.", "New York, 猫",
             "T-shirt 猫", "猫 dog", "猫dog", "dog 猫", "dog猫", "——", "，，", "", None]


def test_metaclip2_padding_matches_entries_in_text_written_without_spaces():
    """MetaCLIP 1 pads every entry, so no Chinese, Japanese or Thai word was ever found inside a caption."""
    texts = CJK_TEXTS + _random_texts(2000, seed=3)
    rng = random.Random(4)
    pieces = [p for e in CJK_ENTRIES for p in (e, *e)] + list(" ,.。、!?-")
    texts += ["".join(rng.choices(pieces, k=rng.randint(0, 10))) for _ in range(2000)]
    got = Matcher(CJK_ENTRIES, metaclip2_padding=True).match_array(pa.array(texts, pa.string())).to_pylist()
    want = [naive_match_metaclip2(CJK_ENTRIES, t) for t in texts]
    mismatches = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not mismatches, mismatches[:5]

    def names(text, **kw):
        return {CJK_ENTRIES[i] for i in Matcher(CJK_ENTRIES, **kw).match_text(text)}

    assert names("一只猫在睡觉", metaclip2_padding=True) == {"猫"} and names("一只猫在睡觉") == set()
    assert names("東京タワー の夜景", metaclip2_padding=True) == {"東京タワー"}  # a kana edge keeps its space
    assert names("東京タワーの夜景", metaclip2_padding=True) == set()  # as in MetaCLIP 2
    assert "dog" not in names("dogs", metaclip2_padding=True)  # a Latin entry keeps both spaces
    assert names("猫dog", metaclip2_padding=True) == {"猫"}  # "猫 dog" needs its space; "dog" its left one
    assert names("C+++", metaclip2_padding=True) == {"C++"}  # punctuation ends leave that side open too
    latin = ADVERSARIAL + _random_texts(2000, seed=5) + [None]  # punctuation-edged entries: "?", "-", "C++"
    assert Matcher(ENTRIES, metaclip2_padding=True).match_array(pa.array(latin, pa.string())).to_pylist() == [
        naive_match_metaclip2(ENTRIES, t) for t in latin]
    # Under MetaCLIP 1's padding the same matcher equals the MetaCLIP 1 reference.
    assert Matcher(CJK_ENTRIES).match_array(pa.array(texts, pa.string())).to_pylist() == [
        naive_match(CJK_ENTRIES, t) for t in texts]


def test_metaclip2_padding_opens_exactly_the_edges_of_metaclip2_s_blocks():
    """Each block's first and last code point opens an entry's edge, the code points just outside do not
    (unless another block or punctuation holds them); checked on both sides of an entry."""
    from tests.curation.matching_reference import METACLIP2_BLOCKS

    edges = sorted({c for low, high in METACLIP2_BLOCKS.values() for c in (low - 1, low, high, high + 1)})
    chars = [chr(c) for c in edges] + ["\u3042", "\u30ab", "\u3005", "(", "，", "x"]  # kana stay padded
    entries = [f"{c}x" for c in chars] + [f"x{c}" for c in chars]
    texts = [f"a{c}xb" for c in chars] + [f"ax{c}b" for c in chars] + [f"{c}x" for c in chars]
    got = Matcher(entries, metaclip2_padding=True).match_array(pa.array(texts, pa.string())).to_pylist()
    assert got == [naive_match_metaclip2(entries, t) for t in texts]
    opened = {c for c, key in zip(chars, (metaclip2_key(e) for e in entries)) if not key.startswith(" ")}
    assert {"\u4e00", "\u9fff", "\u0e00", "\u0fff", "(", "，"} <= opened
    assert not opened & {"\u3042", "\u30ab", "\u3005", "x", "\u4dc0"}  # kana, 々, Latin, just past Ext A
