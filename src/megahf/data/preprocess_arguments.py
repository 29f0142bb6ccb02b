"""The options of `megahf preprocess`, apart from the implementation so that `megahf --help` and argument errors
need neither transformers nor datasets."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("auto", "uint8", "int16", "uint16", "int32", "int64")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `megahf preprocess`'s options to `parser`."""
    parser.description = parser.description or "Tokenize a corpus into Megatron .bin/.idx files."
    g = parser.add_argument_group("input")
    g.add_argument("--input", required=True, help="a .jsonl/.json/.parquet/.txt file, a folder, or a cached Hugging Face dataset name")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="keys (columns) holding the text (default: text)")
    g.add_argument("--split", default="train", help="split of a Hugging Face dataset or folder (default: train)")
    g.add_argument("--subset", default=None, help="configuration (subset) name of a Hugging Face dataset")
    g = parser.add_argument_group("tokenization")
    g.add_argument(
        "--tokenizer", required=True,
        help="'gpt2' (or 'embedded') or 'bert-uncased' for a tokenizer shipped with megahf, else a path or cached "
             "name for AutoTokenizer",
    )
    g.add_argument("--append-eod", action="store_true", help="append the eos token id to the end of each document")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (rule-based splitter, no nltk)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="token dtype (auto: uint16 if vocab < 65500, else int32)")
    g = parser.add_argument_group("output and runtime")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1: in-process)")
    g.add_argument("--log-interval", type=int, default=10000, help="print progress every N documents (0: never; default 10000)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


__all__ = ["DTYPE_CHOICES", "add_arguments"]
