"""Evaluate modules shipped with megahf: the metrics of GLUE and RACE, loadable offline.

evaluate 0.4.6 ships no metric scripts and `evaluate.load("accuracy")` needs the network, so megahf ships its own
modules, one folder each (`accuracy/accuracy.py`, ...: `evaluate.Metric` subclasses computed by scikit-learn and
scipy). `load(name)` returns one, as `evaluate.load(str(path(name)))` does.

Importing this package is cheap; `load` imports evaluate.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MegahfError

METRICS_DIR = Path(__file__).resolve().parent

#: The metric modules shipped here, by name (each is the folder `METRICS_DIR / name` holding `name.py`).
METRICS = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")


class UnknownMetricError(MegahfError, ValueError):
    """A metric name megahf does not ship."""


def path(name: str) -> Path:
    """The folder of the shipped metric module `name`, for `evaluate.load(str(path(name)))`."""
    if name not in METRICS:
        raise UnknownMetricError(f"metric {name!r}: megahf ships no such metric module; known metrics: "
                                 f"{', '.join(METRICS)}")
    return METRICS_DIR / name


def load(name: str, **kwargs):
    """The shipped metric module `name` as an `evaluate.EvaluationModule` (offline). Keyword arguments go to
    `evaluate.load` (e.g. `experiment_id`, `keep_in_memory`)."""
    import evaluate  # imported here: importing megahf.metrics stays cheap

    return evaluate.load(str(path(name)), **kwargs)


__all__ = ["METRICS", "METRICS_DIR", "UnknownMetricError", "load", "path"]
