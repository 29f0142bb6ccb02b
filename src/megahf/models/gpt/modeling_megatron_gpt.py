"""Megatron's GPT as a transformers model.

Module names and the fused QKV layout are Megatron-Core's, so a Megatron checkpoint maps onto this model by renaming.
The file holds no parallelism and imports nothing from megahf outside `models/`, so that it loads as Hub remote code:
the tensor-parallel plan is data on the config (`base_model_tp_plan`) and on the head class (`_tp_plan`), applied by
transformers' `DistributedConfig` machinery. `megahf.parallel` adds what transformers lacks (the vocabulary-parallel
loss, tying before FSDP2) when megahf is installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.utils.deprecation import deprecate_kwarg
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..chunked_loss import can_chunk, chunked_causal_lm_loss, output_logits
from ..layers import MegatronMLP, MegatronSelfAttention, build_norm, init_megatron_weights
from ..padded_vocab import PaddedVocabMixin, causal_lm_loss
from .configuration_megatron_gpt import MegatronGPTConfig


class MegatronGPTEmbedding(nn.Module):
    """Word embeddings over the padded vocabulary, plus learned positions for GPT-2-style models."""

    def __init__(self, config: MegatronGPTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "learned_absolute"
            else None
        )
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The lookup happens inside this module's call so that an FSDP unit wrapping it gathers its weights first.
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            inputs_embeds = inputs_embeds + self.position_embeddings(position_ids)
        return self.embedding_dropout(inputs_embeds)


class MegatronGPTRotaryEmbedding(LlamaRotaryEmbedding):
    """transformers' Llama RoPE module, as it is: the whole head rotated by halves (Megatron's `rotary_percent=1.0`,
    non-interleaved), its frequencies from transformers' RoPE functions for `config.rope_parameters` (default,
    linear, dynamic, yarn, longrope, llama3), recomputed by `dynamic_rope_update` for the dynamic types, cos/sin
    scaled by the type's attention factor (yarn). It reads nothing Llama-specific from the config."""


class MegatronGPTLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer layer: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, config: MegatronGPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attention = MegatronSelfAttention(config, layer_idx)
        self.pre_mlp_layernorm = build_norm(config)
        self.mlp = MegatronMLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention_output, _ = self.self_attention(
            self.input_layernorm(hidden_states), attention_mask, position_embeddings, cache, **kwargs
        )
        hidden_states = hidden_states + self.hidden_dropout(attention_output)
        return hidden_states + self.hidden_dropout(self.mlp(self.pre_mlp_layernorm(hidden_states)))


