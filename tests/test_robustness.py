"""Every bad input a clear error (issue #16): a sweep of unusable inputs over every surface a user
touches — the transformers pipelines, the direct API, the processor, `from_pretrained`, the config,
the example scripts, the evaluation loaders and the Space — each asserting the exception type and a
message that names the argument and what was expected. A case fails when the type differs (an
error from deep inside torch, timm or nltk) or the message does not say what to fix.

The last test counts the cases per surface, so that deleting some is noticed. After the sweep, a few
tests cover inputs that now simply work (NumPy images in the pipeline, a truncated image in an
evaluation folder, a 10,000-word caption) and the Space's upload cap on a real server.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, pipeline

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection, LoupeImageError, LoupeProcessor
from loupe_hf.data import generate_sample
from loupe_hf.evaluation import coco_map, load_coco_json, load_image_folder, load_karpathy_split
from loupe_hf.evaluation import load_refcoco as load_refcoco_items
from loupe_hf.evaluation.images import open_rgb_image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "spaces"))  # the Space's own module, as the app imports it

from loupe_space import (  # noqa: E402
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_UPLOAD_BYTES,
    DemoInputError,
    LoupeDemo,
    prepare_image,
)

try:  # the Space's app needs gradio (the `demo` extra); without it the app's cases skip
    from gradio.exceptions import Error as GradioError
except ImportError:  # pragma: no cover - the extra is installed in CI
    GradioError = None

SURFACES = (
    "pipeline",
    "direct_api",
    "processor",
    "from_pretrained",
    "config",
    "scripts",
    "evaluation",
    "space",
)
MIN_CASES = 60
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
NEEDS_GRADIO = pytest.mark.skipif(GradioError is None, reason="the app needs gradio")


# --- what a case is, and the world it runs in ----------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: where it enters (`surface`), how (`call`, given the [`World`]), and the error
    it must give: `error` (the exception type) and `message` (a regular expression naming the
    argument and what was expected)."""

    surface: str
    name: str
    call: Callable[[World], Any]
    error: type[BaseException]
    message: str
    marks: tuple[Any, ...] = field(default=())


class CliExit(Exception):
    """A command-line entry point's `SystemExit`, carrying its status and the last line it printed
    on stderr (argparse's "prog: error: ..."), so that a case can match the message."""


def run_cli(main: Callable[..., Any], *args: Any, argv: list[str] | None = None) -> Any:
    """`main(*args)` with stdout and stderr captured (`sys.argv` replaced by `argv` when given); a
    `SystemExit` becomes a [`CliExit`] with its status and message."""
    stderr = io.StringIO()
    patch = mock.patch.object(sys, "argv", argv) if argv is not None else contextlib.nullcontext()
    try:
        with patch, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return main(*args)
    except SystemExit as error:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        raise CliExit(f"exit {error.code}: {lines[-1] if lines else ''}") from None


def load_script(name: str) -> Any:
    """`examples/<name>.py` as a module, so that its argument handling runs in this process (a
    subprocess costs seconds of imports per case)."""
    module_name = f"{name}_script"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, REPO_ROOT / "examples" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[module_name]


class StubLoader:
    """Stands in for the app's `BackgroundLoader`: the model is ready at once."""

    def __init__(self, demo: Any):
        self.demo = demo

    def wait(self, timeout: float | None = None) -> Any:
        return self.demo


