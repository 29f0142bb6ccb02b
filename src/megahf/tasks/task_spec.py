"""What a fine-tuning task is, and its error: the lowest layer of the fine-tuning tasks.

`TaskSpec` holds one row of the table in `megahf.tasks.finetuning` (where the data lies, the head, the classes, the
splits, the metrics); `TaskDataError` is what every fine-tuning module raises. Loading the data (`task_data`),
featurizing it (`glue`, `race`) and the task's operations (`finetuning.FinetuneTask`, a `TaskSpec` with methods) all
import this module, and it imports none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import MegahfError

SEQUENCE_CLASSIFICATION = "sequence_classification"
MULTIPLE_CHOICE = "multiple_choice"


class TaskDataError(MegahfError, ValueError):
    """A fine-tuning task's data (or its name) cannot be used; the message names the split, column or value and the
    fix."""


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task: where its data lies, its head and classes, its splits and metrics (see the table in
    `megahf.tasks.finetuning`)."""

    name: str
    hub_name: str
    hub_config: str
    head: str
    num_labels: int
    label_names: tuple[str, ...]
    train_split: str
    eval_splits: tuple[str, ...]
    test_splits: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    #: the columns that must hold text (GLUE: a, b in the order they are encoded; RACE: article, question, id)
    text_columns: tuple[str, ...] = ()
    #: every column `load` requires
    columns: tuple[str, ...] = ()
    #: the prediction file of each test split
    prediction_files: tuple[str, ...] = ()
    #: whether prediction files hold label names (the GLUE server wants them for MNLI, QNLI, RTE) or class ids
    names_in_submission: bool = False
    #: the Hub configs the task can read (RACE: all, high, middle)
    hub_configs: tuple[str, ...] = field(default=())

    @property
    def is_regression(self) -> bool:
        return self.head == SEQUENCE_CLASSIFICATION and self.num_labels == 1

    @property
    def all_splits(self) -> tuple[str, ...]:
        return (self.train_split, *self.eval_splits, *self.test_splits)

    @property
    def id_column(self) -> str:
        """The column featurize keeps to name rows in prediction files (GLUE `idx`, RACE `example_id`)."""
        return "example_id" if self.head == MULTIPLE_CHOICE else "idx"

    def with_config(self, config: str) -> TaskSpec:
        """The same task, of the same class, on another config of its Hub dataset (RACE: "high" or "middle")."""
        if config not in self.hub_configs:
            raise TaskDataError(f"task {self.name}: no config {config!r}; pass one of {', '.join(self.hub_configs)}")
        return dataclasses.replace(self, hub_config=config)


__all__ = ["MULTIPLE_CHOICE", "SEQUENCE_CLASSIFICATION", "TaskDataError", "TaskSpec"]
