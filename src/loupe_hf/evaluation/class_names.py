"""Class names and category ids of the zero-shot detection benchmarks, and the detection prompt.

* COCO: the 80 detection categories with their official (non-contiguous, 1..90) ids, and the
  65-class zero-shot subset (48 seen + 17 unseen) LOUPE evaluates on.
* PASCAL VOC: the 20 classes with COCO-style ids 1..20 (alphabetical order, as in the usual
  VOC → COCO JSON conversions) and readable names for prompts.
* The synthetic shapes benchmark of :mod:`loupe_hf.data`.
"""

from __future__ import annotations

from loupe_hf.configuration_loupe import DEFAULT_PROMPT_TEMPLATE
from loupe_hf.data import SHAPE_CATEGORY_IDS, SHAPES

__all__ = [
    "COCO_65_CATEGORY_IDS",
    "COCO_CATEGORY_IDS",
    "COCO_SEEN_48",
    "COCO_UNSEEN_17",
    "DETECTION_TEMPLATE",
    "SHAPES",
    "SHAPE_CATEGORY_IDS",
    "VOC_CATEGORY_IDS",
    "VOC_CLASSES",
    "VOC_PROMPT_NAMES",
    "VOC_TO_COCO",
    "prompt_for",
]

DETECTION_TEMPLATE = DEFAULT_PROMPT_TEMPLATE
"""LOUPE's zero-shot detection prompt (paper §4.2); used verbatim, without fixing "a"/"an"."""

# Official COCO 2017 detection ids (instances_*.json "categories"); ids 12, 26, 29, 30, 45, 66,
# 68, 69, 71 and 83 are unused.
COCO_CATEGORY_IDS: dict[str, int] = {
    "person": 1,
    "bicycle": 2,
    "car": 3,
    "motorcycle": 4,
    "airplane": 5,
    "bus": 6,
    "train": 7,
    "truck": 8,
    "boat": 9,
    "traffic light": 10,
    "fire hydrant": 11,
    "stop sign": 13,
    "parking meter": 14,
    "bench": 15,
    "bird": 16,
    "cat": 17,
    "dog": 18,
    "horse": 19,
    "sheep": 20,
    "cow": 21,
    "elephant": 22,
    "bear": 23,
    "zebra": 24,
    "giraffe": 25,
    "backpack": 27,
    "umbrella": 28,
    "handbag": 31,
    "tie": 32,
    "suitcase": 33,
    "frisbee": 34,
    "skis": 35,
    "snowboard": 36,
    "sports ball": 37,
    "kite": 38,
    "baseball bat": 39,
    "baseball glove": 40,
    "skateboard": 41,
    "surfboard": 42,
    "tennis racket": 43,
    "bottle": 44,
    "wine glass": 46,
    "cup": 47,
    "fork": 48,
    "knife": 49,
    "spoon": 50,
    "bowl": 51,
    "banana": 52,
    "apple": 53,
    "sandwich": 54,
    "orange": 55,
    "broccoli": 56,
    "carrot": 57,
    "hot dog": 58,
    "pizza": 59,
    "donut": 60,
    "cake": 61,
    "chair": 62,
    "couch": 63,
    "potted plant": 64,
    "bed": 65,
    "dining table": 67,
    "toilet": 70,
    "tv": 72,
    "laptop": 73,
    "mouse": 74,
    "remote": 75,
    "keyboard": 76,
    "cell phone": 77,
    "microwave": 78,
    "oven": 79,
    "toaster": 80,
    "sink": 81,
    "refrigerator": 82,
    "book": 84,
    "clock": 85,
    "vase": 86,
    "scissors": 87,
    "teddy bear": 88,
    "hair drier": 89,
    "toothbrush": 90,
}

# The 65-class COCO zero-shot split of Bansal et al., "Zero-Shot Object Detection", ECCV 2018
# (arXiv:1804.04340; class lists published as mscoco_seen_classes.json /
# mscoco_unseen_classes.json), later reused by OVR-CNN, RegionCLIP and others. The LOUPE paper
# only says "65 classes"; that it means this split is our reading (it is the standard 65-class
# COCO zero-shot benchmark), not something the paper states.
COCO_SEEN_48: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "train",
    "truck",
    "boat",
    "bench",
    "bird",
    "horse",
    "sheep",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "handbag",
    "suitcase",
    "frisbee",
    "skis",
    "kite",
    "surfboard",
    "bottle",
    "fork",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "pizza",
    "donut",
    "chair",
    "bed",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "microwave",
    "oven",
    "toaster",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "toothbrush",
)
COCO_UNSEEN_17: tuple[str, ...] = (
    "airplane",
    "bus",
    "cat",
    "dog",
    "cow",
    "elephant",
    "umbrella",
    "tie",
    "snowboard",
    "skateboard",
    "cup",
    "knife",
    "cake",
    "couch",
    "keyboard",
    "sink",
    "scissors",
)
COCO_65_CATEGORY_IDS: dict[str, int] = {
    name: category_id
    for name, category_id in COCO_CATEGORY_IDS.items()
    if name in COCO_SEEN_48 or name in COCO_UNSEEN_17
}
"""The 65 zero-shot classes with their COCO ids, in COCO id order."""

# PASCAL VOC class names as spelled in the VOC annotations, in the standard (alphabetical) order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
VOC_CATEGORY_IDS: dict[str, int] = {name: k + 1 for k, name in enumerate(VOC_CLASSES)}
"""COCO-style ids for VOC converted to COCO JSON: 1..20 in :data:`VOC_CLASSES` order."""

# Concatenated VOC names tokenise badly; prompts should read like captions.
VOC_PROMPT_NAMES: dict[str, str] = {
    **{name: name for name in VOC_CLASSES},
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}

# Every VOC class is also a COCO class (under another name for six of them).
VOC_TO_COCO: dict[str, str] = {
    **{name: name for name in VOC_CLASSES},
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "pottedplant": "potted plant",
    "sofa": "couch",
    "tvmonitor": "tv",
}


def prompt_for(name: str, template: str = DETECTION_TEMPLATE) -> str:
    """The text prompt of one class, e.g. ``prompt_for("dog") == "an image of a dog."``.

    Args:
        name: Readable class name (use :data:`VOC_PROMPT_NAMES` for VOC).
        template: A ``str.format`` template with one ``{}`` slot.
    """
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    return template.format(name)
