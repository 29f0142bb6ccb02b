"""Training and scoring a fine-tune: the task's features (`featurize` -> `TaskData`), the Trainer's arguments,
`FinetuneTrainer` (MegatronTrainer scoring the dev split(s) with the task's metrics every `eval_interval` steps) and
the logits of a split on every rank (`predict_logits`).

Every rank scores the whole split in the same batches: exact under every layout, since tensor-parallel and FSDP ranks
must run their forwards together anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..parallel.layout import ParallelLayout
from ..recipe import FinetuneRecipe
from ..tasks.finetuning import FinetuneTask
from .callbacks import CheckpointCallback, MegatronLogCallback
from .trainer import MegatronTrainer, trainer_arguments


def finetune_arguments(recipe: FinetuneRecipe, layout: ParallelLayout):
    return trainer_arguments(
        recipe.optim, recipe.parallel, recipe.run, layout, num_workers=recipe.task.num_workers,
        optim="adamw_bnb_8bit" if recipe.optim.optim == "adamw_bnb_8bit" else "adamw_torch_fused",
        remove_unused_columns=False,  # the task's collate drops idx / example_id itself
        label_names=["labels"],
    )


@dataclass
class TaskData:
    """Token features of every split a run uses, and the rows they came from (for metrics and prediction files)."""

    train: Any
    evals: dict[str, tuple[Any, Any]]  # split -> (raw rows, features)
    tests: dict[str, tuple[Any, Any]]


def featurize(task: FinetuneTask, raw, tokenizer, recipe: FinetuneRecipe, args) -> TaskData:
    n = recipe.task.max_seq_length
    with args.main_process_first(desc="featurize"):  # the first process writes the map cache, the others read it
        def feats(split: str):
            features = task.featurize(raw[split], tokenizer, n)
            if len(features) != len(raw[split]):
                raise RuntimeError(f"featurize gave {len(features)} rows for {len(raw[split])} in {split}")
            return features

        return TaskData(
            train=feats(task.train_split),
            evals={s: (raw[s], feats(s)) for s in task.eval_splits},
            tests={s: (raw[s], feats(s)) for s in task.test_splits if s in raw},
        )


class FinetuneTrainer(MegatronTrainer):
    """MegatronTrainer whose evaluation scores the task's dev split(s) with the task's metrics."""

    def __init__(self, *args, task: FinetuneTask, data: TaskData, **kwargs):
        self.task = task
        self.data = data
        self.dev_results: dict[int, dict[str, dict[str, float]]] = {}  # step -> split -> metric -> value
        self.dev_losses: dict[int, dict[str, float]] = {}  # step -> split -> the training loss on it
        super().__init__(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score every dev split (Trainer calls this every eval_interval); logs eval_loss of the main split and
        eval_{split}_{metric}."""
        results = self.evaluate_dev()
        main = self.task.eval_splits[0]
        logs = {"eval_loss": results[main].pop("loss")}
        for split, metrics in results.items():
            metrics.pop("loss", None)
            logs.update({f"{metric_key_prefix}_{split}_{k}": v for k, v in metrics.items()
                         if isinstance(v, (int, float))})
        self.log(logs)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=logs)
        return logs

    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        results = {}
        for split, (rows, features) in self.data.evals.items():
            logits = predict_logits(self, features)
            references = np.asarray(features["labels"])
            metrics = {k: v if isinstance(v, int) else float(v) for k, v in self.task.compute_metrics(
                predictions_of(self.task, logits), references, split=rows).items()}
            results[split] = {**metrics, "loss": dev_loss(self.task, logits, references)}
        self.dev_results[self.state.global_step] = {s: {k: v for k, v in m.items() if k != "loss"}
                                                    for s, m in results.items()}
        self.dev_losses[self.state.global_step] = {s: m["loss"] for s, m in results.items()}
        return {s: dict(m) for s, m in results.items()}


@torch.no_grad()
def predict_logits(trainer: MegatronTrainer, features) -> np.ndarray:
    """The model's logits for every row of `features`, in order, on every rank (the same batches everywhere, so
    sharded forwards run together and no rank's share has to be gathered)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    device = trainer.args.device
    loader = DataLoader(features, batch_size=trainer.args.per_device_eval_batch_size, shuffle=False,
                        collate_fn=trainer.data_collator)
    chunks = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}  # test rows carry label -1
        with trainer.autocast_smart_context_manager():
            logits = model(**batch).logits
        chunks.append(logits.detach().float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy()


def predictions_of(task: FinetuneTask, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


def dev_loss(task: FinetuneTask, logits: np.ndarray, references: np.ndarray) -> float:
    """The training loss on the dev split: mean squared error (STS-B) or cross entropy."""
    logits_t = torch.from_numpy(logits)
    if task.is_regression:
        return F.mse_loss(logits_t[:, 0], torch.from_numpy(references).float()).item()
    return F.cross_entropy(logits_t, torch.from_numpy(references).long()).item()


def build_trainer(recipe: FinetuneRecipe, task: FinetuneTask, model, tokenizer, data: TaskData, args,
                  callbacks: list[TrainerCallback] | None, checkpoint_metadata: dict) -> FinetuneTrainer:
    pad = tokenizer.pad_token_id

    def collate(features):
        return task.collate(features, pad)

    trainer = FinetuneTrainer(
        model=model,
        args=args,
        data_collator=collate,
        train_dataset=data.train,
        eval_dataset=data.evals[task.eval_splits[0]][1],
        processing_class=tokenizer,
        recipe=recipe,
        checkpoint_metadata=checkpoint_metadata,
        task=task,
        data=data,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(MegatronLogCallback(0, perplexity=False))
    if recipe.run.save_interval:
        trainer.add_callback(CheckpointCallback(recipe.run.save_interval))
    for callback in callbacks or []:
        trainer.add_callback(callback)
    return trainer


def train_and_evaluate(trainer: FinetuneTrainer, resume_from: Path | None) -> dict[str, dict[str, float]]:
    """Train (resumed from the checkpoint `resume_from` if given), then score the dev split(s) at the end, logged like
    the periodic evaluations unless the last step's evaluation is in the history already (just done, or in the
    finished checkpoint resumed); split -> metric -> value."""
    if trainer.recipe.optim.train_steps:  # 0: epochs=0, the model as given is scored
        trainer.train_or_resume(resume_from)
    step = trainer.state.global_step
    if step not in trainer.dev_results:
        logged = any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)
        trainer.evaluate_dev() if logged else trainer.evaluate()
    return trainer.dev_results[step]


__all__ = ["FinetuneTrainer", "TaskData", "build_trainer", "dev_loss", "featurize", "finetune_arguments",
           "predict_logits", "predictions_of", "train_and_evaluate"]
