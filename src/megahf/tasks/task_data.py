"""Loading and checking the data of a fine-tuning task (GLUE, RACE), before anything computes.

A task's data comes from the Hub dataset (`nyu-mll/glue`, `ehovy/race`; needs the network or the local cache) or from
a local folder laid out like it: `{folder}/{config}/{split}-00000-of-0000N.parquet` (one or more shards per split, as
the Hub stores them; a README.md with `configs:` makes the folder loadable by `datasets.load_dataset` too, but megahf
reads the parquet files directly, so it is not required). Everything wrong with the data raises `TaskDataError` (a
`MegahfError`: one line on the command line) naming the folder, the split, the column, the row and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from ..assets import ASSETS_DIR
from .race import RACE_LETTERS, race_level
from .task_spec import MULTIPLE_CHOICE, TaskDataError, TaskSpec

FIXTURES_DIR = ASSETS_DIR / "fixtures"

#: Where the shipped fixtures (NOT the real data: tiny hand-made stand-ins) of each Hub dataset lie.
FIXTURE_FOLDERS = {"nyu-mll/glue": FIXTURES_DIR / "glue", "ehovy/race": FIXTURES_DIR / "race"}


def load_splits(task: TaskSpec, dataset: str | os.PathLike | None,
                splits: Sequence[str] | None = None) -> datasets.DatasetDict:
    """The splits `splits` (default: all of the task's train, eval and test splits) of `dataset`, checked by
    `check_split`. `dataset` None, or the task's Hub name, loads the Hub dataset; anything else must be a local
    folder laid out like it."""
    wanted = tuple(splits) if splits is not None else task.all_splits
    if dataset is None or str(dataset) == task.hub_name:
        loaded = _load_hub(task)
        source = f"{task.hub_name} ({task.hub_config})"
    else:
        loaded = _load_folder(task, Path(dataset), wanted)
        source = f"dataset {dataset}"
    missing = [s for s in wanted if s not in loaded]
    if missing:
        raise TaskDataError(f"{source}: no split {missing[0]!r} for task {task.name} (splits found: "
                            f"{', '.join(loaded) or 'none'}); the task needs {', '.join(wanted)}")
    checked = datasets.DatasetDict({name: loaded[name] for name in wanted})
    for name, split in checked.items():
        check_split(task, split, name, source)
    return checked


def _load_hub(task: TaskSpec) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(task.hub_name, task.hub_config)
    except Exception as error:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ValueError, ...)
        raise TaskDataError(f"cannot load {task.hub_name} ({task.hub_config}) from the Hub ({type(error).__name__}: "
                            f"{error}); offline, set `dataset` to a local folder laid out like it "
                            f"({task.hub_config}/{{split}}-00000-of-00001.parquet)") from error


def _load_folder(task: TaskSpec, folder: Path, wanted: Sequence[str]) -> datasets.DatasetDict:
    layout = f"{task.hub_config}/{{split}}-00000-of-00001.parquet, as the Hub dataset {task.hub_name} stores it"
    if not folder.is_dir():
        raise TaskDataError(f"dataset {folder}: no such folder; pass a folder laid out like {task.hub_name} "
                            f"({layout}), or leave `dataset` unset to load {task.hub_name} from the Hub")
    config_dir = folder / task.hub_config
    if not config_dir.is_dir():
        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise TaskDataError(f"dataset {folder}: not laid out like {task.hub_name}: it has no {task.hub_config}/ "
                            f"folder (folders found: {', '.join(found) or 'none'}); pass a folder holding {layout}")
    files = {split: sorted(str(p) for p in config_dir.glob(f"{split}-*.parquet")) for split in wanted}
    missing = [split for split, paths in files.items() if not paths]
    if missing:
        present = sorted({p.name.split("-")[0] for p in config_dir.glob("*.parquet")})
        raise TaskDataError(f"dataset {folder}: no split {missing[0]!r} for task {task.name} (no file "
                            f"{config_dir / (missing[0] + '-*.parquet')}; splits found: {', '.join(present) or 'none'}"
                            f"); the task needs {', '.join(wanted)}; add the split's parquet file")
    loaded = datasets.DatasetDict()
    for split, paths in files.items():  # one split at a time: each is checked against the task on its own
        try:
            loaded[split] = datasets.load_dataset("parquet", data_files={split: paths}, split=split)
        except Exception as error:  # a damaged or non-parquet file, or shards whose schemas disagree
            cause = error.__cause__ or error
            raise TaskDataError(f"dataset {folder}: cannot read split {split!r} ({', '.join(paths)}: "
                                f"{type(cause).__name__}: {cause}); pass intact parquet files laid out like "
                                f"{task.hub_name}") from error
    return loaded


def check_split(task: TaskSpec, split: datasets.Dataset, name: str, source: str) -> None:
    """The split has the task's columns, text where text belongs and labels in the task's classes (test splits may
    hold -1, "unlabeled"); RACE's evaluation splits also tell the level (middle/high) of each row by its
    `example_id`. Raises `TaskDataError` on the first problem."""
    missing = [c for c in task.columns if c not in split.column_names]
    if missing:
        raise TaskDataError(f"{source}: split {name!r} has no column {missing[0]!r} (columns: "
                            f"{', '.join(split.column_names)}); task {task.name} needs {', '.join(task.columns)} "
                            f"as in {task.hub_name}")
    table = split.data.table if hasattr(split.data, "table") else split.data
    for column in task.text_columns:
        _check_strings(table.column(column), source, name, column)
    unlabeled_ok = name in task.test_splits
    if task.head == MULTIPLE_CHOICE:
        _check_race(task, split, name, source, unlabeled_ok)
    elif task.is_regression:
        _check_scores(split, name, source, unlabeled_ok)
    else:
        _check_classes(task, split, name, source, unlabeled_ok)


def _check_strings(column: pa.ChunkedArray, source: str, name: str, column_name: str) -> None:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise TaskDataError(f"{source}: split {name!r} column {column_name!r} holds {column.type}, not text; pass "
                            "the text as strings")
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise TaskDataError(f"{source}: split {name!r} row {row}: column {column_name!r} is empty (null); fill it "
                            "or remove the row")


def _check_classes(task: TaskSpec, split: datasets.Dataset, name: str, source: str, unlabeled_ok: bool) -> None:
    feature = split.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        if tuple(feature.names) != task.label_names:
            raise TaskDataError(f"{source}: split {name!r} labels are the classes {list(feature.names)}, but task "
                                f"{task.name} numbers them {list(task.label_names)} (as {task.hub_name} does); "
                                "relabel the data in that order")
    elif not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise TaskDataError(f"{source}: split {name!r} column 'label' holds {feature}, not class ids; store the "
                            f"class ids 0..{task.num_labels - 1} ({', '.join(task.label_names)})")
    allowed = set(range(task.num_labels)) | ({-1} if unlabeled_ok else set())
    for row, value in enumerate(split["label"]):
        if value not in allowed:
            hint = "" if unlabeled_ok else " (-1, unlabeled, is allowed only in the test splits)"
            raise TaskDataError(f"{source}: split {name!r} row {row}: label {value} is not one of task {task.name}'s "
                                f"classes {', '.join(f'{i}={n}' for i, n in enumerate(task.label_names))}{hint}; "
                                "fix or remove the row")


def _check_scores(split: datasets.Dataset, name: str, source: str, unlabeled_ok: bool) -> None:
    feature = split.features["label"]
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("float", "int"))):
        raise TaskDataError(f"{source}: split {name!r} column 'label' holds {feature}, not similarity scores; store "
                            "numbers from 0 to 5 (STS-B)")
    for row, value in enumerate(split["label"]):
        if value is None or not math.isfinite(value) or not (0.0 <= value <= 5.0 or (unlabeled_ok and value == -1)):
            hint = "" if unlabeled_ok else " (-1, unlabeled, is allowed only in the test splits)"
            raise TaskDataError(f"{source}: split {name!r} row {row}: label {value} is not an STS-B similarity score "
                                f"from 0 to 5{hint}; fix or remove the row")


def _check_race(task: TaskSpec, split: datasets.Dataset, name: str, source: str, unlabeled_ok: bool) -> None:
    for row, (answer, options) in enumerate(zip(split["answer"], split["options"])):
        if not isinstance(options, list) or len(options) != len(RACE_LETTERS) or \
                not all(isinstance(o, str) for o in options):
            raise TaskDataError(f"{source}: split {name!r} row {row}: 'options' is {options!r}, not a list of "
                                f"{len(RACE_LETTERS)} strings; fix or remove the row")
        if answer not in RACE_LETTERS and not (unlabeled_ok and answer in ("", None)):
            raise TaskDataError(f"{source}: split {name!r} row {row}: answer {answer!r} is not one of "
                                f"{', '.join(RACE_LETTERS)}; fix or remove the row")
    if name in task.eval_splits:
        for row, example_id in enumerate(split["example_id"]):
            if race_level(example_id) is None:
                raise TaskDataError(f"{source}: split {name!r} row {row}: example_id {example_id!r} does not tell "
                                    "the level (RACE reports middle and high accuracy: ids start with 'middle' or "
                                    "'high', as in ehovy/race, e.g. 'high1234.txt'); rename the ids")


__all__ = ["FIXTURES_DIR", "FIXTURE_FOLDERS", "check_split", "load_splits"]
