"""The pretrained BERT every fine-tuning test starts from (tests/test_finetune.py, tests/distributed/), and the
accuracy they must beat."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megahf.assets import load_bert_tokenizer
from megahf.models.bert import MegatronBertConfig, MegatronBertForPreTraining


def save_tiny_pretrained_bert(folder: Path) -> Path:
    """A tiny MegatronBertForPreTraining (2 layers, hidden 64, no dropout) with the shipped tokenizer, saved as a
    pretraining run's final/ would be. Init std 1/sqrt(hidden) instead of Megatron's 0.02: at 0.02 a frozen random
    encoder gives LoRA nothing to learn from in a few dozen steps."""
    tokenizer = load_bert_tokenizer()
    config = MegatronBertConfig.from_preset("bert-tiny", num_layers=2, hidden_size=64, vocab_size=len(tokenizer),
                                            pad_token_id=tokenizer.pad_token_id, max_position_embeddings=128,
                                            hidden_dropout=0.0, attention_dropout=0.0, init_method_std=64 ** -0.5)
    torch.manual_seed(0)
    MegatronBertForPreTraining(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def above_chance(chance: float, rows: int) -> float:
    """An accuracy a model guessing at random (each row right with probability `chance`) exceeds with probability
    below 1e-4: chance plus 4 binomial standard deviations of the accuracy over `rows` dev rows (e.g. SST-2's 32 rows:
    0.5 + 4 x 0.088 = 0.85; RACE's 32 questions: 0.25 + 4 x 0.077 = 0.56)."""
    return chance + 4 * math.sqrt(chance * (1 - chance) / rows)
