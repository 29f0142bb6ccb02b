"""The data of a pretraining run, decided in one place from the recipe:

    GPT,  data_path set   Megatron's GPT samples from indexed data, blended by weight (`build_gpt_datasets`)
    GPT,  corpus          the corpus packed into blocks of seq_length tokens (`text_blocks`)
    BERT, either          Megatron's masked-LM + sentence-order samples (`bert_pretraining_data`)

    datasets = build_datasets(recipe, tokenizer, layout, config)   # .train, .valid, .collate, .describe()
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..parallel.layout import ParallelLayout
from ..recipe import PretrainRecipe, RecipeError
from .bert_pretraining_data import build_bert_data
from .blended_dataset import build_gpt_datasets, parse_blend
from .gpt_dataset import GPTDatasetConfig, GPTDatasetError
from .indexed_dataset import IndexedDatasetError
from .text_blocks import build_text_blocks, collate_blocks, corpus_file
from .token_files import open_token_data
from .train_valid import TrainValidDatasets


def sample_counts(recipe: PretrainRecipe, layout: ParallelLayout) -> tuple[int, int]:
    """Samples the run consumes: every step's global batch for training, eval_iters batches on every data-parallel
    rank for one validation."""
    train = recipe.optim.train_steps * layout.global_batch_size
    valid = recipe.run.eval_iters * recipe.parallel.micro_batch_size * layout.data_parallel_size
    return train, valid


def build_datasets(recipe: PretrainRecipe, tokenizer, layout: ParallelLayout, config) -> TrainValidDatasets:
    """The train and valid datasets of the recipe's model family and data source, with their collator (`config`:
    the model's, which says whether BERT samples carry a sentence-order label)."""
    data = recipe.data
    train_samples, valid_samples = sample_counts(recipe, layout)
    if config.model_type == "megatron_bert":
        return build_bert_data(
            tokenizer=tokenizer, seq_length=data.seq_length, seed=recipe.run.seed, split=data.split,
            train_samples=train_samples, valid_samples=valid_samples,
            cache_dir=data.data_cache_path or Path(recipe.run.output_dir) / "data",
            indexed_prefixes=data.indexed_prefixes, corpus=corpus_file(data), text_key=data.text_key,
            sentence_order_prediction=config.add_binary_head,
            masking_probability=data.mask_prob, short_sequence_probability=data.short_seq_prob,
        )
    if data.indexed_prefixes:
        return build_gpt_indexed_data(recipe, train_samples, valid_samples, vocab_size=len(tokenizer))
    blocks = build_text_blocks(data, tokenizer, recipe.run.seed)
    return TrainValidDatasets(train=blocks.train, valid=blocks.valid, collate=collate_blocks,
                              description=blocks.describe())


def build_gpt_indexed_data(recipe: PretrainRecipe, train_samples: int, valid_samples: int,
                           vocab_size: int | None = None) -> TrainValidDatasets:
    """Megatron's GPT samples of seq_length + 1 tokens from indexed datasets (blended by weight), split into
    train/valid by `split`. Each data_path entry is opened and checked first (`open_token_data`: a Megatron pair or
    datatrove's token files), against the tokenizer's `vocab_size` when given."""
    data = recipe.data
    prefixes, weights = parse_blend(data.data_path.split())
    config = GPTDatasetConfig(seq_length=data.seq_length, seed=recipe.run.seed, split=data.split,
                              path_to_cache=data.data_cache_path or None)
    try:
        sources = [open_token_data(p, vocab_size) for p in prefixes]
        train, valid, _ = build_gpt_datasets((sources, weights), [train_samples, valid_samples, 0], config)
    except (GPTDatasetError, IndexedDatasetError) as error:
        raise RecipeError(f"recipe key data_path={data.data_path!r}: {error}") from None
    if train is None or valid is None:
        raise RecipeError(f"recipe key split={data.split!r} leaves no train or no valid split; e.g. '969,30,1'")
    return TrainValidDatasets(
        train=train, valid=valid, collate=collate_samples,
        description=f"{' + '.join(prefixes)} (split {data.split}): {len(train):,} train / {len(valid):,} valid "
                    "samples",
    )


def collate_samples(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Megatron samples of seq_length + 1 tokens: the model reads the first seq_length and predicts the last
    seq_length (`shift_labels`); `labels` (the inputs, as transformers has them) let Trainer count the tokens."""
    tokens = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    # contiguous: transformers' causal-LM loss flattens shift_labels with .view
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, :-1].clone(),
            "shift_labels": tokens[:, 1:].contiguous()}


__all__ = ["build_datasets", "build_gpt_indexed_data", "collate_samples", "sample_counts"]
