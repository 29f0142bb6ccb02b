"""Megatron's data pipeline on numpy and Hugging Face tokenizers.

* `megahf.data.indexed_dataset`: Megatron-Core's `.bin`/`.idx` indexed dataset, read
  (`IndexedDataset`) and written (`IndexedDatasetBuilder`) byte for byte;
* `megahf.data.preprocess`: `megahf preprocess`, a corpus (jsonl, json, parquet, txt or a
  cached Hugging Face dataset) tokenized into that format, over corpus_reader (documents of a file or a byte range),
  sentence_splitter, document_tokenizer (one document to tokens), preprocess_workers (the process pool) and
  preprocess_output (the .bin/.idx pair written and published); on datatrove's executors (local, Slurm, Ray) through
  preprocess_datatrove and datatrove_steps (an optional extra: imported only for `--executor`);
* `megahf.data.token_files`: what a `data_path` entry names, opened and checked: a Megatron pair, or the token files
  of datatrove's tokenizers (`.ds`, one run's `_NNNNN_tokens` pairs);
* `megahf.data.gpt_dataset`, `megahf.data.blended_dataset`: Megatron-Core's GPTDataset and
  BlendedDataset (same samples in the same order), on index builders in numpy (`megahf.data.sample_index`);
* `megahf.data.bert_dataset`: Megatron-Core's BERT samples (masked LM + sentence order), sample for sample;
* `megahf.data.pretraining_data`: the data of a pretraining run, decided once from the recipe (`build_datasets`),
  from `text_blocks` (a corpus packed into blocks), the GPT datasets above, or `bert_pretraining_data`.

Importing this package needs numpy only (not torch, not transformers): `megahf <verb> --help` reads it.
"""

from .indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_dtype,
)

from .bert_dataset import BertDataset, BertDatasetConfig, BertDatasetError, build_bert_sample_mapping
from .blended_dataset import BlendedDataset, build_gpt_datasets, parse_blend, source_sizes
from .gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    GPTDatasetError,
    ltor_masks_and_position_ids,
    parse_split,
    split_ranges,
)
from .sample_index import build_blending_indices, build_exhaustive_blending_indices, build_sample_index

_PREPROCESS_NAMES = ("PreprocessError", "PreprocessResult", "preprocess_corpus", "split_sentences")


def __getattr__(name):
    # Imported lazily so that `python -m megahf.data.preprocess` does not import the module twice.
    # (`megahf.data.preprocess` is the submodule; the function is `preprocess_corpus`.)
    if name in _PREPROCESS_NAMES:
        import importlib

        return getattr(importlib.import_module(".preprocess", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BertDataset",
    "BertDatasetConfig",
    "BertDatasetError",
    "build_bert_sample_mapping",
    "BlendedDataset",
    "GPTDataset",
    "GPTDatasetConfig",
    "GPTDatasetError",
    "build_blending_indices",
    "build_exhaustive_blending_indices",
    "build_gpt_datasets",
    "build_sample_index",
    "ltor_masks_and_position_ids",
    "parse_blend",
    "parse_split",
    "source_sizes",
    "split_ranges",
    "DTYPE_CODES",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "PreprocessError",
    "PreprocessResult",
    "best_dtype",
    "preprocess_corpus",
    "split_sentences",
]
