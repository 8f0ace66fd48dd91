"""The text tokenizer: a BPE trained on the shards' own texts, or an existing CLIP tokenizer.

The trained BPE follows CLIP's conventions (lower-cased, word-end marker
`</w>`, `<|startoftext|>` ... `<|endoftext|>` around every text, padded with
the end token), and is saved as a `PreTrainedTokenizerFast` beside the model,
so `AutoTokenizer.from_pretrained(model_dir)` loads it anywhere.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


def _pipeline() -> Tokenizer:
    """Normaliser, pre-tokenizer and decoder shared by training and use (the model is set afterwards)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    return tokenizer


def learn_merges(word_counts: dict[str, int], vocab_size: int, reserved: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE merges by highest pair count, ties broken by the smaller pair: the same words give the same vocabulary.

    (The `tokenizers` trainer breaks ties by hash-map order, so two runs on the
    same texts could get different vocabularies and a different model.)
    """
    words = [[*w[:-1], w[-1] + "</w>"] for w in sorted(word_counts)]
    freqs = [word_counts[w] for w in sorted(word_counts)]
    alphabet = sorted({symbol for word in words for symbol in word})
    vocab = {symbol: reserved + i for i, symbol in enumerate(alphabet)}
    pair_counts: collections.Counter = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) + reserved < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or negative == 0:
            continue  # stale entry: the count changed after it was pushed
        merged = pair[0] + pair[1]
        merges.append(pair)
        vocab.setdefault(merged, reserved + len(vocab))
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            word, f = words[i], freqs[i]
            for old in zip(word, word[1:]):
                pair_counts[old] -= f
                touched.add(old)
            new, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == pair:
                    new.append(merged)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            words[i] = new
            for fresh in zip(new, new[1:]):
                pair_counts[fresh] += f
                where[fresh].add(i)
                touched.add(fresh)
        for changed in touched:
            if pair_counts[changed] > 0 and changed != pair:
                heapq.heappush(heap, (-pair_counts[changed], changed))
        pair_counts.pop(pair, None)
    return vocab, merges


def train_bpe(texts: Iterable[str], vocab_size: int, context_length: int) -> PreTrainedTokenizerFast:
    """A CLIP-style BPE learned from `texts`, deterministic for the same texts."""
    pipeline = _pipeline()
    counts: collections.Counter = collections.Counter()
    for text in texts:
        normal = pipeline.normalizer.normalize_str(text)
        counts.update(word for word, _ in pipeline.pre_tokenizer.pre_tokenize_str(normal))
    specials = [BOS, EOS, UNK]
    vocab, merges = learn_merges(counts, vocab_size, len(specials))
    vocab.update({token: i for i, token in enumerate(specials)})
    tokenizer = _pipeline()
    tokenizer.model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, end_of_word_suffix="</w>")
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return wrap(tokenizer, context_length)


def wrap(tokenizer: Tokenizer, context_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=UNK, model_max_length=context_length, padding_side="right")


def load_tokenizer(name_or_path: str | Path, context_length: int | None = None) -> PreTrainedTokenizerBase:
    """An existing tokenizer (a saved model directory or a hub id available offline)."""
    kwargs = {"padding_side": "right"}
    if context_length:
        kwargs["model_max_length"] = context_length
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except OSError as exc:
        raise OSError(f"no tokenizer at {name_or_path}: it is neither a folder holding a saved tokenizer nor a "
                      f"hub id available offline ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _check_end_token(tokenizer, name_or_path)
    return tokenizer


def _check_end_token(tokenizer: PreTrainedTokenizerBase, name: str | Path) -> None:
    """The text tower pools at the end token, so a tokenizer must have one, append it, and not give it id 2:
    transformers' CLIP text model then keeps its legacy rule, pooling at the highest token id, and a
    RoBERTa- or BART-style tokenizer (`</s>` = 2) trained a tower that ignored every token after that one."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer at {name} has no end token: the text tower pools there")
    if eos == 2:
        raise ValueError(f"the tokenizer at {name} gives its end token id 2, for which transformers' CLIP text "
                         f"model pools at the highest token id instead (its legacy rule): use a tokenizer whose "
                         f"end token has another id")
    if tokenizer("a", add_special_tokens=True)["input_ids"][-1] != eos:
        raise ValueError(f"the tokenizer at {name} does not end a text with its end token "
                         f"{tokenizer.eos_token!r}: the text tower pools there")


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], context_length: int) -> tuple[dict, int]:
    """Padded input_ids/attention_mask tensors and how many texts were cut to fit the context.

    A cut text keeps its end token as the last position: the text tower pools there.
    """
    rows = tokenizer(texts, add_special_tokens=True)["input_ids"]
    ids = torch.full((len(rows), context_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), context_length), dtype=torch.long)
    truncated = 0
    for i, row in enumerate(rows):
        if len(row) > context_length:
            row = row[: context_length - 1] + [tokenizer.eos_token_id]
            truncated += 1
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}, truncated
