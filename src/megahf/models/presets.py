"""Named model shapes: the Megatron paper's (Shoeybi et al. 2019, Tables 1 and 4) and Llama-style Megatron-Core ones.

A preset holds only what differs from the config's defaults; `expected_params` is the size the model is known
by, checked by the tests on the meta device.
"""

from __future__ import annotations

import copy

_GPT2 = {"vocab_size": 50257, "max_position_embeddings": 1024}
_LLAMA = {
    "position_embedding_type": "rope",
    "normalization": "RMSNorm",
    "activation": "swiglu",
    "add_bias_linear": False,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
}

# Llama 3's tokenizer: 128256 tokens, <|begin_of_text|> = 128000, <|end_of_text|> = 128001
_LLAMA3_VOCAB = {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001}
_LLAMA3_ROPE = {"rope_type": "default", "rope_theta": 500000.0}


def _llama31_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


PRESETS: dict[str, dict[str, dict]] = {
    "gpt": {
        # A model that trains in minutes on two CPU cores (the demo and the tests).
        "gpt-tiny": {**_GPT2, "hidden_size": 128, "num_layers": 4, "num_attention_heads": 4,
                     "max_position_embeddings": 256},
        # The paper's GPT-2 family. The 8.3B model has 32 heads in Table 1 (Table 2 says 24).
        "gpt-345m": {**_GPT2, "hidden_size": 1024, "num_layers": 24, "num_attention_heads": 16},
        "gpt-1.2b": {**_GPT2, "hidden_size": 1536, "num_layers": 40, "num_attention_heads": 16},
        "gpt-2.5b": {**_GPT2, "hidden_size": 1920, "num_layers": 54, "num_attention_heads": 20},
        "gpt-4.2b": {**_GPT2, "hidden_size": 2304, "num_layers": 64, "num_attention_heads": 24},
        "gpt-8.3b": {**_GPT2, "hidden_size": 3072, "num_layers": 72, "num_attention_heads": 32},
        # Llama-style Megatron-Core models: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output.
        "llama-tiny": {**_LLAMA, "vocab_size": 50257, "hidden_size": 128, "num_layers": 4,
                       "num_attention_heads": 8, "num_query_groups": 4, "ffn_hidden_size": 352,
                       "max_position_embeddings": 256},
        # Llama 3's shapes (rope_theta 500000, vocabulary 128256) at Llama 3's unscaled context of 8192: `llama-8b` is
        # Llama 3 8B; `llama-1b` is Llama 3.2 1B's shape without its RoPE scaling.
        "llama-1b": {**_LLAMA, **_LLAMA3_VOCAB, "hidden_size": 2048, "num_layers": 16,
                     "num_attention_heads": 32, "num_query_groups": 8, "ffn_hidden_size": 8192,
                     "max_position_embeddings": 8192, "rope_parameters": _LLAMA3_ROPE,
                     "tie_word_embeddings": True, "layernorm_epsilon": 1e-5, "make_vocab_size_divisible_by": 128},
        "llama-8b": {**_LLAMA, **_LLAMA3_VOCAB, "hidden_size": 4096, "num_layers": 32,
                     "num_attention_heads": 32, "num_query_groups": 8, "ffn_hidden_size": 14336,
                     "max_position_embeddings": 8192, "rope_parameters": _LLAMA3_ROPE, "layernorm_epsilon": 1e-5},
        # The released Llama 3.2 1B and Llama 3.1 8B: context 131072 by llama3 RoPE scaling of the 8192 they were
        # pretrained at, factor 32 (3.2) / 8 (3.1), low/high frequency factors 1 and 4 (transformers'
        # models/llama/convert_llama_weights_to_hf.py, which writes these configs from Meta's release; rope_theta
        # 500000, shapes, tying and token ids as in meta-llama/Llama-3.2-1B's config.json).
        "llama-3.2-1b": {**_LLAMA, **_LLAMA3_VOCAB, "hidden_size": 2048, "num_layers": 16,
                         "num_attention_heads": 32, "num_query_groups": 8, "ffn_hidden_size": 8192,
                         "max_position_embeddings": 131072, "rope_parameters": _llama31_rope(32.0),
                         "tie_word_embeddings": True, "layernorm_epsilon": 1e-5},
        "llama-3.1-8b": {**_LLAMA, **_LLAMA3_VOCAB, "hidden_size": 4096, "num_layers": 32,
                         "num_attention_heads": 32, "num_query_groups": 8, "ffn_hidden_size": 14336,
                         "max_position_embeddings": 131072, "rope_parameters": _llama31_rope(8.0),
                         "layernorm_epsilon": 1e-5},
    },
    "bert": {
        # A model that trains in minutes on two CPU cores (the BERT demo recipe and the tests).
        "bert-tiny": {"hidden_size": 128, "num_layers": 4, "num_attention_heads": 4},
        # The paper's BERT family (Table 4), pre-LayerNorm, uncased WordPiece vocabulary of 30,522.
        "bert-336m": {"hidden_size": 1024, "num_layers": 24, "num_attention_heads": 16},
        "bert-1.3b": {"hidden_size": 2048, "num_layers": 24, "num_attention_heads": 32},
        "bert-3.9b": {"hidden_size": 2560, "num_layers": 48, "num_attention_heads": 40},
    },
}

# The size each model is known by (paper Table 1; Llama 3 / 3.2 model cards), for the parameter-count test.
EXPECTED_PARAMS = {
    "gpt-345m": 355e6, "gpt-1.2b": 1.2e9, "gpt-2.5b": 2.5e9, "gpt-4.2b": 4.2e9, "gpt-8.3b": 8.3e9,
    "llama-1b": 1.24e9, "llama-8b": 8.03e9, "llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9,
    "bert-336m": 336e6, "bert-1.3b": 1.3e9, "bert-3.9b": 3.9e9,
}


def lookup_preset(name: str, family: str) -> dict:
    presets = PRESETS[family]
    if name not in presets:
        raise ValueError(f"Unknown {family} preset {name!r}. Known presets: {', '.join(presets)}.")
    return copy.deepcopy(presets[name])


def preset_family(name: str) -> str:
    """The family ("gpt" or "bert") of a preset name; raises ValueError listing every preset for an unknown one."""
    for family, presets in PRESETS.items():
        if name in presets:
            return family
    known = ", ".join(n for presets in PRESETS.values() for n in presets)
    raise ValueError(f"Unknown model preset {name!r}. Known presets: {known}.")
