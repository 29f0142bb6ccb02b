"""Every shipped GPT recipe loads and validates (no training), fits the layouts its comments name, and the paper
recipes carry the paper's hyper-parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from megahf.training import load_recipe

GPT_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "gpt").glob("*.yaml"))
PAPER = ("gpt-345m", "gpt-1.2b", "gpt-2.5b", "gpt-4.2b", "gpt-8.3b")


def test_the_paper_models_and_a_llama_style_one_are_shipped():
    names = {p.stem for p in GPT_RECIPES}
    assert set(PAPER) | {"llama-1b", "tiny", "llama-tiny"} <= names


@pytest.mark.parametrize("path", GPT_RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_layout_fits_one_and_two_nodes(path):
    recipe = load_recipe(path)  # every key known and typed, the model builds, TP divides it
    assert recipe.model == path.stem or path.stem in ("tiny",)
    for world in (8, 16):  # one and two nodes of 8 GPUs
        layout = recipe.layout(world)
        if recipe.global_batch_size:
            assert layout.global_batch_size == recipe.global_batch_size
    if recipe.tensor_parallel_size == 1 and recipe.fsdp_size == 1:
        recipe.layout(1)  # runs on one process as well


@pytest.mark.parametrize("name", PAPER)
def test_paper_hyper_parameters(name):
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "gpt" / f"{name}.yaml")
    assert (recipe.seq_length, recipe.global_batch_size, recipe.train_steps) == (1024, 512, 300_000)
    assert (recipe.learning_rate, recipe.min_learning_rate, recipe.warmup_steps, recipe.lr_schedule) == (
        1.5e-4, 1e-5, 3000, "cosine")
    assert (recipe.weight_decay, recipe.clip_grad, recipe.activation_checkpointing) == (0.01, 1.0, True)
    config = recipe.build_config()
    assert (config.hidden_dropout, config.attention_dropout) == (0.1, 0.1)
    # Megatron's tensor-parallel degree of the paper's Table 1.
    assert recipe.tensor_parallel_size == {"gpt-345m": 1, "gpt-1.2b": 2, "gpt-2.5b": 4, "gpt-4.2b": 8,
                                           "gpt-8.3b": 8}[name]
