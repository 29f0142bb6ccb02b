"""Configuration of Megatron's BERT: the paper's pre-LayerNorm family (336M to 3.9B) and the original post-LN order."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..config_checks import MegatronConfigMixin
from ..presets import lookup_preset

LAYERNORM_ORDERS = ("pre", "post")


class MegatronBertConfig(MegatronConfigMixin, PreTrainedConfig):
    r"""
    Configuration of [`MegatronBertModel`] and its heads. Field names follow Megatron-Core's `TransformerConfig`
    and `BertModel`; the transformers names (`num_hidden_layers`, `intermediate_size`, `initializer_range`,
    `layer_norm_eps`, `hidden_dropout_prob`, `attention_probs_dropout_prob`) are aliases of them.

    Args:
        vocab_size (`int`): the tokenizer's vocabulary (30,522 for the uncased WordPiece). The embedding holds
            `padded_vocab_size` rows (`vocab_size` rounded up to `make_vocab_size_divisible_by`); the masked-LM
            logits returned stop at `vocab_size`.
        hidden_size (`int`): width of the residual stream.
        num_layers (`int`): number of transformer layers.
        num_attention_heads (`int`): attention heads.
        ffn_hidden_size (`int`, *optional*): MLP width; `None` means `4 * hidden_size`.
        max_position_embeddings (`int`): longest sequence (learned absolute positions).
        type_vocab_size (`int`): token types (Megatron's `num_tokentypes`): segment A and segment B.
        layernorm_order (`str`): `"pre"` (Megatron: x + f(norm(x)), with a final norm; what lets BERT scale past
            336M) or `"post"` (the original BERT: norm(x + f(x)), with a norm on the embeddings), the two
            orders compared in the paper's Figure 7.
        layernorm_epsilon (`float`): epsilon of every norm.
        attention_dropout (`float`): dropout on the attention probabilities.
        hidden_dropout (`float`): dropout on the embeddings and on each block's output before the residual add.
        classifier_dropout (`float`, *optional*): dropout before the task heads; `None` means `hidden_dropout`.
        recompute_granularity (`str`, *optional*): `"selective"` recomputes the attention core (scores, softmax,
            dropout, weighted sum of the values) in the backward pass instead of keeping its activations (Megatron's
            selective recomputation); `None` keeps everything. Whole layers are recomputed by transformers'
            `model.activation_checkpointing_enable()`.
        init_method_std (`float`): standard deviation of the normal init; the output projection of each block uses
            `init_method_std / sqrt(2 * num_layers)`, as Megatron does.
        make_vocab_size_divisible_by (`int`): the embedding is padded to a multiple of this (once, not x TP: a
            checkpoint's shapes do not depend on the layout it was trained with).
        padded_vocab_softmax (`bool`): take the language-model loss's softmax over the padded vocabulary, padded
            rows included, as Megatron-LM trains. By default (`False`) the loss is the cross entropy of the returned
            logits, which stop at `vocab_size`, so that scores computed from the logits agree with the loss.
        add_binary_head (`bool`): [`MegatronBertForPreTraining`] trains the sentence-order head (Megatron's
            `--bert-binary-head`); without it pretraining is masked LM alone.
        tie_word_embeddings (`bool`): share the input embedding and the masked-LM output layer.
        loss_chunk_size (`int`): in training mode with labels, run the masked-LM head on the labeled positions
            only, its output layer and the loss this many of them at a time, and return no masked-LM logits (the
            loss and every gradient are the same). `0` (default): the head on every position, then the loss.
    """

    model_type = "megatron_bert"
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "ffn_hidden_size",
        "initializer_range": "init_method_std",
        "layer_norm_eps": "layernorm_epsilon",
        "hidden_dropout_prob": "hidden_dropout",
        "attention_probs_dropout_prob": "attention_dropout",
    }
    # Megatron's tensor parallelism as data: Q/K/V and fc1 split by columns (heads / channels), the projections after
    # them by rows, the word embeddings along the (padded) vocabulary. Positions, token types, norms, the pooler and
    # the task heads are small and replicated.
    base_model_tp_plan = {
        "embedding.word_embeddings": "embedding_rowwise",
        "encoder.layers.*.self_attention.linear_qkv": "colwise",
        "encoder.layers.*.self_attention.linear_proj": "rowwise",
        "encoder.layers.*.mlp.linear_fc1": "colwise",
        "encoder.layers.*.mlp.linear_fc2": "rowwise",
    }
    # FSDP units: the word embeddings (named themselves so that a tied output layer merges into their unit) and each
    # layer; everything else stays in the root unit.
    base_model_fsdp_plan = {
        "embedding.word_embeddings": "free_full_weight",
        "encoder.layers.*": "free_full_weight",
    }

    vocab_size: int = 30522
    hidden_size: int = 1024
    num_layers: int = 24
    num_attention_heads: int = 16
    ffn_hidden_size: int | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layernorm_order: str = "pre"
    layernorm_epsilon: float = 1e-5
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    classifier_dropout: float | None = None
    init_method_std: float = 0.02
    recompute_granularity: str | None = None
    make_vocab_size_divisible_by: int = 128
    padded_vocab_softmax: bool = False
    add_binary_head: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    loss_chunk_size: int = 0

    # Megatron's BERT: multi-head attention, GeLU MLP with biases, LayerNorm (read by the shared building blocks;
    # not fields: `check` refuses other values).
    FIXED = {"activation": "gelu", "normalization": "LayerNorm", "add_bias_linear": True}
    activation = FIXED["activation"]
    normalization = FIXED["normalization"]
    add_bias_linear = FIXED["add_bias_linear"]

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads

    @num_query_groups.setter
    def num_query_groups(self, value) -> None:
        if value != self.num_attention_heads:
            raise ValueError(f"MegatronBertConfig: num_query_groups={value!r} is invalid: Megatron's BERT uses "
                             "multi-head attention (one key/value head per query head).")

    def __post_init__(self, **kwargs):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Refuse an inconsistent architecture with a message naming the key, the value and the fix."""
        self.check_common()
        for key, value in self.FIXED.items():
            if getattr(self, key) != value:
                self.fail(key, f"Megatron's BERT uses {value!r} (MegatronGPTConfig has the Llama-style options).")
        self.check_positive_ints("type_vocab_size")
        if self.layernorm_order not in LAYERNORM_ORDERS:
            self.fail("layernorm_order", "use 'pre' (Megatron) or 'post' (original BERT).")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            self.fail("classifier_dropout", "a dropout probability must lie in [0, 1), or None for hidden_dropout.")

    @property
    def task_head_dropout(self) -> float:
        return self.hidden_dropout if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MegatronBertConfig:
        """A config with the shapes of a named model: `bert-tiny` and the paper's `bert-336m`, `bert-1.3b`,
        `bert-3.9b`. Keyword arguments override preset fields."""
        return cls(**{**lookup_preset(name, "bert"), **overrides})


__all__ = ["MegatronBertConfig"]
