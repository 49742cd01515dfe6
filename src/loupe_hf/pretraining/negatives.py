"""Hard negative captions: each caption with the head noun of one of its phrases swapped for a noun
that another caption of the batch uses ("a small red star" → "a small red circle").

Contrastive learning stops needing a word once the batch can be told apart without it: on the
synthetic data, colour and size single out most captions, so neither tower ever learns shape. A
caption that differs from the true one in a single noun is a negative that only that noun can
reject. The swap needs no labels: the phrases come from the caption's own phrase spans (the
phrase extractor of `loupe_hf.phrases`) and the replacement nouns from the batch itself.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence

__all__ = ["head_noun_span", "swap_head_nouns"]

_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")


def head_noun_span(caption: str, span: tuple[int, int]) -> tuple[int, int] | None:
    """Character span of a phrase's head noun: its last word (English noun phrases end in their
    head); `None` when the phrase holds no word."""
    start, end = span
    words = list(_WORD.finditer(caption, start, end))
    if not words:
        return None
    return words[-1].start(), words[-1].end()


def swap_head_nouns(
    captions: Sequence[str], phrase_spans: Sequence[Sequence[tuple[int, int]]], seed: int = 0
) -> list[str | None]:
    """One hard negative per caption: one phrase's head noun replaced by a different noun that heads
    a phrase of another caption in the batch and that this caption does not use. `None` where no
    such swap exists (no phrase, or no other noun in the batch).

    Draws are seeded by the batch's own text and `seed`, so the same batch always gets the same
    negatives (a resumed run repeats them exactly) in any process.
    """
    if len(captions) != len(phrase_spans):
        raise ValueError(f"{len(captions)} captions but {len(phrase_spans)} lists of phrase spans")
    heads = [
        [h for h in (head_noun_span(c, tuple(s)) for s in spans) if h is not None]
        for c, spans in zip(captions, phrase_spans, strict=True)
    ]
    nouns = [{c[a:b].lower() for a, b in h} for c, h in zip(captions, heads, strict=True)]
    pool = sorted(set().union(*nouns))
    rng = random.Random(zlib.crc32("\n".join(captions).encode()) ^ seed)
    negatives: list[str | None] = []
    for caption, spans, own in zip(captions, heads, nouns, strict=True):
        others = [noun for noun in pool if noun not in own]
        if not spans or not others:
            negatives.append(None)
            continue
        start, end = spans[rng.randrange(len(spans))]
        negatives.append(caption[:start] + others[rng.randrange(len(others))] + caption[end:])
    return negatives
