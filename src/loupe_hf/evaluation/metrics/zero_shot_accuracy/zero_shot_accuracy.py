"""Zero-shot classification top-k accuracy as an ``evaluate`` metric (wraps ``zero_shot_accuracy``)."""

import datasets
import evaluate
import numpy as np

from loupe_hf.evaluation.classification import zero_shot_accuracy

_DESCRIPTION = """
Top-k accuracy of zero-shot classification from per-class scores (e.g. image-prompt
similarities), plus top-1 accuracy averaged over classes. Values are fractions in [0, 1]; tied
scores rank the lower class index first.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row of class scores per image, ``[num_classes]`` floats.
    references: the true class index of each image.
    ks: cut-offs k (default ``(1, 5)``).
Returns:
    ``top{k}`` for each k and ``mean_per_class_top1``.
Example:
    >>> metric = evaluate.load("src/loupe_hf/evaluation/metrics/zero_shot_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], ks=[1])
    {'top1': 0.5, 'mean_per_class_top1': 0.5}
"""

_CITATION = """
@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and others},
  booktitle={ICML},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    """Top-k accuracy of class scores."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5)):
        return zero_shot_accuracy(
            np.asarray(predictions, dtype=np.float64),
            np.asarray(references, dtype=np.int64),
            ks=tuple(ks),
        )
