"""Pearson correlation coefficient (STS-B's GLUE metric, with Spearman's), an evaluate module shipped with megahf.

Written for megahf because evaluate 0.4.6 ships no metric scripts and cannot fetch them offline; load it with
`evaluate.load(<this folder>)` or `megahf.metrics.load("pearsonr")`. Computed by scipy.
"""

import datasets
import evaluate
from scipy.stats import pearsonr

_DESCRIPTION = "Pearson correlation coefficient between predicted and reference scores, from -1 to 1 (scipy)."
_INPUTS = """
predictions (list of float): predicted scores.
references (list of float): reference scores.
return_pvalue (bool, default False): also return the two-sided p-value.
Returns {"pearsonr": float} (and "p-value").
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        statistic, pvalue = pearsonr(references, predictions)
        result = {"pearsonr": float(statistic)}
        if return_pvalue:
            result["p-value"] = float(pvalue)
        return result