class World:
    """A saved tiny detector and everything built from it, each built once on first use."""

    def __init__(self, root: Path, checkpoint: Path):
        self.root = root
        self.checkpoint = checkpoint
        self.image = generate_sample(3, "validation")["image"]

    @functools.cached_property
    def detector(self) -> LoupeForZeroShotDetection:
        return LoupeForZeroShotDetection.from_pretrained(self.checkpoint).eval()

    @functools.cached_property
    def processor(self) -> LoupeProcessor:
        return LoupeProcessor.from_pretrained(self.checkpoint)

    @functools.cached_property
    def detect_pipe(self) -> Any:
        return pipeline("zero-shot-object-detection", model=str(self.checkpoint))

    @functools.cached_property
    def classify_pipe(self) -> Any:
        return pipeline("zero-shot-image-classification", model=str(self.checkpoint))

    @functools.cached_property
    def demo(self) -> LoupeDemo:
        return LoupeDemo.from_pretrained(self.checkpoint)

    @functools.cached_property
    def app(self) -> Any:
        import app  # spaces/app.py, on the path above; builds the Blocks (seconds)

        return app

    def outputs(self, queries: int = 2) -> dict[str, torch.Tensor]:
        """Detector-shaped outputs for one image, three regions and `queries` queries."""
        return {"logits": torch.zeros(1, 3, queries), "pred_boxes": torch.rand(1, 3, 4)}

    def file(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def variant(self, name: str, damage: Callable[[Path], Any]) -> str:
        """A copy of the checkpoint, damaged by `damage(folder)`."""
        folder = self.root / "variants" / name
        if not folder.exists():
            shutil.copytree(self.checkpoint, folder)
            damage(folder)
        return str(folder)

    def evaluation(self, *argv: str) -> Any:
        """`examples/run_evaluation.py` with `argv` (after `--checkpoint`), in this process."""
        script = load_script("run_evaluation")
        return run_cli(script.main, ["--checkpoint", str(self.checkpoint), *argv])

    def pretrain_arguments(self, *argv: str) -> tuple[Any, ...]:
        """`examples/pretrain.py`'s parsed arguments for `argv`."""
        argv = ["pretrain.py", "--output_dir", str(self.root / "pretrain"), *argv]
        return run_cli(load_script("pretrain").parse_arguments, argv=argv)

    def pretrain_config(self, *argv: str) -> Any:
        """`examples/pretrain.py`'s config for `argv`, built as the script builds it."""
        model_args, _, _ = self.pretrain_arguments(*argv)
        return load_script("pretrain").build_config(model_args, None)

    def pretrain_model_check(self, *argv: str) -> Any:
        """`examples/pretrain.py`'s check of the model options for `argv`."""
        model_args, _, _ = self.pretrain_arguments(*argv)
        return load_script("pretrain").check_model_arguments(model_args)

    def pretrain_model(self, *argv: str) -> Any:
        """`examples/pretrain.py`'s model for `argv`, built as the script builds it."""
        model_args, _, _ = self.pretrain_arguments(*argv)
        script = load_script("pretrain")
        script.check_model_arguments(model_args)
        return script.build_model(model_args, self.processor.tokenizer)

    def pretrain_synthetic(self, *argv: str) -> Any:
        """`examples/pretrain.py`'s synthetic data settings for `argv`."""
        _, data_args, _ = self.pretrain_arguments(*argv)
        return load_script("pretrain").synthetic_config(data_args)

    def pretrain_phrases(self, *argv: str) -> Any:
        """`examples/pretrain.py`'s phrase step for `argv`, on an empty dataset."""
        import datasets

        _, data_args, _ = self.pretrain_arguments(*argv)
        empty = datasets.Dataset.from_dict({"caption": []})
        return load_script("pretrain").add_phrases(empty, data_args)

    def app_view(self, view: str, *args: Any, demo: Any = None) -> Any:
        """One of the app's handlers, as gradio calls it, with the model already loaded."""
        with mock.patch.object(self.app, "loader", StubLoader(demo or self.demo)):
            return getattr(self.app, view)(*args)


# --- files for the cases --------------------------------------------------------------------------


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), "red").save(buffer, "JPEG")
    return buffer.getvalue()[:200]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` pixels (its data is a 1×1 image's): decoding it
    would fail, so an error about its pixel count shows that the header was checked first."""
    buffer = io.BytesIO()
    PIL.Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # Signature (8), IHDR length (4) and type (4), then width and height; the CRC covers type + data.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def sparse_file(world: World, name: str, size: int) -> str:
    """A file of `size` bytes that takes no disk space."""
    path = world.root / name
    with open(path, "wb") as handle:
        handle.truncate(size)
    return str(path)


def nan_weights(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() >= 1)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def one_weight_fewer(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    weights.pop(sorted(weights)[-1])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def class_folder(world: World, name: str, files: dict[str, bytes]) -> str:
    for relative, content in files.items():
        world.file(f"{name}/{relative}", content)
    return str(world.root / name)


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, "blue").save(buffer, "PNG")
    return buffer.getvalue()


def refs_pickle(world: World, refs: Any) -> str:
    return world.file("refs.p", pickle.dumps(refs, protocol=2))


def failing(demo: LoupeDemo) -> LoupeDemo:
    """A copy of `demo` whose image encoding raises something no input check anticipated."""
    broken = copy.copy(demo)
    broken.encode = mock.Mock(side_effect=RuntimeError("boom"))
    return broken


# --- the cases --------------------------------------------------------------------------------------

ARRAY_8x8x2 = np.zeros((8, 8, 2), dtype=np.uint8)
IMAGE_SHAPE = r"image 0 has shape \(8, 8, 2\); expected HxW, HxWxC or CxHxW"
FRACTION = r"must be a number in \[0, 1\]"
TOP_K = r"top_k must be a positive integer or None"


def image_(w: World) -> PIL.Image.Image:
    return w.image


PIPELINE_CASES = [
    Case("pipeline", "no-labels", lambda w: w.detect_pipe(w.image, candidate_labels=[]), ValueError, r"candidate_labels is empty; pass at least one string"),
    Case("pipeline", "labels-missing", lambda w: w.detect_pipe(w.image), TypeError, r"candidate_labels is missing; pass a string or a list of strings"),
    Case("pipeline", "empty-label", lambda w: w.detect_pipe(w.image, candidate_labels=[""]), ValueError, r"candidate label 0 is empty: every entry of candidate_labels must be a non-empty string"),
    Case("pipeline", "blank-second-label", lambda w: w.detect_pipe(w.image, candidate_labels=["star", "  "]), ValueError, r"candidate label 1 is empty"),
    Case("pipeline", "empty-piece-in-label-string", lambda w: w.detect_pipe(w.image, candidate_labels="star,,heart"), ValueError, r"candidate label 1 is empty"),
    Case("pipeline", "label-not-a-string", lambda w: w.detect_pipe(w.image, candidate_labels=[3]), TypeError, r"candidate label 0 in candidate_labels must be a string, got 3 \(int\)"),
    Case("pipeline", "labels-as-dict", lambda w: w.detect_pipe(w.image, candidate_labels={"star": 1}), TypeError, r"candidate_labels must be a string or a list of strings, got dict"),
    Case("pipeline", "image-none", lambda w: w.detect_pipe(None, candidate_labels=["star"]), LoupeImageError, r"no image given \(image=None\)"),
    Case("pipeline", "image-missing-file", lambda w: w.detect_pipe("/no/such/image.png", candidate_labels=["star"]), LoupeImageError, r"image 0: no such file '/no/such/image.png'"),
    Case("pipeline", "image-bad-array", lambda w: w.detect_pipe(ARRAY_8x8x2, candidate_labels=["star"]), LoupeImageError, IMAGE_SHAPE),
    Case("pipeline", "image-int", lambda w: w.detect_pipe(42, candidate_labels=["star"]), LoupeImageError, r"image 0 has unsupported type int; expected a PIL image"),
    Case("pipeline", "threshold-string", lambda w: w.detect_pipe(w.image, candidate_labels=["star"], threshold="0.5"), TypeError, rf"threshold {FRACTION}, got '0.5' \(str\)"),
    Case("pipeline", "threshold-above-one", lambda w: w.detect_pipe(w.image, candidate_labels=["star"], threshold=1.5), ValueError, rf"threshold {FRACTION}, got 1.5"),
    Case("pipeline", "top-k-zero", lambda w: w.detect_pipe(w.image, candidate_labels=["star"], top_k=0), ValueError, rf"{TOP_K}, got 0"),
    Case("pipeline", "top-k-string", lambda w: w.detect_pipe(w.image, candidate_labels=["star"], top_k="3"), TypeError, rf"{TOP_K}, got '3'"),
    Case("pipeline", "label-lists-per-image-count", lambda w: w.detect_pipe([w.image, w.image], candidate_labels=[["a"], ["b"], ["c"]]), ValueError, r"got 2 images but 3 candidate_labels lists"),
    Case("pipeline", "dict-input-empty-labels", lambda w: w.detect_pipe({"image": w.image, "candidate_labels": []}), ValueError, r"input 0's candidate_labels is empty"),
    Case("pipeline", "dict-input-without-image", lambda w: w.detect_pipe([{"image": w.image, "candidate_labels": ["a"]}, {"candidate_labels": ["a"]}]), ValueError, r"input 1 has no 'image' key; expected image and candidate_labels"),
    Case("pipeline", "empty-image-list", lambda w: w.detect_pipe([], candidate_labels=["star"]), ValueError, r"image is an empty list; pass at least one image"),
    Case("pipeline", "classify-no-labels", lambda w: w.classify_pipe(w.image, candidate_labels=[]), ValueError, r"candidate_labels is empty"),
    Case("pipeline", "classify-empty-label", lambda w: w.classify_pipe(w.image, candidate_labels=["star", ""]), ValueError, r"candidate label 1 is empty"),
    Case("pipeline", "classify-labels-missing", lambda w: w.classify_pipe(w.image), TypeError, r"candidate_labels is missing"),
    Case("pipeline", "classify-template-without-slot", lambda w: w.classify_pipe(w.image, candidate_labels=["star"], hypothesis_template="a photo"), ValueError, r"hypothesis_template must be a string with exactly one \{\} for the label, got 'a photo'"),
    Case("pipeline", "classify-image-none", lambda w: w.classify_pipe(None, candidate_labels=["star"]), LoupeImageError, r"no image given"),
    Case("pipeline", "classify-float-image-out-of-range", lambda w: w.classify_pipe(np.full((8, 8, 3), 3.0), candidate_labels=["star"]), LoupeImageError, r"image 0 is a float array .* float images must lie in \[0, 1\]"),
]  # fmt: skip

DIRECT_API_CASES = [
    Case("direct_api", "processor-none", lambda w: w.detector.detect(w.image, ["star"], None), TypeError, r"processor must be a LoupeProcessor .*got NoneType"),
    Case("direct_api", "processor-and-labels-swapped", lambda w: w.detector.detect(w.image, w.processor, ["star"]), TypeError, r"processor must be a LoupeProcessor .*got list"),
    Case("direct_api", "tokenizer-as-processor", lambda w: w.detector.detect(w.image, ["star"], w.processor.tokenizer), TypeError, r"processor must be a LoupeProcessor"),
    Case("direct_api", "labels-none", lambda w: w.detector.detect(w.image, None, w.processor), TypeError, r"labels must be a string or a list of strings, got NoneType"),
    Case("direct_api", "labels-empty", lambda w: w.detector.detect(w.image, [], w.processor), ValueError, r"no labels given: labels is empty"),
    Case("direct_api", "label-empty", lambda w: w.detector.detect(w.image, ["star", ""], w.processor), ValueError, r"label 1 is empty: every entry of labels must be a non-empty string"),
    Case("direct_api", "label-not-a-string", lambda w: w.detector.detect(w.image, [5], w.processor), TypeError, r"label 0 in labels must be a string, got 5 \(int\)"),
    Case("direct_api", "threshold-string", lambda w: w.detector.detect(w.image, ["star"], w.processor, threshold="0.5"), TypeError, rf"threshold {FRACTION}"),
    Case("direct_api", "threshold-nan", lambda w: w.detector.detect(w.image, ["star"], w.processor, threshold=float("nan")), ValueError, rf"threshold {FRACTION}, got nan"),
    Case("direct_api", "top-k-negative", lambda w: w.detector.detect(w.image, ["star"], w.processor, top_k=-2), ValueError, rf"{TOP_K}, got -2"),
    Case("direct_api", "top-k-float", lambda w: w.detector.detect(w.image, ["star"], w.processor, top_k=1.5), TypeError, rf"{TOP_K}, got 1.5"),
    Case("direct_api", "nms-threshold-above-one", lambda w: w.detector.detect(w.image, ["star"], w.processor, nms_threshold=2), ValueError, rf"nms_threshold {FRACTION}, got 2"),
    Case("direct_api", "no-images", lambda w: w.detector.detect([], ["star"], w.processor), LoupeImageError, r"an empty list of images was given"),
    Case("direct_api", "nan-image", lambda w: w.detector.detect(np.full((8, 8, 3), np.nan), ["star"], w.processor), LoupeImageError, r"image 0 contains NaN or infinite values"),
    Case("direct_api", "folder-as-second-image", lambda w: w.detector.detect([w.image, str(w.root)], ["star"], w.processor), LoupeImageError, r"image 1: '.*' is a folder, not an image file"),
    Case("direct_api", "ground-expressions-none", lambda w: w.detector.ground(w.image, None, w.processor), TypeError, r"expressions must be a string or a list of strings"),
    Case("direct_api", "ground-expressions-empty", lambda w: w.detector.ground(w.image, [], w.processor), ValueError, r"no expressions given"),
    Case("direct_api", "ground-one-expression-two-images", lambda w: w.detector.ground([w.image, w.image], "the star", w.processor), ValueError, r"got 1 expressions for 2 images; pass one per image"),
    Case("direct_api", "ground-blank-expression", lambda w: w.detector.ground(w.image, " ", w.processor), ValueError, r"expression 0 is empty"),
    Case("direct_api", "ground-processor-none", lambda w: w.detector.ground(w.image, "the star", None), TypeError, r"processor must be a LoupeProcessor"),
]  # fmt: skip

SPAN_PAIR = r"caption 0: phrase span 0 must be a pair of integers \(start, end\)"

PROCESSOR_CASES = [
    Case("processor", "nothing", lambda w: w.processor(), ValueError, r"needs images, text, or both"),
    Case("processor", "text-int", lambda w: w.processor(text=5), TypeError, r"text must be a string, a list of strings or one list of strings per image, got int"),
    Case("processor", "text-bytes", lambda w: w.processor(text=b"a star"), TypeError, r"text must be a string.*got bytes"),
    Case("processor", "text-empty-list", lambda w: w.processor(text=[]), ValueError, r"an empty list of texts was given"),
    Case("processor", "text-item-not-a-string", lambda w: w.processor(text=["a star", 5]), ValueError, r"text 1 is not a string but int"),
    Case("processor", "text-blank", lambda w: w.processor(text=["  "]), ValueError, r"text 0 is empty"),
    Case("processor", "queries-mixed", lambda w: w.processor(text=[["star"], "heart"]), ValueError, r"text mixes strings and lists: give one list of queries per image"),
    Case("processor", "queries-empty-for-an-image", lambda w: w.processor(text=[["star"], []]), ValueError, r"image 1 has an empty list of queries"),
    Case("processor", "max-length-zero", lambda w: w.processor(text=["a star"], max_length=0), ValueError, r"max_length must be a positive integer or None, got 0"),
    Case("processor", "spans-without-text", lambda w: w.processor(images=[w.image], phrase_spans=[[(0, 1)]]), ValueError, r"phrase_spans refer to character spans of `text`, but no text was given"),
    Case("processor", "spans-count", lambda w: w.processor(text=["a cat"], phrase_spans=[[(0, 1)], [(0, 1)]]), ValueError, r"got phrase spans for 2 captions but 1 texts"),
    Case("processor", "span-past-the-end", lambda w: w.processor(text=["a cat"], phrase_spans=[[(0, 100)]]), ValueError, r"caption 0: phrase span \(0, 100\) ends past the caption's 5 characters"),
    Case("processor", "span-reversed", lambda w: w.processor(text=["a cat"], phrase_spans=[[(3, 1)]]), ValueError, r"caption 0: phrase span \(3, 1\) is empty or negative"),
    Case("processor", "span-float", lambda w: w.processor(text=["a cat"], phrase_spans=[[(0.5, 2)]]), ValueError, SPAN_PAIR),
    Case("processor", "span-triple", lambda w: w.processor(text=["a cat"], phrase_spans=[[(0, 1, 2)]]), ValueError, SPAN_PAIR),
    Case("processor", "spans-string", lambda w: w.processor(text=["a cat"], phrase_spans="0-1"), ValueError, r"phrase_spans must be one list of \(start, end\) character spans per caption, got str"),
    Case("processor", "spans-row-none", lambda w: w.processor(text=["a cat"], phrase_spans=[None]), ValueError, r"phrase_spans\[0\] must be a list of \(start, end\) spans, got NoneType"),
    Case("processor", "spans-with-query-lists", lambda w: w.processor(text=[["a cat"]], phrase_spans=[[(0, 1)]]), ValueError, r"phrase_spans need one caption per text, not nested query lists"),
    Case("processor", "images-empty-list", lambda w: w.processor(images=[]), LoupeImageError, r"an empty list of images was given"),
    Case("processor", "image-complex", lambda w: w.processor(images=np.zeros((8, 8, 3), np.complex64)), LoupeImageError, r"image 0 has dtype complex64; expected uint8 or float pixels"),
    Case("processor", "image-values-above-255", lambda w: w.processor(images=np.full((8, 8, 3), 300)), LoupeImageError, r"image 0 has integer values outside \[0, 255\]"),
    Case("processor", "image-bytes", lambda w: w.processor(images=b"\x89PNG"), LoupeImageError, r"image 0 has unsupported type bytes; expected a PIL image"),
    Case("processor", "image-file-not-an-image", lambda w: w.processor(images=w.file("notes.txt", "hello")), LoupeImageError, r"image 0: '.*notes.txt' is not a readable image"),
    Case("processor", "return-tensors-unknown", lambda w: w.processor(text=["a cat"], return_tensors="xx"), ValueError, r"xx is not a valid TensorType, please select one of"),
    Case("processor", "unknown-keyword", lambda w: w.processor(images=[w.image], foo=1), TypeError, r"unexpected keyword argument 'foo'"),
    Case("processor", "post-process-labels-for-threshold", lambda w: w.processor.post_process_grounded_object_detection(w.outputs(), ["cat", "dog"]), TypeError, r"pass the labels as text_labels="),
    Case("processor", "post-process-too-few-text-labels", lambda w: w.processor.post_process_grounded_object_detection(w.outputs(), 0.0, None, ["cat"]), ValueError, r"text_labels for image 0 has 1 names, but the outputs score 2 queries"),
    Case("processor", "post-process-no-logits", lambda w: w.processor.post_process_object_detection({"pred_boxes": torch.rand(1, 3, 4)}), ValueError, r"outputs lack logits or pred_boxes tensors; expected the detector's outputs"),
    Case("processor", "post-process-bad-target-size", lambda w: w.processor.post_process_object_detection(w.outputs(), 0.0, [(5,)]), ValueError, r"target_sizes\[0\] must be a \(height, width\) pair of positive numbers"),
    Case("processor", "post-process-target-size-count", lambda w: w.processor.post_process_object_detection(w.outputs(), 0.0, [(5, 5), (5, 5)]), ValueError, r"got 2 target sizes for 1 images"),
    Case("processor", "post-process-top-k-zero", lambda w: w.processor.post_process_object_detection(w.outputs(), 0.0, top_k=0), ValueError, rf"{TOP_K}, got 0"),
]  # fmt: skip

FROM_PRETRAINED_CASES = [
    Case("from_pretrained", "model-without-weights", lambda w: LoupeForZeroShotDetection.from_pretrained(w.variant("no-weights", lambda f: (f / "model.safetensors").unlink())), OSError, r"model\.safetensors"),
    Case("from_pretrained", "model-config-not-json", lambda w: LoupeForZeroShotDetection.from_pretrained(w.variant("bad-config", lambda f: (f / "config.json").write_text("{nope"))), OSError, r"config\.json' is not a valid JSON file"),
    Case("from_pretrained", "model-nan-weights", lambda w: LoupeForZeroShotDetection.from_pretrained(w.variant("nan-weights", nan_weights)), OSError, r"holds NaN or infinite values in 1 weight"),
    Case("from_pretrained", "model-missing-a-weight", lambda w: LoupeForZeroShotDetection.from_pretrained(w.variant("fewer-weights", one_weight_fewer)), OSError, r"lacks 1 weight\(s\) of LoupeForZeroShotDetection"),
    Case("from_pretrained", "processor-missing-folder", lambda w: LoupeProcessor.from_pretrained(str(w.root / "no-such-checkpoint")), OSError, r"no such checkpoint folder: .*no-such-checkpoint"),
    Case("from_pretrained", "processor-without-tokenizer", lambda w: LoupeProcessor.from_pretrained(w.variant("no-tokenizer", lambda f: (f / "tokenizer.json").unlink())), OSError, r"has no tokenizer file \(tokenizer\.json or vocab\.txt\)"),
    Case("from_pretrained", "auto-processor-without-tokenizer", lambda w: AutoProcessor.from_pretrained(w.variant("no-tokenizer", lambda f: (f / "tokenizer.json").unlink())), OSError, r"has no tokenizer file"),
    Case("from_pretrained", "processor-without-its-config", lambda w: LoupeProcessor.from_pretrained(w.variant("no-processor-config", lambda f: (f / "processor_config.json").unlink())), OSError, r"has no processor_config\.json or preprocessor_config\.json"),
    Case("from_pretrained", "processor-damaged-tokenizer", lambda w: LoupeProcessor.from_pretrained(w.variant("bad-tokenizer", lambda f: (f / "tokenizer.json").write_text("{"))), OSError, r"tokenizer\.json is damaged \(not valid JSON"),
    Case("from_pretrained", "processor-damaged-tokenizer-config", lambda w: LoupeProcessor.from_pretrained(w.variant("bad-tokenizer-config", lambda f: (f / "tokenizer_config.json").write_text("]"))), OSError, r"tokenizer_config\.json is damaged"),
    Case("from_pretrained", "model-missing-folder", lambda w: LoupeForZeroShotDetection.from_pretrained(str(w.root / "no-such-checkpoint")), OSError, r"no such checkpoint folder: .*no-such-checkpoint"),
    Case("from_pretrained", "model-folder-without-config", lambda w: LoupeForZeroShotDetection.from_pretrained(w.variant("no-config", lambda f: (f / "config.json").unlink())), OSError, r"has no config\.json; a LOUPE checkpoint is saved with model\.save_pretrained"),
    Case("from_pretrained", "model-random-byte-weights", lambda w: LoupeForZeroShotDetection.from_pretrained(w.variant("random-weights", lambda f: (f / "model.safetensors").write_bytes(bytes(range(256)) * 64))), OSError, r"its weights file \(model\.safetensors\) is damaged"),
    Case("from_pretrained", "model-truncated-weights", lambda w: LoupeForZeroShotDetection.from_pretrained(w.variant("truncated-weights", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]))), OSError, r"its weights file \(model\.safetensors\) is damaged"),
    Case("from_pretrained", "pipeline-without-tokenizer", lambda w: pipeline("zero-shot-object-detection", model=w.variant("no-tokenizer", lambda f: (f / "tokenizer.json").unlink())), OSError, r"holds only its 5 special tokens, .*lacks its tokenizer file \(tokenizer\.json or vocab\.txt\)"),
]  # fmt: skip

CONFIG_CASES = [
    Case("config", "projection-dim-zero", lambda w: LoupeConfig.from_preset("tiny", projection_dim=0), ValueError, r"projection_dim must be an integer >= 1, got 0"),
    Case("config", "num-regions-string", lambda w: LoupeConfig.from_preset("tiny", num_regions="8"), TypeError, r"num_regions must be an integer, got '8'"),
    Case("config", "num-regions-zero", lambda w: LoupeConfig.from_preset("tiny", num_regions=0), ValueError, r"num_regions must be an integer >= 1"),
    Case("config", "logit-scale-nan", lambda w: LoupeConfig.from_preset("tiny", logit_scale_init_value=float("nan")), ValueError, r"logit_scale_init_value must be a finite number"),
    Case("config", "nms-iou-above-one", lambda w: LoupeConfig.from_preset("tiny", detection_nms_iou=2.0), ValueError, r"detection_nms_iou must be a number <= 1"),
    Case("config", "vocab-size-zero", lambda w: LoupeConfig.from_preset("tiny", text_config={"vocab_size": 0}), StrictDataclassClassValidationError, r"text_config\.vocab_size must be an integer >= 1, got 0"),
    Case("config", "window-size-zero", lambda w: LoupeConfig.from_preset("tiny", vision_config={"window_size": 0}), StrictDataclassClassValidationError, r"window_size must be an integer >= 1, got 0"),
    Case("config", "unsil-level-unknown", lambda w: LoupeConfig.from_preset("tiny", unsil_levels=["x"]), StrictDataclassClassValidationError, r"unsil_levels must be a non-empty subset of \['token', 'semantic'\]"),
    Case("config", "preset-unknown", lambda w: LoupeConfig.from_preset("huge"), ValueError, r"unknown LOUPE preset 'huge'; choose one of \['paper', 'tiny', 'tiny-128', 'tiny-fine-grid', 'tiny-swin'\]"),
]  # fmt: skip


def eval_cli(*argv: str) -> Callable[[World], Any]:
    return lambda w: w.evaluation(*argv)


def coco_file(w: World, content: str) -> str:
    return w.file("coco.json", content)


SCRIPT_CASES = [
    Case("scripts", "evaluation-no-checkpoint", lambda w: run_cli(load_script("run_evaluation").main, []), CliExit, r"exit 2: .*the following arguments are required: --checkpoint"),
    Case("scripts", "evaluation-unknown-task", eval_cli("--task", "nope"), CliExit, r"exit 2: .*argument --task: invalid choice: 'nope'"),
    Case("scripts", "evaluation-detection-without-coco-json", eval_cli("--task", "detection"), CliExit, r"exit 2: .*--task detection needs --coco_json and --image_root"),
    Case("scripts", "evaluation-coco-json-missing", lambda w: w.evaluation("--task", "detection", "--coco_json", str(w.root / "none.json"), "--image_root", str(w.root)), CliExit, r"exit 2: .*--coco_json .*none\.json: no such file"),
    Case("scripts", "evaluation-coco-json-not-json", lambda w: w.evaluation("--task", "detection", "--coco_json", coco_file(w, "{nope"), "--image_root", str(w.root)), CliExit, r"exit 2: .*--coco_json .*is not a valid JSON file"),
    Case("scripts", "evaluation-coco-json-without-annotations", lambda w: w.evaluation("--task", "detection", "--coco_json", w.file("images-only.json", '{"images": []}'), "--image_root", str(w.root)), CliExit, r"exit 2: .*--coco_json .*lacks annotations, categories"),
    Case("scripts", "evaluation-classes-unknown", eval_cli("--task", "detection", "--classes", "x"), CliExit, r"exit 2: .*argument --classes: invalid choice: 'x'"),
    Case("scripts", "evaluation-zero-samples", eval_cli("--num_samples", "0"), CliExit, r"exit 2: .*--num_samples must be at least 1, got 0"),
    Case("scripts", "evaluation-samples-not-a-number", eval_cli("--num_samples", "x"), CliExit, r"exit 2: .*argument --num_samples: invalid int value: 'x'"),
    Case("scripts", "evaluation-tiny-synthetic-images", eval_cli("--synthetic_image_size", "8"), CliExit, r"exit 2: .*--synthetic_image_size must be at least 32, got 8"),
    Case("scripts", "evaluation-refcoco-split-for-synthetic", eval_cli("--split", "val"), CliExit, r"exit 2: .*--split must be one of \('train', 'validation', 'compositional'\)"),
    Case("scripts", "evaluation-retrieval-without-karpathy-json", lambda w: w.evaluation("--task", "retrieval", "--image_root", str(w.root)), CliExit, r"exit 2: .*--task retrieval needs --karpathy_json"),
    Case("scripts", "evaluation-karpathy-json-of-another-format", lambda w: w.evaluation("--task", "retrieval", "--karpathy_json", w.file("coco-like.json", '{"images": [{"id": 1}]}'), "--image_root", str(w.root)), CliExit, r"exit 2: .*--karpathy_json .*is not a Karpathy split file"),
    Case("scripts", "evaluation-refs-not-a-pickle", lambda w: w.evaluation("--task", "grounding", "--refs", w.file("refs.bin", random.Random(0).randbytes(64)), "--instances", coco_file(w, "{}"), "--image_root", str(w.root)), CliExit, r"exit 2: .*--refs .*is not a plain RefCOCO refs file"),
    Case("scripts", "evaluation-image-folder-missing", lambda w: w.evaluation("--task", "classification", "--image_folder", str(w.root / "nowhere")), CliExit, r"exit 2: .*--image_folder .*nowhere: no such folder"),
    Case("scripts", "evaluation-image-folder-without-classes", lambda w: w.evaluation("--task", "classification", "--image_folder", class_folder(w, "flat", {"a.png": png()})), CliExit, r"exit 2: .*--image_folder .*has no class folders"),
    Case("scripts", "evaluation-negative-objectness-weight", eval_cli("--detection_objectness_weight", "-1", "--num_samples", "1"), CliExit, r"exit 2: .*could not be loaded: detection_objectness_weight must be a number >= 0, got -1"),
    Case("scripts", "evaluation-box-refinement-beyond-one", eval_cli("--box_refinement_iou", "1.5", "--num_samples", "1"), CliExit, r"exit 2: .*could not be loaded: box_refinement_iou must be a number <= 1 and > 0, got 1.5"),
    Case("scripts", "evaluation-box-fusion-of-none", eval_cli("--box_refinement_candidates", "0", "--num_samples", "1"), CliExit, r"exit 2: .*could not be loaded: box_refinement_candidates must be an integer >= 1, got 0"),
    Case("scripts", "evaluation-checkpoint-missing", lambda w: run_cli(load_script("run_evaluation").main, ["--checkpoint", str(w.root / "no-checkpoint"), "--num_samples", "1"]), CliExit, r"exit 2: .*--checkpoint .*no-checkpoint: no such folder"),
    Case("scripts", "evaluation-as-a-subprocess", lambda w: evaluation_subprocess(w, "--task", "detection"), CliExit, r"exit 2: .*--task detection needs --coco_json and --image_root"),
    Case("scripts", "pretrain-ablation-unknown", lambda w: w.pretrain_config("--ablation", "bogus"), ValueError, r"--ablation must be one of \['backbone', 'loupe', 'tsa', 'tsa_fsa'\], got 'bogus'"),
    Case("scripts", "pretrain-synthetic-min-above-max", lambda w: w.pretrain_synthetic("--synthetic_min_objects", "3", "--synthetic_max_objects", "2"), ValueError, r"min_objects \(3\) must not exceed max_objects \(2\)"),
    Case("scripts", "pretrain-continue-with-a-text-model", lambda w: w.pretrain_model_check("--model_name_or_path", str(w.checkpoint), "--text_model_name", "bert-base-uncased"), ValueError, r"--model_name_or_path brings its own tokenizer and text tower; drop --text_model_name"),
    Case("scripts", "pretrain-continue-with-a-tokenizer", lambda w: w.pretrain_model_check("--model_name_or_path", str(w.checkpoint), "--tokenizer_name", "bert-base-uncased"), ValueError, r"--model_name_or_path brings its own tokenizer and text tower; drop --tokenizer_name"),
    Case("scripts", "pretrain-continue-with-a-bad-ablation", lambda w: w.pretrain_model_check("--model_name_or_path", str(w.checkpoint), "--ablation", "bogus"), ValueError, r"--ablation must be one of"),
    Case("scripts", "pretrain-continue-lacking-a-weight", lambda w: w.pretrain_model("--model_name_or_path", w.variant("fewer-weights", one_weight_fewer)), OSError, r"lacks 1 weight\(s\) of the LOUPE model \(loupe\..*\.\.\.\): it is not a LOUPE checkpoint of this architecture"),
    Case("scripts", "pretrain-preset-unknown", lambda w: w.pretrain_config("--preset", "huge"), ValueError, r"unknown LOUPE preset 'huge'"),
    Case("scripts", "pretrain-config-override-out-of-range", lambda w: w.pretrain_config("--config_overrides", '{"num_regions": 0}'), ValueError, r"num_regions must be an integer >= 1, got 0"),
    Case("scripts", "pretrain-max-steps-not-a-number", lambda w: w.pretrain_config("--max_steps", "abc"), CliExit, r"exit 2: .*argument --max_steps(/--max-steps)?: invalid int value: 'abc'"),
    Case("scripts", "pretrain-config-overrides-not-json", lambda w: w.pretrain_config("--config_overrides", "{bad"), ValueError, r"--config_overrides must be a JSON object of LoupeConfig fields.*is not JSON"),
    Case("scripts", "pretrain-config-overrides-a-list", lambda w: w.pretrain_config("--config_overrides", "[1]"), ValueError, r"--config_overrides must be a JSON object of LoupeConfig fields.*got a list"),
    Case("scripts", "pretrain-unknown-flag", lambda w: w.pretrain_config("--bogus_flag", "1"), ValueError, r"not used by the HfArgumentParser: \['--bogus_flag', '1'\]"),
    Case("scripts", "pretrain-phrase-source-unknown", lambda w: w.pretrain_phrases("--phrase_source", "bogus"), ValueError, r"--phrase_source must be extract, ground_truth or none, got 'bogus'"),
]  # fmt: skip


def evaluation_subprocess(world: World, *argv: str) -> None:
    """`examples/run_evaluation.py` run as a script, once: the in-process cases call its `main`."""
    command = [sys.executable, str(REPO_ROOT / "examples" / "run_evaluation.py")]
    command += ["--checkpoint", str(world.checkpoint), *argv]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    raise CliExit(f"exit {done.returncode}: {lines[-1] if lines else ''}")


EVALUATION_CASES = [
    Case("evaluation", "coco-json-not-json", lambda w: load_coco_json(coco_file(w, "[1, 2")), ValueError, r"coco\.json is not a valid JSON file"),
    Case("evaluation", "coco-json-without-categories", lambda w: load_coco_json(coco_file(w, '{"images": [], "annotations": []}')), ValueError, r"is not a COCO detection file: it lacks categories"),
    Case("evaluation", "karpathy-json-without-images", lambda w: load_karpathy_split(w.file("k.json", "{}"), w.root), ValueError, r"is not a Karpathy split file"),
    Case("evaluation", "refs-random-bytes", lambda w: load_refcoco_items(w.file("refs.bin", random.Random(0).randbytes(64)), coco_file(w, "{}"), w.root), ValueError, r"refs\.bin is not a plain RefCOCO refs file"),
    Case("evaluation", "refs-with-code", lambda w: load_refcoco_items(refs_pickle(w, [os.getcwd]), coco_file(w, "{}"), w.root), ValueError, r"is not a plain RefCOCO refs file: refuses to load posix\.getcwd"),
    Case("evaluation", "instances-not-coco", lambda w: load_refcoco_items(refs_pickle(w, [{"split": "val"}]), coco_file(w, "{}"), w.root), ValueError, r"coco\.json is not a RefCOCO instances file: expected a JSON object with images and annotations"),
    Case("evaluation", "truncated-image", lambda w: open_rgb_image(w.file("broken.jpg", truncated_jpeg())), OSError, r"cannot read image .*broken\.jpg"),
    Case("evaluation", "image-folder-without-classes", lambda w: load_image_folder(class_folder(w, "flat-folder", {"a.png": png()})), ValueError, r"has no class folders; expected .*/<class name>/<image>"),
    Case("evaluation", "iou-threshold-zero", lambda w: coco_map({"images": [], "annotations": [], "categories": []}, [], iou_thresholds=[0.0]), ValueError, r"iou_thresholds must be non-empty and lie in \(0, 1\]"),
]  # fmt: skip

SPACE_CASES = [
    Case("space", "detect-without-image", lambda w: w.demo.detect(None, "star"), DemoInputError, r"Please upload an image"),
    Case("space", "detect-blank-labels", lambda w: w.demo.detect(w.image, " , ,"), DemoInputError, r"Please type at least one label"),
    Case("space", "detect-too-many-labels", lambda w: w.demo.detect(w.image, ",".join(f"l{i}" for i in range(MAX_LABELS + 1))), DemoInputError, rf"{MAX_LABELS + 1} labels given; the demo scores at most {MAX_LABELS}"),
    Case("space", "detect-label-too-long", lambda w: w.demo.detect(w.image, "x" * 10_000), DemoInputError, rf"is 10000 characters long; labels are short names of at most {MAX_LABEL_CHARS} characters"),
    Case("space", "detect-labels-not-text", lambda w: w.demo.detect(w.image, [1, 2]), DemoInputError, r"The labels must be text"),
    Case("space", "detect-threshold-not-a-number", lambda w: w.demo.detect(w.image, "star", "abc"), DemoInputError, r"The score threshold must be a number between 0 and 1, got 'abc'"),
    Case("space", "detect-threshold-above-one", lambda w: w.demo.detect(w.image, "star", 1.5), DemoInputError, r"The score threshold must be between 0 and 1, got 1\.5"),
    Case("space", "detect-top-k-infinite", lambda w: w.demo.detect(w.image, "star", 0.1, float("inf")), DemoInputError, r"Top-k must be a whole number, at least 1, got inf"),
    Case("space", "detect-top-k-zero", lambda w: w.demo.detect(w.image, "star", 0.1, 0), DemoInputError, r"Top-k must be at least 1, got 0"),
    Case("space", "ground-expression-not-text", lambda w: w.demo.ground(w.image, 5), DemoInputError, r"The referring expression must be text, got int"),
    Case("space", "ground-blank-expression", lambda w: w.demo.ground(w.image, "   "), DemoInputError, r"Please type a referring expression"),
    Case("space", "explain-blank-caption", lambda w: w.demo.explain(w.image, ""), DemoInputError, r"Please type a caption"),
    Case("space", "explain-regions-not-a-number", lambda w: w.demo.explain(w.image, "a star", "x"), DemoInputError, r"The number of regions must be a whole number, at least 1, got 'x'"),
    Case("space", "image-missing-file", lambda w: prepare_image(w.root / "missing.png"), DemoInputError, r"Could not read the image file '.*missing\.png': no such file"),
    Case("space", "image-folder", lambda w: prepare_image(w.root), DemoInputError, r"is a folder, not an image file"),
    Case("space", "image-not-an-image", lambda w: prepare_image(w.file("fake.png", "not a png")), DemoInputError, r"Could not read the image file '.*fake\.png'"),
    Case("space", "image-file-too-large", lambda w: prepare_image(sparse_file(w, "huge.png", 21 * 2**20)), DemoInputError, rf"The image file is 21\.0 MiB; the demo takes files of at most {MAX_UPLOAD_BYTES // 2**20} MiB"),
    Case("space", "image-too-many-pixels-in-the-header", lambda w: prepare_image(w.file("bomb.png", png_claiming(12000, 12000))), DemoInputError, r"The image has 12000×12000 pixels \(144 megapixels\); the demo takes at most 40 megapixels"),
    Case("space", "image-beyond-pil-s-own-limit", lambda w: prepare_image(w.file("bigger-bomb.png", png_claiming(20000, 20000))), DemoInputError, r"The image is far too large \(Image size \(400000000 pixels\).*\); the demo takes at most 40 megapixels"),
    Case("space", "image-array-too-many-pixels", lambda w: prepare_image(np.broadcast_to(np.uint8(0), (7000, 7000))), DemoInputError, r"The image has 7000×7000 pixels"),
    Case("space", "image-array-bad-shape", lambda w: prepare_image(ARRAY_8x8x2), DemoInputError, rf"This image cannot be used: {IMAGE_SHAPE}"),
    Case("space", "app-shows-the-input-problem", lambda w: w.app_view("detect", w.image, " , ", 0.1, 5), GradioError, r"Please type at least one label", marks=(NEEDS_GRADIO,)),
    Case("space", "app-shows-an-unexpected-failure", lambda w: w.app_view("detect", w.image, "star", 0.1, 5, demo=failing(w.demo)), GradioError, r"The demo could not process this input \(RuntimeError: boom\)", marks=(NEEDS_GRADIO,)),
]  # fmt: skip

CASES = [
    *PIPELINE_CASES,
    *DIRECT_API_CASES,
    *PROCESSOR_CASES,
    *FROM_PRETRAINED_CASES,
    *CONFIG_CASES,
    *SCRIPT_CASES,
    *EVALUATION_CASES,
    *SPACE_CASES,
]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config, processor) -> World:
    """A tiny detector saved with its processor, as `examples/pretrain.py` leaves one."""
    config = copy.deepcopy(tiny_config)
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    checkpoint = tmp_path_factory.mktemp("robustness-checkpoint")
    LoupeForZeroShotDetection(config).save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    return World(tmp_path_factory.mktemp("robustness-files"), checkpoint)


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


# --- the sweep --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, id=f"{case.surface}-{case.name}", marks=case.marks) for case in CASES],
)
def test_bad_input_gives_a_clear_error(world, case):
    with pytest.raises(case.error, match=case.message):
        case.call(world)


# --- inputs that now simply work ----------------------------------------------------------------------


def _detections(results: list[dict]) -> list[tuple]:
    return [(r["label"], round(r["score"], 5), tuple(r["box"].values())) for r in results]


def test_pipeline_takes_numpy_and_torch_images_like_pil(world):
    pil = world.image
    expected = _detections(world.detect_pipe(pil, candidate_labels=["star", "heart"], top_k=3))
    array = np.array(pil)  # a writable copy, as torch.from_numpy wants
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    for image in (array, tensor):
        assert (
            _detections(world.detect_pipe(image, candidate_labels=["star", "heart"], top_k=3))
            == expected
        )
    scores = world.classify_pipe(array, candidate_labels=["star", "heart"])
    assert scores == world.classify_pipe(pil, candidate_labels=["star", "heart"])


def test_pipeline_label_strings_are_split_and_stripped(world):
    results = world.detect_pipe(world.image, candidate_labels="star, heart", threshold=0.0)
    assert {result["label"] for result in results} == {"star", "heart"}


def test_pipelines_keep_the_tasks_defaults_for_other_models():
    from transformers.pipelines import PIPELINE_REGISTRY

    from loupe_hf.zero_shot import PIPELINE_CLASSES, is_loupe_model

    for task, pipeline_class in PIPELINE_CLASSES.items():
        entry = PIPELINE_REGISTRY.supported_tasks[task]
        assert entry["impl"] is pipeline_class and "default" in entry and entry["pt"]
    other = mock.Mock()
    other.config.model_type = "owlvit"
    assert not is_loupe_model(other)  # its pipelines keep transformers' own behaviour


def test_evaluation_skips_a_truncated_image_and_names_it(world, capsys):
    folder = class_folder(
        world,
        "folder-with-a-broken-image",
        {
            "cat/0.png": png(),
            "cat/1.png": png((20, 12)),
            "dog/0.png": png(),
            "dog/broken.jpg": truncated_jpeg(),
        },
    )
    script = load_script("run_evaluation")
    report = script.main(
        [
            "--checkpoint",
            str(world.checkpoint),
            "--task",
            "classification",
            "--image_folder",
            folder,
        ]
    )
    skipped = report["skipped_images"]
    assert skipped["count"] == 1 and skipped["of"] == 4
    assert skipped["files"][0]["file"].endswith("broken.jpg")
    assert "top1" in report  # the other three images were evaluated
    assert "skipping unreadable image" in capsys.readouterr().err


def test_the_evaluation_scores_regions_with_the_objectness_weight_it_is_given(world):
    script = load_script("run_evaluation")
    detector, _ = script.load(str(world.checkpoint), detection_objectness_weight=1.5)
    assert detector.config.detection_objectness_weight == 1.5
    default, _ = script.load(str(world.checkpoint))
    assert (
        default.config.detection_objectness_weight
        == world.detector.config.detection_objectness_weight
    )


def test_a_pathological_caption_is_chunked_without_a_regex_time_out():
    from loupe_hf.phrases import extract_phrases

    # One run of 10,000 determiners made NLTK's chunker exceed its 5 s regular-expression limit.
    assert extract_phrases("the " * 10_000, tagger="pattern") == []
    caption = "a small red star to the left of a large blue circle " * 1000
    assert len(extract_phrases(caption, tagger="pattern")) == 2000


def test_windowed_chunking_finds_the_same_phrases_as_one_pass():
    from loupe_hf import phrases

    generator = random.Random(0)
    tags = ["DT", "JJ", "NN", "NNS", "CC", ",", "IN", "VBZ", "RB", "CD", "POS", "VBG", "PRP$", "."]
    for _ in range(50):
        sequence = [generator.choice(tags) for _ in range(generator.randint(150, 400))]
        whole = [
            (node.leaves()[0][0], node.leaves()[-1][0] + 1)
            for node in phrases._chunker().parse(list(enumerate(sequence)))
            if not isinstance(node, tuple)
        ]
        assert phrases._chunks(sequence) == whole


def test_space_shortens_a_long_caption_before_phrase_extraction(world):
    caption = "a small red star to the left of a large blue circle " * 1000  # 10,000 words
    result = world.demo.explain(world.image, caption, 3)
    assert len(result.explanation["caption"]) <= 1000
    assert any("only its first" in note for note in result.notes)


# --- the app's upload cap -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@NEEDS_GRADIO
def test_app_main_launches_with_the_upload_cap(world):
    app = world.app
    with mock.patch.object(app.demo, "launch") as launch, mock.patch.object(app.loader, "start"):
        app.main(["--port", "7999"])
    assert launch.call_args.kwargs["max_file_size"] == MAX_UPLOAD_BYTES


@pytest.fixture()
def served_app(world) -> Iterator[str]:
    """The app on a free local port, in this process (the model is never loaded)."""
    app = world.app
    port = free_port()
    app.demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **app.LAUNCH_OPTIONS,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.demo.close()


@NEEDS_GRADIO
def test_app_refuses_an_upload_over_the_cap(served_app):
    import httpx

    def upload(size: int) -> httpx.Response:
        files = {"files": ("image.png", b"\0" * size, "image/png")}
        return httpx.post(f"{served_app}/gradio_api/upload", files=files, timeout=30)

    refused = upload(MAX_UPLOAD_BYTES + 1)
    assert refused.status_code == 413 and "maximum allowed size" in refused.text
    assert upload(1024).status_code == 200


def test_any_damaged_refs_bytes_give_the_same_clear_error(tmp_path):
    """Random bytes fail in many ways inside an unpickler (a CI run once met an OverflowError from a
    huge BINUNICODE length), and a few even unpickle to a number or a string: every one must come
    out as a ValueError naming the file."""
    coco = tmp_path / "coco.json"
    coco.write_text("{}")
    refs = tmp_path / "refs.bin"
    kinds = Counter()
    for seed in range(3000):
        generator = random.Random(seed)
        refs.write_bytes(generator.randbytes(generator.randint(1, 96)))
        with pytest.raises(
            ValueError, match=r"refs\.bin is not a (plain )?RefCOCO refs file"
        ) as caught:
            load_refcoco_items(refs, coco, tmp_path)
        kinds[type(caught.value.__cause__ or caught.value).__name__] += 1
    assert len(kinds) >= 3, kinds  # the sweep does reach several different failures


# --- the count ------------------------------------------------------------------------------------------


def test_unknown_config_key_is_warned_about_by_name():
    from transformers.testing_utils import CaptureLogger

    from loupe_hf import configuration_loupe

    with CaptureLogger(configuration_loupe.logger) as captured:
        LoupeConfig.from_preset("tiny", projecton_dim=8)
    assert "unknown key 'projecton_dim'" in captured.out


def test_the_sweep_covers_every_surface_with_enough_cases():
    per_surface = Counter(case.surface for case in CASES)
    assert set(per_surface) == set(SURFACES), per_surface
    assert min(per_surface.values()) >= 5, per_surface
    assert len({(case.surface, case.name) for case in CASES}) == len(CASES)  # no duplicate ids
    assert len(CASES) >= MIN_CASES, f"{len(CASES)} cases: {dict(per_surface)}"


def test_a_continued_run_starts_only_the_pretraining_weights_fresh():
    missing = [
        "token_unsil.interaction_head.0.weight",
        "semantic_unsil.key.weight",
        "training_steps",
        "token_interaction_scale",
        "loupe.text_projection.weight",
    ]
    lacking = load_script("pretrain").encoder_weights_missing(missing)
    assert lacking == ["loupe.text_projection.weight"]


def test_synthetic_images_are_drawn_at_the_size_the_model_reads(world):
    """Drawing 128 px images for a 64 px model only costs time (the processor shrinks them)."""

    def drawn(*argv: str) -> int:
        return world.pretrain_synthetic(*argv).image_size

    assert drawn("--preset", "tiny") == LoupeConfig.from_preset("tiny").vision_config.image_size
    assert drawn("--preset", "tiny-128") == 128
    assert (
        drawn("--preset", "tiny", "--config_overrides", '{"vision_config": {"image_size": 96}}')
        == 96
    )
    # Below the generator's smallest side the data is drawn at that side and shrunk as before.
    assert (
        drawn(
            "--preset",
            "tiny",
            "--config_overrides",
            '{"vision_config": {"image_size": 16, "patch_size": 1}}',
        )
        == 32
    )
    checkpoint_size = LoupeConfig.from_pretrained(world.checkpoint).vision_config.image_size
    assert drawn("--model_name_or_path", str(world.checkpoint)) == checkpoint_size
    assert drawn("--preset", "tiny", "--synthetic_image_size", "128") == 128  # asked for: kept


def test_a_single_object_stage_trains_a_tokenizer_for_the_scenes_after_it(world, tmp_path):
    """The curriculum's first stage sees one object per image, named by its shape alone; its
    tokenizer, which the stages continued from it keep, must still spell lists, relations,
    positions, attributes and templates as words."""
    model_args, data_args, _ = world.pretrain_arguments(
        "--synthetic_max_objects", "1", "--synthetic_shape_caption_share", "1",
        "--tokenizer_training_captions", "1000",
    )  # fmt: skip
    tokenizer = load_script("pretrain").build_tokenizer(model_args, data_args, None, 32, tmp_path)
    for word in ("and", "above", "below", "left", "right", "red", "small", "photo"):
        assert tokenizer.tokenize(word) == [word]
    assert tokenizer.unk_token not in tokenizer.tokenize("a red star above a circle, and a heart")


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("--dataloader_num_workers", "-1", "--dataloader_num_workers must be >= 0, got -1"),
        ("--shape_caption_share", "1.5", r"--shape_caption_share must lie in \[0, 1\], got 1.5"),
    ],
)
def test_the_main_job_names_a_bad_setting_before_training(argument, value, message):
    with pytest.raises(CliExit, match=rf"exit 2: .*{message}"):
        run_cli(load_script("demo").parse_args, argv=["demo.py", argument, value])
