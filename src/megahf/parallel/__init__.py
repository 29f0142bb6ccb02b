"""Parallelism that the model files declare but do not implement: the vocabulary-parallel loss, tying under FSDP2,
sharding a randomly initialised model, clipping across meshes. Importing it attaches megahf's distribution hooks to
the model classes (`model_hooks.py`)."""

from ..models.bert.modeling_megatron_bert import MegatronBertPreTrainedModel
from ..models.gpt.modeling_megatron_gpt import MegatronGPTPreTrainedModel
from .clip import clip_grad_norm_
from .distribute import distribute_model
from .model_hooks import attach_parallel_hooks
from .vocab_parallel import (
    VOCAB_PARALLEL_OUTPUT,
    vocab_parallel_causal_lm_loss,
    vocab_parallel_cross_entropy,
    vocab_parallel_masked_lm_loss,
)

for _base in (MegatronGPTPreTrainedModel, MegatronBertPreTrainedModel):
    attach_parallel_hooks(_base)

__all__ = ["VOCAB_PARALLEL_OUTPUT", "clip_grad_norm_", "distribute_model", "vocab_parallel_causal_lm_loss",
           "vocab_parallel_cross_entropy", "vocab_parallel_masked_lm_loss"]
