"""Every shipped GPT recipe loads and validates (no training), fits the layouts its comments name, and the paper
recipes carry the paper's hyper-parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from megahf.training import load_recipe
from megahf.training.setup import build_config, build_layout

GPT_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "gpt").glob("*.yaml"))
PAPER = ("gpt-345m", "gpt-1.2b", "gpt-2.5b", "gpt-4.2b", "gpt-8.3b")


def test_the_paper_models_and_a_llama_style_one_are_shipped():
    names = {p.stem for p in GPT_RECIPES}
    assert set(PAPER) | {"llama-1b", "tiny", "llama-tiny"} <= names


@pytest.mark.parametrize("path", GPT_RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_layout_fits_one_and_two_nodes(path):
    recipe = load_recipe(path)  # every key known and typed, the model builds, TP divides it
    assert recipe.model.model == path.stem or path.stem in ("tiny",)
    for world in (8, 16):  # one and two nodes of 8 GPUs
        layout = build_layout(recipe, world)
        if recipe.parallel.global_batch_size:
            assert layout.global_batch_size == recipe.parallel.global_batch_size
    if recipe.parallel.tensor_parallel_size == 1 and recipe.parallel.fsdp_size == 1:
        build_layout(recipe, 1)  # runs on one process as well


@pytest.mark.parametrize("name", PAPER)
def test_paper_hyper_parameters(name):
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "gpt" / f"{name}.yaml")
    assert (recipe.data.seq_length, recipe.parallel.global_batch_size, recipe.optim.train_steps) == (1024, 512,
                                                                                                   300_000)
    optim = recipe.optim
    assert (optim.learning_rate, optim.min_learning_rate, optim.warmup_steps, optim.lr_schedule) == (
        1.5e-4, 1e-5, 3000, "cosine")
    assert (optim.weight_decay, optim.clip_grad, recipe.model.recompute) == (0.01, 1.0, "full")
    config = build_config(recipe.model)
    assert (config.hidden_dropout, config.attention_dropout) == (0.1, 0.1)
    # Megatron's tensor-parallel degree of the paper's Table 1.
    assert recipe.parallel.tensor_parallel_size == {"gpt-345m": 1, "gpt-1.2b": 1, "gpt-2.5b": 2, "gpt-4.2b": 4,
                                           "gpt-8.3b": 8}[name]
