"""A reader for the WordNet 3.0 database files ``data.noun``, ``data.verb``, ``data.adj``,
``data.adv`` (format: ``man 5 wndb``; lexicographer file numbers: ``man 5 lexnames``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from rotjax.data._common import DataSourceError

WORDNET_DIR = "/usr/share/wordnet"
"""Where Debian's ``wordnet-base`` package installs the WordNet database files."""

LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
"""WordNet's lexicographer file names, indexed by lexicographer file number (``lexnames(5WN)``)."""

# Database file of each part of speech, and the synset types (ss_type) it may hold.
_POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
_POS_SS_TYPES = {"noun": "n", "verb": "v", "adj": "as", "adv": "r"}
WORDNET_HINT = (
    "Install WordNet 3.0 with `apt-get install wordnet-base` (it lands in "
    f"{WORDNET_DIR}), or pass wordnet_dir= a directory holding WordNet's data.* files."
)
# A quoted example: at the start of the gloss or after a `;` or `:` separator; or after a
# `,`, `)` or "e.g." when it runs to the next `;` or the end of the gloss (some 50 glosses,
# e.g. `propel, "Carry the ball"; "dribble the ball"`), which a quoted phrase inside the
# definition does not (`spread by scattering ("straw" is archaic); "strew toys ..."`).
_EXAMPLE = re.compile(r'(?:^|[;:]|(?:[,)]|\be\.g\.,?)(?=\s*"[^"]*"\s*(?:;|$)))\s*"([^"]*)"')
# What ends a definition before its first example: separators, "e.g.", "as in".
_LEAD_IN = re.compile(r"(?:[\s;:,]|\be\.g\.|\bas in\b)*$")
# Syntactic marker of some adjectives, e.g. `galore(ip)`.
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


class Synset(NamedTuple):
    """One WordNet synset.

    Attributes:
        key: Part-of-speech letter and byte offset, e.g. ``"n00001740"``; unique across files.
        lexname: Lexicographer class, e.g. ``"noun.Tops"``.
        lemmas: The synset's words with underscores turned into spaces.
        definition: The gloss without its examples.
        examples: The quoted example sentences of the gloss, without quotes.
    """

    key: str
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]


def pos_file(wordnet_dir: str | Path, pos: str) -> Path:
    """Path of the database file of a part of speech (``noun``, ``verb``, ``adj``, ``adv``)."""
    if pos not in _POS_FILES:
        raise ValueError(f"unknown WordNet part of speech {pos!r}; expected one of {_POS_FILES}")
    return Path(wordnet_dir) / _POS_FILES[pos]


def read_synsets(wordnet_dir: str | Path, pos: str) -> list[Synset]:
    """Parses the synsets of one ``data.<pos>`` file, in file order.

    Each synset line is ``synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...]
    p_cnt [ptr...] [frames...] | gloss`` with a 2-digit hexadecimal ``w_cnt``; lines starting
    with two spaces are the license header. The gloss is a definition followed by example
    sentences in double quotes after ``;`` (or ``:``) separators; in about 50 glosses the first
    example follows a ``,``, ``e.g.`` or a parenthesis instead (`_EXAMPLE`).

    Args:
        wordnet_dir: Directory holding the WordNet database files.
        pos: ``"noun"``, ``"verb"``, ``"adj"`` or ``"adv"``.

    Returns:
        The synsets.

    Raises:
        DataSourceError: If the file is missing, truncated or a line is malformed (including a
            synset offset that is not the line's byte offset).
    """
    path = pos_file(wordnet_dir, pos)
    if not path.is_file():
        raise DataSourceError(f"WordNet file {path} not found. {WORDNET_HINT}")
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        raise DataSourceError(f"{path}: does not end with a newline: truncated. {WORDNET_HINT}")
    synsets = []
    offset = 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        line_offset, offset = offset, offset + len(raw)
        if raw.startswith(b"  "):
            continue
        try:
            synsets.append(_parse_line(raw.decode("utf-8"), line_offset, _POS_SS_TYPES[pos]))
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise DataSourceError(
                f"{path}:{number}: malformed synset line ({e}). {WORDNET_HINT}"
            ) from e
    if not synsets:
        raise DataSourceError(f"{path}: holds no synsets. {WORDNET_HINT}")
    return synsets


def _parse_line(line: str, line_offset: int, ss_types: str) -> Synset:
    """Parses one synset line found at byte ``line_offset`` of its file."""
    head, bar, gloss = line.partition(" | ")
    if not bar:
        raise ValueError("no ' | ' before the gloss")
    fields = head.split()
    offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
    if len(offset) != 8 or int(offset) != line_offset:
        raise ValueError(f"synset offset {offset} is not the line's byte offset {line_offset}")
    if not 0 <= lex_filenum < len(LEXNAMES):
        raise ValueError(f"lexicographer file number {lex_filenum} outside [0, {len(LEXNAMES)})")
    if ss_type not in ss_types:
        raise ValueError(f"synset type {ss_type!r} does not belong in this file")
    w_cnt = int(fields[3], 16)
    if w_cnt < 1 or len(fields) < 4 + 2 * w_cnt + 1:
        raise ValueError(f"word count {fields[3]} does not match the fields")
    words = fields[4 : 4 + 2 * w_cnt : 2]
    if ss_type in "as":
        words = [_ADJ_MARKER.sub("", word) for word in words]
    gloss = gloss.strip()
    matches = list(_EXAMPLE.finditer(gloss))
    # up to the first example's opening quote (a `)` before it belongs to the definition)
    definition = _LEAD_IN.sub("", gloss[: matches[0].start(1) - 1]) if matches else gloss
    return Synset(
        key=("a" if ss_type == "s" else ss_type) + offset,
        lexname=LEXNAMES[lex_filenum],
        lemmas=tuple(word.replace("_", " ") for word in words),
        definition=definition.strip().rstrip(";:").strip(),
        examples=tuple(example for m in matches if (example := m.group(1).strip())),
    )
