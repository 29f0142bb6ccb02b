"""MegatronBertConfig: defaults, presets and their sizes, aliases, serialization and validation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

import megahf  # noqa: F401  (registers the Auto classes)
from megahf import MegatronBertConfig, MegatronBertForPreTraining
from megahf.models.presets import EXPECTED_PARAMS, PRESETS

BERT_PRESETS = list(PRESETS["bert"])


def test_defaults_are_the_paper_336m_with_the_uncased_vocabulary():
    config = MegatronBertConfig()
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (24, 1024, 16)
    assert config.ffn_hidden_size == 4096
    assert config.vocab_size == 30522 and config.padded_vocab_size == 30592  # Megatron pads to a multiple of 128
    assert config.type_vocab_size == 2 and config.max_position_embeddings == 512
    assert config.layernorm_order == "pre" and config.add_binary_head and config.tie_word_embeddings
    # read by the blocks shared with the GPT
    assert (config.num_query_groups, config.activation, config.normalization) == (16, "gelu", "LayerNorm")
    assert config.head_dim == 64


@pytest.mark.parametrize("name", BERT_PRESETS)
def test_from_preset_and_overrides(name):
    config = MegatronBertConfig.from_preset(name, layernorm_order="post")
    for key, value in PRESETS["bert"][name].items():
        assert getattr(config, key) == value
    assert config.layernorm_order == "post"


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="bert-336m"):
        MegatronBertConfig.from_preset("bert-large")


# The paper quotes the 24-layer 2048-wide model as "1.3B"; it has 1.281B parameters (1.5% below), so its bound is
# the rounding of the quoted figure rather than 1%.
PARAM_TOLERANCE = {"bert-1.3b": 0.016}


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED_PARAMS if n in PRESETS["bert"]))
def test_parameter_count_matches_the_paper(name):
    config = MegatronBertConfig.from_preset(name)
    with torch.device("meta"):  # nothing is allocated
        model = MegatronBertForPreTraining(config)
    count = sum(p.numel() for p in model.parameters())  # the tied output layer counted once
    expected = EXPECTED_PARAMS[name]
    assert abs(count / expected - 1) < PARAM_TOLERANCE.get(name, 0.01), (name, count, expected)
    assert model.output_layer.weight is model.model.embedding.word_embeddings.weight


ALIASES = {
    "num_hidden_layers": ("num_layers", 3),
    "intermediate_size": ("ffn_hidden_size", 96),
    "initializer_range": ("init_method_std", 0.01),
    "layer_norm_eps": ("layernorm_epsilon", 1e-12),
    "hidden_dropout_prob": ("hidden_dropout", 0.0),
    "attention_probs_dropout_prob": ("attention_dropout", 0.2),
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_attribute_map_aliases_read_and_write(alias):
    field, value = ALIASES[alias]
    config = MegatronBertConfig(hidden_size=64, num_attention_heads=4, **{alias: value})
    assert getattr(config, field) == value and getattr(config, alias) == value


def test_json_round_trip_and_auto_config(tmp_path):
    config = MegatronBertConfig.from_preset("bert-tiny", layernorm_order="post", classifier_dropout=0.2,
                                            num_labels=3)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MegatronBertConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.num_labels == 3 and loaded.task_head_dropout == 0.2
    # the fixed properties are not written as fields
    assert "num_query_groups" not in config.to_dict() and "activation" not in config.to_dict()


INVALID = [
    ({"layernorm_order": "sandwich"}, "layernorm_order", "'sandwich'"),
    ({"hidden_size": 100, "num_attention_heads": 16}, "hidden_size", "100"),
    ({"type_vocab_size": 0}, "type_vocab_size", "0"),
    ({"vocab_size": -1}, "vocab_size", "-1"),
    ({"hidden_dropout": 1.0}, "hidden_dropout", "1.0"),
    ({"classifier_dropout": -0.1}, "classifier_dropout", "-0.1"),
    ({"init_method_std": 0.0}, "init_method_std", "0.0"),
    ({"activation": "swiglu"}, "activation", "'swiglu'"),
    ({"normalization": "RMSNorm"}, "normalization", "'RMSNorm'"),
    ({"num_attention_heads": 4, "num_query_groups": 2}, "num_query_groups", "2"),
]


@pytest.mark.parametrize("overrides,key,value", INVALID, ids=[f"{k}={v}" for _, k, v in INVALID])
def test_validation_errors_name_key_and_value(overrides, key, value):
    with pytest.raises(ValueError, match=rf"MegatronBertConfig: {key}={value} is invalid: "):
        MegatronBertConfig(**overrides)


def test_check_tensor_parallel():
    config = MegatronBertConfig.from_preset("bert-3.9b")  # 40 heads
    config.check_tensor_parallel(8)
    with pytest.raises(ValueError, match=r"num_attention_heads=40 is not divisible by tp_size=16"):
        config.check_tensor_parallel(16)
    odd = MegatronBertConfig.from_preset("bert-tiny", make_vocab_size_divisible_by=2)  # 30522 pads to 30522
    with pytest.raises(ValueError, match=r"padded_vocab_size=30522 .*tp_size=4: raise make_vocab_size_divisible_by"):
        odd.check_tensor_parallel(4)
