"""What the data side hands a pretraining run: a train and a valid dataset, the collator that batches them, and a
line that says where they came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainValidDatasets:
    train: Any  # a torch-style dataset: len() and [i] -> one sample (a dict of token arrays)
    valid: Any
    collate: Callable[[list[dict]], dict]  # samples -> the model's keyword inputs
    description: str  # for the log: the source and the sizes

    def describe(self) -> str:
        return self.description


__all__ = ["TrainValidDatasets"]
