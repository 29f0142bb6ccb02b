"""The results a folder carries, as model-index entries (the Hub's evaluation results in a card's metadata).

    FOLDER/eval/*.json with "task": "lambada"   (megahf evaluate lambada --output-json)
        accuracy  -> text-generation, dataset LAMBADA (EleutherAI/lambada_openai), split test, metric accuracy
    FOLDER/eval/*.json with "task": "wikitext"  (megahf evaluate wikitext --output-json)
        perplexity, adjusted_perplexity -> text-generation, dataset WikiText-103 (Salesforce/wikitext,
        wikitext-103-raw-v1), split test, metric perplexity
    FOLDER/results.json                         (megahf finetune)
        every split in "eval_splits" (else "split" with "metrics"), every metric name -> value in it ->
        text-classification (GLUE) or multiple-choice (RACE), dataset results["dataset"] / ["dataset_config"],
        that split, metric type = the metric's name (accuracy, f1, matthews_correlation, pearson, spearmanr)

A result computed on megahf's shipped fixtures (results.json "smoke": true, or an evaluation whose "data" lies in
megahf's assets/fixtures) is NOT a result on the real data set: it is listed in the card's text, marked, and kept
out of the model-index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LAMBADA = ("LAMBADA", "EleutherAI/lambada_openai", None, "test")
WIKITEXT = ("WikiText-103", "Salesforce/wikitext", "wikitext-103-raw-v1", "test")
GLUE_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


@dataclass(frozen=True)
class Result:
    task_type: str
    task_name: str
    dataset_name: str
    dataset_type: str
    dataset_config: str | None
    split: str
    metric_type: str
    metric_name: str
    value: float
    source: str  # the file it came from, in the repo
    smoke: bool  # computed on a shipped fixture: not a result on the real data


def _is_fixture(data: Any) -> bool:
    return isinstance(data, str) and "assets/fixtures" in data.replace("\\", "/")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def evaluation_results(path: str, report: dict[str, Any]) -> list[Result]:
    """The results of one `megahf evaluate --output-json` file (unknown tasks give none)."""
    smoke = _is_fixture(report.get("data"))
    task = report.get("task")
    results = []
    if task == "lambada" and _number(report.get("accuracy")) is not None:
        name, kind, config, split = LAMBADA
        strict = " (strict: whole last word)" if report.get("strict") else ""
        results.append(Result("text-generation", f"Zero-shot LAMBADA last-word prediction{strict}", name, kind,
                              config, split, "accuracy", f"LAMBADA accuracy{strict}", _number(report["accuracy"]),
                              path, smoke))
    if task == "wikitext":
        name, kind, config, split = WIKITEXT
        for key, label in (("perplexity", "perplexity (BPE tokens)"),
                           ("adjusted_perplexity", "adjusted perplexity (WikiText tokens)")):
            if _number(report.get(key)) is not None:
                results.append(Result("text-generation", "Zero-shot WikiText-103 perplexity", name, kind, config,
                                      split, "perplexity", f"WikiText-103 {label}", _number(report[key]), path,
                                      smoke))
    return results


def finetune_results(results: dict[str, Any], path: str = "results.json") -> list[Result]:
    """The per-split metrics of `megahf finetune`'s results.json (whatever splits and metrics it names)."""
    dataset = results.get("dataset") or "unknown"
    config = results.get("dataset_config")
    task = str(results.get("task") or config or "")
    race = "race" in str(dataset).lower() or task.startswith("race")
    task_type = "multiple-choice" if race else "text-classification"
    pretty = "RACE" + (f" ({config})" if config else "") if race else f"GLUE {GLUE_NAMES.get(task, task.upper())}"
    splits = results.get("eval_splits") or [results.get("split")]
    smoke = bool(results.get("smoke"))
    out = []
    for split in splits:
        metrics = results.get(split) if isinstance(results.get(split), dict) else None
        if metrics is None and split == results.get("split"):
            metrics = results.get("metrics")
        for metric, value in (metrics or {}).items():
            if _number(value) is None:
                continue
            out.append(Result(task_type, pretty, pretty, str(dataset), config, str(split), str(metric),
                              f"{pretty} {split} {metric}", _number(value), path, smoke))
    return out


def all_results(source) -> list[Result]:
    """Every result of a `PublishSource`: its evaluations, then its fine-tuning results."""
    results = [r for path, report in source.evaluations.items() for r in evaluation_results(path, report)]
    if source.results:
        results += finetune_results(source.results)
    return results


def model_index(name: str, results: list[Result]) -> list[dict[str, Any]] | None:
    """The `model-index` metadata: one entry per (task, dataset, split), its metrics; fixture results left out."""
    grouped: dict[tuple, dict[str, Any]] = {}
    for r in results:
        if r.smoke:
            continue
        key = (r.task_type, r.task_name, r.dataset_type, r.dataset_config, r.split)
        if key not in grouped:
            dataset = {"name": r.dataset_name, "type": r.dataset_type, "split": r.split}
            if r.dataset_config:
                dataset["config"] = r.dataset_config
            grouped[key] = {"task": {"type": r.task_type, "name": r.task_name}, "dataset": dataset, "metrics": []}
        grouped[key]["metrics"].append({"type": r.metric_type, "value": r.value, "name": r.metric_name})
    if not grouped:
        return None
    return [{"name": name, "results": list(grouped.values())}]


__all__ = ["Result", "all_results", "evaluation_results", "finetune_results", "model_index"]
