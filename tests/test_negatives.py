"""Hard negative captions: one head noun swapped for another noun of the batch."""

from __future__ import annotations

import re

import pytest

from loupe_hf.data import SHAPES, generate_sample
from loupe_hf.pretraining.negatives import head_noun_span, swap_head_nouns


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z-]+", text.lower())


def test_head_noun_is_the_last_word_of_the_phrase():
    caption = "a small red star to the left of a big blue circle."
    assert caption[slice(*head_noun_span(caption, (0, 16)))] == "star"
    assert caption[slice(*head_noun_span(caption, (32, 49)))] == "circle"
    assert head_noun_span("a , b", (1, 3)) is None


def test_each_negative_differs_from_its_caption_in_one_head_noun_taken_from_the_batch():
    samples = [generate_sample(index) for index in range(32)]
    captions = [s["caption"] for s in samples]
    spans = [[tuple(span) for span in s["objects"]["phrase_span"]] for s in samples]
    negatives = swap_head_nouns(captions, spans, seed=3)
    assert sum(n is not None for n in negatives) == len(captions)  # ten shapes: always a swap
    batch_nouns = {noun for s in samples for noun in s["objects"]["category"]}
    for caption, negative, sample in zip(captions, negatives, samples, strict=True):
        before, after = _words(caption), _words(negative)
        assert len(before) == len(after)
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changed) == 1, (caption, negative)
        old, new = changed[0]
        assert old in sample["objects"]["category"] and new in batch_nouns
        assert new not in sample["objects"]["category"] and new in SHAPES
    assert swap_head_nouns(captions, spans, seed=3) == negatives  # the same batch, the same draws
    assert swap_head_nouns(captions, spans, seed=4) != negatives


def test_no_swap_without_phrases_or_without_another_noun():
    assert swap_head_nouns(["a red star", "a cat"], [[], []]) == [None, None]
    assert swap_head_nouns(["a red star", "a blue star"], [[(0, 10)], [(0, 11)]]) == [None, None]
    assert swap_head_nouns(["a red star", "a cat"], [[(0, 10)], [(0, 5)]]) == [
        "a red cat",
        "a star",
    ]
    with pytest.raises(ValueError, match="2 captions but 1 lists"):
        swap_head_nouns(["a", "b"], [[]])
