"""Noun-phrase extraction from captions: the phrases that LOUPE aligns with image regions.

The method (``LOUPE_METHOD.md`` §3.4) takes its phrases from an off-the-shelf chunker. This module
tags a caption with a part-of-speech tagger, chunks noun phrases with an ``nltk.RegexpParser``
grammar and returns each phrase as a ``[start, end)`` character span into the caption, so that
``caption[start:end]`` is the phrase text and word-piece offsets can be mapped to phrases later.

Tagger backends (``tagger=``):

* ``"nltk"``: NLTK's averaged perceptron, the model behind ``nltk.pos_tag``. Needs the
  ``averaged_perceptron_tagger_eng`` data package, which a fresh machine does not have.
* ``"pattern"``: textblob's ``PatternTagger`` (a Brill-style lexicon tagger whose lexicon ships
  inside the textblob wheel), so it works with no downloads at all.
* ``"auto"`` (default): ``"nltk"`` when its data is installed, else ``"pattern"``.

Conventions, chosen for the LOUPE use (phrases stand for things one can point at in the image):

* Leading determiners, possessive pronouns and numbers are part of the phrase ("a small red
  star", "two dogs", "his phone"), matching the synthetic benchmark's ground-truth phrases.
* Colour and size words stay inside the phrase even where the tagger calls them nouns or verbs
  ("a medium cyan cross" is tagged noun-noun-verb by ``PatternTagger``): see ``_fix_tags``.
* Commas and conjunctions end a phrase, so lists give one phrase per item.
* With ``filter_non_referring=True`` (default) two kinds of noun phrase that name no region are
  dropped: bare positions ("the left" in "to the left of", "the top", "the background") and the
  picture itself at the start of a caption ("a photo" in "a photo of ...").

Phrase extraction is meant to run once, in preprocessing: :func:`map_phrase_spans` runs the
batched :func:`add_phrase_spans` through ``datasets.Dataset.map`` so that the result is cached.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # imported lazily at run time: nltk and textblob are the optional extra "text"
    import datasets
    import nltk

__all__ = [
    "TAGGERS",
    "Phrase",
    "add_phrase_spans",
    "chunk_caption",
    "count_without_phrases",
    "extract_phrases",
    "map_phrase_spans",
    "nltk_tagger_available",
    "resolve_tagger",
    "spans_or_whole_caption",
]

TaggerName = Literal["auto", "nltk", "pattern"]
TAGGERS: tuple[str, ...] = ("auto", "nltk", "pattern")

# NLTK >= 3.9 loads the perceptron from this JSON resource (older releases used a pickle).
_NLTK_TAGGER_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"

# Words, with clitics split off the way the Penn Treebank (and so both taggers) expects:
# "man's" -> "man" "'s", "isn't" -> "is" "n't". Hyphenated and slashed words stay whole
# ("close-up", "red/blue": one modifier, not a phrase boundary); a
# quote mark that is not a clitic's is a token of its own (and is not tagged: see _QUOTES).
_APOSTROPHE = "['\u2019]"  # ASCII or typographic
_TOKEN = re.compile(
    rf"\w+(?=n{_APOSTROPHE}t\b)|n{_APOSTROPHE}t\b|(?i:{_APOSTROPHE}(?:s|re|ve|ll|d|m)\b)"
    r"|\w+(?:[-/]\w+)*|[^\w\s]"
)
# Quotes are skipped when tagging, so "the 'red' car" is one phrase (its span keeps the quotes).
_QUOTES = frozenset("\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb")
_SENTENCE_END = frozenset(".!?")


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Closed lists of attribute words that must stay prenominal modifiers; taggers trained on news
# text often read "cyan", "medium" or "orange" as nouns.
_COLOURS = _word_set(
    "red green blue yellow purple orange pink cyan brown white black grey gray gold golden "
    "silver beige tan maroon navy teal violet magenta turquoise dark light bright pale"
)
_SIZES = _word_set("small medium large big little tiny huge giant tall short long")
_ATTRIBUTE_WORDS = _COLOURS | _SIZES

# Nouns that, with no modifier of their own, name a position rather than a thing.
_POSITION_NOUNS = _word_set(
    "left right top bottom front back middle center centre side foreground background "
    "distance corner edge"
)
# Nouns naming the picture itself when a caption starts "a photo of ...".
_PICTURE_NOUNS = _word_set("photo photograph image picture pic snapshot shot view close-up closeup")
_PICTURE_LINKS = _word_set("of showing shows depicting featuring with")

# Determiner-like words that open a phrase: articles, predeterminers ("all"), possessive
# pronouns, numbers. Participles and adverbs are modifiers only after one of these, because a
# bare "riding horses" or "down busy streets" is more often a verb or adverb phrase.
_GRAMMAR = r"""
NP:
    {<DT|PDT|PRP\$|CD>+(<RB.*>?<JJ.*|VBN|VBG>)*<NN.*>+(<POS>(<JJ.*|VBN|VBG>)*<NN.*>+)?}
    {<JJ.*>*<NN.*>+(<POS><JJ.*>*<NN.*>+)?}
