"""Image processor for LOUPE: any image → a square, normalised `pixel_values` tensor."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision.ops import batched_nms
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
)

from .boxes import pixel_boxes

# Images larger than this are almost certainly a mistake (or a decompression bomb); PIL's own
# limit is the same order of magnitude.
MAX_IMAGE_PIXELS = 16384 * 16384


class LoupeImageError(ValueError):
    """An input that cannot be turned into a LOUPE image; the message names the input and the problem."""


def check_fraction(name: str, value: Any) -> float:
    """`value` as a float in [0, 1] (a score or IoU threshold), or an error naming `name`.

    A string or NaN would otherwise reach a tensor comparison and fail there, or silently keep
    nothing; a value outside [0, 1] would keep everything or nothing without saying so."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_top_k(value: Any, name: str = "top_k") -> int | None:
    """`value` as a positive int, or `None` (keep all); an error naming `name` otherwise.

    Slicing with 0 would return nothing and a negative count would drop the last detections,
    both silently."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a positive integer or None, got {value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


class LoupeImageProcessing:
    r"""
    What both LOUPE image processors share (the PIL one, [`LoupeImageProcessor`], and the torchvision
    one, [`LoupeImageProcessorTorchvision`], which transformers picks by default when torchvision is
    installed): both prepare images for [`LoupeModel`]: they convert any mode to RGB, resizes to the Swin input size
    (square, no crop, so boxes map back to the original image by scaling), rescales to [0, 1] and
    normalises with the ImageNet statistics of timm's Swin.

    Accepts PIL images (any mode: L, LA, P, RGBA, CMYK, I;16, I, F …), NumPy arrays and torch tensors
    (`HxW`, `HxWxC` or `CxHxW` with C in {1, 3, 4}; uint8, or floats in [0, 1]) and paths to local image
    files. Unusable inputs raise [`LoupeImageError`] naming the offending item.

    Args:
        size (`dict[str, int]`, defaults to `{"height": 224, "width": 224}`): output size.
        resample (`PILImageResampling`, defaults to `BICUBIC`): resampling filter.
        image_mean / image_std (`list[float]`): normalisation statistics (ImageNet by default).
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)
    size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = False  # done by `to_rgb_array`, which also handles 16-bit and float modes

    def preprocess(self, images: Any, *args: Any, **kwargs: Any):
        """Validates and converts every image to an RGB uint8 array, then resizes and normalises."""
        arrays = [to_rgb_array(image, index) for index, image in enumerate(_as_image_list(images))]
        kwargs["input_data_format"] = ChannelDimension.LAST
        kwargs.pop("do_convert_rgb", None)
        return super().preprocess(arrays, *args, **kwargs)

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: Any = None,
        nms_threshold: float | None = 0.5,
        top_k: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Turns [`LoupeForZeroShotDetection`] outputs into boxes in pixels, per image.

        Args:
            outputs: anything with `logits` `[B, K, Q]` and `pred_boxes` `[B, K, 4]` (normalised cx, cy, w, h).
            threshold: keep detections whose score `sigmoid(logit)` is at least this.
            target_sizes: `[B, 2]` (height, width) of the original images (tensor or list of pairs);
                `None` leaves boxes normalised to [0, 1].
            nms_threshold: IoU of the class-aware non-maximum suppression (`None` disables it).
            top_k: keep at most this many detections per image, best first.

        Returns:
            One dict per image with `scores` `[N]`, `labels` `[N]` (query indices) and `boxes` `[N, 4]`
            (x0, y0, x1, y1), sorted by score. Each region is scored against every query.
        """
        logits, boxes = _detection_outputs(outputs)
        threshold = check_fraction("threshold", threshold)
        nms_threshold = (
            None if nms_threshold is None else check_fraction("nms_threshold", nms_threshold)
        )
        top_k = check_top_k(top_k)
        sizes = _target_sizes(target_sizes, logits.shape[0])
        results = []
        for index in range(logits.shape[0]):
            size = None if sizes is None else sizes[index]
            results.append(
                _detections(logits[index], boxes[index], size, threshold, nms_threshold, top_k)
            )
        return results


def _field(outputs: Any, name: str) -> Any:
    """`outputs[name]` of a dict or a `ModelOutput`, or `None` when it is missing."""
    try:
        return outputs[name]
    except (KeyError, TypeError, IndexError):
        return getattr(outputs, name, None)


def _detection_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The `logits` `[B, K, Q]` and `pred_boxes` `[B, K, 4]` of a detector's outputs, checked, so that a
    wrong object fails here with both names rather than deep inside the box arithmetic."""
    logits, boxes = _field(outputs, "logits"), _field(outputs, "pred_boxes")
    expected = "expected the detector's outputs, with logits [B, K, Q] and pred_boxes [B, K, 4]"
    if not isinstance(logits, torch.Tensor) or not isinstance(boxes, torch.Tensor):
        raise ValueError(f"outputs lack logits or pred_boxes tensors; {expected}")
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(
            f"outputs have logits {tuple(logits.shape)} and pred_boxes {tuple(boxes.shape)}; {expected}"
        )
    return logits, boxes


