"""MegatronGPTConfig: defaults, presets, sizes, aliases, serialization and validation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

import megahf  # noqa: F401  (registers the Auto classes)
from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.models.presets import EXPECTED_PARAMS, PRESETS

GPT_PRESETS = list(PRESETS["gpt"])


def test_builds_with_no_arguments():
    config = MegatronGPTConfig()
    assert config.model_type == "megatron_gpt"
    # The paper's 345M GPT-2 shapes.
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_attention_heads) == (
        50257, 1024, 24, 16)
    # None means multi-head attention and a 4h MLP, stored resolved.
    assert config.num_query_groups == 16
    assert config.ffn_hidden_size == 4096
    assert config.head_dim == 64
    assert config.padded_vocab_size == 50304
    assert config.position_embedding_type == "learned_absolute"
    assert config.normalization == "LayerNorm"
    assert config.activation == "gelu"
    assert config.tie_word_embeddings is True
    assert config.init_method_std == 0.02


def test_accepts_common_pretrained_config_kwargs():
    config = MegatronGPTConfig(output_hidden_states=True, return_dict=False, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
    assert config.output_hidden_states is True
    assert config.return_dict is False
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", GPT_PRESETS)
def test_from_preset(name):
    config = MegatronGPTConfig.from_preset(name)
    for key, value in PRESETS["gpt"][name].items():
        assert getattr(config, key) == value, key
    assert config.hidden_size % config.num_attention_heads == 0
    assert config.num_attention_heads % config.num_query_groups == 0
    # Overrides win over the preset and are validated.
    small = MegatronGPTConfig.from_preset(name, num_layers=1, hidden_dropout=0.0)
    assert small.num_layers == 1 and small.hidden_dropout == 0.0
    assert small.hidden_size == config.hidden_size
    # The preset table is not mutated by a lookup with overrides.
    assert MegatronGPTConfig.from_preset(name).num_layers == config.num_layers


def test_llama_presets_are_llama_style():
    for name in ("llama-tiny", "llama-1b", "llama-8b", "llama-3.2-1b", "llama-3.1-8b"):
        config = MegatronGPTConfig.from_preset(name)
        assert config.position_embedding_type == "rope"
        assert config.normalization == "RMSNorm"
        assert config.activation == "swiglu"
        assert config.add_bias_linear is False
        assert config.num_query_groups < config.num_attention_heads
    assert MegatronGPTConfig.from_preset("llama-8b").tie_word_embeddings is False
    assert MegatronGPTConfig.from_preset("llama-3.1-8b").tie_word_embeddings is False
    assert MegatronGPTConfig.from_preset("llama-3.2-1b").tie_word_embeddings is True


@pytest.mark.parametrize("name, factor", [("llama-3.2-1b", 32.0), ("llama-3.1-8b", 8.0)])
def test_llama3x_presets_equal_transformers_llama_configs_of_the_release(name, factor):
    """The released configs as transformers' Llama converter writes them (legacy `rope_scaling` + `rope_theta`),
    standardized by transformers itself: the preset's RoPE, context, vocabulary and token ids are the same."""
    import transformers

    ours = MegatronGPTConfig.from_preset(name)
    theirs = transformers.LlamaConfig(
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000,
        eos_token_id=128001, rope_scaling={"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    assert ours.rope_parameters == theirs.rope_parameters
    for key in ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key


# --------------------------------------------------------------------------------------------------------------------
# RoPE parameters, as transformers defines them

LEGACY_ROPE = [
    {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 500000.0},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, "rope_theta": 500000.0},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    {"rope_theta": 1234.0},
]


@pytest.mark.parametrize("given", LEGACY_ROPE, ids=lambda given: "+".join(given))
def test_rope_parameters_are_standardized_as_transformers_llama_does(given):
    """Legacy `rope_scaling` / top-level `rope_theta` are folded into `rope_parameters` by transformers' own code,
    as for its LlamaConfig (llama3 and yarn take `original_max_position_embeddings` from the context if absent)."""
    import copy

    import transformers

    ours = MegatronGPTConfig.from_preset("llama-tiny", **copy.deepcopy(given))
    theirs = transformers.LlamaConfig(max_position_embeddings=256, **copy.deepcopy(given))
    assert ours.rope_parameters == theirs.rope_parameters
    assert "rope_scaling" not in ours.to_dict() and "rope_theta" not in ours.to_dict()


def test_megatron_rotary_base_is_the_rope_theta():
    config = MegatronGPTConfig.from_preset("llama-tiny", rotary_base=500000)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000} and config.rotary_base == 500000
    # a config.json written before rope_parameters existed (Megatron's name, and on GPT-2 shapes the unused default)
    old = {k: v for k, v in config.to_dict().items() if k != "rope_parameters"}
    assert MegatronGPTConfig.from_dict({**old, "rotary_base": 5000}).rope_parameters["rope_theta"] == 5000
    gpt2 = MegatronGPTConfig.from_preset("gpt-tiny").to_dict()
    assert MegatronGPTConfig.from_dict({**gpt2, "rotary_base": 10000}).rope_parameters is None


