"""megahf's Megatron BERT against Megatron-Core's own `BertModel` (megatron-core 0.16.1, run on CPU): the same
weights under the same names (megahf's base model adds the `model.` prefix), and the same masked-LM logits,
sentence-order logits and per-token loss."""

from __future__ import annotations

import pytest
import torch

from megahf import MegatronBertConfig, MegatronBertForPreTraining

SHAPE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
VOCAB, PADDED, SEQ = 30522, 30592, 12


@pytest.fixture(scope="module")
def megatron_core_bert(megatron_core):
    """A Megatron-Core BertModel with the local layer spec and random weights (biases and norms too)."""
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(**SHAPE, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                               layernorm_epsilon=1e-5, params_dtype=torch.float32)
    torch.manual_seed(0)
    model = BertModel(config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec, vocab_size=PADDED,
                      max_sequence_length=64, share_embeddings_and_output_weights=True, add_binary_head=True).eval()
    with torch.no_grad():  # non-zero biases and norms, so that a swapped one cannot go unnoticed
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, VOCAB, (2, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 5:] = 1
    token_type_ids[1, 3:8] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def megahf_twin(megatron_model) -> MegatronBertForPreTraining:
    """The megahf model holding Megatron-Core's weights: its names with `model.` before the base model's."""
    base = ("embedding.", "encoder.", "pooler.")
    state = {("model." + k if k.startswith(base) else k): v for k, v in megatron_model.state_dict().items()
             if not k.endswith("_extra_state")}
    model = MegatronBertForPreTraining(MegatronBertConfig(**SHAPE, vocab_size=VOCAB, layernorm_epsilon=1e-5,
                                                          max_position_embeddings=64))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["output_layer.weight"] and unexpected == []  # the output layer is the tied embedding
    return model.eval()


def test_same_names_and_same_outputs_as_megatron_core(megatron_core_bert):
    ours = megahf_twin(megatron_core_bert)
    inputs = batch()
    with torch.no_grad():
        theirs_logits, theirs_order = megatron_core_bert(inputs["input_ids"], inputs["attention_mask"],
                                                         tokentype_ids=inputs["token_type_ids"])
        out = ours(**inputs)
    real = inputs["attention_mask"].bool()  # Megatron-Core also masks padded queries; their outputs differ
    assert theirs_logits.shape == (2, SEQ, PADDED)
    torch.testing.assert_close(out.prediction_logits[real], theirs_logits[..., :VOCAB][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.seq_relationship_logits, theirs_order, rtol=1e-5, atol=1e-5)


def test_masked_lm_loss_equals_megatron_cores_per_token_loss(megatron_core_bert):
    ours = megahf_twin(megatron_core_bert)
    ours.config.padded_vocab_softmax = True  # Megatron's training loss: the softmax covers the padded rows
    inputs = batch()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, [1, 4, 9]] = inputs["input_ids"][0, [1, 4, 9]]
    labels[1, [2, 6]] = torch.tensor([17, 29000])
    with torch.no_grad():
        per_token, _ = megatron_core_bert(inputs["input_ids"], inputs["attention_mask"],
                                          tokentype_ids=inputs["token_type_ids"], lm_labels=labels.clamp(min=0))
        loss = ours(**inputs, labels=labels).loss
    masked = labels != -100
    torch.testing.assert_close(loss, per_token[masked].mean(), rtol=1e-5, atol=1e-6)
