"""BERT pretraining data: Megatron's masked-LM + sentence-order samples (`BertDataset`) for a run.

From indexed data written with sentence splitting (`data_path`, Megatron's `--data-path`), or from a text corpus
(the shipped Shakespeare by default) that is first preprocessed into such data under `cache_dir`: split into
sentences, tokenized with the run's WordPiece tokenizer, written atomically and reused by later runs. Documents are
divided into train / valid / test by `split` as Megatron does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..atomic import publish_folder, temporary_name
from ..parallel.ranks import barrier, is_local_rank_zero
from ..recipe.errors import RecipeError
from .bert_dataset import BertDataset, BertDatasetConfig, BertDatasetError
from .gpt_dataset import split_ranges
from .indexed_dataset import IndexedDataset
from .preprocess import output_prefix_for, preprocess_corpus
from .train_valid import TrainValidDatasets

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label")


def _corpus_prefix(corpus: str, text_key: str, tokenizer, cache_dir: Path) -> str:
    """Sentence-split indexed data of `corpus` for `tokenizer`, built once under `cache_dir` (keyed by the corpus
    file, its size and time, and the tokenizer's vocabulary, so that a changed input is rebuilt)."""
    stat = Path(corpus).stat()
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    key = hashlib.md5(
        f"{Path(corpus).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{text_key}|{vocab}".encode()
    ).hexdigest()[:12]
    prefix = cache_dir / f"{Path(corpus).stem}-{key}"
    indexed = output_prefix_for(str(prefix), text_key, split_sentences=True)
    # One process per machine builds it (the others wait at the barrier); every file is written under a temporary
    # name and renamed, so machines sharing a file system may race harmlessly.
    if not Path(indexed + ".idx").exists() and is_local_rank_zero():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_dir = cache_dir / f"tokenizer-{key}"
        if not tokenizer_dir.exists():
            partial = temporary_name(tokenizer_dir)
            tokenizer.save_pretrained(partial)
            publish_folder(partial, tokenizer_dir, replace=False)  # keeps an identical copy another machine made
        preprocess_corpus(corpus, str(prefix), tokenizer=str(tokenizer_dir), json_keys=(text_key,),
                          split_sentences=True, progress=False)
    barrier()
    return indexed


def build_bert_data(
    *,
    tokenizer,
    seq_length: int,
    seed: int,
    split: str,
    train_samples: int,
    valid_samples: int,
    cache_dir: str | Path,
    indexed_prefixes: list[str] | None = None,
    corpus: str = "",
    text_key: str = "text",
    sentence_order_prediction: bool = True,
    masking_probability: float = 0.15,
    short_sequence_probability: float = 0.1,
) -> TrainValidDatasets:
    """Train and valid `BertDataset`s with at least the samples asked (whole passes over the documents), from one
    indexed dataset written with sentence splitting (`indexed_prefixes`), or else from `corpus`, preprocessed into
    one under `cache_dir`."""
    for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise RecipeError(f"the tokenizer has no {name.removesuffix('_token_id')} token, which BERT samples need "
                              "([CLS] A [SEP] B [SEP], [MASK], [PAD]): use tokenizer: bert-uncased-embedded or "
                              "another WordPiece tokenizer")
    if indexed_prefixes:
        if len(indexed_prefixes) != 1:
            raise RecipeError(f"recipe key data_path={' '.join(indexed_prefixes)!r}: BERT pretraining reads one "
                              "indexed dataset (blending is implemented for GPT data only)")
        prefix = source = indexed_prefixes[0]
    else:
        prefix, source = _corpus_prefix(corpus, text_key, tokenizer, Path(cache_dir)), corpus
    try:
        indexed = IndexedDataset(prefix)
        config = BertDatasetConfig.from_tokenizer(
            tokenizer, seq_length, seed=seed, split=split, path_to_cache=str(Path(cache_dir)),
            sentence_order_prediction=sentence_order_prediction, masking_probability=masking_probability,
            short_sequence_probability=short_sequence_probability,
        )
        ranges = split_ranges(indexed.num_documents, split)
        train = BertDataset(indexed, ranges[0] or range(0), train_samples, config, "train")
        valid = BertDataset(indexed, ranges[1] or range(0), valid_samples, config, "valid")
    except BertDatasetError as error:
        raise RecipeError(f"BERT data from {source!r}: {error}") from None
    return TrainValidDatasets(
        train=train, valid=valid, collate=collate_bert,
        description=f"{source} ({indexed.num_documents} documents, {len(indexed)} sentences, split {split}): "
                    f"{len(train):,} train / {len(valid):,} valid samples",
    )


def collate_bert(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack BERT samples into the inputs of `MegatronBertForPreTraining` (the dataset's `loss_mask` is the same
    information as labels != -100 and is left out)."""
    keys = [k for k in BATCH_KEYS if k in examples[0]]
    return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in keys}


__all__ = ["build_bert_data", "collate_bert"]
