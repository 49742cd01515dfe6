"""Offline WordPiece tokenizers for LOUPE's BERT text tower."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer
from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    min_frequency: int = 1,
    lowercase: bool = True,
    model_max_length: int = 64,
) -> BertTokenizerFast:
    """Trains an uncased BERT WordPiece tokenizer on `texts`, with no download.

    Users who are online can instead pass any BERT tokenizer name to [`LoupeProcessor`]; this is for
    offline use and tests. The result normalises and pre-tokenises exactly like BERT, so phrase
    character offsets map to tokens the same way.

    Args:
        texts: captions (any iterable; consumed once).
        vocab_size: upper bound on the vocabulary, special tokens included; small corpora give fewer.
        min_frequency: minimum count for a merge.
        lowercase: lowercase and strip accents (uncased BERT).
        model_max_length: the tokenizer's truncation length (the text tower's positions).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    backend = Tokenizer(WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    seen = {"count": 0}

    def counted(items: Iterable[str]) -> Iterable[str]:
        for text in items:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            seen["count"] += 1
            yield text

    backend.train_from_iterator(counted(texts), trainer=trainer)
    if seen["count"] == 0:
        raise ValueError("cannot train a tokenizer on an empty collection of texts")
    return BertTokenizerFast(
        vocab=backend.get_vocab(),
        do_lower_case=lowercase,
        strip_accents=lowercase,
        model_max_length=model_max_length,
    )


__all__ = ["train_wordpiece_tokenizer"]
