"""MetaCLIP substring matching, batched over Arrow arrays with one pyahocorasick automaton per worker.

Semantics (MetaCLIP's `substr_matching`): a caption is "spaced" (one space at
each end, a space on each side of `, . ; : ? !` and the backtick, tab/newline/
carriage return turned into spaces), every entry is wrapped as " entry ", and
an entry matches when its wrapped form is a substring of the spaced caption.
Entries therefore match whole words and phrases, every entry found counts once
per caption, and overlapping entries all match ("New York" and "York").
`metaclip2_padding` is MetaCLIP 2's rule for worldwide metadata: an entry
gets no padding space on a side whose character is CJK, Thai, Lao, Burmese,
Khmer or Tibetan (scripts without spaces between words) or punctuation, so
"猫" matches inside "一只猫在睡觉" (MetaCLIP 2's code-point ranges exactly). Those entries are plain substrings on their
open side, which no token run expresses: they are matched by a character
automaton over the spaced caption, MetaCLIP's own per-caption loop, beside the
token path below. Off by default: MetaCLIP 1 pads every entry.
Case-sensitive by default, as MetaCLIP; `case_fold` lower-cases both sides
with Python's `str.lower`, and an entry's case variants ("red", "Red") are then
one entry, the first id: as two, each would get the full count and its own
t/count, and a caption with "red" would be kept with twice the probability
the cap t allows (19,722 folded groups in the default metadata).

How: " entry " can only start right after a space and end right before one,
so it matches exactly when the entry equals some run of consecutive tokens of
the spaced caption split on single spaces (an entry with a leading, trailing
or double space is a run that includes empty tokens). So the automaton runs
over tokens rather than characters. Arrow spaces and splits a whole batch,
each distinct token of the batch is looked up once in a dict of the entries'
tokens, and one pyahocorasick `KEY_SEQUENCE` automaton, built once per worker,
scans the whole batch in a single `iter` call, captions separated by a letter
that no entry contains. A one-token entry needs no scan: the token lookup is
its match, so the automaton holds the phrases (entries of two tokens or more).
A phrase can only match where each adjacent pair of tokens is an adjacent
pair of some phrase, so a vectorised check of the batch's token pairs
against the phrases' pairs picks the runs that the automaton scans; in web
captions that is a few percent of the tokens.

pyahocorasick finds a node's child by a linear scan of its children, so a
vocabulary of ~10^5 tokens cannot be the automaton's alphabet (the root alone
would be scanned through for every token). Each token is spelled instead in
one to three letters of a small alphabet: a "start" letter, which only begins
a token (so matches stay aligned to tokens) and whose value says how many
"continuation" letters follow (so no token's code is a prefix of another's).
Frequent English words (wordfreq) get one-letter codes and come first among
the root's children, where the scan reaches them first. Only speed depends on
that ranking; the result does not.
"""

from __future__ import annotations

import itertools
import string
import threading

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.metadata import SPACE_LIKE, SPACED_PUNCTUATION, MetadataFile, load_metadata

_PUNCTUATION_PATTERN = "([" + SPACED_PUNCTUATION.replace(".", "\\.").replace("?", "\\?") + "])"
_SPACE_PATTERN = "[" + SPACE_LIKE + "]"
MATCHES_TYPE = pa.list_(pa.int32())
# MetaCLIP 2's scripts written without spaces (code point ranges), and the full-width punctuation it adds to
# ASCII's; an entry whose first or last character is one of them gets no padding space on that side.
UNSPACED_SCRIPTS = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),  # CJK ideographs, compatibility ideographs, radicals, description characters
    (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF),  # Thai .. Tibetan
)
FULL_WIDTH_PUNCTUATION = "，。、；：？！“”‘’（）【】《》〈〉「」『』～—"
# Captions per `match_array` call in the pipeline. Matching reads only key and caption, so a large batch is
# cheap, and it amortises the per-call work: each distinct token of a batch is looked up once.
MATCH_BATCH_ROWS = 8192

