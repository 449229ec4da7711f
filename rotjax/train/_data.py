"""Batch order as a pure function of (seed, step), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from rotjax.train._metrics import IGNORE_LABEL


def _length(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("no arrays to batch")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays must share their leading dimension, got lengths {lengths}")
    return next(iter(lengths.values()))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per pass (the remainder of each shuffled pass is dropped)."""
    if batch_size < 1 or num_examples < batch_size:
        raise ValueError(f"{num_examples} examples make no batch of {batch_size}")
    return num_examples // batch_size


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of pass ``epoch``: ``default_rng([seed, epoch]).permutation(n)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Indices of the examples of training step ``step`` (0-based).

    Step ``t`` takes batch ``t mod S`` of pass ``t // S`` (``S`` = `steps_per_epoch`), each
    pass shuffled by `epoch_order`: no state, any step is reproducible on its own.
    """
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(num_examples, seed=seed, epoch=epoch)
    return order[index * batch_size : (index + 1) * batch_size]


def train_batches(
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    rows: slice = slice(None),
) -> Iterator[dict[str, np.ndarray]]:
    """The endless stream of training batches from step ``start_step`` on.

    Args:
        arrays: Named arrays sharing their leading (example) axis.
        batch_size: Global batch size.
        seed: Seed of the order (see `batch_indices`).
        start_step: The first step to yield.
        rows: The rows of each global batch to keep (this process's share in a multi-process
            run, see `rotjax.train.process_rows`).

    Yields:
        Dicts of numpy arrays (copies), one per step.
    """
    n = _length(arrays)
    per_epoch = steps_per_epoch(n, batch_size)
    step = start_step
    epoch, order = None, None
    while True:
        e, index = divmod(step, per_epoch)
        if e != epoch:
            epoch, order = e, epoch_order(n, seed=seed, epoch=e)
        idx = order[index * batch_size : (index + 1) * batch_size][rows]
        yield {k: np.asarray(v)[idx] for k, v in arrays.items()}
        step += 1


def eval_batches(
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    rows: slice = slice(None),
) -> Iterator[dict[str, np.ndarray]]:
    """One in-order pass in batches of exactly ``batch_size`` (one compiled shape).

    The last batch is padded with zeros and with `IGNORE_LABEL` labels, which the eval
    metrics skip, so every example counts once.

    Args:
        arrays: Named arrays sharing their leading axis; ``labels`` is required.
        batch_size: Global batch size.
        rows: The rows of each global batch to keep (see `train_batches`).

    Yields:
        Dicts of numpy arrays.
    """
    if "labels" not in arrays:
        raise ValueError(f"eval arrays need 'labels', got {sorted(arrays)}")
    n = _length(arrays)
    for start in range(0, n, batch_size):
        batch = {}
        for k, v in arrays.items():
            part = np.asarray(v[start : start + batch_size])
            pad = batch_size - len(part)
            if pad:
                fill = IGNORE_LABEL if k == "labels" else 0
                filler = np.full((pad, *part.shape[1:]), fill, part.dtype)
                part = np.concatenate([part, filler])
            batch[k] = part[rows]
        yield batch
