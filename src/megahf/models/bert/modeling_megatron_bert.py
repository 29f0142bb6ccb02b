"""Megatron's BERT as a transformers model: the encoder and every head the paper fine-tunes.

Module names are Megatron-Core's `BertModel` (`embedding.{word,position,tokentype}_embeddings`,
`encoder.layers.N.{input_layernorm, self_attention.linear_qkv, linear_proj, pre_mlp_layernorm, mlp.linear_fc1,
linear_fc2}`, `encoder.final_layernorm`, `pooler.dense`, `lm_head.{dense,layer_norm}`, `output_layer`,
`binary_head`), with the attention and MLP blocks shared with the GPT. The file holds no parallelism and imports
nothing from megahf outside `models/` (it loads as Hub remote code): the tensor-parallel plan is data on the config
and on the masked-LM heads; `megahf.parallel` adds the vocabulary-parallel loss when megahf is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..chunked_loss import chunked_masked_lm_loss, holds_whole_weight, output_logits
from ..layers import MegatronMLP, MegatronSelfAttention, build_norm, init_megatron_weights
from ..padded_vocab import PaddedVocabMixin, masked_lm_loss
from .configuration_megatron_bert import MegatronBertConfig


class MegatronBertEmbedding(nn.Module):
    """Word (padded vocabulary), learned position and token-type embeddings, summed; the original post-LN BERT
    normalizes the sum."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.tokentype_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layernorm = build_norm(config) if config.layernorm_order == "post" else None
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids, position_ids, token_type_ids, inputs_embeds=None) -> torch.Tensor:
        # The lookup happens inside this module's call so that an FSDP unit wrapping it gathers its weights first.
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        hidden = inputs_embeds + self.position_embeddings(position_ids) + self.tokentype_embeddings(token_type_ids)
        if self.layernorm is not None:
            hidden = self.layernorm(hidden)
        return self.embedding_dropout(hidden)


class MegatronBertLayer(GradientCheckpointingLayer):
    """Bidirectional transformer layer. Pre-LN (Megatron): x + drop(attn(norm(x))), then x + drop(mlp(norm(x))).
    Post-LN (original BERT): norm(x + drop(attn(x))), then norm(x + drop(mlp(x)))."""

    def __init__(self, config: MegatronBertConfig, layer_idx: int):
        super().__init__()
        self.pre_ln = config.layernorm_order == "pre"
        if self.pre_ln:
            self.input_layernorm = build_norm(config)
        self.self_attention = MegatronSelfAttention(config, layer_idx, is_causal=False)
        if self.pre_ln:
            self.pre_mlp_layernorm = build_norm(config)
        else:
            self.post_attention_layernorm = build_norm(config)
        self.mlp = MegatronMLP(config)
        if not self.pre_ln:
            self.post_mlp_layernorm = build_norm(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if self.pre_ln:
            attention, _ = self.self_attention(self.input_layernorm(hidden_states), attention_mask, **kwargs)
            hidden_states = hidden_states + self.hidden_dropout(attention)
            return hidden_states + self.hidden_dropout(self.mlp(self.pre_mlp_layernorm(hidden_states)))
        attention, _ = self.self_attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.post_attention_layernorm(hidden_states + self.hidden_dropout(attention))
        return self.post_mlp_layernorm(hidden_states + self.hidden_dropout(self.mlp(hidden_states)))


class MegatronBertTransformerBlock(nn.Module):
    """Megatron-Core's `encoder`: the layers, and the final norm of the pre-LN order."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.layers = nn.ModuleList(MegatronBertLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = build_norm(config) if config.layernorm_order == "pre" else None


class MegatronBertPooler(nn.Module):
    """tanh(dense(h[CLS])): the sentence representation the sentence-order and classification heads read."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class MegatronBertLMHead(nn.Module):
    """Megatron's masked-LM transform before the (tied) output layer: dense -> gelu -> layer norm."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = build_norm(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.gelu(self.dense(hidden_states)))


class MegatronBertPreTrainedModel(PaddedVocabMixin, PreTrainedModel):
    config_class = MegatronBertConfig
    config: MegatronBertConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegatronBertLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": MegatronBertLayer, "attentions": MegatronSelfAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_megatron_weights(module, self.config)


class MegatronBertModel(MegatronBertPreTrainedModel):
    """Megatron-Core's BERT body: `embedding`, `encoder` and (for the heads that read [CLS]) the `pooler`."""

    _input_embed_layer = "word_embeddings"

    def __init__(self, config: MegatronBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embedding = MegatronBertEmbedding(config)
        self.encoder = MegatronBertTransformerBlock(config)
        self.pooler = MegatronBertPooler(config) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, seq = reference.shape[:2]
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"The input has {seq} tokens but max_position_embeddings="
                             f"{self.config.max_position_embeddings}: truncate the input (tokenizer truncation=True).")
        if position_ids is None:
            position_ids = torch.arange(seq, device=reference.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, seq, dtype=torch.long, device=reference.device)
        hidden_states = self.embedding(input_ids, position_ids, token_type_ids, inputs_embeds)
        # The mask spans every position of the input (sequence parallelism hands the layers a shard of them).
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states.new_empty(batch, seq, 0),
                                         attention_mask=attention_mask)
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, **kwargs)
        if self.encoder.final_layernorm is not None:
            hidden_states = self.encoder.final_layernorm(hidden_states)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