# The automaton's alphabet. Letter 0 separates captions and stands for every token that is in no phrase.
# Start letters follow: ONE_LETTER_CODES tokens spelled by their start letter alone, then TWO_LETTER_STARTS
# letters each followed by one continuation letter, then as many as needed followed by two. CONTINUATIONS
# continuation letters come last.
SEPARATOR = 0
ONE_LETTER_CODES = 256
TWO_LETTER_STARTS = 64
CONTINUATIONS = 64
MAX_CODE_LETTERS = 3


def spacing_array(captions: pa.Array) -> pa.Array:
    """MetaCLIP's spacing of every caption, without the two outer spaces (nulls stay null).

    The outer spaces only mark the caption's ends, which splitting into tokens
    does already.
    """
    spaced = pc.replace_substring_regex(captions, pattern=_PUNCTUATION_PATTERN, replacement=r" \1 ")
    return pc.replace_substring_regex(spaced, pattern=_SPACE_PATTERN, replacement=" ")


def _as_string_array(captions: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks() if captions.num_chunks else pa.array([], pa.string())
    if pa.types.is_large_string(captions.type) or pa.types.is_string_view(captions.type):
        captions = captions.cast(pa.string())
    if not pa.types.is_string(captions.type):
        raise TypeError(f"captions must be a string array, got {captions.type}")
    return captions


def rank_by_frequency(tokens: list[str]) -> list[str]:
    """Tokens, most frequent English word first (wordfreq); only the automaton's speed depends on it."""
    import wordfreq

    frequency = wordfreq.get_frequency_dict("en")
    return sorted(tokens, key=lambda token: -frequency.get(token.lower(), 0.0))


def token_codes(n_tokens: int) -> np.ndarray:
    """(n_tokens, MAX_CODE_LETTERS) letters spelling token ranks 0.. (padded with -1): rank 0 the shortest."""
    one = min(n_tokens, ONE_LETTER_CODES)
    two = min(n_tokens - one, TWO_LETTER_STARTS * CONTINUATIONS)
    three = n_tokens - one - two
    two_starts = -(-two // CONTINUATIONS)
    three_starts = -(-three // CONTINUATIONS ** 2)
    first_continuation = 1 + one + two_starts + three_starts
    codes = np.full((n_tokens, MAX_CODE_LETTERS), -1, np.int64)
    codes[:one, 0] = 1 + np.arange(one)
    rank = np.arange(two)
    codes[one:one + two, 0] = 1 + one + rank // CONTINUATIONS
    codes[one:one + two, 1] = first_continuation + rank % CONTINUATIONS
    rank = np.arange(three)
    codes[one + two:, 0] = 1 + one + two_starts + rank // CONTINUATIONS ** 2
    codes[one + two:, 1] = first_continuation + rank // CONTINUATIONS % CONTINUATIONS
    codes[one + two:, 2] = first_continuation + rank % CONTINUATIONS
    if n_tokens and codes.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{n_tokens} phrase tokens need letters beyond uint16")
    return codes


class Matcher:
    """Entry ids matched by each caption; build once per worker (see `matcher_for`), reuse for every batch."""

    def __init__(self, entries: list[str], case_fold: bool = False, metaclip2_padding: bool = False):
        self.n_entries = len(entries)
        self.case_fold = case_fold
        self.metaclip2_padding = metaclip2_padding
        patterns: dict[str, list[int]] = {}
        for entry_id, entry in enumerate(entries):
            ids = patterns.setdefault(entry.lower() if case_fold else entry, [])
            if not (case_fold and ids):  # folded: the group's first id only (see the module docstring)
                ids.append(entry_id)
        # Under MetaCLIP 2's padding an entry with an open side is a plain substring there: no token run, so
        # those go to a character automaton (see `unpadded_key`); every other entry stays on the token path.
        unpadded = {pattern_id: key for pattern_id, pattern in enumerate(patterns)
                    if metaclip2_padding and (key := unpadded_key(pattern)) is not None}
        self._unpadded = _character_automaton(unpadded)
        pattern_tokens = [(pattern_id, pattern.split(" ")) for pattern_id, pattern in enumerate(patterns)
                          if pattern_id not in unpadded]
        phrase_tokens = rank_by_frequency(list({t: None for _, tokens in pattern_tokens if len(tokens) > 1
                                                for t in tokens}))
        self._vocab = {token: i for i, token in enumerate(phrase_tokens)}  # phrase tokens first, by frequency
        for _, tokens in pattern_tokens:
            if len(tokens) == 1:
                self._vocab.setdefault(tokens[0], len(self._vocab))
        self._unknown = len(self._vocab)
        self._single = np.full(self._unknown + 1, -1, np.int64)  # the one-token pattern of each id, or -1
        codes = token_codes(len(phrase_tokens))
        letters = [tuple(c for c in code if c >= 0) for code in codes.tolist()]
        keys = []
        for pattern_id, tokens in pattern_tokens:
            if len(tokens) == 1:
                self._single[self._vocab[tokens[0]]] = pattern_id
            else:
                keys.append((tuple(itertools.chain.from_iterable(letters[self._vocab[t]] for t in tokens)),
                             pattern_id))
        self._has_phrases = bool(keys)
        # Adjacent token pairs of the phrases, sorted: a phrase can only match inside a run of tokens whose
        # every adjacent pair is one of them, so only such runs go through the automaton.
        pairs = {self._vocab[a] * (self._unknown + 1) + self._vocab[b]
                 for _, tokens in pattern_tokens for a, b in zip(tokens, tokens[1:])}
        self._pairs = np.array(sorted(pairs), np.int64)
        self._has_next = np.zeros(self._unknown + 1, bool)
        self._has_next[self._pairs // (self._unknown + 1)] = True
        self._has_previous = np.zeros(self._unknown + 1, bool)
        self._has_previous[self._pairs % (self._unknown + 1)] = True
        # Every start letter, the separator included, gets a root child (a key no stream completes): the root's
        # children are then all start letters in order, and a token that begins no phrase is found, not missed.
        dead_end = int(codes.max(initial=SEPARATOR)) + 1
        keys.extend(((start, dead_end), -1) for start in range(int(codes[:, 0].max(initial=SEPARATOR)) + 1))
        keys.sort()
        self._automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS, ahocorasick.KEY_SEQUENCE)
        for key, pattern_id in keys:
            self._automaton.add_word(key, pattern_id)
        self._automaton.make_automaton()
        # Each id's letters as uint16 bytes, for Arrow to gather a batch's letters in one `take`; an id that is
        # in no phrase (and "unknown", the last id) is spelled as a separator.
        self._spelling = pa.array([np.array(code, np.uint16).tobytes() for code in letters]
                                  + [np.array([SEPARATOR], np.uint16).tobytes()] * (self._unknown + 1 - len(letters)),
                                  pa.binary())
        sizes = [len(ids) for ids in patterns.values()]
        self._entry_counts = np.array(sizes, np.int64)
        self._entry_starts = np.concatenate([[0], np.cumsum(self._entry_counts)[:-1]]).astype(np.int64)
        self._entry_ids = np.fromiter((i for ids in patterns.values() for i in ids), np.int64, sum(sizes))
        self._one_to_one = all(size == 1 for size in sizes)

    def match_array(self, captions: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """list<int32> of sorted, unique entry ids per caption; null where the caption is null.

        Repeated captions of a batch (common on the web) are matched once.
        """
        captions = _as_string_array(captions)
        encoded = captions.dictionary_encode()
        if len(encoded.dictionary) < len(captions):
            return self._match_distinct(encoded.dictionary).take(encoded.indices)
        return self._match_distinct(captions)

    def _match_distinct(self, captions: pa.StringArray) -> pa.ListArray:
        n = len(captions)
        if self.case_fold:
            captions = pa.array([None if c is None else c.lower() for c in captions.to_pylist()], pa.string())
        spaced = spacing_array(captions)
        tokens = pc.split_pattern(pc.fill_null(spaced, "") if spaced.null_count else spaced, " ")
        row_of = pc.list_parent_indices(tokens).to_numpy().astype(np.int64, copy=False)
        encoded = tokens.flatten().dictionary_encode()
        distinct = encoded.dictionary.to_pylist()  # each distinct token of the batch is looked up once
        distinct_ids = np.fromiter(map(self._vocab.get, distinct, itertools.repeat(self._unknown)), np.int64,
                                   len(distinct))
        token = distinct_ids[encoded.indices.to_numpy()]
        single = self._single[token]
        hit = single >= 0
        rows, patterns = [row_of[hit]], [single[hit]]
        if self._has_phrases:
            phrase_rows, phrase_patterns = self._scan_phrases(token, row_of, n)
            rows.append(phrase_rows)
            patterns.append(phrase_patterns)
        if self._unpadded is not None:
            unpadded_rows, unpadded_patterns = self._scan_unpadded(spaced)
            rows.append(unpadded_rows)
            patterns.append(unpadded_patterns)
        return self._to_lists(np.concatenate(rows), np.concatenate(patterns), n, captions)

    def _scan_unpadded(self, spaced: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
        """(row, pattern) of every entry matched as a plain substring: MetaCLIP 2's per-caption automaton loop
        over the spaced caption (outer spaces put back: a padded side may sit at the caption's end)."""
        rows, found = [], []
        for row, text in enumerate(spaced.to_pylist()):
            if text is not None:
                ids = {pattern_id for _, pattern_id in self._unpadded.iter(f" {text} ")}
                rows += [row] * len(ids)
                found += ids
        return np.array(rows, np.int64), np.array(found, np.int64)

    def _scan_phrases(self, token: np.ndarray, row_of: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, pattern) of every phrase match: one automaton scan over the candidate runs of the whole batch."""
        first, second = token[:-1], token[1:]
        linked = (row_of[1:] == row_of[:-1]) & self._has_next[first] & self._has_previous[second]
        at = np.flatnonzero(linked)
        key = first[at] * (self._unknown + 1) + second[at]
        slot = np.minimum(np.searchsorted(self._pairs, key), len(self._pairs) - 1)
        linked[at] = self._pairs[slot] == key
        linked = np.concatenate([linked, [False]])  # token i is linked to token i + 1
        chosen = np.flatnonzero(linked | np.concatenate([[False], linked[:-1]]))
        if not len(chosen):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        run_ends = ~linked[chosen]
        position = np.arange(len(chosen)) + np.concatenate([[0], np.cumsum(run_ends)[:-1]])
        items = np.full(len(chosen) + int(run_ends.sum()), self._unknown, np.int64)  # each run, then a separator
        items[position] = token[chosen]
        item_row = np.zeros(len(items), np.int64)
        item_row[position] = row_of[chosen]
        spelled = self._spelling.take(pa.array(items))  # Arrow gathers the letters of every item in one pass
        starts = np.frombuffer(spelled.buffers()[1], np.int32, len(items) + 1, spelled.offset * 4) // 2
        letters = np.frombuffer(spelled.buffers()[2], np.uint16, starts[-1] - starts[0], starts[0] * 2)
        found = np.fromiter(itertools.chain.from_iterable(self._automaton.iter(tuple(letters.tolist()))), np.int64)
        return item_row[np.searchsorted(starts - starts[0], found[0::2], side="right") - 1], found[1::2]

    def _to_lists(self, row: np.ndarray, pattern_id: np.ndarray, n: int, captions: pa.StringArray) -> pa.ListArray:
        """Expand patterns to entry ids, drop repeats, and pack one sorted id list per caption."""
        if self._one_to_one:
            entry_id = self._entry_ids[pattern_id]
        else:
            repeat = self._entry_counts[pattern_id]
            row = np.repeat(row, repeat)
            within = np.arange(len(row)) - np.repeat(np.cumsum(repeat) - repeat, repeat)
            entry_id = self._entry_ids[np.repeat(self._entry_starts[pattern_id], repeat) + within]
        pair = np.sort(row.astype(np.int64) * self.n_entries + entry_id)
        pair = pair[np.concatenate(([True], pair[1:] != pair[:-1]))] if len(pair) else pair
        row, entry_id = np.divmod(pair, self.n_entries)
        offsets = np.searchsorted(row, np.arange(n + 1)).astype(np.int32)
        mask = pc.is_null(captions) if captions.null_count else None
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(entry_id.astype(np.int32)), MATCHES_TYPE,
                                        mask=mask)

    def match_text(self, text: str) -> list[int]:
        """Entry ids of one caption (for interactive use; pipelines call `match_array` on whole batches)."""
        return self.match_array(pa.array([text], pa.string()))[0].as_py()
def is_unspaced_boundary(char: str) -> bool:
    """MetaCLIP 2's test of an entry's boundary character, exactly: a script written without spaces between
    words (CJK ideographs and radicals, Thai, Lao, Burmese, Khmer, Tibetan), or punctuation (ASCII, and the
    full-width marks of CJK text). Its ranges leave kana out, so a kana edge keeps its space: "タワー" does
    not match inside "東京タワーの夜景". Widening them would let the English metadata's one-kana entries
    (の, が, て, ...) match inside nearly every Japanese caption."""
    code = ord(char)
    return (any(low <= code <= high for low, high in UNSPACED_SCRIPTS)
            or char in string.punctuation or char in FULL_WIDTH_PUNCTUATION)


def unpadded_key(entry: str) -> str | None:
    """The entry as MetaCLIP 2 pads it, when a side stays open ("東京" for 東京, " C++" for C++); None when
    both sides get their space, as in MetaCLIP 1, which the token path matches."""
    if not entry:
        raise ValueError("an empty entry matches everywhere: metadata entries must be non-empty")
    left, right = not is_unspaced_boundary(entry[0]), not is_unspaced_boundary(entry[-1])
    return None if left and right else (" " if left else "") + entry + (" " if right else "")


def _character_automaton(keys: dict[int, str]) -> ahocorasick.Automaton | None:
    if not keys:
        return None
    automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    for pattern_id, key in keys.items():
        automaton.add_word(key, pattern_id)
    automaton.make_automaton()
    return automaton


_CACHE: dict[tuple[str, bool, bool], Matcher] = {}
_CACHE_LOCK = threading.Lock()


def matcher_for(metadata: MetadataFile | str, sha256: str | None = None, case_fold: bool = False,
                metaclip2_padding: bool = False) -> Matcher:
    """The worker's Matcher for a metadata file, built on first use and kept, keyed by the file's checksum.

    Beam DoFns call this from `setup`, so each worker process builds the index
    once however many bundles it runs.
    """
    loaded = metadata if isinstance(metadata, MetadataFile) else None
    digest = loaded.sha256 if loaded else sha256
    if digest is None:
        loaded = load_metadata(metadata)
        digest = loaded.sha256
    with _CACHE_LOCK:
        cached = _CACHE.get((digest, case_fold, metaclip2_padding))
        if cached is None:
            loaded = loaded or load_metadata(metadata)
            if loaded.sha256 != digest:
                raise ValueError(f"{loaded.path} changed since the stage started (sha256 {loaded.sha256} != {digest})")
            cached = _CACHE[(digest, case_fold, metaclip2_padding)] = Matcher(loaded.entries, case_fold,
                                                                              metaclip2_padding)
        return cached
