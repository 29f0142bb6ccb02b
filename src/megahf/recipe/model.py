"""Which model a run builds: a preset and the config fields that replace the preset's, or a checkpoint whose
pretraining continues and the few fields continued pretraining may change."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..models.presets import PRESETS
from .errors import RecipeError, did_you_mean, need, need_at_least
from .finetune import looks_like_hub_id
from .help import arg

RECOMPUTE_MODES = ("none", "selective", "full")
PRESET_NAMES = tuple(name for family in PRESETS.values() for name in family)


@dataclass
class ModelRecipe:
    model: str = arg("Model preset: gpt-tiny, gpt-345m, ..., llama-tiny, llama-1b, llama-8b (MegatronGPT), or "
                     "bert-tiny, bert-336m, bert-1.3b, bert-3.9b (MegatronBert: masked LM + sentence order), "
                     "initialised from the seed; or a checkpoint whose pretraining continues (the weights are loaded, "
                     "the optimizer and the step start afresh, as Megatron's --finetune): a megahf model folder, a "
                     "transformers GPT-2 / Llama / BERT / MegatronBert folder, or the Hub id of one.",
                     default="gpt-tiny")
    model_overrides: dict[str, Any] = arg(
        "MegatronGPTConfig / MegatronBertConfig fields that replace the preset's, e.g. {num_layers: 2}; for a "
        "checkpoint only what continued pretraining may change: hidden_dropout, attention_dropout, and for a "
        "context extension of a RoPE model max_position_embeddings and rotary_base.",
        default_factory=dict,
    )
    recompute: str = arg("Activations recomputed in the backward pass instead of kept (Korthikanti et al. 2022): "
                         "none; selective (the attention core: scores, softmax, dropout, weighted values; a few "
                         "percent of compute for most of the attention's memory); full (every layer: only its "
                         "input is kept).", default="none")
    loss_chunk_size: int = arg(
        "In training, compute the output layer and the loss this many tokens at a time, never holding the "
        "[tokens, vocabulary] logits (the same loss and gradients; 0: the plain output layer and loss). BERT: its "
        "masked-LM head runs on the labeled positions only, then the same.", default=1024)
    compile: bool = arg("torch.compile each transformer layer (the unit FSDP2 and recompute: full wrap): "
                        "one process, DDP, FSDP2 and tensor parallelism (with or without sequence "
                        "parallelism).", default=False)

    def validate(self) -> None:
        need(self, self.recompute in RECOMPUTE_MODES, "recompute", f"use one of {', '.join(RECOMPUTE_MODES)}")
        if "recompute_granularity" in self.model_overrides:
            raise RecipeError("model_overrides.recompute_granularity is set by the recipe key recompute "
                              "(none | selective | full); remove it from model_overrides")
        need_at_least(self, 0, "loss_chunk_size")
        # The override fields are checked against the config where the config is built (megahf.training.setup).
        if not self.is_preset and not os.path.isdir(self.model) and not looks_like_hub_id(self.model):
            raise RecipeError(
                f"unknown model preset model={self.model!r}{did_you_mean(self.model, PRESET_NAMES)} "
                f"(known presets: {', '.join(PRESET_NAMES)}); nor is it a folder or a Hub id (owner/name) of a model "
                "to continue"
            )

    @property
    def is_preset(self) -> bool:
        """A preset, initialised from the seed (else a checkpoint, loaded)."""
        return self.model in PRESET_NAMES


__all__ = ["PRESET_NAMES", "RECOMPUTE_MODES", "ModelRecipe"]
