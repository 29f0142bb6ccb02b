"""Pipeline parallelism's recipe keys and layout, in one process: the micro-batches derived as Megatron derives them,
every layout that does not fit refused before anything is built (key, value, fix), the stage split, and the
verbs that cannot take a pipelined run's checkpoint pointing at a model folder. The runs themselves are
tests/distributed/test_pipeline_layouts.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from megahf.errors import TRAINING_CHECKPOINT_MARKER
from megahf.parallel.layout import LayoutError, resolve_layout
from megahf.parallel.pipeline import stage_layers, stages_of_rank
from megahf.recipe import FinetuneRecipe, RecipeError, parse_recipe
from megahf.tasks.common import EvaluationError, check_model_folder
from megahf.tasks.finetuning import get_task
from megahf.training import load_recipe
from megahf.training.finetune_setup import resolve_model
from megahf.training.setup import build_layout

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GPT = RECIPES / "gpt" / "tiny.yaml"


def test_micro_batches_are_the_global_batch_over_micro_batch_and_data_parallel_size():
    layout = resolve_layout(world_size=8, tensor_parallel_size=2, micro_batch_size=2, global_batch_size=16,
                            pipeline_parallel_size=2)
    # 8 processes = 2 stages x 2 data-parallel x 2 tensor-parallel; 16 / (2 x 2) = 4 micro-batches per step
    assert (layout.data_parallel_size, layout.gradient_accumulation_steps) == (2, 4)
    assert layout.pipelined and not layout.sharded  # the pipeline builds its stages, not transformers
    assert layout.describe() == ("8 processes x pipeline parallel 2 (1f1b) x tensor parallel 2 x DDP replicas 2; "
                                 "global batch 16 = micro 2 x data parallel 2 x micro-batches through the pipeline 4")


@pytest.mark.parametrize("kwargs, message", [
    ({"world_size": 6, "tensor_parallel_size": 2, "pipeline_parallel_size": 2},
     r"world size 6 is not a multiple of pipeline_parallel_size=2 x tensor_parallel_size=2 = 4"),
    ({"world_size": 2, "micro_batch_size": 4, "global_batch_size": 4, "pipeline_parallel_size": 2},
     r"pipeline_parallel_size=2 needs at least 2 micro-batches per step, and the global batch gives 1 .*set "
     r"global_batch_size to at least 8"),
    ({"world_size": 2, "micro_batch_size": 1, "global_batch_size": 3, "pipeline_parallel_size": 2,
      "virtual_pipeline_size": 2, "pipeline_schedule": "interleaved-1f1b"},
     r"interleaved-1f1b runs the micro-batches in rounds of pipeline_parallel_size=2, and the global batch gives 3; "
     r"set global_batch_size to a multiple of 2"),
    ({"world_size": 4, "fsdp_size": 4, "pipeline_parallel_size": 2},
     r"fsdp_size=4 does not divide the data-parallel size 2 \(= 4 processes / tensor_parallel_size=1 x "
     r"pipeline_parallel_size=2\)"),
])
def test_layouts_that_do_not_fit_name_key_value_and_fix(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        resolve_layout(**kwargs)


@pytest.mark.parametrize("overrides, message", [
    (["--pipeline_parallel_size", "2", "--pipeline_schedule", "zigzag"],
     r"pipeline_schedule='zigzag' is invalid: use one of 1f1b, gpipe, interleaved-1f1b, interleaved-zb"),
    (["--pipeline_parallel_size", "2", "--virtual_pipeline_size", "2"],
     r"virtual_pipeline_size=2 is invalid: pipeline_schedule=1f1b runs one model chunk per rank"),
    (["--pipeline_parallel_size", "2", "--pipeline_schedule", "interleaved-1f1b"],
     r"virtual_pipeline_size=1 is invalid: pipeline_schedule=interleaved-1f1b interleaves several model chunks"),
    (["--pipeline_parallel_size", "3"],
     r"pipeline_parallel_size=3 x virtual_pipeline_size=1 = 3 stages do not divide the model's num_layers=4"),
    (["--pipeline_parallel_size", "2", "--compile", "true"],
     r"compile=True: megahf does not compile a pipelined model yet"),
    (["--pipeline_parallel_size", "2", "--model", "bert-tiny", "--tokenizer", "bert-uncased-embedded"],
     r"megahf pipelines GPT models only, and model='bert-tiny' is a BERT; set pipeline_parallel_size: 1"),
])
def test_pretraining_refuses_what_a_pipeline_cannot_run(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(GPT, overrides)


def test_a_recipe_gives_the_pipelined_layout():
    recipe = load_recipe(GPT, ["--pipeline_parallel_size", "2", "--pipeline_schedule", "interleaved-zb",
                               "--virtual_pipeline_size", "2", "--global_batch_size", "16"])
    layout = build_layout(recipe, world_size=4)
    assert (layout.pipeline_parallel_size, layout.virtual_pipeline_size, layout.data_parallel_size) == (2, 2, 2)
    assert layout.gradient_accumulation_steps == 16 // (recipe.parallel.micro_batch_size * 2)


def test_stages_split_the_layers_evenly_and_loop_over_the_ranks():
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # interleaved: rank 0 runs stages 0 and 2 (layers 0-1 and 4-5), rank 1 stages 1 and 3
    assert stages_of_rank(0, 2, 2) == [0, 2] and stages_of_rank(1, 2, 2) == [1, 3]
    with pytest.raises(ValueError, match="3 pipeline stages do not divide num_layers=8"):
        stage_layers(8, 3)


def test_finetuning_does_not_pipeline():
    with pytest.raises(RecipeError, match=r"pipeline_parallel_size=2: megahf finetune does not pipeline .* final/ "
                                          r"folder is an ordinary model folder"):
        parse_recipe(FinetuneRecipe, RECIPES / "glue" / "mnli.yaml",
                     ["--model", "bert-tiny", "--pipeline_parallel_size", "2"]).validate()


def test_a_training_checkpoint_given_as_a_model_says_how_to_get_a_model_folder(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_0000006"
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINING_CHECKPOINT_MARKER).write_text("{}")
    fix = rf"megahf training checkpoint .* use the run's final/ folder, or write one with `megahf convert --from " \
          rf"megahf --to megahf {checkpoint} NEW_FOLDER`"
    with pytest.raises(EvaluationError, match=fix):
        check_model_folder(checkpoint)
    recipe = parse_recipe(FinetuneRecipe, RECIPES / "glue" / "mnli.yaml", ["--model", str(checkpoint)])
    with pytest.raises(RecipeError, match=fix):
        resolve_model(recipe, get_task("mnli"))
