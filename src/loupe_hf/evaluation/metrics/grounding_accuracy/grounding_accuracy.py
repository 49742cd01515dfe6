"""Grounding accuracy at an IoU threshold as an ``evaluate`` metric (wraps ``grounding_accuracy``)."""

import datasets
import evaluate
import numpy as np

from loupe_hf.evaluation.grounding import grounding_accuracy

_DESCRIPTION = """
Accuracy of visual grounding (referring expression comprehension): a predicted box is correct
when its IoU with the referred object's box is at least the threshold (0.5 in the RefCOCO
protocol). Accuracy is a fraction in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted box per expression, 4 floats.
    references: the ground-truth box of each expression, 4 floats, same format.
    iou_threshold: minimum IoU of a hit, inclusive (default 0.5).
    box_format: "xywh" ([x, y, w, h], COCO; default) or "xyxy" ([x1, y1, x2, y2]).
Returns:
    accuracy, mean_iou, num_items.
Example:
    >>> metric = evaluate.load("src/loupe_hf/evaluation/metrics/grounding_accuracy")
    >>> metric.compute(predictions=[[0, 0, 10, 10]], references=[[0, 0, 10, 10]])
    {'accuracy': 1.0, 'mean_iou': 1.0, 'num_items': 1}
"""

_CITATION = """
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C. and Berg, Tamara L.},
  booktitle={ECCV},
  year={2016}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GroundingAccuracy(evaluate.Metric):
    """Accuracy@IoU of one predicted box per referring expression."""

    def _info(self) -> evaluate.MetricInfo:
        box = datasets.List(datasets.Value("float64"), length=4)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": box, "references": box}),
        )

    def _compute(self, predictions, references, iou_threshold=0.5, box_format="xywh"):
        return grounding_accuracy(
            np.asarray(predictions, dtype=np.float64),
            np.asarray(references, dtype=np.float64),
            iou_threshold=iou_threshold,
            box_format=box_format,
        )
