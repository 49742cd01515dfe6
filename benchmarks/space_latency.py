"""Latency of one Detect call of the Space (5 labels), with and without the image-region cache.

    python benchmarks/space_latency.py CHECKPOINT

Calls `spaces/loupe_space.LoupeDemo.detect` directly on a 128 px synthetic image and a 640 px CC0 photo
(scikit-image's astronaut); "no cache" clears the cache before each call. Prints JSON (medians, ms).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import PIL.Image
import skimage.data
import transformers

from loupe_hf.data import generate_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces"))
from loupe_space import LoupeDemo

LABELS = "person, flag, helmet, rocket, cat"


def median_ms(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def main() -> None:
    transformers.utils.logging.set_verbosity_error()
    demo = LoupeDemo.from_pretrained(sys.argv[1])
    images = {
        "128px": generate_sample(13, "validation")["image"],
        "640px": PIL.Image.fromarray(skimage.data.astronaut()).resize(
            (640, 640), PIL.Image.BICUBIC
        ),
    }
    demo.detect(images["128px"], LABELS, 0.1, 10)  # warm-up
    report = {}
    for name, image in images.items():

        def uncached(image=image):
            demo.cache.clear()
            demo.detect(image, LABELS, 0.1, 10)

        demo.detect(image, LABELS, 0.1, 10)
        cached = median_ms(lambda image=image: demo.detect(image, LABELS, 0.1, 10))
        report[name] = {"no_cache_ms": median_ms(uncached), "cache_hit_ms": cached}
        report[name]["ratio_cached_over_uncached"] = round(cached / report[name]["no_cache_ms"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
