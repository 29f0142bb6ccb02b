"""Accuracy (the fraction of predictions equal to their reference), an evaluate module shipped with megahf.

Written for megahf because evaluate 0.4.6 ships no metric scripts and cannot fetch them offline; load it with
`evaluate.load(<this folder>)` or `megahf.metrics.load("accuracy")`. Computed by scikit-learn.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference (scikit-learn's accuracy_score)."
_INPUTS = """
predictions (list of int): predicted class ids.
references (list of int): true class ids.
normalize (bool, default True): False returns the count of correct predictions instead of the fraction.
sample_weight (list of float, optional): a weight per example.
Returns {"accuracy": float}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
