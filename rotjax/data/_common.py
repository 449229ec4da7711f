"""Shared pieces of the data pipelines: the error type, split containers and split helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import numpy as np

from rotjax._atomic import write_whole
from rotjax._numbers import is_int

T = TypeVar("T")


class DataSourceError(OSError):
    """A data source is missing, unreadable or corrupt.

    Raised instead of any silent fallback. The message names the file, directory or package
    and says how to obtain or repair it (which apt or pip package to install, which
    ``tfds build`` command to run, ...).
    """


class Splits(NamedTuple, Generic[T]):
    """The splits of one dataset.

    Attributes:
        train: Training split.
        validation: Validation split, or ``None`` when none was requested.
        test: Test split.
    """

    train: T
    validation: T | None
    test: T


def split_off(
    labels: np.ndarray, size: int, *, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of ``arange(len(labels))`` into a kept and a split-off part.

    Stratified when it can be: every class has 2 examples or more and each part can hold one
    of every class. Otherwise (one class with a single example is enough) the split is a plain
    seeded shuffle, as scikit-learn cannot stratify it.

    Args:
        labels: Integer class labels, one per example.
        size: Number of examples to split off (0 splits off nothing).
        seed: Seed of the split (``random_state`` of scikit-learn's ``train_test_split``).
        what: Name of the split-off part, for error messages.

    Returns:
        ``(kept, split_off)``: sorted index arrays, disjoint and covering all examples.

    Raises:
        ValueError: If ``size`` is negative or leaves no example, or ``seed`` is not an int
            in ``[0, 2**32)`` (scikit-learn's ``random_state``; its own message named that).
    """
    n = len(labels)
    if not (is_int(seed) and 0 <= seed < 2**32):
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not is_int(size):
        raise TypeError(f"{what}_size must be an int number of examples, got {size!r}")
    if size < 0 or size >= n:
        raise ValueError(f"{what}_size must be in [0, {n}) for {n} examples, got {size}")
    if size == 0:
        return np.arange(n), np.arange(0)
    from sklearn.model_selection import train_test_split

    counts = np.unique(labels, return_counts=True)[1]
    # Stratify when every class can appear on both sides; else fall back to a plain shuffle.
    stratified = counts.min() >= 2 and min(size, n - size) >= len(counts)
    stratify = labels if stratified else None
    kept, off = train_test_split(
        np.arange(n), test_size=int(size), random_state=seed, stratify=stratify
    )
    return np.sort(kept), np.sort(off)


def file_stamp(path: Path) -> tuple[str, int, int]:
    """Identifies a file's version by its path, size and modification time."""
    stat = path.stat()
    return os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to ``path`` as ``.npz``, whole or not at all (`write_whole`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda f: np.savez_compressed(f, **arrays))
