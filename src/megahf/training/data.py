"""The first pretraining data path: a local text corpus -> packed blocks of `seq_length` tokens.

What Megatron's `preprocess_data.py --append-eod` followed by its GPT dataset computes, in `datasets` terms:
documents are split into train and valid by document (deterministically by seed), tokenized, each followed by the
end-of-document token, concatenated, and cut into blocks of `seq_length` tokens. The model shifts the labels
(`labels = input_ids`), so a block of n tokens gives n - 1 predictions. Attention is not reset at document
boundaries (Megatron's default). Later work replaces this with Megatron's indexed datasets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .recipe import EMBEDDED_BERT_TOKENIZER, EMBEDDED_CORPUS, EMBEDDED_TOKENIZER, PretrainRecipe, RecipeError

# Documents tokenized and packed per `datasets.map` call; the tail of each group shorter than a block is dropped.
PACK_GROUP_DOCUMENTS = 1000


@dataclass
class PackedCorpus:
    train: "datasets.Dataset"  # noqa: F821  (one `input_ids` row of seq_length tokens per block)
    valid: "datasets.Dataset"  # noqa: F821
    num_documents: int
    train_documents: int
    valid_documents: int
    train_tokens: int
    valid_tokens: int
    source: str = ""  # set for Megatron indexed data

    def describe(self) -> str:
        if self.source:
            return f"{self.source}: {len(self.train):,} train / {len(self.valid):,} valid samples"
        return (
            f"{self.num_documents} documents ({self.train_documents} train / {self.valid_documents} valid), "
            f"{self.train_tokens:,} / {self.valid_tokens:,} tokens -> "
            f"{len(self.train):,} train / {len(self.valid):,} valid blocks"
        )


def load_tokenizer(recipe: PretrainRecipe):
    """The recipe's tokenizer: one shipped with megahf (GPT-2 BPE, BERT WordPiece) by name, or
    `AutoTokenizer.from_pretrained(recipe.tokenizer)`."""
    from transformers import AutoTokenizer

    from ..assets import embedded_tokenizer_path
    from ..models.presets import preset_family

    try:
        tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_path(recipe.tokenizer) or recipe.tokenizer)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"recipe key tokenizer={recipe.tokenizer!r} cannot be loaded ({str(error).splitlines()[0]}); give a "
            f"local tokenizer folder or '{EMBEDDED_TOKENIZER}' / '{EMBEDDED_BERT_TOKENIZER}'"
        ) from None
    if preset_family(recipe.model) == "gpt" and tokenizer.eos_token_id is None:
        raise RecipeError(
            f"tokenizer={recipe.tokenizer!r} has no eos token, which marks the end of each document; "
            "use a tokenizer with an eos token"
        )
    return tokenizer


def corpus_file(recipe: PretrainRecipe) -> str:
    if recipe.corpus == EMBEDDED_CORPUS:
        from ..assets import corpus_path

        return corpus_path()
    return recipe.corpus


def load_documents(path: str, text_key: str):
    """A `datasets.Dataset` with one `text` row per non-empty document of a local .jsonl/.json/.parquet/.txt file."""
    import datasets

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


def build_corpus(recipe: PretrainRecipe, tokenizer) -> PackedCorpus:
    """Load, split, tokenize and pack the recipe's corpus; refuse a split that yields no block."""
    import datasets

    path = corpus_file(recipe)
    if not os.path.isfile(path):
        raise RecipeError(f"corpus file {path!r} not found")
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one summary line instead of a bar per step on a small corpus
    try:
        docs = load_documents(path, recipe.text_key)
        train_docs, valid_docs = split_documents(docs, recipe.valid_fraction, recipe.seed)
        train, train_tokens = tokenize_and_pack(train_docs, tokenizer, recipe.seq_length)
        valid, valid_tokens = tokenize_and_pack(valid_docs, tokenizer, recipe.seq_length)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    for name, blocks, tokens in (("train", train, train_tokens), ("valid", valid, valid_tokens)):
        if len(blocks) == 0:
            raise RecipeError(
                f"the {name} split of {path!r} has {tokens} tokens, fewer than one block of seq_length="
                f"{recipe.seq_length}; lower seq_length"
                + (", raise valid_fraction" if name == "valid" else ", lower valid_fraction")
                + " or use a bigger corpus"
            )
    return PackedCorpus(
        train=train.with_format("torch"),
        valid=valid.with_format("torch"),
        num_documents=len(docs),
        train_documents=len(train_docs),
        valid_documents=len(valid_docs),
        train_tokens=train_tokens,
        valid_tokens=valid_tokens,
    )


def build_indexed_data(recipe: PretrainRecipe, layout=None) -> PackedCorpus:
    """Megatron's data path: GPT samples of seq_length + 1 tokens from indexed datasets (blended by weight), split
    into train/valid by `recipe.split`; as many train samples as the run consumes, eval_iters batches to validate."""
    from ..data import GPTDatasetConfig, GPTDatasetError, build_gpt_datasets, parse_blend

    prefixes, weights = parse_blend(recipe.data_path.split())
    config = GPTDatasetConfig(
        seq_length=recipe.seq_length,
        seed=recipe.seed,
        split=recipe.split,
        path_to_cache=recipe.data_cache_path or None,
    )
    layout = layout or recipe.layout(1)
    train_samples = recipe.train_steps * layout.global_batch_size
    valid_samples = recipe.eval_iters * recipe.micro_batch_size * layout.data_parallel_size
    try:
        train, valid, _ = build_gpt_datasets((prefixes, weights), [train_samples, valid_samples, 0], config)
    except GPTDatasetError as error:
        raise RecipeError(f"recipe key data_path={recipe.data_path!r}: {error}") from None
    if train is None or valid is None:
        raise RecipeError(f"recipe key split={recipe.split!r} leaves no train or no valid split; e.g. '969,30,1'")
    return PackedCorpus(
        train=train,
        valid=valid,
        num_documents=0,
        train_documents=0,
        valid_documents=0,
        train_tokens=len(train) * recipe.seq_length,
        valid_tokens=len(valid) * recipe.seq_length,
        source=f"{' + '.join(prefixes)} (split {recipe.split})",
    )


def collate_samples(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Megatron samples of seq_length + 1 tokens: the model reads the first seq_length and predicts the last
    seq_length (`shift_labels`); `labels` (the inputs, as transformers has them) let Trainer count the tokens."""
    tokens = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, :-1].clone(), "shift_labels": tokens[:, 1:]}


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack blocks into a batch; the labels are the inputs (the model shifts them)."""
    input_ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


__all__ = ["PackedCorpus", "build_corpus", "build_indexed_data", "collate_blocks", "collate_samples",
           "load_documents", "load_tokenizer", "split_documents", "tokenize_and_pack"]
