"""`megahf finetune`: fine-tune a pretrained Megatron BERT on a GLUE task or RACE, as Megatron-LM's tasks/ did.

    result = run_finetune(load_finetune_recipe("recipes/glue/mnli.yaml", ["--model", "runs/bert-336m/final"]))

The pretrained encoder is loaded into `MegatronBertForSequenceClassification` (GLUE; STS-B as regression) or
`MegatronBertForMultipleChoice` (RACE): its pretraining heads are dropped and the task head is newly initialised.
Training is `MegatronTrainer` (Megatron's decay groups and linear decay, clipping across meshes) under every layout of
pretraining for a full fine-tuning; `peft: lora` trains LoRA adapters on `lora_target_modules` with the task head
trained fully (peft's `modules_to_save`), `peft: qlora` the same on a 4-bit nf4 base (bitsandbytes);
`optim: adamw_bnb_8bit` keeps AdamW's state in 8 bits (bitsandbytes). The dev split(s) are scored every
`eval_interval` steps and at the end with the task's metrics; every rank scores the whole split in the same batches
(exact under every layout: tensor-parallel and FSDP ranks must run their forwards together anyway), and the test
splits are predicted into the GLUE submission files.

The steps live in their own modules: `finetune_setup` (the checks before anything is computed), `finetune_model` (the
task model, LoRA/QLoRA), `finetune_trainer` (features, FinetuneTrainer, dev scores) and `finetune_outputs` (prediction
files, results.json and its schema, results.md, loss.png, final/).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed

from ..errors import alike_on_every_rank
from ..parallel.layout import ParallelLayout
from ..recipe import FinetuneRecipe, RecipeError, parse_recipe
from ..tasks.finetuning import FinetuneTask, get_task
from .finetune_model import apply_peft, build_task_model, lora_target_pattern, shard_model
from .finetune_outputs import collect_results, predict_test_splits, write_outputs
from .finetune_setup import (check_layout, find_finetune_checkpoint, finetune_checkpoint_metadata, load_data,
                             load_tokenizer, plan_steps, resolve_model)
from .finetune_trainer import (FinetuneTrainer, TaskData, build_trainer, featurize, finetune_arguments,
                               train_and_evaluate)
from .log import say
from .processes import prepare_processes
from .publish import check_hub_push, push_to_hub
from .setup import build_layout


def load_finetune_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> FinetuneRecipe:
    """Read a fine-tuning recipe and apply `--key value` overrides; `RecipeError` names the key, the value and the
    fix. The checks that need the model or the data run at the start of `run_finetune`."""
    return parse_recipe(FinetuneRecipe, path, overrides)


@dataclass
class FinetuneResult:
    """What a run leaves behind: the fine-tuned model (in memory), its tokenizer, the Trainer and results.json."""

    model: Any
    tokenizer: Any
    trainer: FinetuneTrainer
    results: dict[str, Any]
    output_dir: Path


def run_finetune(recipe: FinetuneRecipe, callbacks: list[TrainerCallback] | None = None) -> FinetuneResult:
    """Fine-tune as the recipe says and write the run's outputs. Under a launcher (torchrun, accelerate launch) every
    process calls it. Everything the user gave is checked before anything is computed or written."""
    start = time.perf_counter()
    with alike_on_every_rank():  # every process reads the same recipe and launch config: printed once (megahf.cli)
        recipe.validate()
        task = get_task(recipe.task.task)
        source = resolve_model(recipe, task)
        layout = build_layout(recipe)
        check_layout(recipe, source, layout)
        prepare_processes(layout)
    check_hub_push(recipe)  # a push that cannot happen is refused before any training
    set_seed(recipe.run.seed)
    tokenizer = load_tokenizer(recipe, source)
    raw, dataset_path = load_data(recipe, task)
    recipe = plan_steps(recipe, layout, len(raw[task.train_split]))
    args = finetune_arguments(recipe, layout)  # starts the process group under a launcher
    if args.world_size != layout.world_size:
        raise RecipeError(f"the launcher started {args.world_size} processes but WORLD_SIZE says {layout.world_size}")
    resume_from = find_finetune_checkpoint(recipe, layout) if recipe.optim.train_steps else None
    data = featurize(task, raw, tokenizer, recipe, args)
    model = build_task_model(recipe, task, source, tokenizer)
    model = shard_model(apply_peft(recipe, task, model), layout)
    describe(recipe, task, model, layout, data)
    trainer = build_trainer(recipe, task, model, tokenizer, data, args, callbacks,
                            finetune_checkpoint_metadata(recipe, layout))
    dev = train_and_evaluate(trainer, resume_from)
    predictions = predict_test_splits(trainer, task, data, Path(recipe.run.output_dir))
    results = collect_results(recipe, task, layout, trainer, dev, predictions, dataset_path, len(data.train))
    output_dir = write_outputs(recipe, task, trainer, model, tokenizer, results, start)
    push_to_hub(recipe, output_dir)
    return FinetuneResult(model=model, tokenizer=tokenizer, trainer=trainer, results=results, output_dir=output_dir)


def finetune(recipe: FinetuneRecipe) -> dict[str, Any]:
    """Fine-tune as the recipe says, write the outputs; return results.json's mapping."""
    return run_finetune(recipe).results


def describe(recipe: FinetuneRecipe, task: FinetuneTask, model, layout: ParallelLayout, data: TaskData) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    peft = {"none": "full fine-tuning", "lora": f"LoRA r={recipe.peft.lora_rank}",
            "qlora": f"QLoRA (4-bit nf4 base) r={recipe.peft.lora_rank}"}[recipe.peft.peft]
    dev = ", ".join(f"{split} {len(features):,}" for split, (_, features) in data.evals.items())
    test = ", ".join(f"{split} {len(features):,}" for split, (_, features) in data.tests.items())
    say(f"{task.name}: {len(data.train):,} train rows, dev {dev}{'; test ' + test if test else ''}; "
        f"max_seq_length {recipe.task.max_seq_length}")
    optim = recipe.optim
    say(f"{peft}: {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters trained (this rank's share); "
        f"{optim.optim}, lr {optim.learning_rate:g} {optim.lr_schedule} -> {optim.min_learning_rate:g}; "
        f"{layout.describe()}")


__all__ = ["FinetuneResult", "FinetuneTrainer", "finetune", "load_finetune_recipe", "lora_target_pattern",
           "run_finetune"]
