"""Megatron BERT and its heads in one process: names, init, masks and token types, every head's loss, attention
implementations, checkpointing, save/load through the Auto classes, and the shipped tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import megahf  # noqa: F401  (registers the Auto classes)
from megahf import (
    MegatronBertConfig,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    MegatronBertModel,
)
from megahf.assets import load_bert_tokenizer

VOCAB, PADDED_VOCAB = 30522, 30592
HEADS = {
    MegatronBertModel: AutoModel,
    MegatronBertForPreTraining: AutoModelForPreTraining,
    MegatronBertForMaskedLM: AutoModelForMaskedLM,
    MegatronBertForSequenceClassification: AutoModelForSequenceClassification,
    MegatronBertForMultipleChoice: AutoModelForMultipleChoice,
    MegatronBertForQuestionAnswering: AutoModelForQuestionAnswering,
    MegatronBertForTokenClassification: AutoModelForTokenClassification,
}


def tiny_config(**overrides) -> MegatronBertConfig:
    defaults = {"num_layers": 2, "hidden_size": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0, "num_labels": 3}
    return MegatronBertConfig.from_preset("bert-tiny", **{**defaults, **overrides})


def tiny(cls, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def pair_batch(lengths=(12, 7), split=(5, 3), seed: int = 1) -> dict[str, torch.Tensor]:
    """Two [CLS] A [SEP] B [SEP]-shaped sequences of different lengths, right-padded, token types 0 then 1."""
    generator = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    input_ids = torch.randint(1000, VOCAB, (len(lengths), seq), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    for row, (length, a) in enumerate(zip(lengths, split)):
        attention_mask[row, :length] = 1
        token_type_ids[row, a:length] = 1
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask,
            "token_type_ids": token_type_ids}


@pytest.mark.parametrize("order", ["pre", "post"])
def test_megatron_core_names_and_shapes(order):
    model = tiny(MegatronBertForPreTraining, layernorm_order=order)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes["model.embedding.word_embeddings.weight"] == (PADDED_VOCAB, 64)
    assert shapes["model.embedding.position_embeddings.weight"] == (512, 64)
    assert shapes["model.embedding.tokentype_embeddings.weight"] == (2, 64)
    layer = "model.encoder.layers.1."
    assert shapes[layer + "self_attention.linear_qkv.weight"] == (192, 64)
    assert shapes[layer + "self_attention.linear_proj.weight"] == (64, 64)
    assert shapes[layer + "mlp.linear_fc1.weight"] == (256, 64)
    assert shapes[layer + "mlp.linear_fc2.weight"] == (64, 256)
    assert shapes["model.pooler.dense.weight"] == (64, 64)
    assert shapes["lm_head.dense.weight"] == (64, 64) and shapes["lm_head.layer_norm.weight"] == (64,)
    assert shapes["output_layer.bias"] == (PADDED_VOCAB,) and shapes["binary_head.weight"] == (2, 64)
    norms = {n.rsplit(".", 2)[-2] for n in shapes if "norm" in n}
    if order == "pre":
        assert norms == {"input_layernorm", "pre_mlp_layernorm", "final_layernorm", "layer_norm"}
    else:
        assert norms == {"post_attention_layernorm", "post_mlp_layernorm", "layernorm", "layer_norm"}
    assert model.output_layer.weight is model.model.embedding.word_embeddings.weight


def test_megatron_init_statistics():
    torch.manual_seed(0)
    model = MegatronBertForPreTraining(MegatronBertConfig.from_preset("bert-tiny", hidden_size=256, num_layers=8))
    params = dict(model.named_parameters())
    std = 0.02
    assert params["model.embedding.word_embeddings.weight"].std().item() == pytest.approx(std, rel=0.02)
    assert params["model.encoder.layers.0.self_attention.linear_qkv.weight"].std().item() == pytest.approx(std, rel=0.05)
    scaled = std / math.sqrt(2 * 8)  # the output projection of each block
    assert params["model.encoder.layers.3.mlp.linear_fc2.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert params["model.encoder.layers.3.self_attention.linear_proj.weight"].std().item() == pytest.approx(
        scaled, rel=0.1)
    assert params["binary_head.weight"].std().item() == pytest.approx(std, rel=0.2)
    for name, param in params.items():
        if name.endswith(".bias"):
            assert torch.all(param == 0), name
        elif "norm" in name:
            assert torch.all(param == 1), name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("order", ["pre", "post"])
def test_padding_does_not_change_the_real_tokens(attn, order):
    model = tiny(MegatronBertModel, layernorm_order=order, attn_implementation=attn)
    batch = pair_batch()
    padded = model(**batch)
    short = {k: v[1:, :7] for k, v in batch.items()}
    alone = model(**short)
    torch.testing.assert_close(padded.last_hidden_state[1, :7], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.pooler_output[1], alone.pooler_output[0], rtol=1e-5, atol=1e-5)
    # attention is bidirectional: the first token sees the last real one
    changed = dict(short, input_ids=short["input_ids"].clone())
    changed["input_ids"][0, 6] = 2000
    assert not torch.allclose(model(**changed).last_hidden_state[0, 0], alone.last_hidden_state[0, 0])


def test_token_types_and_positions_matter():
    model = tiny(MegatronBertModel)
    batch = pair_batch()
    base = model(**batch).last_hidden_state
    flipped = model(**dict(batch, token_type_ids=1 - batch["token_type_ids"])).last_hidden_state
    assert not torch.allclose(base, flipped, atol=1e-4)
    shifted = model(**batch, position_ids=torch.arange(12)[None] + 3).last_hidden_state
    assert not torch.allclose(base, shifted, atol=1e-4)
    default = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    zeros = model(**dict(batch, token_type_ids=torch.zeros_like(batch["input_ids"]))).last_hidden_state
    torch.testing.assert_close(default, zeros)  # token types default to 0


def test_eager_and_sdpa_agree():
    batch = pair_batch()
    eager = tiny(MegatronBertForPreTraining, attn_implementation="eager")(**batch)
    sdpa = tiny(MegatronBertForPreTraining, attn_implementation="sdpa")(**batch)
    torch.testing.assert_close(eager.prediction_logits, sdpa.prediction_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager.seq_relationship_logits, sdpa.seq_relationship_logits, rtol=1e-5, atol=1e-5)


def test_too_long_input_is_refused_with_the_fix():
    model = tiny(MegatronBertModel, max_position_embeddings=16)
    with pytest.raises(ValueError, match=r"20 tokens but max_position_embeddings=16: truncate"):
        model(input_ids=torch.ones(1, 20, dtype=torch.long))


def mlm_labels(batch, seed=2):
    generator = torch.Generator().manual_seed(seed)
    masked = (torch.rand(batch["input_ids"].shape, generator=generator) < 0.3) & (batch["attention_mask"] == 1)
    masked[0, 1] = True
    return batch["input_ids"].masked_fill(~masked, -100)


def test_pretraining_loss_is_masked_lm_plus_sentence_order():
    model = tiny(MegatronBertForPreTraining)
    batch = pair_batch()
    labels, order = mlm_labels(batch), torch.tensor([1, 0])
    out = model(**batch, labels=labels, next_sentence_label=order)
    assert out.prediction_logits.shape == (2, 12, VOCAB)  # the padded rows are not returned
    full = model.output_layer(model.lm_head(model.model(**batch).last_hidden_state))
    assert full.shape[-1] == PADDED_VOCAB
    # The masked-LM loss is the cross entropy of the returned logits (the real vocabulary), a mean over masked tokens;
    # Megatron's softmax over the padded rows too is the config's `padded_vocab_softmax`.
    mlm = F.cross_entropy(out.prediction_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    sop = F.cross_entropy(out.seq_relationship_logits, order)
    torch.testing.assert_close(out.loss, mlm + sop)
    padded = tiny(MegatronBertForPreTraining, padded_vocab_softmax=True)(**batch, labels=labels, next_sentence_label=order)
    torch.testing.assert_close(padded.loss, F.cross_entropy(full.flatten(0, 1), labels.flatten()) + sop)
    assert model(**batch, labels=labels).loss.item() == pytest.approx(mlm.item(), rel=1e-6)
    assert model(**batch, next_sentence_label=order).loss.item() == pytest.approx(sop.item(), rel=1e-6)


def test_pretraining_without_binary_head_is_masked_lm_alone():
    model = tiny(MegatronBertForPreTraining, add_binary_head=False)
    assert model.binary_head is None and model.model.pooler is None
    batch = pair_batch()
    labels = mlm_labels(batch)
    out = model(**batch, labels=labels, next_sentence_label=torch.tensor([1, 0]))
    assert out.seq_relationship_logits is None
    mlm = tiny(MegatronBertForMaskedLM, add_binary_head=False)
    mlm.load_state_dict(model.state_dict())
    torch.testing.assert_close(out.loss, mlm(**batch, labels=labels).loss)


def test_masked_lm_num_items_in_batch_is_the_denominator():
    model = tiny(MegatronBertForMaskedLM)
    batch = pair_batch()
    labels = mlm_labels(batch)
    mean = model(**batch, labels=labels).loss
    count = int((labels != -100).sum())
    total = model(**batch, labels=labels, num_items_in_batch=4 * count).loss
    torch.testing.assert_close(total * 4, mean)


def test_sequence_classification_losses():
    batch = pair_batch()
    model = tiny(MegatronBertForSequenceClassification)
    out = model(**batch, labels=torch.tensor([2, 0]))
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([2, 0])))
    # the head reads the pooled [CLS]
    pooled = model.model(**batch).pooler_output
    torch.testing.assert_close(out.logits, model.classification_head(pooled))
    regression = tiny(MegatronBertForSequenceClassification, num_labels=1)  # STS-B
    target = torch.tensor([3.5, 1.0])
    out = regression(**batch, labels=target)
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), target))


def test_multiple_choice_scores_each_choice():
    model = tiny(MegatronBertForMultipleChoice)
    batch = pair_batch()
    choices = {k: torch.stack([v, v.flip(0)], dim=1) for k, v in batch.items()}  # [2 examples, 2 choices, seq]
    out = model(**choices, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (2, 2)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([1, 0])))
    single = model(**{k: v[:1] for k, v in choices.items()})  # example 0 alone
    torch.testing.assert_close(out.logits[0], single.logits[0])


def test_question_answering_and_token_classification():
    batch = pair_batch()
    qa = tiny(MegatronBertForQuestionAnswering)
    start, end = torch.tensor([2, 4]), torch.tensor([5, 6])
    out = qa(**batch, start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (2, 12)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, expected)

    ner = tiny(MegatronBertForTokenClassification, num_labels=5)
    labels = torch.randint(0, 5, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    out = ner(**batch, labels=labels)
    assert out.logits.shape == (2, 12, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()))


def test_gradient_checkpointing_gives_same_loss_and_grads():
    batch = pair_batch()
    labels, order = mlm_labels(batch), torch.tensor([0, 1])
    results = []
    for checkpointing in (False, True):
        model = tiny(MegatronBertForPreTraining).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(**batch, labels=labels, next_sentence_label=order).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_output_hidden_states_and_attentions():
    model = tiny(MegatronBertModel, attn_implementation="eager")
    out = model(**pair_batch(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (2, 4, 12, 12)
    # padded keys get no attention
    assert torch.all(out.attentions[0][1, :, :, 7:] == 0)


@pytest.mark.parametrize("cls", list(HEADS), ids=lambda c: c.__name__)
def test_save_and_auto_load(cls, tmp_path):
    model = tiny(cls, layernorm_order="post" if cls is MegatronBertForMaskedLM else "pre")
    batch = pair_batch()
    if cls is MegatronBertForMultipleChoice:
        batch = {k: v[:, None].repeat(1, 2, 1) for k, v in batch.items()}
    model.save_pretrained(tmp_path)
    loaded = HEADS[cls].from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    expected, actual = model(**batch), loaded(**batch)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=key)


def test_shipped_tokenizer_feeds_the_model():
    tokenizer = load_bert_tokenizer()
    batch = tokenizer(["The quick brown fox.", "Hi"], ["Jumps over the dog!", "there"], padding=True,
                      return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id == 101
    assert batch["input_ids"][1].tolist() == [101, 7632, 102, 2045, 102] + [0] * 8  # [CLS] hi [SEP] there [SEP]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1] + [0] * 8
    model = tiny(MegatronBertForPreTraining)
    out = model(**batch)
    assert out.prediction_logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
