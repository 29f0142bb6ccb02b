"""Which tokenizer a tokenized dataset was made with, recorded beside it, so that a run with another tokenizer is
refused before it computes anything.

Megatron's `.bin`/`.idx` hold token ids and nothing about the tokenizer that made them. A run whose tokenizer is not
the data's trains on the wrong text without any error whenever the data's ids fit the model's vocabulary (GPT-2 ids
under a Llama tokenizer, a cased vocabulary under an uncased one). `megahf preprocess` therefore writes, next to
`PREFIX.bin` and `PREFIX.idx`:

    PREFIX.tokenizer_identity.json   {"megahf_tokenizer_record": 1, "tokenizer": {"name", "class", "vocab_size",
                                      "vocab_sha256"}}

A tokenizer's identity is its vocabulary: every token with its id, added tokens included, hashed (`vocab_sha256`);
two tokenizers with the same identity turn text into the same ids for all practical purposes, wherever their files
lie. Data written before the record existed (or by Megatron's own tool) has none: a run warns that it cannot check it
and goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..atomic import atomic_write_json
from ..errors import MegahfError

RECORD_SUFFIX = ".tokenizer_identity.json"
RECORD_VERSION = 1


def tokenizer_identity(tokenizer: Any, name: str) -> dict[str, Any]:
    """The identity of a transformers tokenizer (`name`: how the user named it, shown in messages only)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"name": str(name), "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "vocab_sha256": digest}


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["vocab_sha256"] == b["vocab_sha256"]


def describe(identity: dict[str, Any]) -> str:
    digest = identity["vocab_sha256"][:12]
    return f"{identity['name']!r} ({identity['vocab_size']:,} tokens, vocabulary sha256 {digest})"


def record_path(prefix: str) -> str:
    return prefix + RECORD_SUFFIX


def write_tokenizer_record(prefix: str, identity: dict[str, Any]) -> None:
    """Record (atomically) the tokenizer the dataset `prefix` was tokenized with."""
    atomic_write_json(record_path(prefix), {"megahf_tokenizer_record": RECORD_VERSION, "tokenizer": identity}, indent=2)


def remove_tokenizer_record(prefix: str) -> None:
    """Drop a previous record before its dataset is replaced (a crash in between leaves data without a record, which
    is warned about, never a record of other data)."""
    try:
        os.remove(record_path(prefix))
    except FileNotFoundError:
        pass


class TokenizerRecordError(MegahfError, ValueError):
    """A record that cannot be read (the message names the file)."""


def read_tokenizer_record(prefix: str) -> dict[str, Any] | None:
    """The recorded identity of the dataset `prefix`'s tokenizer, or None when the dataset has no record."""
    path = record_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        identity = record["tokenizer"]
        if not isinstance(identity.get("vocab_sha256"), str) or not isinstance(identity.get("vocab_size"), int):
            raise TypeError("vocab_sha256 or vocab_size missing")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise TokenizerRecordError(f"{path} is not a megahf tokenizer record ({error}); remove it, or run megahf "
                                   "preprocess again to write it") from None
    return identity


__all__ = ["RECORD_SUFFIX", "TokenizerRecordError", "describe", "read_tokenizer_record", "record_path",
           "remove_tokenizer_record", "same_tokenizer", "tokenizer_identity", "write_tokenizer_record"]