"""
_DETERMINER_TAGS = frozenset({"DT", "PDT", "PRP$", "CD"})


@dataclass(frozen=True)
class Phrase:
    """One noun phrase of a caption.

    Attributes:
        start: Offset of the phrase's first character in the caption.
        end: Offset one past its last character (``caption[start:end] == text``).
        text: The phrase as written in the caption.
        head: Its head noun, lower-cased (the last noun: "star" in "a small red star").
    """

    start: int
    end: int
    text: str
    head: str

    @property
    def span(self) -> tuple[int, int]:
        """``(start, end)``."""
        return (self.start, self.end)


# --------------------------------------------------------------------------------------------
# Taggers (built once per process: loading a tagger costs far more than tagging a caption)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"phrase extraction needs {module.split('.')[0]!r}; install the extra: "
            "pip install 'loupe-hf[text]'"
        ) from error


@functools.cache
def nltk_tagger_available() -> bool:
    """Whether NLTK's perceptron tagger data is installed (checked once per process)."""
    nltk = _require("nltk")
    try:
        nltk.data.find(_NLTK_TAGGER_RESOURCE)
    except LookupError:
        return False
    return True


def resolve_tagger(tagger: str = "auto") -> str:
    """The concrete backend (``"nltk"`` or ``"pattern"``) that ``tagger`` stands for."""
    if tagger not in TAGGERS:
        raise ValueError(f"tagger must be one of {TAGGERS}, got {tagger!r}")
    if tagger == "auto":
        return "nltk" if nltk_tagger_available() else "pattern"
    return tagger


@functools.cache
def _nltk_tagger() -> Callable[[list[str]], list[str]]:
    if not nltk_tagger_available():
        raise LookupError(
            "tagger='nltk' needs NLTK's 'averaged_perceptron_tagger_eng' data, which is not "
            "installed (python -m nltk.downloader averaged_perceptron_tagger_eng); "
            "use tagger='pattern' or 'auto' to tag without it"
        )
    perceptron = _require("nltk.tag.perceptron")
    # The same model nltk.pos_tag uses, built once: pos_tag reloads it from disk on every call.
    model = perceptron.PerceptronTagger()
    return lambda tokens: [tag for _, tag in model.tag(tokens)]


@functools.cache
def _pattern_tagger() -> Callable[[list[str]], list[str]]:
    taggers = _require("textblob.en.taggers")
    model = taggers.PatternTagger()

    def tag(tokens: list[str]) -> list[str]:
        # tokenize=False makes the tagger split on spaces only, so it sees exactly our tokens
        # (which never contain whitespace) and its output lines up with them one to one.
        tags = [tag for _, tag in model.tag(" ".join(tokens), tokenize=False)]
        if len(tags) != len(tokens):  # defensive: never mis-align spans silently
            raise RuntimeError(f"PatternTagger returned {len(tags)} tags for {len(tokens)} tokens")
        return tags

    return tag


def _tagger(backend: str) -> Callable[[list[str]], list[str]]:
    return _nltk_tagger() if backend == "nltk" else _pattern_tagger()


@functools.cache
def _chunker() -> nltk.RegexpParser:
    return _require("nltk").RegexpParser(_GRAMMAR)


# --------------------------------------------------------------------------------------------
# Tagging