def test_rope_override_of_a_preset_keeps_its_base_and_copies_the_dict():
    scaling = {"rope_type": "linear", "factor": 2.0}
    config = MegatronGPTConfig.from_preset("llama-3.1-8b", rope_parameters=scaling)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert scaling == {"rope_type": "linear", "factor": 2.0}  # the caller's dict is not standardized in place
    assert PRESETS["gpt"]["llama-tiny"].get("rope_parameters") is None  # nor the preset table
    assert MegatronGPTConfig.from_preset("llama-3.1-8b").rope_parameters["rope_type"] == "llama3"


def test_learned_positions_have_no_rope_parameters():
    assert MegatronGPTConfig().rope_parameters is None and MegatronGPTConfig().rotary_base is None
    assert MegatronGPTConfig.from_preset("llama-tiny").rope_parameters == {"rope_type": "default",
                                                                           "rope_theta": 10000.0}


# (overrides on llama-tiny or gpt-tiny, text the one-line message must hold)
INVALID_ROPE = [
    ("llama-tiny", {"rope_parameters": {"rope_type": "linear"}}, "rope_parameters=.*'linear'.*factor"),
    ("llama-tiny", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "high_freq_factor"),
    ("llama-tiny", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}},
     r"rope_type must be one of \('default', 'linear', 'dynamic', 'yarn', 'longrope', 'llama3'\)"),
    ("llama-tiny", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor.*rotary_percent=1.0"),
    ("llama-tiny", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rotary_base": 500000},
     r"rotary_base=500000 conflicts with rope_parameters\['rope_theta'\]=10000.0"),
    ("llama-tiny", {"rotary_base": 500000, "rope_theta": 1e6}, "disagree"),
    ("gpt-tiny", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     "rope_parameters=.*position_embedding_type='learned_absolute'.*no RoPE.*set position_embedding_type='rope'"),
    ("gpt-tiny", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling=.*no RoPE"),
    ("gpt-tiny", {"rope_theta": 5e5}, "rope_theta=500000.0 is invalid.*no RoPE"),
    ("gpt-tiny", {"rotary_base": 500000}, "rotary_base=500000 is invalid.*no RoPE"),
]


@pytest.mark.parametrize("preset, overrides, message", INVALID_ROPE, ids=[str(o) for _, o, _ in INVALID_ROPE])
def test_bad_rope_parameters_are_one_line_errors(preset, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        MegatronGPTConfig.from_preset(preset, **overrides)
    assert "\n" not in str(error.value)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError) as error:
        MegatronGPTConfig.from_preset("gpt-175b")
    message = str(error.value)
    assert "gpt-175b" in message
    for name in GPT_PRESETS:
        assert name in message


def _rounds_to(count: int, figure: float) -> bool:
    """Whether `count` rounded to the precision `figure` is quoted with (its last significant digit) is `figure`."""
    digits = f"{figure:.6e}".split("e")[0].rstrip("0").rstrip(".")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    unit = 10 ** (int(f"{figure:e}".split("e")[1]) - decimals)
    return round(count / unit) * unit == round(figure)


# The paper quotes the 40-layer 1536-wide model as "1.2B"; its exact size is 1.212B (1.009% above), so its bound is
# the rounding of the quoted figure rather than 1%.
PARAM_TOLERANCE = {"gpt-1.2b": 0.011}


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED_PARAMS if n in PRESETS["gpt"]))
def test_parameter_count_matches_known_size(name):
    config = MegatronGPTConfig.from_preset(name)
    with torch.device("meta"):  # nothing is allocated
        model = MegatronGPTForCausalLM(config)
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    assert all(p.is_meta for p in unique.values())
    count = sum(p.numel() for p in unique.values())
    expected = EXPECTED_PARAMS[name]
    assert abs(count / expected - 1) < PARAM_TOLERANCE.get(name, 0.01), (name, count, expected)
    assert _rounds_to(count, expected), (name, count, expected)
    # A tied output layer is counted once.
    embedding = config.padded_vocab_size * config.hidden_size
    n_matrices = 1 if config.tie_word_embeddings else 2
    assert count > n_matrices * embedding
    if config.tie_word_embeddings:
        assert model.output_layer.weight is model.model.embedding.word_embeddings.weight


