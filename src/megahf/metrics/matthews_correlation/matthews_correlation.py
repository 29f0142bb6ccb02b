"""Matthews correlation coefficient (CoLA's GLUE metric), an evaluate module shipped with megahf.

Written for megahf because evaluate 0.4.6 ships no metric scripts and cannot fetch them offline; load it with
`evaluate.load(<this folder>)` or `megahf.metrics.load("matthews_correlation")`. Computed by scikit-learn.
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = "Matthews correlation coefficient, from -1 to 1 (scikit-learn's matthews_corrcoef)."
_INPUTS = """
predictions (list of int): predicted class ids.
references (list of int): true class ids.
sample_weight (list of float, optional): a weight per example.
Returns {"matthews_correlation": float} (0.0 when every prediction or every reference is one class).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        score = matthews_corrcoef(references, predictions, sample_weight=sample_weight)
        return {"matthews_correlation": float(score)}