def _tokenize(caption: str) -> list[tuple[str, int, int]]:
    """``(word, start, end)`` of each token, quotes left out, typographic apostrophes made ASCII
    (the taggers' lexicons only know the ASCII forms of "'s" and "n't")."""
    return [
        (m.group().replace("\u2019", "'"), m.start(), m.end())
        for m in _TOKEN.finditer(caption)
        if m.group() not in _QUOTES
    ]


def _sentences(words: list[str]) -> list[list[str]]:
    """Split tokens after sentence-final punctuation.

    Both taggers read the first word of a sentence specially (the lexicon tagger only looks up
    a lower-cased form there), so a second sentence's "The" must start a sentence of its own.
    """
    sentences: list[list[str]] = [[]]
    for word in words:
        sentences[-1].append(word)
        if word in _SENTENCE_END:
            sentences.append([])
    return [sentence for sentence in sentences if sentence]


def _is_word(token: str) -> bool:
    return any(char.isalnum() for char in token)


def _fix_tags(words: list[str], tags: list[str]) -> list[str]:
    """Repair the tagging errors that break noun phrases apart on caption-style text.

    1. A colour or size word followed by a noun, adjective or verb-tagged word is an adjective
       ("a medium/NN cyan/NN cross").
    2. A base-form verb right after a determiner or adjective is a noun ("a cyan cross/VB").
    3. A plural noun between a singular noun and a determiner is a verb ("a man rides/NNS a
       bicycle"): a noun phrase never continues straight into a new determiner.

    First, symbols get a symbol tag: the lexicon tagger calls unknown tokens such as "—" nouns.
    """
    tags = [
        "SYM" if not _is_word(word) and tag[:2] in ("NN", "JJ", "VB", "RB") else tag
        for word, tag in zip(words, tags, strict=True)
    ]
    for i in range(len(words) - 1):
        if (
            words[i].lower() in _ATTRIBUTE_WORDS
            and _is_word(words[i + 1])
            and tags[i + 1][:2] in ("NN", "JJ", "VB")
            and tags[i + 1] not in ("VBZ", "VBD")
        ):
            tags[i] = "JJ"
    for i in range(1, len(words)):
        if tags[i] in ("VB", "VBP") and (
            tags[i - 1] in _DETERMINER_TAGS or tags[i - 1][:2] == "JJ"
        ):
            tags[i] = "NN"
    for i in range(1, len(words) - 1):
        if tags[i] == "NNS" and tags[i - 1] == "NN" and tags[i + 1] in ("DT", "PRP$"):
            tags[i] = "VBZ"
    return tags


def _tag(words: list[str], backend: str, repair: bool = True) -> list[str]:
    tag = _tagger(backend)
    tags = [t for sentence in _sentences(words) for t in tag(sentence)]
    return _fix_tags(words, tags) if repair else tags


# --------------------------------------------------------------------------------------------
# Chunking


# Tags the grammar can place inside a noun phrase; any other tag ends one.
_PHRASE_TAG = re.compile(r"DT|PDT|PRP\$|CD|RB.*|JJ.*|VBN|VBG|NN.*|POS")
# NLTK's chunk rules look ahead to the end of the tag string at every match, so their time grows
# with the square of its length: 10,000 words of "the" hit NLTK's 5 s regular-expression limit
# (a `TimeoutError`). Longer captions are chunked in windows of at most this many tags, cut after
# a tag no phrase can contain, which gives the same phrases (a chunk never spans such a tag).
_CHUNK_WINDOW = 128


