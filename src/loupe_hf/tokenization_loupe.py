"""Offline WordPiece tokenizers for LOUPE's BERT text tower."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import normalizers, pre_tokenizers
from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    min_frequency: int = 1,
    lowercase: bool = True,
    model_max_length: int = 64,
) -> BertTokenizerFast:
    """Builds an uncased BERT WordPiece tokenizer from `texts`, with no download, deterministically:
    the same texts give the same vocabulary and ids in every process (the `tokenizers` trainer breaks
    ties between equally frequent merges differently from run to run, which made resumed runs
    tokenise differently).

    The vocabulary is the special tokens, every character seen (alone and as a `##` continuation,
    so any word of the corpus can be spelled) and then whole words by frequency (ties by spelling)
    up to `vocab_size`. Users who are online can instead pass any BERT tokenizer to
    [`LoupeProcessor`]; this is for offline use and tests. Normalisation and pre-tokenisation are
    BERT's, so phrase character offsets map to tokens the same way.

    Args:
        texts: captions (any iterable; consumed once).
        vocab_size: upper bound on the vocabulary, special tokens and characters included.
        min_frequency: fewest occurrences for a whole word to enter the vocabulary.
        lowercase: lowercase and strip accents (uncased BERT).
        model_max_length: the tokenizer's truncation length (the text tower's positions).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    count = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        count += 1
        words.update(
            word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        )
    if count == 0:
        raise ValueError("cannot train a tokenizer on an empty collection of texts")
    characters = sorted({character for word in words for character in word})
    pieces = [*SPECIAL_TOKENS, *characters, *(f"##{character}" for character in characters)]
    if len(pieces) > vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold the {len(pieces)} special tokens and characters "
            "of these texts"
        )
    known = set(pieces)
    ranked = sorted(words.items(), key=lambda item: (-item[1], item[0]))
    for word, frequency in ranked:
        if len(pieces) >= vocab_size or frequency < min_frequency:
            break
        if word not in known:
            pieces.append(word)
            known.add(word)
    return BertTokenizerFast(
        vocab={piece: index for index, piece in enumerate(pieces)},
        do_lower_case=lowercase,
        strip_accents=lowercase,
        model_max_length=model_max_length,
    )


__all__ = ["train_wordpiece_tokenizer"]