def test_rounds_to_helper():
    assert _rounds_to(354_871_296, 355e6)
    assert not _rounds_to(356_000_000, 355e6)
    assert _rounds_to(1_212_103_680, 1.2e9)
    assert not _rounds_to(1_250_000_001, 1.2e9)
    assert _rounds_to(8_030_261_248, 8.03e9)


ALIASES = {
    "num_hidden_layers": "num_layers",
    "num_key_value_heads": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "initializer_range": "init_method_std",
    "layer_norm_eps": "layernorm_epsilon",
    "rms_norm_eps": "layernorm_epsilon",
}
ALIAS_VALUES = {
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "intermediate_size": 96,
    "initializer_range": 0.01,
    "layer_norm_eps": 1e-6,
    "rms_norm_eps": 1e-6,
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_attribute_map_aliases_read_and_write(alias):
    own = ALIASES[alias]
    value = ALIAS_VALUES[alias]
    config = MegatronGPTConfig.from_preset("gpt-tiny")
    assert getattr(config, alias) == getattr(config, own)
    setattr(config, alias, value)
    assert getattr(config, own) == value
    assert getattr(config, alias) == value
    # As a constructor argument, too.
    built = MegatronGPTConfig.from_preset("gpt-tiny", **{alias: value})
    assert getattr(built, own) == value
    # Serialized under megahf's own name only.
    data = built.to_dict()
    assert data[own] == value
    assert alias not in data


def test_json_round_trip(tmp_path):
    config = MegatronGPTConfig.from_preset(
        "llama-tiny", hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        rotary_base=500000, layernorm_epsilon=1e-6, make_vocab_size_divisible_by=64,
    )
    config.save_pretrained(tmp_path)
    with open(tmp_path / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    assert raw["model_type"] == "megatron_gpt"
    own_names = {
        "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
        "max_position_embeddings", "position_embedding_type", "rope_parameters", "normalization", "layernorm_epsilon",
        "activation", "add_bias_linear", "tie_word_embeddings", "attention_dropout", "hidden_dropout",
        "init_method_std", "make_vocab_size_divisible_by",
    }
    assert own_names <= set(raw)
    assert not set(ALIASES) & set(raw)
    assert raw["num_layers"] == 2 and raw["num_query_groups"] == 2 and raw["ffn_hidden_size"] == 96
    assert raw["layernorm_epsilon"] == 1e-6
    # Megatron's `rotary_base` given to the constructor is stored once, where transformers keeps the base
    assert raw["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000} and "rotary_base" not in raw

    loaded = MegatronGPTConfig.from_pretrained(tmp_path)
    auto = AutoConfig.from_pretrained(tmp_path)
    assert type(auto) is MegatronGPTConfig
    for reloaded in (loaded, auto):
        for key in own_names:
            assert getattr(reloaded, key) == getattr(config, key), key
        assert reloaded.padded_vocab_size == config.padded_vocab_size
    assert {k: v for k, v in loaded.to_dict().items() if k != "transformers_version"} == {
        k: v for k, v in config.to_dict().items() if k != "transformers_version"}


def test_to_dict_resolves_defaults():
    data = MegatronGPTConfig(hidden_size=64, num_attention_heads=4).to_dict()
    assert data["num_query_groups"] == 4
    assert data["ffn_hidden_size"] == 256
    reloaded = MegatronGPTConfig.from_dict(data)
    assert reloaded.num_query_groups == 4 and reloaded.ffn_hidden_size == 256


# (overrides, key named in the message, value named in the message)
INVALID = [
    ({"hidden_size": 100, "num_attention_heads": 16}, "hidden_size", "100"),
    ({"num_attention_heads": 16, "num_query_groups": 3}, "num_attention_heads", "16"),
    ({"activation": "relu"}, "activation", "relu"),
    ({"normalization": "BatchNorm"}, "normalization", "BatchNorm"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type", "alibi"),
    ({"vocab_size": 0}, "vocab_size", "0"),
    ({"vocab_size": -5}, "vocab_size", "-5"),
    ({"hidden_size": -64}, "hidden_size", "-64"),
    ({"hidden_size": 0}, "hidden_size", "0"),
    ({"num_layers": 0}, "num_layers", "0"),
    ({"num_attention_heads": 0}, "num_attention_heads", "0"),
    ({"num_query_groups": 0}, "num_query_groups", "0"),
    ({"num_query_groups": -2}, "num_query_groups", "-2"),
    ({"ffn_hidden_size": 0}, "ffn_hidden_size", "0"),
    ({"ffn_hidden_size": -1}, "ffn_hidden_size", "-1"),
    ({"max_position_embeddings": 0}, "max_position_embeddings", "0"),
    ({"make_vocab_size_divisible_by": 0}, "make_vocab_size_divisible_by", "0"),
    ({"hidden_size": 64.0}, "hidden_size", "64.0"),
    ({"num_layers": True}, "num_layers", "True"),
    ({"hidden_dropout": 1.0}, "hidden_dropout", "1.0"),
    ({"hidden_dropout": -0.1}, "hidden_dropout", "-0.1"),
    ({"attention_dropout": 1.5}, "attention_dropout", "1.5"),
    ({"attention_dropout": -0.5}, "attention_dropout", "-0.5"),
    ({"init_method_std": 0.0}, "init_method_std", "0.0"),
    ({"init_method_std": -0.02}, "init_method_std", "-0.02"),
    # rope needs an even head size: 6 heads of 11.
    ({"position_embedding_type": "rope", "hidden_size": 66, "num_attention_heads": 6}, "hidden_size", "66"),
]


@pytest.mark.parametrize("overrides,key,value", INVALID, ids=[f"{k}={v}" for _, k, v in INVALID])
def test_validation_errors_name_key_and_value(overrides, key, value):
    with pytest.raises(ValueError) as error:
        MegatronGPTConfig(**overrides)
    message = str(error.value)
    assert key in message, message
    assert value in message, message


def test_validation_messages_give_the_fix():
    with pytest.raises(ValueError, match=r"num_query_groups=3"):
        MegatronGPTConfig(num_attention_heads=16, num_query_groups=3)
    with pytest.raises(ValueError, match=r"head size, got 11"):
        MegatronGPTConfig(position_embedding_type="rope", hidden_size=66, num_attention_heads=6)
    with pytest.raises(ValueError, match=r"gelu.*swiglu"):
        MegatronGPTConfig(activation="relu")


def test_odd_head_dim_is_fine_without_rope():
    config = MegatronGPTConfig(hidden_size=66, num_attention_heads=6)
    assert config.head_dim == 11


def test_boundary_values_are_valid():
    config = MegatronGPTConfig(hidden_dropout=0.0, attention_dropout=0.999, vocab_size=1, num_layers=1,
                               make_vocab_size_divisible_by=1)
    assert config.padded_vocab_size == 1


@pytest.mark.parametrize(
    "vocab_size,multiple,padded",
    [(50257, 128, 50304), (50257, 1, 50257), (50304, 128, 50304), (128256, 128, 128256), (30522, 128, 30592),
     (50257, 1024, 51200), (100, 64, 128)],
)
def test_padded_vocab_size(vocab_size, multiple, padded):
    config = MegatronGPTConfig(vocab_size=vocab_size, make_vocab_size_divisible_by=multiple)
    assert config.padded_vocab_size == padded
    assert config.padded_vocab_size % multiple == 0
    assert config.vocab_size == vocab_size


def test_check_tensor_parallel_accepts_dividing_sizes():
    config = MegatronGPTConfig.from_preset("llama-tiny")  # 8 heads, 4 groups, ffn 352, padded vocab 50304
    for tp in (1, 2, 4):
        config.check_tensor_parallel(tp)


@pytest.mark.parametrize(
    "overrides,tp,key,value",
    [
        ({"num_attention_heads": 4, "hidden_size": 64}, 3, "num_attention_heads", "4"),
        ({"num_attention_heads": 8, "num_query_groups": 2, "hidden_size": 64}, 4, "num_query_groups", "2"),
        ({"num_attention_heads": 4, "hidden_size": 64, "ffn_hidden_size": 98}, 4, "ffn_hidden_size", "98"),
        ({"num_attention_heads": 4, "hidden_size": 64, "make_vocab_size_divisible_by": 1}, 2,
         "padded_vocab_size", "50257"),
    ],
)
def test_check_tensor_parallel_errors(overrides, tp, key, value):
    config = MegatronGPTConfig(**overrides)
    with pytest.raises(ValueError) as error:
        config.check_tensor_parallel(tp)
    message = str(error.value)
    assert f"{key}={value}" in message
    assert f"tp_size={tp}" in message
    if key == "padded_vocab_size":
        assert "make_vocab_size_divisible_by" in message
