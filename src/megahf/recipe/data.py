"""Where a run's samples come from: a text corpus or Megatron indexed data, the tokenizer, the sample shape."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.blended_dataset import parse_blend
from ..data.token_files import find_token_data
from .errors import RecipeError, need, need_at_least, need_finite
from .help import arg

EMBEDDED_TOKENIZER = "gpt2-embedded"
EMBEDDED_BERT_TOKENIZER = "bert-uncased-embedded"
GPT2_TOKENIZER_NAMES = (EMBEDDED_TOKENIZER, "gpt2", "embedded")
EMBEDDED_CORPUS = "embedded"
CORPUS_EXTENSIONS = (".jsonl", ".json", ".txt", ".parquet")


@dataclass
class DataRecipe:
    tokenizer: str = arg(
        f"'{EMBEDDED_TOKENIZER}' (GPT-2 BPE shipped with megahf), '{EMBEDDED_BERT_TOKENIZER}' (BERT WordPiece "
        "shipped with megahf), or a folder/name for AutoTokenizer.",
        default=EMBEDDED_TOKENIZER,
    )
    corpus: str = arg(
        f"'{EMBEDDED_CORPUS}' (Shakespeare scenes shipped with megahf), or a local "
        f"{'/'.join(CORPUS_EXTENSIONS)} file (.txt: documents separated by blank lines).",
        default=EMBEDDED_CORPUS,
    )
    text_key: str = arg("Field holding each document's text in a .jsonl/.json/.parquet corpus.", default="text")
    data_path: str = arg(
        "Megatron indexed data instead of `corpus` (Megatron's --data-path): one prefix written by "
        "`megahf preprocess` (e.g. data/my_text_document), or weights and prefixes to blend ('30 data/a 70 data/b'); "
        "a prefix may also be a .ds file of datatrove's DocumentTokenizer or the folder of one datatrove tokenizer "
        "run.",
        default="",
    )
    split: str = arg("Train/valid/test shares of the documents of each data_path file (Megatron's --split).",
                     default="969,30,1")
    data_cache_path: str = arg("Folder for the sample-index cache of data_path (default: beside the data).",
                               default="")
    mask_prob: float = arg("BERT: share of the tokens masked for the masked LM (Megatron's --mask-prob).",
                           default=0.15)
    short_seq_prob: float = arg("BERT: chance of a shorter sample (Megatron's --short-seq-prob).", default=0.1)
    valid_fraction: float = arg("Fraction of the documents held out for validation (0 < f < 1).", default=0.05)
    seq_length: int = arg("Tokens per training sample (documents are packed, EOD-separated).", default=128)
    num_workers: int = arg("DataLoader worker processes.", default=0)

    @property
    def indexed_prefixes(self) -> list[str]:
        """The indexed-dataset prefixes named by data_path (weights dropped); [] when the corpus is used."""
        return parse_blend(self.data_path.split())[0] if self.data_path.strip() else []

    def validate(self) -> None:
        need_finite(self)
        need_at_least(self, 1, "seq_length")
        need_at_least(self, 0, "num_workers")
        need(self, 0.0 < self.mask_prob < 1.0, "mask_prob", "it must lie strictly between 0 and 1, e.g. 0.15")
        need(self, 0.0 <= self.short_seq_prob <= 1.0, "short_seq_prob", "it must lie in [0, 1], e.g. 0.1")
        need(self, 0.0 < self.valid_fraction < 1.0, "valid_fraction",
             "it must lie strictly between 0 and 1, e.g. 0.05")
        need(self, self.text_key != "", "text_key", "name the field that holds each document's text, e.g. text")
        for prefix in self.indexed_prefixes:
            if find_token_data(prefix) is None:
                raise RecipeError(
                    f"recipe key data_path={self.data_path!r}: {prefix}.bin/.idx not found; give the prefix that "
                    "`megahf preprocess --output-prefix P` wrote, P_text_document (or a .ds file of datatrove's "
                    "DocumentTokenizer, or the folder of one datatrove tokenizer run)"
                )
        if self.corpus != EMBEDDED_CORPUS:
            if not os.path.isfile(self.corpus):
                raise RecipeError(
                    f"recipe key corpus={self.corpus!r}: no such file; give a local "
                    f"{'/'.join(CORPUS_EXTENSIONS)} file or '{EMBEDDED_CORPUS}' for the shipped corpus"
                )
            if not self.corpus.endswith(CORPUS_EXTENSIONS):
                raise RecipeError(
                    f"recipe key corpus={self.corpus!r}: unsupported file type; use a "
                    f"{'/'.join(CORPUS_EXTENSIONS)} file"
                )
        if self.tokenizer != EMBEDDED_TOKENIZER and self.tokenizer.startswith((".", "/")) and not os.path.isdir(
            self.tokenizer
        ):
            raise RecipeError(
                f"recipe key tokenizer={self.tokenizer!r}: no such folder; give a tokenizer folder or "
                f"'{EMBEDDED_TOKENIZER}' for the shipped GPT-2 tokenizer"
            )


__all__ = ["CORPUS_EXTENSIONS", "DataRecipe", "EMBEDDED_BERT_TOKENIZER", "EMBEDDED_CORPUS", "EMBEDDED_TOKENIZER",
           "GPT2_TOKENIZER_NAMES"]
