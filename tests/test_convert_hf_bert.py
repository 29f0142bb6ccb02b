"""transformers' MegatronBert (pre-LN) and Bert (post-LN) <-> megahf's Megatron BERT: equal outputs for every
head, a lossless round trip, Megatron's vocabulary padding, and clear errors."""

from __future__ import annotations

import pytest
import torch
import transformers

import megahf
from megahf.convert import from_transformers, to_transformers
from megahf.convert.hf_bert import config_from_transformers

SUFFIXES = ["ForPreTraining", "ForMaskedLM", "ForSequenceClassification", "ForMultipleChoice",
            "ForQuestionAnswering", "ForTokenClassification", "Model"]
ROWS = 30592  # an uncased Megatron checkpoint: 30522 tokens padded to a multiple of 128


def hf_model(family: str, suffix: str, **overrides):
    config_class = transformers.MegatronBertConfig if family == "MegatronBert" else transformers.BertConfig
    config = config_class(vocab_size=ROWS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, layer_norm_eps=1e-5,
                          num_labels=2 if suffix == "ForQuestionAnswering" else 3, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, family + suffix)(config).eval()
    with torch.no_grad():  # non-zero biases and norms, so that a swapped bias or norm cannot go unnoticed
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or ".ln." in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def inputs(suffix: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (2, 3, 9) if suffix == "ForMultipleChoice" else (2, 9)
    input_ids = torch.randint(1, 30522, shape, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, ..., 6:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[..., 4:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("family", ["MegatronBert", "Bert"])
def test_equal_outputs_and_lossless_round_trip(family, suffix):
    theirs = hf_model(family, suffix)
    ours = from_transformers(theirs, vocab_size=30522)
    assert type(ours).__name__ == "MegatronBert" + suffix
    assert ours.config.layernorm_order == ("pre" if family == "MegatronBert" else "post")
    assert ours.config.padded_vocab_size == ROWS
    batch = inputs(suffix)
    with torch.no_grad():
        expected, actual = theirs(**batch), ours(**batch)
    our_values = [v for v in actual.values() if torch.is_tensor(v)]
    their_values = [v for v in expected.values() if torch.is_tensor(v)]
    assert len(our_values) == len(their_values)
    for mine, reference in zip(our_values, their_values):
        if reference.shape[-1] == ROWS:  # masked-LM logits: megahf returns the real vocabulary only
            reference = reference[..., :30522]
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)

    back = to_transformers(ours)
    assert type(back) is type(theirs)
    original, returned = theirs.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        assert torch.equal(returned[key], tensor), key


def test_checkpoint_with_fewer_rows_is_padded_with_zeros(tmp_path):
    theirs = hf_model("MegatronBert", "ForMaskedLM")
    theirs.resize_token_embeddings(30522)  # a checkpoint that stores exactly the tokenizer's rows
    ours = from_transformers(theirs)
    assert ours.config.vocab_size == 30522 and ours.config.padded_vocab_size == ROWS
    rows = ours.model.embedding.word_embeddings.weight
    assert torch.all(rows[30522:] == 0) and torch.all(ours.output_layer.bias[30522:] == 0)
    batch = inputs("ForMaskedLM")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)
    # and the converted model saves and reloads like any megahf model
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, megahf.MegatronBertForMaskedLM)


def test_training_mode_is_kept():
    ours = from_transformers(hf_model("MegatronBert", "ForSequenceClassification").train())
    assert ours.training and to_transformers(ours).training


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_act": "relu"}, r"hidden_act='relu': Megatron's BERT uses the exact 'gelu'"),
        ({"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key'"),
    ],
)
def test_unsupported_architectures_are_refused(overrides, message):
    config = transformers.MegatronBertConfig(**overrides)
    with pytest.raises(ValueError, match=message):
        config_from_transformers(config)


def test_vocab_size_errors_name_the_fix():
    config = transformers.MegatronBertConfig(vocab_size=ROWS)
    with pytest.raises(ValueError, match=r"vocab_size=40000 is larger than the checkpoint's 30592 rows"):
        config_from_transformers(config, vocab_size=40000)
    with pytest.raises(ValueError, match=r"vocab_size=100 pads to 128 rows, fewer than the checkpoint's 30592"):
        config_from_transformers(config, vocab_size=100)
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not a BERT"):
        config_from_transformers(transformers.GPT2Config())
    with pytest.raises(ValueError, match=r"Cannot convert a GPT2Model"):
        from_transformers(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2)))
