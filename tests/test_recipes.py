"""Every shipped GPT recipe loads and validates (no training), fits the layouts its comments name, and the paper
recipes carry the paper's hyper-parameters; the continued-pretraining recipes (recipes/continue/, whose `model` is a
Hub id) load with a local stand-in checkpoint of the same kind in its place."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from megahf.training import load_recipe
from megahf.training.setup import build_config, build_layout

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GPT_RECIPES = sorted((RECIPES / "gpt").glob("*.yaml"))
CONTINUE_RECIPES = sorted((RECIPES / "continue").glob("*.yaml"))
PAPER = ("gpt-345m", "gpt-1.2b", "gpt-2.5b", "gpt-4.2b", "gpt-8.3b")


def test_the_paper_models_and_a_llama_style_one_are_shipped():
    names = {p.stem for p in GPT_RECIPES}
    assert set(PAPER) | {"llama-1b", "tiny", "llama-tiny"} <= names


@pytest.mark.parametrize("path", GPT_RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_layout_fits_one_and_two_nodes(path):
    recipe = load_recipe(path)  # every key known and typed, the model builds, TP divides it
    # named after its preset (-seq4096: the same model at a longer sequence)
    assert recipe.model.model == path.stem.removesuffix("-seq4096") or path.stem in ("tiny",)
    for world in (8, 16):  # one and two nodes of 8 GPUs
        layout = build_layout(recipe, world)
        if recipe.parallel.global_batch_size:
            assert layout.global_batch_size == recipe.parallel.global_batch_size
    if recipe.parallel.tensor_parallel_size == 1 and recipe.parallel.fsdp_size in (0, 1):  # 0: 1 without FSDP config
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


def test_the_long_context_recipes_train_at_4096_with_sequence_parallelism_where_tensor_parallel():
    for name in ("llama-8b-seq4096", "gpt-1.2b-seq4096"):
        recipe = load_recipe(RECIPES / "gpt" / f"{name}.yaml")
        assert recipe.data.seq_length == 4096
        assert build_config(recipe.model).max_position_embeddings >= 4096
        assert recipe.parallel.sequence_parallel == (recipe.parallel.tensor_parallel_size > 1)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Local checkpoints of each kind a continued-pretraining recipe names on the Hub (their position tables as long
    as the recipes' sequences)."""
    from continue_helpers import bert_folder, gpt2_folder, llama_folder

    root = tmp_path_factory.mktemp("stand-ins")
    # Llama 3 8B's grouping (32 heads in 8 groups: the recipe's tensor parallelism must divide it), smaller heads
    llama = llama_folder(root / "llama", max_positions=8192, tie=True, hidden=128, heads=32, groups=8)
    # TinyLlama's: 32 heads in 4 groups, 2048 positions (its recipe extends them)
    tinyllama = llama_folder(root / "tinyllama", max_positions=2048, tie=True, hidden=128, heads=32, groups=4)
    return {"llama": llama, "tinyllama": tinyllama, "gpt2": gpt2_folder(root / "gpt2", 1024),
            "bert": bert_folder(root / "bert", max_positions=512)}


@pytest.mark.parametrize("path", CONTINUE_RECIPES, ids=lambda p: p.stem)
def test_continued_pretraining_recipe_loads_with_a_stand_in_checkpoint(path, stand_ins):
    values = yaml.safe_load(path.read_text())
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", values["model"])  # a Hub id
    kind = path.stem.split("-")[0]
    folder = str(stand_ins[kind])
    overrides = ["--model", folder] + (["--tokenizer", folder] if values["tokenizer"] == values["model"] else [])
    recipe = load_recipe(path, overrides)
    if "rope_parameters" in values["model_overrides"]:  # a context extension: the scaling is on the loaded config
        config = build_config(recipe.model)
        assert config.max_position_embeddings == recipe.data.seq_length > 2048
        assert config.rope_parameters["rope_type"] == values["model_overrides"]["rope_parameters"]["rope_type"]
    for world in (8, 16):
        layout = build_layout(recipe, world)
        assert layout.global_batch_size == recipe.parallel.global_batch_size
