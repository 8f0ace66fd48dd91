"""A named tokenizer the text tower cannot pool with is refused when it loads (training.tokenizer)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from training.tokenizer import load_tokenizer, train_bpe


def _saved(path, eos_id: int, appends_eos: bool = True):
    names = ["<s>", "<pad>", "</s>"] if eos_id == 2 else ["<s>", "</s>", "<pad>"]
    vocab = {name: i for i, name in enumerate(names + ["a", "red", "circle", "<unk>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if appends_eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return path


def test_an_end_token_of_id_2_or_one_never_appended_is_refused(tmp_path):
    """With eos id 2, transformers' CLIP text model pools at the highest token id (its legacy rule): a
    RoBERTa-style tokenizer trained a tower that ignored every token after that one, without a word."""
    with pytest.raises(ValueError, match=r"gives its end token id 2, for which transformers' CLIP text model"):
        load_tokenizer(_saved(tmp_path / "roberta_like", eos_id=2))
    with pytest.raises(ValueError, match=r"does not end a text with its end token '</s>'"):
        load_tokenizer(_saved(tmp_path / "no_eos", eos_id=1, appends_eos=False))
    assert load_tokenizer(_saved(tmp_path / "fine", eos_id=1)).eos_token_id == 1
    train_bpe(["a red circle", "two blue squares"] * 20, 300, 16).save_pretrained(tmp_path / "bpe")
    assert load_tokenizer(tmp_path / "bpe", 16).eos_token_id == 1  # the trainer's own BPE
