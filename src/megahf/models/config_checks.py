"""Checks and derived sizes shared by the Megatron GPT and BERT configs: one place for each rule."""

from __future__ import annotations

import math

RECOMPUTE_GRANULARITIES = (None, "selective")


class MegatronConfigMixin:
    """Mixed into a `PreTrainedConfig` that has `vocab_size`, `hidden_size`, `num_attention_heads`,
    `num_query_groups`, `ffn_hidden_size` and `make_vocab_size_divisible_by`."""

    def fail(self, key: str, fix: str):
        raise ValueError(f"{type(self).__name__}: {key}={getattr(self, key)!r} is invalid: {fix}")

    def check_positive_ints(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.fail(key, "it must be a positive integer.")

    def check_common(self) -> None:
        """The rules every Megatron transformer shares: positive sizes, heads dividing the width, dropouts in [0, 1)."""
        self.check_positive_ints("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                                 "num_query_groups", "ffn_hidden_size", "max_position_embeddings",
                                 "make_vocab_size_divisible_by")
        if self.hidden_size % self.num_attention_heads:
            self.fail("hidden_size", f"it must be divisible by num_attention_heads={self.num_attention_heads}.")
        if self.num_attention_heads % self.num_query_groups:
            self.fail("num_attention_heads", f"it must be divisible by num_query_groups={self.num_query_groups}.")
        for key in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                self.fail(key, "a dropout probability must lie in [0, 1).")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            self.fail("recompute_granularity", "use None or 'selective' (the attention core); recomputing whole "
                      "layers is transformers' model.activation_checkpointing_enable().")
        if not self.init_method_std > 0:
            self.fail("init_method_std", "it must be positive.")
        if not isinstance(self.loss_chunk_size, int) or isinstance(self.loss_chunk_size, bool) or \
                self.loss_chunk_size < 0:
            self.fail("loss_chunk_size", "it must be a number of tokens >= 0 (0: the plain loss).")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and of the output layer: `vocab_size` rounded up as Megatron pads it."""
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Refuse, before anything is allocated, a tensor-parallel size that does not divide the model."""
        for key, value in (("num_attention_heads", self.num_attention_heads),
                           ("num_query_groups", self.num_query_groups),
                           ("ffn_hidden_size", self.ffn_hidden_size),
                           ("padded_vocab_size", self.padded_vocab_size)):
            if value % tp_size:
                fix = ("raise make_vocab_size_divisible_by to a multiple of the TP size"
                       if key == "padded_vocab_size" else "pick a TP size that divides it")
                raise ValueError(f"{key}={value} is not divisible by tp_size={tp_size}: {fix}.")
