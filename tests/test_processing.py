"""LoupeProcessor and the offline WordPiece tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from loupe_hf import LoupeProcessor, train_wordpiece_tokenizer
from loupe_hf.processing_loupe import phrase_token_masks


def test_trained_tokenizer_uses_bert_special_tokens(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        0,
        1,
        2,
        3,
        4,
    ]
    ids = tokenizer("A Small RED star")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a", "small", "red", "star"]


def test_trained_tokenizer_splits_unseen_words_into_wordpieces(tokenizer):
    pieces = tokenizer.tokenize("starred circles")
    assert len(pieces) > 2 and any(piece.startswith("##") for piece in pieces)


def test_trained_tokenizer_round_trips_through_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a large pink heart to the left of a cyan cross"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(loaded) == len(tokenizer)


def test_tokenizer_vocabulary_respects_the_requested_size():
    texts = [f"word{i} another{i} thing{i}" for i in range(400)]
    assert len(train_wordpiece_tokenizer(texts, vocab_size=100)) <= 100


@pytest.mark.parametrize(
    ("texts", "vocab_size", "error", "message"),
    [
        ([], 100, ValueError, "empty collection"),
        (["a b c"], 5, ValueError, "vocab_size"),
        (["fine", 3], 100, TypeError, "strings"),
    ],
)
def test_tokenizer_training_rejects_bad_input(texts, vocab_size, error, message):
    with pytest.raises(error, match=message):
        train_wordpiece_tokenizer(texts, vocab_size=vocab_size)


def test_processor_returns_model_inputs(processor):
    batch = processor(
        images=[torch.zeros(3, 10, 10, dtype=torch.uint8).numpy()] * 2,
        text=["a red star", "a blue circle"],
    )
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "token_type_ids"}
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["input_ids"].shape == batch["attention_mask"].shape


def test_processor_text_only_and_image_only(processor):
    assert set(processor(text="a red star")) == {"input_ids", "attention_mask", "token_type_ids"}
    assert set(processor(images=torch.zeros(3, 8, 8, dtype=torch.uint8).numpy())) == {
        "pixel_values"
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs images, text, or both"),
        ({"text": ""}, "text 0 is empty"),
        ({"text": ["fine", "   "]}, "text 1 is empty"),
        ({"text": []}, "empty list of texts"),
        ({"text": [None]}, "not a string"),
        ({"images": None, "phrase_spans": [[(0, 1)]]}, "needs images"),
        ({"text": ["a red star"], "phrase_spans": [[(3, 3)]]}, "empty or negative"),
        ({"text": ["a red star"], "phrase_spans": [[(0, 1)], [(0, 1)]]}, "2 captions but 1 texts"),
    ],
)
def test_processor_rejects_bad_text(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_phrase_masks_cover_the_tokens_of_each_phrase(processor, tokenizer):
    text = "a small red star to the left of a large blue circle"
    spans = [(0, 16), (32, 51)]
    batch = processor(text=[text, "a red circle"], phrase_spans=[spans, [(2, 12)]])
    masks = batch["phrase_masks"]
    assert masks.shape == (2, 2, batch["input_ids"].shape[1])
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert [t for t, m in zip(tokens, masks[0, 0], strict=True) if m] == [
        "a",
        "small",
        "red",
        "star",
    ]
    assert [t for t, m in zip(tokens, masks[0, 1], strict=True) if m] == [
        "a",
        "large",
        "blue",
        "circle",
    ]
    assert [
        t
        for t, m in zip(
            tokenizer.convert_ids_to_tokens(batch["input_ids"][1]), masks[1, 0], strict=True
        )
        if m
    ] == [
        "red",
        "circle",
    ]
    assert masks[1, 1].sum() == 0  # the second caption has one phrase: the other row is padding


def test_phrase_truncated_away_gives_an_empty_row():
    offsets = torch.tensor([[[0, 0], [0, 1], [2, 5], [0, 0]]])
    masks = phrase_token_masks(offsets, torch.ones(1, 4), [[(0, 5), (10, 20)]])
    assert masks[0, 0].tolist() == [0, 1, 1, 0] and masks[0, 1].sum() == 0


def test_processor_round_trips_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LoupeProcessor)
    image = torch.zeros(3, 12, 12, dtype=torch.uint8).numpy()
    original, reloaded = (
        processor(images=image, text="a red star"),
        loaded(images=image, text="a red star"),
    )
    for key in original:
        torch.testing.assert_close(original[key], reloaded[key])


def test_tokenizer_training_is_the_same_in_every_process(tmp_path):
    # The `tokenizers` trainer broke ties between merges differently per process, so a resumed
    # run re-tokenised its captions differently; two fresh interpreters must now agree.
    script = (
        "import json, sys\n"
        "from loupe_hf import train_wordpiece_tokenizer\n"
        "from loupe_hf.data import training_captions\n"
        "tokenizer = train_wordpiece_tokenizer(training_captions(500), vocab_size=2048)\n"
        "print(json.dumps(sorted(tokenizer.get_vocab().items())))\n"
    )
    vocabularies = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        vocabularies.append(result.stdout)
    assert vocabularies[0] == vocabularies[1]


def test_a_vocabulary_too_small_for_the_characters_is_refused():
    with pytest.raises(ValueError, match=r"cannot hold the .* special tokens and characters"):
        train_wordpiece_tokenizer(["abcdefghij klmnop"], vocab_size=20)
