"""Which model a run builds: a preset and the config fields that replace the preset's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models.presets import PRESETS
from .errors import RecipeError, did_you_mean, need_at_least
from .help import arg

PRESET_NAMES = tuple(name for family in PRESETS.values() for name in family)


@dataclass
class ModelRecipe:
    model: str = arg("Model preset: gpt-tiny, gpt-345m, ..., llama-tiny, llama-1b, llama-8b (MegatronGPT), or "
                     "bert-tiny, bert-336m, bert-1.3b, bert-3.9b (MegatronBert: masked LM + sentence order).",
                     default="gpt-tiny")
    model_overrides: dict[str, Any] = arg(
        "MegatronGPTConfig / MegatronBertConfig fields that replace the preset's, e.g. {num_layers: 2}.",
        default_factory=dict,
    )
    activation_checkpointing: bool = arg("Recompute activations in the backward pass to save memory.",
                                         default=False)
    loss_chunk_size: int = arg(
        "GPT: in training, compute the output layer and the loss this many tokens at a time, never holding the "
        "[tokens, vocabulary] logits (the same loss and gradients; 0: the plain output layer and loss). BERT's "
        "masked-LM loss ignores it.", default=1024)
    compile: bool = arg("torch.compile each transformer layer (the unit FSDP2 and activation checkpointing wrap): "
                        "one process, DDP, FSDP2 and tensor parallelism.", default=False)

    def validate(self) -> None:
        need_at_least(self, 0, "loss_chunk_size")
        # The override fields are checked against the config class where the config is built (megahf.training.setup).
        if self.model not in PRESET_NAMES:
            raise RecipeError(
                f"unknown model preset model={self.model!r}{did_you_mean(self.model, PRESET_NAMES)} "
                f"(known presets: {', '.join(PRESET_NAMES)})"
            )


__all__ = ["PRESET_NAMES", "ModelRecipe"]
