"""Tokenizing documents as `megahf preprocess` stores them: the tokenizer (`load_tokenizer`), the choices that change
the tokens (`TokenizeSettings`: end-of-document token, sentence splitting, dtype), and documents -> token arrays
(`encode_documents` for many at once, `tokenize_document` for one; the same code).

Text is encoded with `add_special_tokens=False`. A document is its text (one sequence), its sentences
(`split_sentences`, one sequence each) or a list of strings (taken as its sentences, as Megatron does). Sequences with
no tokens are dropped, as Megatron does, and a document left with none is skipped (counted as empty). With
`append_eod`, the eos id (the sep id when the tokenizer has none, as BERT) ends each document's last sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from transformers import AutoTokenizer

from ..assets import embedded_tokenizer_path
from .indexed_dataset import best_dtype
from .preprocess_arguments import DTYPE_CHOICES
from .preprocess_errors import PreprocessError
from .sentence_splitter import split_sentences

#: `--tokenizer` values that mean a tokenizer shipped in `megahf/assets` (GPT-2 BPE, BERT uncased WordPiece).
EMBEDDED_TOKENIZER_NAMES = ("gpt2", "embedded", "bert-uncased")

#: A key's documents as token arrays: tokens (flat), sequence lengths, sequences per kept document, empty documents.
Encoded = Tuple[np.ndarray, np.ndarray, np.ndarray, int]


def load_tokenizer(name_or_path: str):
    """`gpt2`/`embedded` -> the shipped GPT-2 tokenizer, `bert-uncased` -> the shipped BERT WordPiece;
    else `AutoTokenizer.from_pretrained`."""
    path = embedded_tokenizer_path(name_or_path) or name_or_path
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, HFValidationError ...
        raise PreprocessError(
            f"could not load the tokenizer {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"give a local folder with the tokenizer files, a Hub name already in the local cache (megahf runs "
            f"offline), or one of the tokenizers shipped with megahf: {' / '.join(EMBEDDED_TOKENIZER_NAMES)}"
        ) from e


def eod_token_id(tok: Any, name: str) -> int:
    """The id that ends a document: the tokenizer's eos, else its sep."""
    for attr in ("eos_token_id", "sep_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    raise PreprocessError(
        f"--append-eod: the tokenizer {name!r} has neither an eos nor a sep token; drop --append-eod "
        f"or use a tokenizer that defines one"
    )


def token_dtype(dtype: Optional[str], vocab: int, name: str) -> np.dtype:
    """The dtype tokens are stored in: `auto` is Megatron's rule (`best_dtype`), else the one asked for if every id
    of the vocabulary fits it."""
    if dtype in (None, "auto"):
        return best_dtype(vocab)
    if dtype not in DTYPE_CHOICES:
        raise PreprocessError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    dt = np.dtype(dtype)
    if vocab - 1 > np.iinfo(dt).max:
        raise PreprocessError(
            f"the tokenizer {name!r} has {vocab:,} ids (0..{vocab - 1:,}), which do not fit --dtype {dt} "
            f"(at most {np.iinfo(dt).max:,}); use --dtype auto ({best_dtype(vocab)}) or a wider dtype"
        )
    return dt


@dataclass(frozen=True)
class TokenizeSettings:
    """What changes the tokens of a document besides the tokenizer (`tokenize_settings` resolves them)."""

    append_eod: bool = False
    eod_id: Optional[int] = None
    split_sentences: bool = False
    dtype: str = "int32"


def tokenize_settings(tokenizer: Any, name: str, append_eod: bool = False, split_sentences: bool = False,
                      dtype: Optional[str] = "auto") -> TokenizeSettings:
    """The settings for `tokenizer` (called `name` in messages): the dtype checked against its vocabulary, then its
    end-of-document id when `append_eod`."""
    dt = token_dtype(dtype, len(tokenizer), name)
    eod = eod_token_id(tokenizer, name) if append_eod else None
    return TokenizeSettings(append_eod, eod, split_sentences, dt.name)