def _target_sizes(target_sizes: Any, batch: int) -> list[tuple[float, float]] | None:
    """`target_sizes` as one positive (height, width) pair per image, or `None`."""
    if target_sizes is None:
        return None
    if len(target_sizes) != batch:
        raise ValueError(f"got {len(target_sizes)} target sizes for {batch} images")
    sizes = []
    for index, size in enumerate(target_sizes):
        values = size.tolist() if hasattr(size, "tolist") else size
        if (
            not isinstance(values, Sequence)
            or len(values) != 2
            or not all(isinstance(v, numbers.Real) and v > 0 for v in values)
        ):
            raise ValueError(
                f"target_sizes[{index}] must be a (height, width) pair of positive numbers, got {size!r}"
            )
        sizes.append((float(values[0]), float(values[1])))
    return sizes


def _detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    size: Any,
    threshold: float,
    nms_threshold: float | None,
    top_k: int | None,
) -> dict[str, torch.Tensor]:
    num_regions, num_queries = logits.shape
    scores = torch.sigmoid(logits.float()).flatten()  # region-major: index = k * Q + q
    labels = torch.arange(num_queries, device=logits.device).repeat(num_regions)
    xyxy = pixel_boxes(boxes.float(), size).repeat_interleave(num_queries, dim=0)
    keep = scores >= threshold
    scores, labels, xyxy = scores[keep], labels[keep], xyxy[keep]
    if nms_threshold is not None and scores.numel():
        kept = batched_nms(xyxy, scores, labels, nms_threshold)
        scores, labels, xyxy = scores[kept], labels[kept], xyxy[kept]
    order = scores.argsort(descending=True)[:top_k]
    return {"scores": scores[order], "labels": labels[order], "boxes": xyxy[order]}


class LoupeImageProcessor(LoupeImageProcessing, PilBackend):
    """LOUPE's image processor on the PIL backend (see [`LoupeImageProcessing`] for what it does)."""


class LoupeImageProcessorTorchvision(LoupeImageProcessing, TorchvisionBackend):
    """LOUPE's image processor on the torchvision backend: the same steps as [`LoupeImageProcessor`]
    (see [`LoupeImageProcessing`]), resized and normalised as tensors."""


def _as_image_list(images: Any) -> list[Any]:
    if images is None:
        raise LoupeImageError("no image given (images=None)")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise LoupeImageError("an empty list of images was given")
        return list(images)
    if _is_array(images) and np.ndim(images) == 4:
        return list(images)
    return [images]


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def to_rgb_array(image: Any, index: int = 0) -> np.ndarray:
    """Converts one image of any supported kind to an `HxWx3` uint8 array, or raises `LoupeImageError`."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_image_file(image, index)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb_array(image, index)
    if _is_array(image):
        return _array_to_rgb_array(
            np.asarray(image.detach().cpu() if hasattr(image, "detach") else image), index
        )
    raise LoupeImageError(
        f"image {index} has unsupported type {type(image).__name__}; expected a PIL image, a NumPy array, "
        "a torch tensor or a path to an image file"
    )


def _open_image_file(path: str | os.PathLike, index: int) -> PIL.Image.Image:
    if os.path.isdir(path):
        raise LoupeImageError(f"image {index}: {os.fspath(path)!r} is a folder, not an image file")
    if not os.path.isfile(path):
        raise LoupeImageError(f"image {index}: no such file {os.fspath(path)!r}")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (PIL.UnidentifiedImageError, OSError, PIL.Image.DecompressionBombError) as error:
        raise LoupeImageError(
            f"image {index}: {os.fspath(path)!r} is not a readable image ({error})"
        ) from error


def _check_size(width: int, height: int, index: int) -> None:
    if width < 1 or height < 1:
        raise LoupeImageError(f"image {index} is empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise LoupeImageError(
            f"image {index} has {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} this processor accepts; "
            "downscale it first"
        )


def _pil_to_rgb_array(image: PIL.Image.Image, index: int) -> np.ndarray:
    _check_size(image.width, image.height, index)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("RGB") clips 16/32-bit values to 255; stretch the range instead.
        values = np.asarray(image, dtype=np.float64)
        return _array_to_rgb_array(_stretch_to_unit(values), index)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent images on white, which is what viewers show.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, as torch wants


def _stretch_to_unit(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _array_to_rgb_array(array: np.ndarray, index: int) -> np.ndarray:
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):  # complex pixels would otherwise be cast to their real part, silently
        raise LoupeImageError(
            f"image {index} has dtype {array.dtype}; expected uint8 or float pixels"
        )
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW → HWC
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise LoupeImageError(
            f"image {index} has shape {tuple(array.shape)}; expected HxW, HxWxC or CxHxW with C in (1, 3, 4)"
        )
    _check_size(array.shape[1], array.shape[0], index)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise LoupeImageError(f"image {index} contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise LoupeImageError(
                f"image {index} is a float array with values in [{array.min():.3g}, {array.max():.3g}]; "
                "float images must lie in [0, 1] (or pass uint8)"
            )
        array = np.round(array * 255)
    elif array.min() < 0 or array.max() > 255:
        raise LoupeImageError(f"image {index} has integer values outside [0, 255]")
    array = array.astype(np.uint8)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255
        array = np.round(array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


__all__ = [
    "LoupeImageError",
    "LoupeImageProcessing",
    "LoupeImageProcessor",
    "LoupeImageProcessorTorchvision",
    "to_rgb_array",
]