def _windows(tags: list[str]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``tags``, each at most ``_CHUNK_WINDOW`` long, ending after a
    tag that cannot be inside a phrase wherever the window has one."""
    windows, start = [], 0
    while start < len(tags):
        end = min(start + _CHUNK_WINDOW, len(tags))
        if end < len(tags):
            breaks = [k + 1 for k in range(start, end) if not _PHRASE_TAG.fullmatch(tags[k])]
            end = breaks[-1] if breaks else end  # no break at all: a degenerate run, cut anyway
        windows.append((start, end))
        start = end
    return windows


def _chunks(tags: list[str]) -> list[tuple[int, int]]:
    """Token ranges ``[first, last)`` of the noun phrases the grammar finds."""
    ranges = []
    for start, end in _windows(tags):
        # Token indices ride along as the "words", so each chunk tells where it sits.
        tree = _chunker().parse(list(enumerate(tags[start:end], start)))
        for node in tree:
            if not isinstance(node, tuple):  # a chunk subtree; plain leaves are (index, tag)
                indices = [index for index, _ in node.leaves()]
                ranges.append((indices[0], indices[-1] + 1))
    return ranges


def _refers(
    first: int, last: int, words: list[str], tags: list[str], is_first_phrase: bool
) -> bool:
    """Whether the phrase ``words[first:last]`` can name a region (see the module docstring)."""
    content = [k for k in range(first, last) if tags[k] not in _DETERMINER_TAGS]
    head = words[last - 1].lower()
    if len(content) == 1 and head in _POSITION_NOUNS:
        return False
    following = words[last].lower() if last < len(words) else ""
    return not (is_first_phrase and head in _PICTURE_NOUNS and following in _PICTURE_LINKS)


def chunk_caption(
    caption: str,
    max_phrases: int | None = None,
    *,
    tagger: TaggerName = "auto",
    filter_non_referring: bool = True,
    repair_tags: bool = True,
) -> list[Phrase]:
    """Noun phrases of ``caption``, in caption order, with text, span and head noun.

    Args:
        caption: The caption text.
        max_phrases: Keep only the first ``max_phrases`` phrases (``None``: all).
        tagger: ``"auto"``, ``"nltk"`` or ``"pattern"`` (see the module docstring).
        filter_non_referring: Drop bare position phrases ("the left") and a leading "a photo"
            of "a photo of ...", which name no region.
        repair_tags: Repair the tagger's colour/size and verb/noun errors on caption-style text
            (see the module docstring); ``False`` keeps its raw tags.

    Raises:
        TypeError: ``caption`` is not a ``str``.
        ValueError: Unknown ``tagger`` or negative ``max_phrases``.
        LookupError: ``tagger="nltk"`` without NLTK's tagger data.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    if max_phrases is not None and max_phrases < 0:
        raise ValueError(f"max_phrases must be >= 0 or None, got {max_phrases}")
    backend = resolve_tagger(tagger)
    tokens = _tokenize(caption)
    if max_phrases == 0 or not any(_is_word(word) for word, _, _ in tokens):
        return []  # nothing to tag: skips the taggers for blank or punctuation-only captions
    words = [word for word, _, _ in tokens]
    tags = _tag(words, backend, repair=repair_tags)
    phrases: list[Phrase] = []
    for k, (first, last) in enumerate(_chunks(tags)):
        if filter_non_referring and not _refers(first, last, words, tags, k == 0):
            continue
        start, end = tokens[first][1], tokens[last - 1][2]
        phrases.append(Phrase(start, end, caption[start:end], words[last - 1].lower()))
        if len(phrases) == max_phrases:
            break
    return phrases


def extract_phrases(
    caption: str,
    max_phrases: int | None = None,
    *,
    tagger: TaggerName = "auto",
    filter_non_referring: bool = True,
) -> list[tuple[int, int]]:
    """``[start, end)`` character spans of the noun phrases of ``caption``, in caption order.

    Spans never overlap and ``caption[start:end]`` is the phrase, with no surrounding space or
    punctuation. A blank caption, or one with no noun phrase, gives ``[]``. Arguments and errors
    as :func:`chunk_caption`.

    >>> caption = "a small red star to the left of a large blue circle"
    >>> [caption[s:e] for s, e in extract_phrases(caption, tagger="pattern")]
    ['a small red star', 'a large blue circle']
    """
    return [
        phrase.span
        for phrase in chunk_caption(
            caption, max_phrases, tagger=tagger, filter_non_referring=filter_non_referring
        )
    ]


def spans_or_whole_caption(caption: str, spans: Sequence[Sequence[int]]) -> list[list[int]]:
    """``spans`` as ``[start, end]`` lists, or, if there are none, the whole caption as one phrase.

    The fallback for captions with no noun phrase ("running fast!"): the fine-grained loss then
    still has one phrase to align. It is applied when batches are built, not stored by
    :func:`add_phrase_spans`, so that the captions without phrases stay countable
    (:func:`count_without_phrases`). The whole-caption span is trimmed of surrounding whitespace;
    a blank caption still gives ``[]``.
    """
    if spans:
        return [[int(start), int(end)] for start, end in spans]
    stripped = caption.strip()
    if not stripped:
        return []
    start = caption.index(stripped)
    return [[start, start + len(stripped)]]


# --------------------------------------------------------------------------------------------
# datasets integration


def add_phrase_spans(
    batch: dict[str, list[Any]],
    caption_column: str = "caption",
    spans_column: str = "phrase_spans",
    *,
    tagger: TaggerName = "auto",
    max_phrases: int | None = None,
    filter_non_referring: bool = True,
) -> dict[str, list[Any]]:
    """Batched ``Dataset.map`` function: add ``spans_column`` with the phrase spans per caption.

    Each row gets a list of ``[start, end]`` int pairs (see :func:`extract_phrases`); a missing
    (``None``), blank or phrase-less caption gets ``[]``. Prefer :func:`map_phrase_spans`, which
    also keys the ``datasets`` cache to this module's code.

    >>> add_phrase_spans({"caption": ["a red star", ""]}, tagger="pattern")["phrase_spans"]
    [[[0, 10]], []]
    """
    spans = []
    for caption in batch[caption_column]:
        phrases = (
            [] if caption is None else _spans(caption, max_phrases, tagger, filter_non_referring)
        )
        spans.append(phrases)
    return {spans_column: spans}


def _spans(
    caption: str, max_phrases: int | None, tagger: TaggerName, filter_non_referring: bool
) -> list[list[int]]:
    phrases = chunk_caption(
        caption, max_phrases, tagger=tagger, filter_non_referring=filter_non_referring
    )
    return [[phrase.start, phrase.end] for phrase in phrases]


@functools.cache
def _source_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def map_phrase_spans(
    dataset: datasets.Dataset,
    caption_column: str = "caption",
    spans_column: str = "phrase_spans",
    *,
    tagger: TaggerName = "auto",
    max_phrases: int | None = None,
    filter_non_referring: bool = True,
    batch_size: int = 1000,
    num_proc: int | None = None,
    **map_kwargs: Any,
) -> datasets.Dataset:
    """Run :func:`add_phrase_spans` over ``dataset`` with ``Dataset.map``, cached.

    ``datasets`` fingerprints a module-level function by reference, so on its own it would keep
    serving spans made by an older version of this module; the fingerprint here also covers
    this file's source and the concrete tagger (``"auto"`` resolves per machine). A second call
    with the same arguments on a dataset backed by cache files loads the stored result instead
    of re-tagging.

    Args:
        dataset: A ``datasets.Dataset`` with a string column ``caption_column``.
        caption_column: Column holding the captions.
        spans_column: Column to write (a list of ``[start, end]`` pairs per row).
        tagger, max_phrases, filter_non_referring: As :func:`chunk_caption`.
        batch_size: Rows per call of the batched function.
        num_proc: Worker processes for ``Dataset.map``.
        **map_kwargs: Passed on to ``Dataset.map`` (e.g. ``desc``, ``load_from_cache_file``).
    """
    from datasets.fingerprint import Hasher

    fn_kwargs = {
        "caption_column": caption_column,
        "spans_column": spans_column,
        "tagger": resolve_tagger(tagger),
        "max_phrases": max_phrases,
        "filter_non_referring": filter_non_referring,
    }
    # Dataset._fingerprint is how datasets itself chains fingerprints through transforms.
    key = [dataset._fingerprint, _source_digest(), sorted(fn_kwargs.items()), batch_size]
    return dataset.map(
        add_phrase_spans,
        batched=True,
        batch_size=batch_size,
        fn_kwargs=fn_kwargs,
        num_proc=num_proc,
        new_fingerprint=Hasher.hash(key),
        **map_kwargs,
    )


def count_without_phrases(dataset: datasets.Dataset, spans_column: str = "phrase_spans") -> int:
    """Number of rows of ``dataset`` whose ``spans_column`` is empty (captions with no phrase)."""
    import pyarrow.compute as pc

    # Arrow compute on the column avoids materialising millions of Python lists.
    column = dataset.with_format("arrow")[spans_column]
    lengths = pc.fill_null(pc.list_value_length(column), 0)
    return int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
