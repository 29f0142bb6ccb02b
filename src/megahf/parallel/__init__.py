"""Parallelism that the model files declare but do not implement: the vocabulary-parallel loss and the
distributed set-up helpers."""

from .vocab_parallel import (
    VOCAB_PARALLEL_OUTPUT,
    causal_lm_loss,
    gather_vocab_logits,
    token_cross_entropy,
    vocab_parallel_cross_entropy,
)

__all__ = ["VOCAB_PARALLEL_OUTPUT", "causal_lm_loss", "gather_vocab_logits", "token_cross_entropy",
           "vocab_parallel_cross_entropy"]
from .distribute import distribute_model  # noqa: E402

__all__ += ["distribute_model"]
from .clip import clip_grad_norm_  # noqa: E402

__all__ += ["clip_grad_norm_"]
