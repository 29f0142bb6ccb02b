"""The pretrained BERT every fine-tuning test starts from (tests/test_finetune.py, tests/distributed/)."""

from __future__ import annotations

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
