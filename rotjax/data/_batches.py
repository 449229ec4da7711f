"""Minibatches of numpy arrays, deterministic given a seed."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool = False) -> int:
    """Number of batches :func:`batches` yields for ``num_examples`` examples."""
    _check_batch_size(batch_size)
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def batches(
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    batch_size: int,
    *,
    seed: int | None = None,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray] | tuple[np.ndarray, ...]]:
    """One pass over arrays that share their leading dimension, in minibatches.

    Args:
        arrays: A mapping of names to arrays (yields dicts) or a sequence of arrays (yields
            tuples), all with the same number of examples along axis 0.
        batch_size: Examples per batch.
        seed: ``None`` keeps the order; an int shuffles with
            ``np.random.default_rng(seed).permutation``, the same order for the same seed.
        drop_remainder: Whether to drop a last batch smaller than ``batch_size``.

    Yields:
        Batches with the structure of ``arrays``. Without shuffling they are views of the
        inputs; with shuffling they are copies.

    Raises:
        ValueError: If there are no arrays, they disagree in length, or ``batch_size < 1``.
    """
    _check_batch_size(batch_size)
    names, values, n = _flatten(arrays)
    rng = None if seed is None else np.random.default_rng(seed)
    return _epoch(names, values, n, batch_size, rng, drop_remainder)


def epochs(
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    batch_size: int,
    *,
    seed: int | None = None,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray] | tuple[np.ndarray, ...]]:
    """Batches over several passes, reshuffled every pass; ``None`` epochs repeats forever.

    The first pass equals ``batches(arrays, batch_size, seed=seed, ...)``; later passes draw
    further permutations from the same ``np.random.default_rng(seed)``. Take a number of
    training steps with ``itertools.islice(epochs(...), num_steps)``.

    Args:
        arrays: As for :func:`batches`.
        batch_size: Examples per batch.
        seed: ``None`` keeps the order in every pass; an int shuffles every pass.
        num_epochs: Number of passes; ``None`` for an endless stream.
        drop_remainder: Whether to drop a last batch smaller than ``batch_size`` in each pass
            (the default, so that every batch has the same shape).

    Yields:
        Batches with the structure of ``arrays``.

    Raises:
        ValueError: If there are no arrays, they disagree in length, ``batch_size < 1``, a
            pass would yield no batch, or ``num_epochs < 0``.
    """
    _check_batch_size(batch_size)
    names, values, n = _flatten(arrays)
    if num_epochs is not None and num_epochs < 0:
        raise ValueError(f"num_epochs must be None or >= 0, got {num_epochs}")
    if num_batches(n, batch_size, drop_remainder=drop_remainder) == 0:
        raise ValueError(
            f"{n} examples make no batch of {batch_size} with drop_remainder={drop_remainder}"
        )
    rng = None if seed is None else np.random.default_rng(seed)
    passes = itertools.count() if num_epochs is None else range(num_epochs)
    return itertools.chain.from_iterable(
        _epoch(names, values, n, batch_size, rng, drop_remainder) for _ in passes
    )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _flatten(
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
) -> tuple[tuple[str, ...] | None, tuple[np.ndarray, ...], int]:
    """Splits ``arrays`` into names (``None`` for a sequence), arrays and their length."""
    if isinstance(arrays, Mapping):
        names: tuple[str, ...] | None = tuple(arrays)
        values = tuple(np.asarray(arrays[name]) for name in arrays)
    elif isinstance(arrays, Sequence) and not isinstance(arrays, str):
        names, values = None, tuple(np.asarray(a) for a in arrays)
    else:
        raise TypeError(f"arrays must be a mapping or sequence of arrays, got {type(arrays)}")
    if not values:
        raise ValueError("arrays is empty: nothing to batch")
    if any(v.ndim == 0 for v in values):
        raise ValueError("every array needs a leading example axis; got a scalar")
    lengths = {int(v.shape[0]) for v in values}
    if len(lengths) != 1:
        labels = names if names is not None else range(len(values))
        shapes = {str(k): v.shape for k, v in zip(labels, values, strict=True)}
        raise ValueError(f"arrays must share their leading dimension, got shapes {shapes}")
    return names, values, lengths.pop()


def _epoch(
    names: tuple[str, ...] | None,
    values: tuple[np.ndarray, ...],
    n: int,
    batch_size: int,
    rng: np.random.Generator | None,
    drop_remainder: bool,
) -> Iterator[dict[str, np.ndarray] | tuple[np.ndarray, ...]]:
    """One pass: draws the permutation when started, then yields the batches."""
    order = None if rng is None else rng.permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        index = (
            slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        )
        batch = tuple(v[index] for v in values)
        yield batch if names is None else dict(zip(names, batch, strict=True))