@dataclass
class MegatronBertForPreTrainingOutput(ModelOutput):
    """`loss` = masked-LM loss + sentence-order loss (each a mean, as in Megatron); `prediction_logits` over the
    real vocabulary (None for a training forward with labels and `config.loss_chunk_size`)."""

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class _MaskedLMHeadMixin:
    """The masked-LM output: `lm_head` transform, then `output_layer` (tied to the word embeddings, with a bias),
    split along the vocabulary under tensor parallelism. Logits stop at `vocab_size`; the loss is their cross
    entropy."""

    _tied_weights_keys = {"output_layer.weight": "model.embedding.word_embeddings.weight"}
    _tp_plan = {"output_layer": "colwise_gather_output"}
    _loss_function = staticmethod(masked_lm_loss)  # `self.loss_function`, which megahf.parallel may replace

    def _build_lm_output(self, config: MegatronBertConfig) -> None:
        self.lm_head = MegatronBertLMHead(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=True)

    def get_output_embeddings(self) -> nn.Linear:
        return self.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output_layer = value

    def _masked_lm(self, hidden_states, labels, num_items_in_batch=None):
        if labels is not None and self.training and self.config.loss_chunk_size and self._head_runs_on_rows():
            # Only the labeled positions (15% in Megatron's masking) reach the head: every other position's logits
            # would be computed and thrown away. The head is per position, so loss and gradients are the same.
            kept = labels != -100
            loss = chunked_masked_lm_loss(self.lm_head(hidden_states[kept]), self.output_layer, labels[kept],
                                          vocab_size=self.config.vocab_size,
                                          padded_vocab_softmax=self.config.padded_vocab_softmax,
                                          chunk_size=self.config.loss_chunk_size,
                                          num_items_in_batch=num_items_in_batch)
            return loss, None
        if labels is not None and self.training and not self.config.padded_vocab_softmax:  # padded rows unused
            logits = output_logits(self.output_layer, self.lm_head(hidden_states), self.config.vocab_size, bias=True)
        else:
            logits = self.output_layer(self.lm_head(hidden_states))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size,
                                      padded_vocab_softmax=self.config.padded_vocab_softmax,
                                      num_items_in_batch=num_items_in_batch)
        return loss, logits[..., : self.config.vocab_size]

    def _head_runs_on_rows(self) -> bool:
        """Whether the head can take the labeled rows alone: a plain output layer (not a LoRA or quantized one) with
        plain tensors. Under tensor parallelism or FSDP2 (DTensor parameters: their plans expect whole sequences
        and the vocabulary-parallel loss) the head runs on every position."""
        return holds_whole_weight(self.output_layer, bias=True)


