"""What `megahf finetune` writes once training is done: the test splits' prediction files, results.json and
results.md, loss.png, recipe.yaml and the model in final/.

What `output_dir` holds:
    final/            the model and tokenizer (`AutoModelFor{SequenceClassification,MultipleChoice}.from_pretrained`
                      after `import megahf`); with LoRA/QLoRA the peft adapter (`adapter_config.json` names the base
                      model; `PeftModel.from_pretrained(base, final)`), the task head inside it, and the tokenizer
    results.json      the schema below
    results.md        the same figures as a markdown table
    predictions/      one file per test split (`task.prediction_file_name`: CoLA.tsv, MNLI-m.tsv, race_test.tsv...)
    loss.png          train loss per logged step, dev loss per evaluation
    recipe.yaml       the recipe as run (train_steps and warmup_steps resolved)

results.json (read by the model card's model-index; keep these names):
    {
      "task": "mnli",                        # megahf task name
      "dataset": "nyu-mll/glue",             # the Hub dataset the task is defined on
      "dataset_config": "mnli",              # its config
      "dataset_path": null,                  # the local folder the data came from (null: the Hub)
      "smoke": false,                        # true: the shipped fixture, NOT the real data: never report these
      "split": "validation_matched",         # the main dev split
      "main_metric": "accuracy",
      "metrics": {"accuracy": 0.84},         # metric name -> value on the main dev split
      "eval_splits": ["validation_matched", "validation_mismatched"],
      "validation_matched": {"accuracy": 0.84},      # one mapping per dev split, metric name -> value
      "validation_mismatched": {"accuracy": 0.85},
      "dev_loss": {"validation_matched": 0.45, "validation_mismatched": 0.43},   # the training loss on each
      "predictions": {"test_matched": "predictions/MNLI-m.tsv", ...},   # relative to output_dir
      "model": "runs/bert-336m/final",       # the recipe's model (folder, Hub id or preset)
      "peft": "none", "optim": "adamw", "steps": 30680, "epochs": 10, "train_rows": 392702,
      "global_batch_size": 128, "learning_rate": 1e-05, "max_seq_length": 128, "seed": 1234, "layout": "..."
    }
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text
from ..parallel.distribute import gathered_state_dict
from ..parallel.layout import ParallelLayout
from ..parallel.ranks import barrier, is_rank_zero
from ..recipe import FinetuneRecipe, save_recipe
from ..tasks.finetuning import FinetuneTask
from .finetune_trainer import FinetuneTrainer, TaskData, predict_logits, predictions_of
from .log import say
from .outputs import plot_losses, save_final
from .trainer import check_finite_weights


def predict_test_splits(trainer: FinetuneTrainer, task: FinetuneTask, data: TaskData,
                        output_dir: Path) -> dict[str, str]:
    """Write one prediction file per test split (every rank predicts, rank 0 writes); split -> relative path."""
    written = {}
    for split, (rows, features) in data.tests.items():
        predictions = predictions_of(task, predict_logits(trainer, features))
        relative = Path("predictions") / task.prediction_file_name(split)
        if is_rank_zero():
            (output_dir / "predictions").mkdir(parents=True, exist_ok=True)
            task.write_predictions(output_dir / relative, rows, predictions)
        written[split] = relative.as_posix()
    return written


def collect_results(recipe: FinetuneRecipe, task: FinetuneTask, layout: ParallelLayout, trainer: FinetuneTrainer,
                    dev: dict[str, dict[str, float]], predictions: dict[str, str], dataset_path: str | None,
                    train_rows: int) -> dict[str, Any]:
    """results.json's mapping (the schema is in the module docstring)."""
    main = task.eval_splits[0]
    return {
        "task": task.name,
        "dataset": task.hub_name,
        "dataset_config": task.hub_config,
        "dataset_path": dataset_path,
        "smoke": recipe.task.smoke,
        "split": main,
        "main_metric": task.main_metric,
        "metrics": dict(dev[main]),
        "eval_splits": list(task.eval_splits),
        **{split: dict(dev[split]) for split in task.eval_splits},
        "dev_loss": dict(trainer.dev_losses[trainer.state.global_step]),
        "predictions": predictions,
        "model": recipe.task.model,
        "peft": recipe.peft.peft,
        "optim": recipe.optim.optim,
        "steps": trainer.state.global_step,
        "epochs": recipe.task.epochs,
        "train_rows": train_rows,
        "global_batch_size": layout.global_batch_size,
        "learning_rate": recipe.optim.learning_rate,
        "max_seq_length": recipe.task.max_seq_length,
        "seed": recipe.run.seed,
        "layout": layout.describe(),
    }


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: one row per (dev split, metric)."""
    fixture = " (shipped FIXTURE, not the real data)" if results["smoke"] else ""
    lines = [f"# {results['task']}: {results['model']}{fixture}", "",
             f"Dataset {results['dataset']} ({results['dataset_config']}); main metric {results['main_metric']} on "
             f"{results['split']}; {results['steps']} steps, peft {results['peft']}, optim {results['optim']}.", "",
             "| split | metric | value |", "|---|---|---|"]
    for split in results["eval_splits"]:
        for metric, value in results[split].items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {split} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"


def adapter_state_dict(model) -> dict | None:
    """What `final/` holds of a peft model sharded by FSDP2 or tensor parallelism: its state with the trained tensors
    (the adapters and the task head, all that peft saves of it) gathered; None for any other model (transformers
    gathers a sharded model itself)."""
    if not (hasattr(model, "peft_config") and getattr(model, "is_distributed_loading_by_transformers", False)):
        return None
    return gathered_state_dict(model, {name for name, p in model.named_parameters() if p.requires_grad})


def write_outputs(recipe: FinetuneRecipe, task: FinetuneTask, trainer: FinetuneTrainer, model, tokenizer,
                  results: dict[str, Any], start: float) -> Path:
    """`final/` (every rank: a sharded model is gathered), then on rank 0 results.json, results.md, loss.png and
    recipe.yaml, each written atomically."""
    output_dir = Path(recipe.run.output_dir)
    if is_rank_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
    check_finite_weights(model, "final model")
    final = save_final(model, tokenizer, output_dir, state_dict=adapter_state_dict(model))
    main = results["metrics"]
    if is_rank_zero():
        plot_losses(trainer.state.log_history, output_dir / "loss.png",
                    f"{task.name}: {results['steps']} steps, {results['split']} {task.main_metric} "
                    f"{main.get(task.main_metric, float('nan')):.3f}",
                    ylabel="mean squared error" if task.is_regression else "cross entropy (nats/example)")
        save_recipe(recipe, output_dir / "recipe.yaml")
        atomic_write_json(output_dir / "results.json", results, indent=2)
        atomic_write_text(output_dir / "results.md", results_markdown(results))
        saved = "the peft adapter (PeftModel.from_pretrained)" if recipe.peft.peft != "none" else "the model"
        say(f"saved {final} ({saved}), results.json, results.md, loss.png"
            f"{', predictions/' if results['predictions'] else ''} in {output_dir}")
    barrier()
    figures = "; ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in results[split].items()
                                                 if isinstance(v, float))
                        for split in results["eval_splits"])
    say(f"done in {time.perf_counter() - start:.0f}s: {figures}")
    return output_dir


__all__ = ["adapter_state_dict", "collect_results", "predict_test_splits", "results_markdown", "write_outputs"]