def document_texts(value: Any, key: str, loc: str, split: bool) -> List[str]:
    """The texts to tokenize for one document: the whole text, its sentences, or a given list."""
    if isinstance(value, str):
        return split_sentences(value) if split else [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise PreprocessError(
        f"{loc}: the value of {key!r} is {type(value).__name__ if value is not None else 'null'}, "
        f"expected a string (or a list of strings, taken as sentences)"
    )


def encode_texts(tok: Any, texts: List[str]) -> List[List[int]]:
    """`tok(texts, add_special_tokens=False)["input_ids"]`, the same ids, with less work for a Rust ("fast")
    tokenizer: its `encode_batch_fast` skips the character offsets, which preprocessing never reads. The backend is
    first set as `tok(...)` would set it (no truncation, no padding, the tokenizer's `split_special_tokens`); a Python
    tokenizer is simply called."""
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tok, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def encode_documents(values: Sequence[Any], locations: Sequence[str], key: str, tok: Any, settings: TokenizeSettings,
                     description: str) -> Encoded:
    """Key `key`'s value of many documents -> token arrays, in one call of the tokenizer (the Rust tokenizer spreads
    a batch over its threads). `locations` name the documents and `description` their input in messages."""
    dtype = np.dtype(settings.dtype)
    n_docs = len(locations)
    if not settings.split_sentences and all(type(v) is str for v in values):
        texts: List[str] = list(values)  # the common case, one sequence per document: no loop over documents
        per_doc_pieces = np.ones(n_docs, dtype=np.int64)
    else:
        texts = []
        per_doc_pieces = np.zeros(n_docs, dtype=np.int64)
        for d, (value, loc) in enumerate(zip(values, locations)):
            pieces = document_texts(value, key, loc, settings.split_sentences)
            texts.extend(pieces)
            per_doc_pieces[d] = len(pieces)
    ids = encode_texts(tok, texts) if texts else []
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    # Sequences with no tokens are dropped (as Megatron does); documents left with none are skipped.
    keep = lens > 0
    doc_of_piece = np.repeat(np.arange(n_docs), per_doc_pieces)
    lens = lens[keep]
    seqs_per_doc = np.bincount(doc_of_piece[keep], minlength=n_docs)
    nonempty = seqs_per_doc > 0
    if settings.append_eod and lens.size:
        last = np.cumsum(seqs_per_doc)[nonempty] - 1  # each document's last sequence
        flat = np.insert(flat, np.cumsum(lens)[last], settings.eod_id)
        lens[last] += 1
    if flat.size and dtype.kind in "iu":
        hi, lo = int(flat.max()), int(flat.min())
        info = np.iinfo(dtype)
        if hi > info.max or lo < info.min:
            bad = hi if hi > info.max else lo
            raise PreprocessError(
                f"{description}: token id {bad} (key {key!r}) does not fit dtype {dtype} "
                f"(range {info.min}..{info.max}); rerun with --dtype int32"
            )
    return (
        flat.astype(dtype),
        lens.astype(np.int32),
        seqs_per_doc[nonempty].astype(np.int64),
        int(n_docs - int(nonempty.sum())),
    )


def tokenize_document(value: Any, tok: Any, settings: TokenizeSettings, key: str = "text",
                      location: str = "document") -> Tuple[np.ndarray, np.ndarray]:
    """One document -> (its tokens, the length of each of its sequences), as `megahf preprocess` writes it (an
    `IndexedDatasetBuilder.add_document(tokens, lengths)`); no sequence (lengths empty) for a document without
    tokens, which preprocess skips."""
    tokens, lengths, _, _ = encode_documents([value], [location], key, tok, settings, location)
    return tokens, lengths


__all__ = ["EMBEDDED_TOKENIZER_NAMES", "Encoded", "TokenizeSettings", "document_texts", "encode_documents",
           "encode_texts", "eod_token_id", "load_tokenizer", "token_dtype", "tokenize_document", "tokenize_settings"]