class MegatronBertForPreTraining(_MaskedLMHeadMixin, MegatronBertPreTrainedModel):
    """Megatron's BERT pretraining model: masked LM plus the binary sentence-order head (`binary_head` on the pooled
    [CLS]; `next_sentence_label` 1 means the two segments were swapped)."""

    # Both losses are means over this micro-batch, as in Megatron; Trainer averages them over accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.model = MegatronBertModel(config, add_pooling_layer=config.add_binary_head)
        self._build_lm_output(config)
        self.binary_head = nn.Linear(config.hidden_size, 2) if config.add_binary_head else None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        next_sentence_label: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MegatronBertForPreTrainingOutput | tuple:
        r"""`labels`: the original token at each masked position, -100 elsewhere. `next_sentence_label`: 0 when the
        segments are in order, 1 when swapped (sentence-order prediction)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        loss, logits = self._masked_lm(outputs.last_hidden_state, labels)
        order_logits = self.binary_head(outputs.pooler_output) if self.binary_head is not None else None
        if next_sentence_label is not None and order_logits is not None:
            order_loss = F.cross_entropy(order_logits.float(), next_sentence_label.view(-1))
            loss = order_loss if loss is None else loss + order_loss
        return MegatronBertForPreTrainingOutput(
            loss=loss,
            prediction_logits=logits,
            seq_relationship_logits=order_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class MegatronBertForMaskedLM(_MaskedLMHeadMixin, MegatronBertPreTrainedModel):
    """Masked LM alone (the pretraining model without the sentence-order head and pooler)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.model = MegatronBertModel(config, add_pooling_layer=False)
        self._build_lm_output(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        loss, logits = self._masked_lm(outputs.last_hidden_state, labels, num_items_in_batch)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class MegatronBertForSequenceClassification(MegatronBertPreTrainedModel):
    """GLUE: dropout and `classification_head` on the pooled [CLS] (Megatron's classification model).
    `num_labels=1` is regression (STS-B, mean squared error); otherwise cross entropy (or multi-label BCE by
    `problem_type`, as in transformers)."""

    # The loss is the mean over this micro-batch; Trainer averages it over accumulation steps and ranks.
    accepts_loss_kwargs = False

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.model = MegatronBertModel(config)
        self.classification_dropout = nn.Dropout(config.task_head_dropout)
        self.classification_head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.classification_head(self.classification_dropout(outputs.pooler_output))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


class MegatronBertForMultipleChoice(MegatronBertPreTrainedModel):
    """RACE: each (question + option, article) pair is scored by `multichoice_head` on its pooled [CLS]; inputs are
    [batch, choices, seq] and the logits [batch, choices] (Megatron's multiple-choice model)."""

    # The loss is the mean over this micro-batch; Trainer averages it over accumulation steps and ranks.
    accepts_loss_kwargs = False

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.model = MegatronBertModel(config)
        self.multichoice_dropout = nn.Dropout(config.task_head_dropout)
        self.multichoice_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultipleChoiceModelOutput:
        r"""`labels`: the index of the right choice for each example."""
        reference = input_ids if input_ids is not None else inputs_embeds
        choices = reference.shape[1]

        def flat(x):
            return None if x is None else x.flatten(0, 1)

        outputs = self.model(input_ids=flat(input_ids), attention_mask=flat(attention_mask),
                             token_type_ids=flat(token_type_ids), position_ids=flat(position_ids),
                             inputs_embeds=flat(inputs_embeds), **kwargs)
        logits = self.multichoice_head(self.multichoice_dropout(outputs.pooler_output)).view(-1, choices)
        loss = F.cross_entropy(logits.float(), labels.view(-1)) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions)


class MegatronBertForQuestionAnswering(MegatronBertPreTrainedModel):
    """SQuAD: `qa_outputs` gives each token a start and an end score; `start_positions` / `end_positions` train it
    (positions outside the sequence are clamped and ignored, as in transformers)."""

    # The loss is the mean over this micro-batch; Trainer averages it over accumulation steps and ranks.
    accepts_loss_kwargs = False

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.model = MegatronBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class MegatronBertForTokenClassification(MegatronBertPreTrainedModel):
    """NER: dropout and `classification_head` on every token; labels -100 are ignored."""

    # The loss is the mean over this micro-batch; Trainer averages it over accumulation steps and ranks.
    accepts_loss_kwargs = False

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.model = MegatronBertModel(config, add_pooling_layer=False)
        self.classification_dropout = nn.Dropout(config.task_head_dropout)
        self.classification_head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.classification_head(self.classification_dropout(outputs.last_hidden_state))
        loss = self.loss_function(logits, labels, self.config) if labels is not None else None
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


__all__ = [
    "MegatronBertForMaskedLM",
    "MegatronBertForMultipleChoice",
    "MegatronBertForPreTraining",
    "MegatronBertForPreTrainingOutput",
    "MegatronBertForQuestionAnswering",
    "MegatronBertForSequenceClassification",
    "MegatronBertForTokenClassification",
    "MegatronBertModel",
    "MegatronBertPreTrainedModel",
]
