"""Configuration of Megatron's GPT: the paper's GPT-2 family and the Llama-style Megatron-Core variant."""

from __future__ import annotations

import copy

from transformers import PreTrainedConfig

from ..config_checks import MegatronConfigMixin
from ..presets import lookup_preset

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
# transformers' RoPE types for a Llama-style model that rotates the whole head (transformers' `proportional` type is a
# partial rotation, which megahf's attention does not do)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Spellings of the RoPE base besides `rope_parameters["rope_theta"]`: Megatron's `rotary_base` (also what megahf's
# config.json files held before `rope_parameters`) and transformers' legacy top-level `rope_theta`
ROPE_BASE_KEYS = ("rotary_base", "rope_theta")
LEGACY_ROTARY_BASE = 10000  # the `rotary_base` every GPT-2-style megahf config.json carried, although unused


class MegatronGPTConfig(MegatronConfigMixin, PreTrainedConfig):
    r"""
    Configuration of [`MegatronGPTModel`]. Field names follow Megatron-Core's `TransformerConfig`; the standard
    transformers names (`num_hidden_layers`, `num_key_value_heads`, `intermediate_size`, `initializer_range`,
    `layer_norm_eps`, `rms_norm_eps`) are aliases of them.

    Args:
        vocab_size (`int`): the tokenizer's vocabulary. The embedding holds `padded_vocab_size` rows
            (`vocab_size` rounded up to `make_vocab_size_divisible_by`); the padded rows are never generated.
        hidden_size (`int`): width of the residual stream.
        num_layers (`int`): number of transformer layers.
        num_attention_heads (`int`): query heads.
        num_query_groups (`int`, *optional*): key/value heads (grouped-query attention). `None` means multi-head
            attention and is stored as `num_attention_heads`.
        ffn_hidden_size (`int`, *optional*): MLP width; `None` means `4 * hidden_size`.
        max_position_embeddings (`int`): longest sequence (the size of the learned position table).
        position_embedding_type (`str`): `"learned_absolute"` (GPT-2) or `"rope"` (rotary).
        rope_parameters (`dict`, *optional*): RoPE as transformers defines it (`transformers.modeling_rope_utils.
            RopeParameters`, as on `LlamaConfig`): `rope_theta` (the base; Megatron's `rotary_base`, default 10000)
            and `rope_type` (`"default"`, or a scaling: `"linear"`, `"dynamic"`, `"yarn"`, `"longrope"`, `"llama3"`)
            with that type's keys (`factor`, `original_max_position_embeddings`, ...). The frequencies are computed
            by transformers' own RoPE functions. Legacy spellings are accepted and folded in: `rope_scaling`,
            `rope_theta` and Megatron's `rotary_base`. Only for `position_embedding_type="rope"`: a model with
            learned positions has none (`None`) and refuses them.
        normalization (`str`): `"LayerNorm"` or `"RMSNorm"`.
        layernorm_epsilon (`float`): epsilon of every norm.
        activation (`str`): `"gelu"` (GPT-2 MLP, exact GeLU as Megatron computes it), `"gelu_tanh"` (its tanh
            approximation: Megatron's `--openai-gelu`, OpenAI GPT-2's `gelu_new`) or `"swiglu"` (gated, Llama-style).
        add_bias_linear (`bool`): biases on every linear layer (GPT-2 style) or none (Llama style).
        tie_word_embeddings (`bool`): share the input embedding and the output layer.
        attention_dropout (`float`): dropout on the attention probabilities.
        hidden_dropout (`float`): dropout on the embeddings and on each block's output before the residual add.
        recompute_granularity (`str`, *optional*): `"selective"` recomputes the attention core (scores, softmax,
            dropout, weighted sum of the values) in the backward pass instead of keeping its activations (Megatron's
            selective recomputation); `None` keeps everything. Whole layers are recomputed by transformers'
            `model.activation_checkpointing_enable()`.
        init_method_std (`float`): standard deviation of the normal init; the output projection of each block
            (`linear_proj`, `linear_fc2`) uses `init_method_std / sqrt(2 * num_layers)`, as Megatron does.
        make_vocab_size_divisible_by (`int`): the embedding is padded to a multiple of this. Megatron multiplies it
            by the tensor-parallel size; megahf pads once, so that a checkpoint's shapes do not depend on the layout
            it was trained with (128 divides by every power-of-two TP size up to 128).
        padded_vocab_softmax (`bool`): take the language-model loss's softmax over the padded vocabulary, padded
            rows included, as Megatron-LM trains. By default (`False`) the loss is the cross entropy of the returned
            logits, which stop at `vocab_size`, so that scores computed from the logits agree with the loss.
        loss_chunk_size (`int`): in training mode with labels, compute the output layer and the loss this many
            tokens at a time, never holding the whole `[tokens, vocabulary]` logits, and return `logits=None`
            (the loss is the same). `0` (default): the plain output layer and loss.
    """

    model_type = "megatron_gpt"
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_key_value_heads": "num_query_groups",
        "intermediate_size": "ffn_hidden_size",
        "initializer_range": "init_method_std",
        "layer_norm_eps": "layernorm_epsilon",
        "rms_norm_eps": "layernorm_epsilon",
    }
    base_model_pp_plan = {
        "embedding": (["input_ids"], ["inputs_embeds"]),
        "decoder.layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "decoder.final_layernorm": (["hidden_states"], ["hidden_states"]),
    }
    # FSDP units. The word embeddings are named themselves (not their parent) so that transformers can merge a
    # tied output layer into their unit.
    base_model_fsdp_plan = {
        "embedding.word_embeddings": "free_full_weight",
        "decoder.layers.*": "free_full_weight",
        "decoder.final_layernorm": "keep_full_weight",
    }

    vocab_size: int = 50257
    hidden_size: int = 1024
    num_layers: int = 24
    num_attention_heads: int = 16
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    max_position_embeddings: int = 1024
    position_embedding_type: str = "learned_absolute"
    rope_parameters: dict | None = None
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"
    add_bias_linear: bool = True
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    init_method_std: float = 0.02
    recompute_granularity: str | None = None
    make_vocab_size_divisible_by: int = 128
    padded_vocab_softmax: bool = False
    loss_chunk_size: int = 0
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        # transformers standardizes the RoPE dict in place: never the caller's (or a preset's) dict
        self.rope_parameters = copy.deepcopy(self.rope_parameters)
        kwargs = {key: copy.deepcopy(value) if key == "rope_scaling" else value for key, value in kwargs.items()}
        rope = self.position_embedding_type == "rope"
        kwargs = self._fold_rope_base(kwargs) if rope else self._drop_rope_inputs(kwargs)
        super().__post_init__(**kwargs)  # transformers standardizes rope_parameters (legacy keys folded in)
        if not rope:
            self.rope_parameters = None
        self.check()

    def _fold_rope_base(self, kwargs: dict) -> dict:
        """Megatron's `rotary_base` (or a top-level `rope_theta`) becomes `rope_parameters["rope_theta"]`; refused
        when `rope_parameters` says otherwise (transformers would silently keep the dict's value)."""
        given = {key: kwargs.pop(key) for key in ROPE_BASE_KEYS if kwargs.get(key) is not None}
        if not given:
            return kwargs
        if len(set(given.values())) > 1:
            raise ValueError(f"{type(self).__name__}: {given} disagree: give the RoPE base once, as "
                             "rope_parameters['rope_theta'].")
        key, base = next(iter(given.items()))
        rope = self.rope_parameters or kwargs.get("rope_scaling") or {}
        if rope.get("rope_theta") not in (None, base):
            raise ValueError(f"{type(self).__name__}: {key}={base!r} conflicts with rope_parameters['rope_theta']="
                             f"{rope['rope_theta']!r}: give the RoPE base once, as rope_parameters['rope_theta'].")
        return {**kwargs, "rope_theta": base}

    def _drop_rope_inputs(self, kwargs: dict) -> dict:
        """Learned positions have no RoPE: refuse any RoPE setting (the unused `rotary_base=10000` that megahf's
        GPT-2-style config.json files carried is dropped silently)."""
        if kwargs.get("rotary_base") == LEGACY_ROTARY_BASE:
            kwargs = {key: value for key, value in kwargs.items() if key != "rotary_base"}
        for key, value in (("rope_parameters", self.rope_parameters), *kwargs.items()):
            if key in ("rope_parameters", "rope_scaling", *ROPE_BASE_KEYS) and value is not None:
                raise ValueError(f"{type(self).__name__}: {key}={value!r} is invalid: position_embedding_type="
                                 f"{self.position_embedding_type!r} (learned positions, GPT-2 style) has no RoPE; "
                                 "drop it, or set position_embedding_type='rope'.")
        return kwargs

    def check(self) -> None:
        """Refuse an inconsistent architecture with a message naming the key, the value and the fix."""
        self.check_common()
        if self.activation not in ACTIVATIONS:
            self.fail("activation", f"use one of {ACTIVATIONS}.")
        if self.normalization not in NORMALIZATIONS:
            self.fail("normalization", f"use one of {NORMALIZATIONS}.")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            self.fail("position_embedding_type", f"use one of {POSITION_EMBEDDINGS}.")
        if self.position_embedding_type == "rope":
            if self.head_dim % 2:
                self.fail("hidden_size",
                          f"rope needs an even head size, got {self.head_dim}; change hidden_size or heads.")
            self.check_rope_parameters()

    def check_rope_parameters(self) -> None:
        """transformers' own validation of `rope_parameters` (its missing-key error as megahf's one line), then what
        megahf adds: a RoPE type transformers computes for a whole-head rotation, and no partial rotation."""
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            self.fail("rope_parameters", "a RoPE model needs a dict such as {'rope_type': 'default', "
                      "'rope_theta': 10000.0}.")
        if rope.get("rope_type", rope.get("type")) not in ROPE_TYPES:
            self.fail("rope_parameters", f"rope_type must be one of {ROPE_TYPES}.")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            self.fail("rope_parameters", "megahf rotates the whole head (Megatron's rotary_percent=1.0): drop "
                      "partial_rotary_factor.")
        try:
            self.validate_rope()
        except KeyError as error:
            self.fail("rope_parameters", f"{error.args[0]}; add them.")

    @property
    def rotary_base(self) -> int | float | None:
        """Megatron's name for the RoPE base, read-only: `rope_parameters["rope_theta"]` (`None` with learned
        positions)."""
        return self.rope_parameters["rope_theta"] if self.rope_parameters else None

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Megatron's tensor parallelism as data: Q/K/V and fc1 split by columns (heads / channels), the projections
        after them by rows, the embedding along the (padded) vocabulary; fc1 is gelu's `linear_fc1` or SwiGLU's
        gate and up, whichever this model has."""
        fc1 = ("linear_fc1_gate", "linear_fc1_up") if self.activation == "swiglu" else ("linear_fc1",)
        return {
            "embedding.word_embeddings": "embedding_rowwise",
            "decoder.layers.*.self_attention.linear_qkv": "colwise",
            "decoder.layers.*.self_attention.linear_proj": "rowwise",
            **{f"decoder.layers.*.mlp.{name}": "colwise" for name in fc1},
            "decoder.layers.*.mlp.linear_fc2": "rowwise",
        }

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MegatronGPTConfig:
        """A config with the shapes of a named model: `gpt-tiny`, the paper's `gpt-345m` ... `gpt-8.3b`, and
        the Llama-style `llama-tiny`, `llama-1b`, `llama-8b`, `llama-3.2-1b`, `llama-3.1-8b`. Keyword arguments
        override preset fields; a `rope_parameters` override without `rope_theta` keeps the preset's base (a new
        scaling of the same model, not a new base)."""
        preset = lookup_preset(name, "gpt")
        rope = overrides.get("rope_parameters")
        base = (preset.get("rope_parameters") or {}).get("rope_theta")
        if isinstance(rope, dict) and "rope_theta" not in rope and base is not None and \
                not any(key in overrides for key in ROPE_BASE_KEYS):
            overrides = {**overrides, "rope_parameters": {**rope, "rope_theta": base}}
        return cls(**{**preset, **overrides})


__all__ = ["MegatronGPTConfig"]
