"""Image↔text retrieval recall@K as an ``evaluate`` metric (a wrapper of ``recall_at_k``)."""

import datasets
import evaluate
import numpy as np

from loupe_hf.evaluation.retrieval import recall_at_k

_DESCRIPTION = """
Recall@K of zero-shot image-text retrieval in both directions, as in CLIP/ALBEF evaluation.
An image query is correct at K if any of its captions is among its K most similar texts; a
text query if its image is among its K most similar images. Values are fractions in [0, 1].
Ties in similarity rank the lower candidate index first.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per image: its similarity to every text, ``[num_texts]`` floats.
        Add all image rows (``add_batch``) before ``compute``; rows are image indices in order.
    references: one list per image: the indices (columns) of that image's captions. Every
        text index must belong to exactly one image.
    ks: cut-offs K (default ``(1, 5, 10)``).
Returns:
    ``i2t_R@K`` and ``t2i_R@K`` for each K, and ``mean_recall`` (their mean).
Example:
    >>> metric = evaluate.load("src/loupe_hf/evaluation/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[[0], [1]], ks=[1])
    {'i2t_R@1': 1.0, 't2i_R@1': 1.0, 'mean_recall': 1.0}
"""

_CITATION = """
@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and others},
  booktitle={ICML},
  year={2021}
}
"""


def _text_to_image(references: list[list[int]], num_texts: int) -> np.ndarray:
    """Invert the per-image caption lists into the image index of every text."""
    owner = np.full(num_texts, -1, dtype=np.int64)
    for image, texts in enumerate(references):
        for text in texts:
            if not 0 <= text < num_texts or owner[text] != -1:
                raise ValueError(f"text {text} is out of range or claimed by two images")
            owner[text] = image
    if (owner < 0).any():
        raise ValueError(f"texts {np.flatnonzero(owner < 0).tolist()} belong to no image")
    return owner


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Recall@K in both retrieval directions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("float64")),
                    "references": datasets.List(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        similarity = np.asarray(predictions, dtype=np.float64)
        if similarity.ndim != 2:
            raise ValueError("every prediction row must have the same length (num_texts)")
        text_to_image = _text_to_image(references, similarity.shape[1])
        return recall_at_k(similarity, text_to_image, ks=tuple(ks))
