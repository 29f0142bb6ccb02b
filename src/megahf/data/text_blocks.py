"""A local text corpus -> train and valid blocks of `seq_length` tokens (the data of a GPT run without `data_path`).

What Megatron's `preprocess_data.py --append-eod` followed by its GPT dataset computes, in `datasets` terms:
documents are split into train and valid by document (deterministically by seed), tokenized, each followed by the
end-of-document token, concatenated, and cut into blocks of `seq_length` tokens. The model shifts the labels
(`labels = input_ids`), so a block of n tokens gives n - 1 predictions. Attention is not reset at document
boundaries (Megatron's default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from ..assets import corpus_path
from ..recipe.data import EMBEDDED_CORPUS, DataRecipe
from ..recipe.errors import RecipeError

# Documents tokenized and packed per `datasets.map` call; the tail of each group shorter than a block is dropped.
PACK_GROUP_DOCUMENTS = 1000


@dataclass
class PackedTextBlocks:
    """Train and valid blocks of `seq_length` tokens (one `input_ids` row each), and the counts they came from."""

    train: datasets.Dataset
    valid: datasets.Dataset
    num_documents: int
    train_documents: int
    valid_documents: int
    train_tokens: int
    valid_tokens: int

    def describe(self) -> str:
        return (
            f"{self.num_documents} documents ({self.train_documents} train / {self.valid_documents} valid), "
            f"{self.train_tokens:,} / {self.valid_tokens:,} tokens -> "
            f"{len(self.train):,} train / {len(self.valid):,} valid blocks"
        )


def corpus_file(data: DataRecipe) -> str:
    """The corpus file a recipe names (`embedded`: the shipped Shakespeare)."""
    return corpus_path() if data.corpus == EMBEDDED_CORPUS else data.corpus


def load_documents(path: str, text_key: str):
    """A `datasets.Dataset` with one `text` row per non-empty document of a local .jsonl/.json/.parquet/.txt file."""
    if path.endswith(".txt"):
        # Documents are separated by blank lines (the `text` builder's paragraph mode).
        ds = datasets.load_dataset("text", data_files=path, split="train", sample_by="paragraph")
        text_key = "text"
    else:
        builder = "parquet" if path.endswith(".parquet") else "json"
        try:
            ds = datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as error:  # the builders raise assorted types for a malformed file
            raise RecipeError(
                f"corpus {path!r} cannot be read as {builder} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); it must hold one JSON object per line "
                f"(.jsonl), a JSON list of objects (.json), or a table (.parquet)"
            ) from None
    if len(ds) == 0:
        raise RecipeError(f"corpus {path!r} is empty; point the recipe key corpus at a file with documents")
    if text_key not in ds.column_names:
        raise RecipeError(
            f"corpus {path!r} has no field text_key={text_key!r}; its fields are {ds.column_names}: "
            "set text_key to the one that holds the text"
        )
    ds = ds.select_columns([text_key])
    if text_key != "text":
        ds = ds.rename_column(text_key, "text")
    if ds.features["text"].dtype not in ("string", "large_string"):
        raise RecipeError(
            f"corpus {path!r}: field text_key={text_key!r} holds {ds.features['text']}, not text; "
            "set text_key to a field of strings"
        )
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise RecipeError(f"corpus {path!r} has no non-empty {text_key!r} field; it holds no text to train on")
    return ds


def split_documents(ds, valid_fraction: float, seed: int):
    """(train, valid) by document: a seeded permutation, the first `ceil(fraction * n)` documents held out."""
    n = len(ds)
    if n < 2:
        raise RecipeError(
            f"the corpus holds {n} document; a train/valid split by document needs at least 2 "
            "(use a corpus with more documents, e.g. a .txt file with blank lines between documents)"
        )
    n_valid = min(n - 1, max(1, int(np.ceil(valid_fraction * n))))
    order = np.random.default_rng(seed).permutation(n)
    return ds.select(np.sort(order[n_valid:])), ds.select(np.sort(order[:n_valid]))


def tokenize_and_pack(ds, tokenizer, seq_length: int):
    """Tokenize (batched, fast tokenizer), append EOD after each document, concatenate, cut into blocks."""
    eod = tokenizer.eos_token_id

    def pack(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        stream = [token for doc in ids for token in (*doc, eod)]
        blocks = [stream[i : i + seq_length] for i in range(0, len(stream) - seq_length + 1, seq_length)]
        # One extra empty row carries the group's token count; it is filtered out below.
        return {"input_ids": blocks + [[]], "num_tokens": [0] * len(blocks) + [len(stream)]}

    packed = ds.map(
        pack, batched=True, batch_size=PACK_GROUP_DOCUMENTS, remove_columns=ds.column_names,
        keep_in_memory=True, desc="tokenize and pack",
    )
    num_tokens = int(sum(packed["num_tokens"]))
    packed = packed.filter(lambda batch: [len(x) > 0 for x in batch["input_ids"]], batched=True, keep_in_memory=True)
    return packed.remove_columns("num_tokens"), num_tokens


def build_text_blocks(data: DataRecipe, tokenizer, seed: int) -> PackedTextBlocks:
    """Load, split, tokenize and pack the recipe's corpus; refuse a split that yields no block."""
    path = corpus_file(data)
    if not os.path.isfile(path):
        raise RecipeError(f"corpus file {path!r} not found")
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one summary line instead of a bar per step on a small corpus
    try:
        docs = load_documents(path, data.text_key)
        train_docs, valid_docs = split_documents(docs, data.valid_fraction, seed)
        train, train_tokens = tokenize_and_pack(train_docs, tokenizer, data.seq_length)
        valid, valid_tokens = tokenize_and_pack(valid_docs, tokenizer, data.seq_length)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    for name, blocks, tokens in (("train", train, train_tokens), ("valid", valid, valid_tokens)):
        if len(blocks) == 0:
            raise RecipeError(
                f"the {name} split of {path!r} has {tokens} tokens, fewer than one block of seq_length="
                f"{data.seq_length}; lower seq_length"
                + (", raise valid_fraction" if name == "valid" else ", lower valid_fraction")
                + " or use a bigger corpus"
            )
    return PackedTextBlocks(
        train=train.with_format("torch"),
        valid=valid.with_format("torch"),
        num_documents=len(docs),
        train_documents=len(train_docs),
        valid_documents=len(valid_docs),
        train_tokens=train_tokens,
        valid_tokens=valid_tokens,
    )


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack blocks into a batch; the labels are the inputs (the model shifts them)."""
    input_ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


__all__ = ["PackedTextBlocks", "build_text_blocks", "collate_blocks", "corpus_file", "load_documents",
           "split_documents", "tokenize_and_pack"]
