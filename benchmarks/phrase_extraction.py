"""Quality and speed of caption noun-phrase extraction (``loupe_hf.phrases``); prints one JSON document.

    python benchmarks/phrase_extraction.py --num-samples 2000

On synthetic captions the ground truth is exact (each object's phrase and its character span), so
it measures: the share of ground-truth phrases recovered with the exact span, recovered loosely
(an extracted phrase overlapping it with the same head noun), and the phrases extracted that
overlap no ground-truth phrase ("extra"), with and without ``filter_non_referring``, and without
the tag repairs (``_fix_tags``) to show what they contribute. Two caption
sets: the default generator settings and one where every multi-object caption states a spatial
relation ("... to the left of ..."). Real-style captions have no ground truth: their phrases are
listed for a reader to judge. Each backend whose data is present runs side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

from loupe_hf.data import SyntheticConfig, generate_sample
from loupe_hf.phrases import Phrase, chunk_caption, nltk_tagger_available

REAL_CAPTIONS = (
    "A man in a red jacket rides a bicycle down a busy street.",
    "Two dogs play with a frisbee on the green grass.",
    "A plate of food with broccoli, rice and a piece of chicken.",
    "A woman holding an umbrella walks past a yellow taxi.",
    "A large brown bear standing next to a small tree.",
    "The kitchen has white cabinets and a stainless steel refrigerator.",
    "A little girl in a pink dress is holding her teddy bear.",
    "Three people sitting at a wooden table with laptops.",
    "A close-up of a cat sleeping on a blue couch.",
    "An orange cat sits to the left of a black dog on the sofa.",
    "A group of young men playing soccer in a park.",
    "A red double decker bus driving down the road.",
    "A vase of flowers on top of a table next to the window.",
    "A man's hand holding a smartphone in front of a laptop.",
    "a photo of a skateboarder doing a trick at the top of a ramp",
    "Cars are parked along the side of a street in the city at night.",
)


def synthetic_set(num_samples: int, config: SyntheticConfig) -> list[dict[str, Any]]:
    rows = []
    for index in range(num_samples):
        sample = generate_sample(index, "train", config)
        objects = sample["objects"]
        gold = [
            (tuple(span), phrase.split()[-1])
            for span, phrase in zip(objects["phrase_span"], objects["phrase"], strict=True)
        ]
        rows.append({"caption": sample["caption"], "gold": gold})
    return rows


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def score(rows: list[dict[str, Any]], extracted: list[list[Phrase]]) -> dict[str, Any]:
    gold_total = exact = loose = captions_all_exact = extra = 0
    extra_texts: Counter[str] = Counter()
    for row, phrases in zip(rows, extracted, strict=True):
        spans = {phrase.span for phrase in phrases}
        hits = 0
        for span, head in row["gold"]:
            gold_total += 1
            hits += span in spans
            loose += any(overlaps(span, p.span) and p.head == head for p in phrases)
        exact += hits
        captions_all_exact += hits == len(row["gold"])
        for phrase in phrases:
            if not any(overlaps(phrase.span, span) for span, _ in row["gold"]):
                extra += 1
                extra_texts[phrase.text.lower()] += 1
    return {
        "gold_phrases": gold_total,
        "exact_recall": round(exact / gold_total, 4),
        "loose_recall": round(loose / gold_total, 4),
        "captions_all_exact": round(captions_all_exact / len(rows), 4),
        "extra_phrases_per_caption": round(extra / len(rows), 4),
        "most_common_extra": extra_texts.most_common(6),
    }


def run(
    rows: list[dict[str, Any]], tagger: str, filter_non_referring: bool, repair_tags: bool = True
) -> dict[str, Any]:
    start = time.perf_counter()
    extracted = [
        chunk_caption(
            row["caption"],
            tagger=tagger,
            filter_non_referring=filter_non_referring,
            repair_tags=repair_tags,
        )
        for row in rows
    ]
    seconds = time.perf_counter() - start
    return {**score(rows, extracted), "captions_per_second": round(len(rows) / seconds, 1)}


def run_variants(rows: list[dict[str, Any]], tagger: str) -> dict[str, Any]:
    variants = {
        "filtered": run(rows, tagger, filter_non_referring=True),
        "unfiltered": run(rows, tagger, filter_non_referring=False),
    }
    # Ablation: the tagger's raw tags, without the colour/size and verb/noun repairs.
    variants["filtered_no_tag_fixes"] = run(
        rows, tagger, filter_non_referring=True, repair_tags=False
    )
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    args = parser.parse_args()

    backends = ["pattern"] + (["nltk"] if nltk_tagger_available() else [])
    caption_sets = {
        "default": synthetic_set(args.num_samples, SyntheticConfig()),
        "all_relations": synthetic_set(
            args.num_samples, SyntheticConfig(min_objects=2, relation_probability=1.0)
        ),
    }
    for tagger in backends:  # build each tagger once, so throughput excludes loading it
        chunk_caption("a warm-up caption", tagger=tagger)

    report: dict[str, Any] = {
        "command": f"python benchmarks/phrase_extraction.py --num-samples {args.num_samples}",
        "backends": backends,
        "nltk_tagger_data": "present" if nltk_tagger_available() else "absent: nltk not measured",
        "synthetic": {
            name: {tagger: run_variants(rows, tagger) for tagger in backends}
            for name, rows in caption_sets.items()
        },
        "real_style": {
            tagger: {
                caption: [p.text for p in chunk_caption(caption, tagger=tagger)]
                for caption in REAL_CAPTIONS
            }
            for tagger in backends
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
