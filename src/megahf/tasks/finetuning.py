"""The fine-tuning tasks of the paper (the nine GLUE tasks and RACE): data, features, batches, metrics, predictions.

`get_task(name)` returns a `FinetuneTask`, which

* `load(dataset)`s its splits from the Hub dataset or a local folder laid out like it, checking columns and labels
  before anything computes (`task_data`; errors are `TaskDataError`);
* `featurize`s a split into unpadded token features as Megatron-LM does (`glue.py`, `race.py`);
* `collate`s a batch of features into right-padded tensors (RACE: `[batch, 4, length]`);
* `compute_metrics` with the evaluate modules shipped in `megahf.metrics` (offline);
* `write_predictions` of a test split in the GLUE submission format (`index<TAB>prediction`).

| task | Hub dataset (config) | head | labels | metrics |
| --- | --- | --- | --- | --- |
| cola | nyu-mll/glue (cola) | sequence classification | unacceptable, acceptable | matthews_correlation |
| sst2 | nyu-mll/glue (sst2) | sequence classification | negative, positive | accuracy |
| mrpc | nyu-mll/glue (mrpc) | sequence classification | not_equivalent, equivalent | f1, accuracy |
| qqp | nyu-mll/glue (qqp) | sequence classification | not_duplicate, duplicate | f1, accuracy |
| stsb | nyu-mll/glue (stsb) | regression (num_labels 1) | a score from 0 to 5 | pearson, spearmanr |
| mnli | nyu-mll/glue (mnli) | sequence classification | entailment, neutral, contradiction | accuracy (m, mm) |
| qnli | nyu-mll/glue (qnli) | sequence classification | entailment, not_entailment | accuracy |
| rte | nyu-mll/glue (rte) | sequence classification | entailment, not_entailment | accuracy |
| wnli | nyu-mll/glue (wnli) | sequence classification | not_entailment, entailment | accuracy |
| race | ehovy/race (all; high, middle) | multiple choice (4) | A, B, C, D | accuracy, accuracy_middle, accuracy_high |

The shipped fixtures (`fixture_path(name)`) are tiny hand-made stand-ins in these schemas, NOT the real data.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from ..atomic import atomic_write_text
from . import glue, race
from .glue import GLUE
from .task_data import FIXTURE_FOLDERS, load_splits
from .task_spec import MULTIPLE_CHOICE, SEQUENCE_CLASSIFICATION, TaskDataError, TaskSpec

#: The smallest `max_seq_length` featurize accepts: [CLS], [SEP] and a few tokens of text.
MIN_SEQ_LENGTH = 8
#: The metric module behind each reported metric name (`megahf.metrics`), and the key its result has.
METRIC_MODULES = {"accuracy": ("accuracy", "accuracy"), "f1": ("f1", "f1"),
                  "matthews_correlation": ("matthews_correlation", "matthews_correlation"),
                  "pearson": ("pearsonr", "pearsonr"), "spearmanr": ("spearmanr", "spearmanr")}


@dataclass(frozen=True)
class FinetuneTask(TaskSpec):
    """One fine-tuning task (`TaskSpec`: see the module docstring's table) and what can be done with it: load its
    data, featurize it, collate batches, compute its metrics and write its prediction files."""

    def load(self, dataset: str | os.PathLike | None, splits: Sequence[str] | None = None) -> datasets.DatasetDict:
        """The task's splits (default all: train, eval and test; `splits` picks some) from the Hub dataset
        (`dataset` None or the Hub name; needs the network) or a local folder laid out like it
        (`{config}/{split}-00000-of-00001.parquet`). Checks that each split exists and has the task's columns, that
        every train/eval label lies in the task's classes (test labels may be -1) and, for RACE's eval splits, that
        each `example_id` tells the level; else raises `TaskDataError` naming the split, column, row and fix."""
        return load_splits(self, dataset, splits)

    def featurize(self, split: datasets.Dataset, tokenizer, max_seq_length: int) -> datasets.Dataset:
        """Unpadded token features, one row per example: `input_ids`, `token_type_ids`, `attention_mask` (RACE:
        lists of 4 lists, one per option) and `labels` (class id, float score for stsb, -1 when unlabeled); keeps
        `idx` (GLUE) / `example_id` (RACE). Megatron's featurization (glue.py, race.py)."""
        if not isinstance(max_seq_length, int) or max_seq_length < MIN_SEQ_LENGTH:
            raise TaskDataError(f"max_seq_length {max_seq_length}: too short for [CLS] text [SEP] text [SEP]; pass "
                                f"at least {MIN_SEQ_LENGTH} (Megatron fine-tunes with 512)")
        missing = [c for c in self.columns if c not in split.column_names]
        if missing:
            raise TaskDataError(f"task {self.name}: the split to featurize has no column {missing[0]!r} (columns: "
                                f"{', '.join(split.column_names)}); pass a split loaded by FinetuneTask.load")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise TaskDataError(f"task {self.name}: the tokenizer has no [CLS]/[SEP] token; pass a BERT tokenizer "
                                "(e.g. megahf.assets.load_bert_tokenizer())")
        drop = [c for c in split.column_names if c != self.id_column]
        if self.head == MULTIPLE_CHOICE:
            function = functools.partial(race.featurize_batch, tokenizer=tokenizer, max_seq_length=max_seq_length)
        else:
            function = functools.partial(glue.featurize_batch, tokenizer=tokenizer, text_columns=self.text_columns,
                                         max_seq_length=max_seq_length, regression=self.is_regression)
        features = split.map(function, batched=True, remove_columns=drop, desc=f"featurizing {self.name}")
        if self.is_regression:
            features = features.cast_column("labels", datasets.Value("float32"))
        return features

    def collate(self, features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        """A batch of `featurize`'s rows, right-padded to its longest sequence: `input_ids` (with `pad_token_id`),
        `token_type_ids` and `attention_mask` (with 0), shapes [batch, length] (RACE [batch, 4, length]); `labels`
        int64 (float32 for stsb). `idx` / `example_id` are dropped."""
        if not features:
            raise TaskDataError(f"task {self.name}: collate got an empty batch")
        choice = self.head == MULTIPLE_CHOICE
        rows = [[f["input_ids"]] if not choice else f["input_ids"] for f in features]
        width = max(len(ids) for row in rows for ids in row)
        depth = len(rows[0])
        batch = {}
        for key, pad in (("input_ids", pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
            tensor = torch.full((len(features), depth, width), pad, dtype=torch.long)
            for b, feature in enumerate(features):
                for c, values in enumerate(feature[key] if choice else [feature[key]]):
                    tensor[b, c, : len(values)] = torch.as_tensor(values, dtype=torch.long)
            batch[key] = tensor if choice else tensor[:, 0]
        dtype = torch.float32 if self.is_regression else torch.long
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
        return batch

    def compute_metrics(self, predictions: np.ndarray, references: np.ndarray,
                        split: datasets.Dataset | None = None) -> dict[str, float]:
        """The task's metrics (`self.metrics`) of `predictions` (class ids; float scores for stsb, [N] or [N, 1])
        against `references`, computed by the evaluate modules of `megahf.metrics`. RACE with `split` (whose
        `example_id` tells each row's level, see `race.race_level`) also gives `accuracy_middle` and `accuracy_high`
        (only for the levels present) and the counts `num_examples`, `num_middle`, `num_high`."""
        predictions, references = np.asarray(predictions), np.asarray(references)
        if self.is_regression and predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]  # the regression head's [N, 1] logits are the scores
        if predictions.ndim != 1 or predictions.shape != references.shape:
            raise TaskDataError(f"task {self.name}: predictions of shape {predictions.shape} for references of shape "
                                f"{references.shape}; pass one prediction per example (argmax class ids, or scores "
                                "for stsb)")
        if not len(references):
            raise TaskDataError(f"task {self.name}: no predictions to score")
        if split is not None and len(split) != len(references):
            raise TaskDataError(f"task {self.name}: {len(references)} predictions for a split of {len(split)} rows")
        results: dict[str, float] = {}
        for name in self.metrics:
            if name in METRIC_MODULES:
                module, key = METRIC_MODULES[name]
                results[name] = _metric(module).compute(predictions=predictions, references=references)[key]
        if self.head == MULTIPLE_CHOICE:
            results["num_examples"] = len(references)
            if split is not None:
                results.update(self._level_accuracies(predictions, references, split))
        return results

    def _level_accuracies(self, predictions: np.ndarray, references: np.ndarray, split: datasets.Dataset) -> dict:
        levels = np.array([race.race_level(i) for i in split["example_id"]], dtype=object)
        if any(level is None for level in levels):
            row = next(i for i, level in enumerate(levels) if level is None)
            raise TaskDataError(f"task {self.name}: row {row} of the split has example_id "
                                f"{split['example_id'][row]!r}, which tells no level (middle/high ids start with "
                                "'middle' or 'high', as in ehovy/race)")
        results = {}
        for level in race.LEVELS:
            chosen = levels == level
            results[f"num_{level}"] = int(chosen.sum())
            if chosen.any():
                results[f"accuracy_{level}"] = _metric("accuracy").compute(
                    predictions=predictions[chosen], references=references[chosen])["accuracy"]
        return results

    def prediction_file_name(self, test_split: str) -> str:
        """The file of a test split's predictions: GLUE's submission names (CoLA.tsv, ..., MNLI-m.tsv, MNLI-mm.tsv),
        race_test.tsv for RACE."""
        if test_split not in self.test_splits:
            raise TaskDataError(f"task {self.name}: {test_split!r} is not a test split; pass one of "
                                f"{', '.join(self.test_splits)}")
        return self.prediction_files[self.test_splits.index(test_split)]

    def write_predictions(self, path: str | os.PathLike, split: datasets.Dataset, predictions: np.ndarray) -> None:
        """Write `path` atomically: the header `index<TAB>prediction`, then one line per row of `split` in its
        order. GLUE: index = the row's `idx`, prediction = the label name (MNLI, QNLI, RTE, as the GLUE server
        reads them), the class id (the others) or the score with 6 decimals (stsb). RACE: index = the row's
        position in the split (RACE's `example_id` names an article, shared by its questions), prediction = the
        answer letter."""
        predictions = np.asarray(predictions)
        if self.is_regression and predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        if predictions.ndim != 1 or len(predictions) != len(split):
            raise TaskDataError(f"task {self.name}: {predictions.shape} predictions for a split of {len(split)} rows; "
                                "pass one prediction per row (argmax class ids, or scores for stsb)")
        if self.head == MULTIPLE_CHOICE:
            indices = range(len(split))
        elif "idx" in split.column_names:
            indices = split["idx"]
        else:
            raise TaskDataError(f"task {self.name}: the split has no 'idx' column; pass the loaded or featurized "
                                "split (featurize keeps idx)")
        lines = ["index\tprediction"]
        for index, prediction in zip(indices, predictions):
            lines.append(f"{index}\t{self._prediction_text(prediction)}")
        atomic_write_text(path, "\n".join(lines) + "\n")

    def _prediction_text(self, prediction) -> str:
        if self.is_regression:
            return f"{float(prediction):.6f}"
        label = int(prediction)
        if not 0 <= label < self.num_labels:
            raise TaskDataError(f"task {self.name}: prediction {label} is not a class id 0..{self.num_labels - 1}")
        return self.label_names[label] if self.names_in_submission else str(label)


@functools.lru_cache(maxsize=None)
def _metric(module: str):
    from .. import metrics  # imports evaluate on first use only

    return metrics.load(module)


def _glue_task(name: str) -> FinetuneTask:
    spec = GLUE[name]
    mnli = name == "mnli"
    return FinetuneTask(
        name=name, hub_name="nyu-mll/glue", hub_config=name, head=SEQUENCE_CLASSIFICATION,
        num_labels=len(spec.label_names) or 1, label_names=spec.label_names, train_split="train",
        eval_splits=("validation_matched", "validation_mismatched") if mnli else ("validation",),
        test_splits=("test_matched", "test_mismatched") if mnli else ("test",),
        metrics=spec.metrics, main_metric=spec.metrics[0], text_columns=spec.text_columns,
        columns=(*spec.text_columns, "label", "idx"), prediction_files=spec.prediction_files,
        names_in_submission=spec.names_in_submission, hub_configs=(name,))


RACE = FinetuneTask(
    name="race", hub_name="ehovy/race", hub_config="all", head=MULTIPLE_CHOICE, num_labels=race.NUM_CHOICES,
    label_names=race.RACE_LETTERS, train_split="train", eval_splits=("validation",), test_splits=("test",),
    metrics=("accuracy", "accuracy_middle", "accuracy_high"), main_metric="accuracy",
    text_columns=("article", "question", "example_id"), columns=("example_id", "article", "question", "answer",
                                                                  "options"),
    prediction_files=("race_test.tsv",), names_in_submission=True, hub_configs=("all", "high", "middle"))

#: Every fine-tuning task, by name.
TASKS: dict[str, FinetuneTask] = {**{name: _glue_task(name) for name in GLUE}, "race": RACE}


def get_task(name: str, config: str | None = None) -> FinetuneTask:
    """The task called `name` (e.g. "mnli", "race"), on its Hub dataset's `config` if given (RACE: all, high,
    middle). Unknown names raise `TaskDataError` listing the known ones."""
    if name not in TASKS:
        raise TaskDataError(f"task {name!r}: no such fine-tuning task; known tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    return task if config is None or config == task.hub_config else task.with_config(config)


def fixture_path(task_name: str) -> Path:
    """The folder of the shipped fixture of a task (laid out like its Hub dataset; NOT the real data)."""
    return FIXTURE_FOLDERS[get_task(task_name).hub_name]


#: The folder of the shipped fixture of each task (NOT the real data), as `fixture_path(name)` gives it.
FIXTURES: dict[str, Path] = {name: FIXTURE_FOLDERS[task.hub_name] for name, task in TASKS.items()}

__all__ = ["FIXTURES", "METRIC_MODULES", "MIN_SEQ_LENGTH", "MULTIPLE_CHOICE", "SEQUENCE_CLASSIFICATION", "TASKS",
           "FinetuneTask", "TaskDataError", "TaskSpec", "fixture_path", "get_task"]
