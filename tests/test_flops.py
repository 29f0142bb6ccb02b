"""Model FLOPs per token (for MFU): the matmul weights counted from the config equal the model's own parameters."""

from __future__ import annotations

import math

import pytest
import torch

from megahf import MegatronBertConfig, MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.training.flops import gpu_peak_tflops, matmul_parameters, measure_cpu_matmul_tflops, \
    training_flops_per_token


@pytest.mark.parametrize("preset", ["gpt-345m", "llama-1b", "llama-tiny"])
def test_matmul_parameters_are_the_models_matrices_with_the_output_layer(preset):
    config = MegatronGPTConfig.from_preset(preset)
    with torch.device("meta"):
        model = MegatronGPTForCausalLM(config)
    lookups = {"model.embedding.word_embeddings.weight", "model.embedding.position_embeddings.weight"}
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n not in lookups)
    if config.tie_word_embeddings:  # the output layer multiplies by the (shared) word embeddings
        matrices += config.padded_vocab_size * config.hidden_size
    assert matmul_parameters(config) == matrices


def test_training_flops_per_token_is_megatrons_formula():
    config = MegatronGPTConfig.from_preset("gpt-345m")
    n = matmul_parameters(config)
    assert training_flops_per_token(config, 1024) == 6 * n + 12 * 24 * 1024 * 1024
    # 345M model: ~2.4 GFLOP per token, the figure usually quoted (6 x 355M + attention)
    assert 2.2e9 < training_flops_per_token(config, 1024) < 2.6e9


def test_peaks():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gpu_peak_tflops("Tesla T4") is None
    # a rate, not judged: any machine and load gives some positive, finite figure (scripts/bench/launch_peak.py times it)
    assert math.isfinite(rate := measure_cpu_matmul_tflops(size=256, repeats=2, threads=1)) and rate > 0


def test_a_masked_lm_counts_its_output_layer_at_the_masked_share():
    """BERT needs its output layer only at the labeled positions (15%): the model FLOPs count that share of it."""
    config = MegatronBertConfig.from_preset("bert-336m")
    output = config.padded_vocab_size * config.hidden_size
    full, masked = training_flops_per_token(config, 512), training_flops_per_token(config, 512, output_fraction=0.15)
    assert full - masked == pytest.approx(6 * 0.85 * output)
