"""`encode_texts`, the fast path preprocessing tokenizes with, gives exactly the ids of calling the tokenizer
(`tok(texts, add_special_tokens=False)`), whatever state the tokenizer's Rust backend was left in."""

import pytest

from megahf.data.document_tokenizer import encode_texts, load_tokenizer

TEXTS = ["Hello world. This is megahf.", "", " caf\u00e9 \u2014 \u65e5\u672c\u8a9e!\n\n  spaces  ",
         "an <|endoftext|> and a [SEP] [CLS] inside the text", " x" * 1000, "Mr. Smith went to Washington."]


def _called(tok, texts):
    return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


@pytest.mark.parametrize("name", ["gpt2", "bert-uncased"])
def test_the_same_ids_as_calling_the_tokenizer(name):
    tok = load_tokenizer(name)
    ids = encode_texts(tok, TEXTS)
    assert ids == _called(tok, TEXTS)
    assert any(len(x) > 512 for x in ids)  # longer than either model's maximum: nothing was cut


@pytest.mark.parametrize("name", ["gpt2", "bert-uncased"])
def test_a_backend_left_truncating_padding_or_splitting_special_tokens_is_reset(name):
    tok = load_tokenizer(name)
    expected = _called(tok, TEXTS)
    backend = tok.backend_tokenizer
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64, pad_id=0)
    backend.encode_special_tokens = True  # what `split_special_tokens=True` sets
    assert encode_texts(tok, TEXTS) == expected


def test_split_special_tokens_is_honoured():
    tok = load_tokenizer("gpt2")
    tok.split_special_tokens = True
    ids = encode_texts(tok, TEXTS)
    assert ids == _called(tok, TEXTS)
    assert tok.eos_token_id not in ids[3]  # "<|endoftext|>" in the text is read as characters, not the eos token