class MegatronGPTTransformerBlock(nn.Module):
    """Megatron-Core's `decoder`: the layers and the final norm."""

    def __init__(self, config: MegatronGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(MegatronGPTLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = build_norm(config)


class MegatronGPTPreTrainedModel(PaddedVocabMixin, PreTrainedModel):
    config_class = MegatronGPTConfig
    config: MegatronGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegatronGPTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": MegatronGPTLayer, "attentions": MegatronSelfAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_megatron_weights(module, self.config)
        if isinstance(module, MegatronGPTRotaryEmbedding):  # transformers recomputes RoPE's frequency buffers
            PreTrainedModel._init_weights(self, module)


class MegatronGPTModel(MegatronGPTPreTrainedModel):
    """Megatron-Core's GPT body: `embedding` and `decoder` (the output layer lives on the causal-LM head)."""

    _input_embed_layer = "word_embeddings"

    def __init__(self, config: MegatronGPTConfig):
        super().__init__(config)
        self.embedding = MegatronGPTEmbedding(config)
        self.decoder = MegatronGPTTransformerBlock(config)
        self.rotary_pos_emb = MegatronGPTRotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        reference = input_ids if input_ids is not None else inputs_embeds
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + reference.shape[1], device=reference.device)[None]
        hidden_states = self.embedding(input_ids, position_ids, inputs_embeds)
        mask, rotary = self.layer_inputs(hidden_states, reference.shape[:2], attention_mask, position_ids, cache)
        for layer in self.decoder.layers:
            # Keyword arguments: GradientCheckpointingLayer drops a `cache=` keyword under checkpointing (a positional
            # cache would be updated a second time when the backward pass replays the layer).
            hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=rotary, cache=cache,
                                  position_ids=position_ids, **kwargs)
        hidden_states = self.decoder.final_layernorm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)

    def layer_inputs(self, hidden_states: torch.Tensor, batch_shape: tuple[int, int],
                     attention_mask: torch.Tensor | None, position_ids: torch.LongTensor,
                     cache: Cache | None = None) -> tuple[torch.Tensor | None, tuple | None]:
        """What every layer takes besides the hidden states: the causal mask of a `[batch, seq]` input and the RoPE
        cosines and sines (None for learned positions). A pipeline stage without the embedding computes them too."""
        mask = create_causal_mask(
            config=self.config,
            # every position of the input (sequence parallelism hands the layers a shard of them)
            inputs_embeds=hidden_states.new_empty(*batch_shape, 0),
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        rotary = self.rotary_pos_emb(hidden_states, position_ids) if self.rotary_pos_emb is not None else None
        return mask, rotary


class MegatronGPTForCausalLM(MegatronGPTPreTrainedModel, GenerationMixin):
    """Megatron's GPT with its output layer (tied to the word embeddings unless `tie_word_embeddings=False`).

    Returned logits stop at `config.vocab_size` (the padding rows of the embedding can never be generated) and the
    loss is their cross entropy. Under tensor parallelism the output layer is split along the vocabulary; with
    megahf installed the loss is computed on the vocabulary shards (Megatron's parallel cross entropy).
    """

    _tied_weights_keys = {"output_layer.weight": "model.embedding.word_embeddings.weight"}
    _tp_plan = {"output_layer": "colwise_gather_output"}
    _pp_plan = {"output_layer": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"output_layer": "keep_full_weight"}
    _loss_function = staticmethod(causal_lm_loss)  # `self.loss_function`, which megahf.parallel may replace
    # The training loss with `config.loss_chunk_size` (output layer + cross entropy, logits never held whole); megahf.
    # parallel replaces it under tensor parallelism and FSDP2.
    chunked_loss_function = staticmethod(chunked_causal_lm_loss)

    def __init__(self, config: MegatronGPTConfig):
        super().__init__(config)
        self.model = MegatronGPTModel(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output_layer = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""`labels` are the input ids (shifted inside, -100 ignored), as in transformers; pass `shift_labels`
        instead for labels that are already shifted (Megatron's datasets).

        With `config.loss_chunk_size > 0`, a forward in training mode with labels returns the loss and
        `logits=None`: the output layer and the cross entropy run chunk by chunk over the tokens and the logits are
        never held whole (`chunked_loss.py`). In eval mode, or without labels, or when the output layer is not a
        plain bias-free `nn.Linear` (LoRA, quantized), the logits are returned as always."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        loss, logits = self.head_and_loss(hidden_states, labels, **kwargs)
        if logits is None:
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache,
                                          hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits[..., : self.config.vocab_size],
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def head_and_loss(self, hidden_states: torch.Tensor, labels: torch.LongTensor | None = None,
                      chunked: bool = True, **kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The output layer and the loss on the final hidden states: `(loss, logits)` (logits over the padded
        vocabulary; `None` when the chunked training loss never held them whole; `chunked=False` never chunks). The
        last pipeline stage calls it on the hidden states it computed."""
        has_labels = labels is not None or kwargs.get("shift_labels") is not None
        if chunked and has_labels and self.training and self.config.loss_chunk_size and can_chunk(self.output_layer):
            loss = self.chunked_loss_function(hidden_states, self.output_layer, labels,
                                              vocab_size=self.config.vocab_size,
                                              padded_vocab_softmax=self.config.padded_vocab_softmax,
                                              chunk_size=self.config.loss_chunk_size, **kwargs)
            return loss, None
        if has_labels and self.training and not self.config.padded_vocab_softmax:  # the padded rows' logits unused
            logits = output_logits(self.output_layer, hidden_states, self.config.vocab_size)
        else:
            logits = self.output_layer(hidden_states)
        loss = None
        if has_labels:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size,
                                      padded_vocab_softmax=self.config.padded_vocab_softmax, **kwargs)
        return loss, logits


__all__ = ["MegatronGPTForCausalLM", "MegatronGPTModel", "MegatronGPTPreTrainedModel"]
