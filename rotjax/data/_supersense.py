"""Supersense tagging from WordNet's example sentences: a token-classification task (the
named-entity-recognition analogue of the fusion experiments).

Every occurrence of a synset's lemma (or an inflected form of it) in the synset's own example
sentences is tagged, in BIO form, with the synset's lexicographer class (its supersense, e.g.
``B-verb.motion``); every other word is ``O``. The tag space is one for all domains: ``O`` and
``B-``/``I-`` for the 16 classes of `WORDNET_LABELS` (33 tags). Two **domains** share it:

- ``"nouns"``: the example sentences of noun synsets (mostly short phrases: "a pocket of
  resistance"), tagged with the 8 ``noun.*`` classes;
- ``"verbs"``: those of verb synsets (mostly whole sentences: "She ran to the store"), tagged
  with the 8 ``verb.*`` classes; ``"both"`` is their union (the multi-task reference).

Why this split: it keeps one label space (every model has all 33 tags) while the two domains
differ both in style (phrases vs sentences) and in which classes occur, as the different
corpora of the paper's NER pairs do; a model fine-tuned on one domain has never seen the other
domain's tags, so a merge has to keep both skills.

Words are the tokenizer's pre-tokenized words; each word's first word piece carries its tag,
the other pieces, the special tokens and the padding carry `IGNORE_LABEL` (they count in
neither loss nor metrics). Sentences with no tagged word (no lemma found, or truncated away)
are left out. Splits follow the synset, as for the other WordNet datasets (`split_of`).
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from rotjax.data._batches import IGNORE_LABEL
from rotjax.data._common import DataSourceError, Splits, write_npz
from rotjax.data._text import (
    SPLITS,
    WORDNET_LABELS,
    TextDataset,
    cached_path,
    check_options,
    read_cache,
    same_text,
    select_synsets,
    split_of,
    wrap,
)
from rotjax.data._tokenize import load_tokenizer, tokenizer_file
from rotjax.data._wordnet import WORDNET_DIR, WORDNET_HINT, pos_file

SUPERSENSE_DOMAINS = ("nouns", "verbs", "both")
_RULES = 3  # version of the tagging rules and the order (a change rebuilds the cache)


def supersense_tags(classes: Sequence[str] = WORDNET_LABELS) -> tuple[str, ...]:
    """The tag names: ``O``, then ``B-c``, ``I-c`` for each class c."""
    return ("O", *(f"{bi}-{c}" for c in classes for bi in ("B", "I")))


def wordnet_supersense(
    domain: str = "nouns",
    *,
    max_length: int = 48,
    max_per_class: int | None = 2000,
    limit: int | None = None,
    classes: Sequence[str] = WORDNET_LABELS,
    wordnet_dir: str | os.PathLike[str] = WORDNET_DIR,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> Splits[TextDataset]:
    """Supersense-tagged WordNet example sentences of one domain (see the module docstring).

    Args:
      domain: ``"nouns"``, ``"verbs"`` or ``"both"``.
      max_length: word pieces per sentence, ``[CLS]`` and ``[SEP]`` included.
      max_per_class: at most this many synsets a class (by a hash of the key).
      limit: at most this many sentences a split (the first of its fixed order).
      classes: the label space (lexicographer classes); the tags are `supersense_tags`.
      wordnet_dir, tokenizer_dir, cache_dir, cache: as for `wordnet_examples`.

    Returns:
      ``Splits`` of `TextDataset` whose ``labels`` are ``(N, max_length)`` tag ids (or
      `IGNORE_LABEL`) and whose ``label_names`` are the tag names.
    """
    if domain not in SUPERSENSE_DOMAINS:
        raise ValueError(f"domain must be one of {SUPERSENSE_DOMAINS}, got {domain!r}")
    classes = tuple(classes)
    check_options(classes, max_length=max_length, max_per_class=max_per_class, limit=limit)
    poses = sorted({c.split(".")[0] for c in classes if domain == "both" or domain[:-1] == c[:4]})
    if not poses:
        raise ValueError(f"domain {domain!r} has none of the classes {list(classes)}")
    # Duplicates are counted over every class's sentences (the "both" selection), so a
    # sentence of a noun and a verb synset is in no domain: each domain is a subset of "both",
    # and no domain's train split holds another's test sentence.
    every_pos = sorted({c.split(".")[0] for c in classes})
    sources = [pos_file(wordnet_dir, pos) for pos in every_pos]
    sources += [Path(wordnet_dir) / f"{pos}.exc" for pos in poses]
    missing = [p for p in sources if not p.is_file()]
    if missing:
        raise DataSourceError(f"WordNet file {missing[0]} not found. {WORDNET_HINT}")
    tags = supersense_tags(classes)
    tok_file = tokenizer_file(tokenizer_dir)
    name = f"wordnet_supersense_{domain}"
    options = dict(max_per_class=max_per_class, limit=limit, classes=classes, rules=_RULES)
    path = cached_path(name, max_length, options, sources, tok_file, cache_dir) if cache else None
    if path is not None and (arrays := read_cache(path, tags)) is not None:
        return wrap(name, arrays, tags)
    tokenizer = load_tokenizer(tok_file, max_length)
    every = select_synsets(
        classes, every_pos, wordnet_dir, max_per_class=max_per_class, texts_of=lambda s: s.examples
    )
    counts = Counter(same_text(text) for _, texts in every for text in texts)
    kept = [(synset, texts) for synset, texts in every if synset.lexname.split(".")[0] in poses]
    forms = {pos: _exceptions(Path(wordnet_dir) / f"{pos}.exc") for pos in poses}
    rows: dict[str, list] = {split: [] for split in SPLITS}
    for synset, texts in kept:
        pos = synset.lexname.split(".")[0]
        variants = _variants(synset.lemmas, pos, forms[pos])
        for text in texts:
            if counts[same_text(text)] != 1:
                continue
            encoding = tokenizer.encode(text)
            labels = tag_pieces(
                encoding, lemma_spans(text, variants), tags.index(f"B-{synset.lexname}")
            )
            if (labels > 0).any():
                rows[split_of(synset.key)].append((encoding, labels, synset.key, text))
    arrays = {}
    for split in SPLITS:
        part = rows[split][:limit]
        shape = (len(part), max_length)
        arrays[f"{split}.input_ids"] = np.array([e.ids for e, *_ in part], np.int32).reshape(shape)
        arrays[f"{split}.attention_mask"] = np.array(
            [e.attention_mask for e, *_ in part], np.int32
        ).reshape(shape)
        arrays[f"{split}.labels"] = np.array([lab for _, lab, *_ in part], np.int32).reshape(shape)
        arrays[f"{split}.synsets"] = np.array([k for *_, k, _ in part], dtype=np.str_)
        arrays[f"{split}.texts"] = np.array([t for *_, t in part], dtype=np.str_)
    arrays["label_names"] = np.array(tags, dtype=np.str_)
    if path is not None:
        write_npz(path, arrays)
    return wrap(name, arrays, tags)


def _exceptions(path: Path) -> dict[str, tuple[str, ...]]:
    """WordNet's irregular forms (``ran run``): base form -> its inflected forms; read again
    when the file changes (as the dataset's cache key does)."""
    status = path.stat()
    return _read_exceptions(path, status.st_mtime_ns, status.st_size)


@functools.cache
def _read_exceptions(path: Path, mtime_ns: int, size: int) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        for base in parts[1:]:
            out.setdefault(base, []).append(parts[0])
    return {k: tuple(v) for k, v in out.items()}


def inflections(
    word: str, pos: str, irregular: dict[str, tuple[str, ...]] | None = None
) -> set[str]:
    """The word and its regular (and, from ``irregular``, irregular) inflected forms: plurals
    for nouns; third person, past and gerund for verbs (``stop`` -> ``stops``, ``stopped``,
    ``stopping``; ``carry`` -> ``carries``, ``carried``; ``make`` -> ``making``)."""
    w = word.lower()
    out = {w, w + "s", w + "es", *(irregular or {}).get(w, ())}
    if w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
        out.add(w[:-1] + "ies")
        if pos == "verb":
            out.add(w[:-1] + "ied")
    if pos == "verb":
        out |= {w + "ed", w + "d", w + "ing"}
        if w.endswith("e") and len(w) > 2:
            out.add(w[:-1] + "ing")
        if len(w) > 2 and w[-1] not in "aeiouwxy" and w[-2] in "aeiou" and w[-3] not in "aeiou":
            out |= {w + w[-1] + "ed", w + w[-1] + "ing"}  # doubled final consonant
    return out


def _variants(lemmas: Iterable[str], pos: str, irregular) -> tuple[str, ...]:
    """Every surface form of the lemmas: a verb phrase inflects its first word, a noun
    compound its last; an irregular form listed for the whole lemma (``objets_d'art``,
    ``movers_and_shakers``) counts too."""
    out = set()
    for lemma in lemmas:
        words = lemma.lower().split()
        out.update(f.replace("_", " ") for f in (irregular or {}).get("_".join(words), ()))
        i = 0 if pos == "verb" else len(words) - 1
        for form in inflections(words[i], pos, irregular):
            out.add(" ".join([*words[:i], form, *words[i + 1 :]]))
    return tuple(sorted(out, key=lambda v: (-len(v), v)))  # longest first


def lemma_spans(text: str, variants: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of whole-word, case-insensitive occurrences of any variant (multiword
    variants match across any whitespace); overlapping matches keep the longest."""
    spans: list[tuple[int, int]] = []
    # A variant with a word the text does not hold cannot match, and its pattern is not
    # compiled (one per variant and sentence was two thirds of a dataset's build). Exact for
    # ASCII text and variants, where ignoring case is lower-casing; any other pair is searched.
    low = text.lower() if text.isascii() else None
    for v in variants:
        if low is not None and v.isascii() and not all(w in low for w in v.lower().split()):
            continue
        pattern = r"(?<![\w-])" + r"\s+".join(map(re.escape, v.split())) + r"(?![\w-])"
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            if all(m.end() <= s or m.start() >= e for s, e in spans):
                spans.append((m.start(), m.end()))
    return sorted(spans)


def tag_pieces(encoding, spans: Sequence[tuple[int, int]], begin: int) -> np.ndarray:
    """Tag ids per word piece of a tokenizer ``encoding``: ``begin`` (the ``B-`` tag) on the
    first piece of the first word of a span, ``begin + 1`` (``I-``) on the first piece of its
    other words, 0 (``O``) on the first piece of every other word, `IGNORE_LABEL` on the rest
    (later pieces of a word, special tokens, padding)."""
    labels = np.full(len(encoding.ids), IGNORE_LABEL, np.int32)
    seen = set()
    for i, (word, (start, end)) in enumerate(zip(encoding.word_ids, encoding.offsets, strict=True)):
        if word is None or word in seen or not encoding.attention_mask[i]:
            continue
        seen.add(word)
        labels[i] = 0
        for s, e in spans:
            if s <= start and end <= e:
                labels[i] = begin if start == s else begin + 1
    return labels
