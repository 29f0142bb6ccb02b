"""The evaluate modules shipped in megahf/metrics equal scikit-learn / scipy, load offline from the package path, and
give each task its metrics under the names results.json uses."""

import datasets
import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from megahf import metrics
from megahf.tasks.finetuning import TASKS, TaskDataError, get_task

# fixed predictions, 3 classes and imbalanced so that the metrics differ from one another
REFERENCES = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 1, 2])
PREDICTIONS = np.array([0, 1, 1, 1, 0, 2, 0, 2, 0, 1, 2, 2])
BINARY_REFERENCES = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 1])
BINARY_PREDICTIONS = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 0])
SCORES_REFERENCES = np.array([0.0, 1.2, 2.5, 3.1, 4.8, 5.0, 2.2, 0.4])
SCORES_PREDICTIONS = np.array([0.3, 1.0, 3.0, 2.7, 4.1, 4.9, 1.5, 1.0])

# both sides are the same float64 computations; only the order of operations may differ, a few ulps of values ~1
TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def loaded():
    return {name: metrics.load(name) for name in metrics.METRICS}


def test_every_module_loads_with_evaluate_load_from_its_folder():
    for name in metrics.METRICS:
        module = evaluate.load(str(metrics.path(name)))
        assert isinstance(module, evaluate.Metric)
        assert (metrics.METRICS_DIR / name / f"{name}.py").is_file()


def test_accuracy_equals_sklearn(loaded):
    result = loaded["accuracy"].compute(predictions=PREDICTIONS, references=REFERENCES)["accuracy"]
    assert result == pytest.approx(accuracy_score(REFERENCES, PREDICTIONS), abs=TOLERANCE)
    assert result == pytest.approx(8 / 12, abs=TOLERANCE)  # counted by hand


def test_f1_equals_sklearn_binary_and_averaged(loaded):
    binary = loaded["f1"].compute(predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES)["f1"]
    assert binary == pytest.approx(f1_score(BINARY_REFERENCES, BINARY_PREDICTIONS), abs=TOLERANCE)
    macro = loaded["f1"].compute(predictions=PREDICTIONS, references=REFERENCES, average="macro")["f1"]
    assert macro == pytest.approx(f1_score(REFERENCES, PREDICTIONS, average="macro"), abs=TOLERANCE)
    per_class = loaded["f1"].compute(predictions=PREDICTIONS, references=REFERENCES, average=None)["f1"]
    assert per_class == pytest.approx(list(f1_score(REFERENCES, PREDICTIONS, average=None)), abs=TOLERANCE)


def test_f1_and_accuracy_differ_where_they_should(loaded):
    # 2 of 4 positives found, 1 false positive: precision 2/3, recall 1/2, F1 4/7; accuracy 7/10
    f1 = loaded["f1"].compute(predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES)["f1"]
    accuracy = loaded["accuracy"].compute(predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES)["accuracy"]
    assert f1 == pytest.approx(4 / 7, abs=TOLERANCE)
    assert accuracy == pytest.approx(7 / 10, abs=TOLERANCE)


def test_matthews_correlation_equals_sklearn(loaded):
    for predictions, references in ((PREDICTIONS, REFERENCES), (BINARY_PREDICTIONS, BINARY_REFERENCES)):
        result = loaded["matthews_correlation"].compute(predictions=predictions, references=references)
        assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(references, predictions),
                                                               abs=TOLERANCE)


def test_pearson_and_spearman_equal_scipy(loaded):
    pearson = loaded["pearsonr"].compute(predictions=SCORES_PREDICTIONS, references=SCORES_REFERENCES,
                                         return_pvalue=True)
    expected = pearsonr(SCORES_REFERENCES, SCORES_PREDICTIONS)
    assert pearson["pearsonr"] == pytest.approx(expected.statistic, abs=TOLERANCE)
    assert pearson["p-value"] == pytest.approx(expected.pvalue, rel=1e-9)
    spearman = loaded["spearmanr"].compute(predictions=SCORES_PREDICTIONS, references=SCORES_REFERENCES)
    assert spearman["spearmanr"] == pytest.approx(spearmanr(SCORES_REFERENCES, SCORES_PREDICTIONS).statistic,
                                                  abs=TOLERANCE)
    assert spearman["spearmanr"] != pytest.approx(pearson["pearsonr"], abs=1e-3)  # the two really are different


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(metrics.UnknownMetricError, match="known metrics: accuracy, f1, matthews_correlation"):
        metrics.load("bleu")


def test_each_task_reports_its_metrics_under_results_names():
    expected_keys = {
        "cola": {"matthews_correlation"}, "sst2": {"accuracy"}, "mrpc": {"f1", "accuracy"},
        "qqp": {"f1", "accuracy"}, "stsb": {"pearson", "spearmanr"}, "mnli": {"accuracy"},
        "qnli": {"accuracy"}, "rte": {"accuracy"}, "wnli": {"accuracy"},
    }
    for name, keys in expected_keys.items():
        task = TASKS[name]
        if task.is_regression:
            result = task.compute_metrics(SCORES_PREDICTIONS, SCORES_REFERENCES)
            assert task.compute_metrics(SCORES_PREDICTIONS[:, None], SCORES_REFERENCES) == result  # head's [N, 1]
            assert result["pearson"] == pytest.approx(pearsonr(SCORES_REFERENCES, SCORES_PREDICTIONS).statistic,
                                                      abs=TOLERANCE)
        else:
            result = task.compute_metrics(BINARY_PREDICTIONS, BINARY_REFERENCES)
        assert set(result) == keys, name
        assert task.main_metric in result


def test_mrpc_reports_binary_f1_and_accuracy():
    result = get_task("mrpc").compute_metrics(BINARY_PREDICTIONS, BINARY_REFERENCES)
    assert result == pytest.approx({"f1": 4 / 7, "accuracy": 7 / 10}, abs=TOLERANCE)


def test_race_accuracy_by_level_with_counts():
    split = {"example_id": ["middle1.txt", "middle1.txt", "high2.txt", "high2.txt", "high3.txt"]}
    result = get_task("race").compute_metrics(np.array([0, 1, 2, 3, 0]), np.array([0, 2, 2, 3, 1]), split=_rows(split))
    assert result == pytest.approx({"accuracy": 3 / 5, "accuracy_middle": 1 / 2, "accuracy_high": 2 / 3,
                                    "num_examples": 5, "num_middle": 2, "num_high": 3}, abs=TOLERANCE)


def test_race_levels_refused_for_ids_without_level():
    split = _rows({"example_id": ["middle1.txt", "college9.txt"]})
    with pytest.raises(TaskDataError, match="'college9.txt'.*level"):
        get_task("race").compute_metrics(np.array([0, 1]), np.array([0, 1]), split=split)


def test_logits_instead_of_class_ids_are_refused():
    with pytest.raises(TaskDataError, match="argmax class ids"):
        get_task("sst2").compute_metrics(np.zeros((4, 2)), np.zeros(4))


def _rows(columns):
    return datasets.Dataset.from_dict(columns)
