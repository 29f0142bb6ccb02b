"""F1 (the harmonic mean of precision and recall), an evaluate module shipped with megahf.

Written for megahf because evaluate 0.4.6 ships no metric scripts and cannot fetch them offline; load it with
`evaluate.load(<this folder>)` or `megahf.metrics.load("f1")`. Computed by scikit-learn; binary (class 1 positive)
by default, as GLUE reports it for MRPC and QQP.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall) (scikit-learn's f1_score)."
_INPUTS = """
predictions (list of int): predicted class ids.
references (list of int): true class ids.
pos_label (int, default 1): the positive class when average="binary".
average (str, default "binary"): "binary", "micro", "macro", "weighted", or None (one score per class).
labels (list of int, optional), sample_weight (list of float, optional): as in scikit-learn.
Returns {"f1": float} (a list of floats with average=None).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight)
        return {"f1": float(score) if np.ndim(score) == 0 else [float(s) for s in score]}
