"""Minibatches of numpy arrays; the order is a pure function of (seed, epoch), so any batch of
any run can be reproduced on its own (what exact resume needs).

- `batches`: one pass, in order or shuffled by `epoch_order`, optionally padded to full batches
  (eval: every example counts once; the padding of the array named ``"labels"`` is
  `IGNORE_LABEL`, of every other array 0).
- `train_batches`: the endless training stream from any step: step ``t`` is batch ``t mod S``
  of pass ``t // S`` (`batch_indices`).

Both can cut the padding columns of token sequences batch by batch (``trim``): the compute of a
batch of short texts then scales with its longest text, not with the padded length.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from rotjax._numbers import is_int

IGNORE_LABEL = -100
"""Label of positions that count in neither loss nor metrics (padding tokens, padded examples,
word pieces after the first), as in PyTorch's ``CrossEntropyLoss(ignore_index=-100)``."""

Arrays = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def check_labels(
    labels: np.ndarray, what: str, num_classes: int | None = None, *, all_ignored_ok: bool = False
) -> None:
    """Refuse labels that are neither a class in ``[0, num_classes)`` (``[0, ∞)`` when
    ``num_classes`` is None) nor `IGNORE_LABEL`: inside a jitted step a label of -1 (the
    "unlabeled" of many test splits) would be gathered as the last class, and one of
    ``num_classes`` or more would make the loss NaN, neither with an error. So are labels of
    any dtype but an integer one (float labels fail inside optax with an error that names
    neither; bool ones are no class ids), and, unless ``all_ignored_ok`` (one batch of many
    may have none), labels that are all `IGNORE_LABEL` (an evaluation of loss 0 and accuracy
    0, training by weight decay alone). Used by `rotjax.train`, `rotjax.merge.statistics`
    and the command line alike."""
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integer class ids, got dtype {y.dtype}")
    bad = (y != IGNORE_LABEL) & ((y < 0) | (y >= (np.inf if num_classes is None else num_classes)))
    if bad.any():
        classes = "[0, ∞)" if num_classes is None else f"[0, {num_classes})"
        raise ValueError(
            f"{what}: {int(bad.sum())} label(s) outside the classes {classes} and not "
            f"IGNORE_LABEL ({IGNORE_LABEL}), e.g. {np.unique(y[bad])[:5].tolist()}"
        )
    if y.size and not all_ignored_ok and (y == IGNORE_LABEL).all():
        raise ValueError(f"{what}: every label is IGNORE_LABEL ({IGNORE_LABEL}): nothing to count")


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool = False) -> int:
    """Number of batches `batches` yields for ``num_examples`` examples."""
    num_examples = _check_count(num_examples)
    _check_batch_size(batch_size)
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full training batches per pass (the remainder of each shuffled pass is dropped)."""
    num_examples = _check_count(num_examples)
    _check_batch_size(batch_size)
    if num_examples < batch_size:
        raise ValueError(f"{num_examples} examples make no batch of {batch_size}")
    return num_examples // batch_size


def epoch_order(num_examples: int, *, seed: int, epoch: int = 0) -> np.ndarray:
    """The example order of pass ``epoch``: ``default_rng(entropy).permutation(n)``, a stream
    of its own for every pair of ints ``seed, epoch >= 0``.

    ``entropy`` is ``[seed, epoch]`` while both are below ``2**32``. numpy splits a larger int
    into 32-bit words (low first) and joins the words of a list, so ``[2**32 + 7, 0]`` and
    ``[7, 1]`` would both be the words ``7, 1, 0`` (and zeros up to its pool's 4 words change
    nothing);
    larger values are therefore spelled out as their words followed by the two word counts
    (at least 5 words ending in a nonzero one: no pair below ``2**32``, padded with zeros to
    numpy's pool of 4 words, spells the same, and the counts make the spelling unique).
    """
    num_examples = _check_count(num_examples)
    seed, epoch = operator.index(seed), operator.index(epoch)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    entropy = [seed, epoch]
    if max(entropy) >= 2**32:  # below it, the orders of every run so far are kept
        words = [[n >> k & 0xFFFFFFFF for k in range(0, n.bit_length() or 1, 32)] for n in entropy]
        entropy = [*words[0], *words[1], len(words[0]), len(words[1])]
    return np.random.default_rng(entropy).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Indices of the examples of training step ``step`` (0-based): batch ``step mod S`` of
    pass ``step // S`` (``S`` = `steps_per_epoch`), each pass shuffled by `epoch_order`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(num_examples, seed=seed, epoch=epoch)
    return order[index * batch_size : (index + 1) * batch_size]


def batches(
    arrays: Arrays,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
    pad: bool = False,
    rows: slice = slice(None),
    trim: int | None = None,
) -> Iterator[dict[str, np.ndarray] | tuple[np.ndarray, ...]]:
    """One pass over arrays that share their leading dimension, in minibatches.

    Args:
      arrays: A mapping of names to arrays (yields dicts) or a sequence of arrays (yields
        tuples), all with the same number of examples along axis 0.
      batch_size: Examples per batch.
      seed: ``None`` keeps the order; an int shuffles by ``epoch_order(n, seed=seed, epoch=epoch)``.
      epoch: The pass whose order to use (with ``seed``).
      drop_remainder: Drop a last batch smaller than ``batch_size``.
      pad: Pad the last batch to ``batch_size`` with zeros (labels, under the name
        ``"labels"``, with `IGNORE_LABEL`), so every batch has one shape and every example
        counts once.
      rows: The rows of each batch to keep (a process's share, `rotjax.train.process_rows`).
      trim: Cut each batch's padding columns (`trim_padding`, by the ``"attention_mask"``
        array, to a multiple of ``trim``; decided on the whole batch before ``rows``, so
        every process cuts alike). ``None`` keeps the
        arrays' length.

    Yields:
      Batches with the structure of ``arrays``: views of the inputs in order, copies when
      shuffled or padded.

    Raises:
      ValueError: If there are no arrays, they disagree in length, ``batch_size < 1``,
        ``pad`` would pad a sequence of arrays (no ``"labels"`` to pad with `IGNORE_LABEL`),
        or ``trim`` is not an int >= 1, has no ``"attention_mask"`` to cut by, or a row's
        ``"labels"`` past its last real token are not all `IGNORE_LABEL` (checked on the
        whole arrays at once: uncut they count, and a batch that cuts them drops them).
    """
    _check_batch_size(batch_size)
    names, values, n = _flatten(arrays)
    _check_trim(trim, names, values)
    if pad and names is None and n % batch_size:  # no "labels" to fill with IGNORE_LABEL
        raise ValueError(
            "pad=True needs named arrays (a mapping with 'labels'): unnamed labels would be "
            "padded with 0, a real class"
        )
    order = None if seed is None else epoch_order(n, seed=seed, epoch=epoch)
    return _pass(names, values, n, batch_size, order, drop_remainder, pad, rows, trim)


_KINDS = {"u": "i"}  # signed and unsigned ints are one kind: both class ids or token ids


def concat(datasets: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The examples of several datasets (dicts of arrays), one after another, under the names
    they all have (sorted); names that some lack are dropped.

    Raises:
      ValueError: No datasets, no name they all have, a dataset whose arrays differ in length,
        or arrays of one name that differ past
        the example axis (e.g. token sequences of different lengths; the shapes in the message)
        or in the kind of their dtype (``np.concatenate`` would promote uint8 pixels to the
        floats of another dataset, or int labels to floats, silently; the dtypes by dataset in
        the message). Dtypes of one kind (int32 and int64 token ids, float32 and float64
        pixels) are joined in the wider one.
    """
    if not datasets:
        raise ValueError("concat: no datasets")
    names = sorted(set.intersection(*(set(d) for d in datasets)))
    if not names:
        raise ValueError(f"concat: no name every dataset has: {[sorted(d) for d in datasets]}")
    for i, d in enumerate(datasets):  # one dataset's labels went with the next one's inputs
        sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in d.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"concat: dataset {i}'s arrays differ in length: {sizes}")
    for name in names:
        shapes = [np.shape(d[name]) for d in datasets]
        if len({s[1:] for s in shapes}) > 1 or any(not s for s in shapes):
            raise ValueError(f"concat: {name!r} has shapes {shapes}; they must agree past axis 0")
        dtypes = [np.asarray(d[name]).dtype for d in datasets]
        kinds = {_KINDS.get(t.kind, t.kind) for t in [*dtypes, np.result_type(*dtypes)]}
        if len(kinds) > 1:  # (uint64 with int64 would be float64: refused too)
            each = {i: str(t) for i, t in enumerate(dtypes)}
            raise ValueError(
                f"concat: {name!r} has dtypes {each} (by dataset index) of different kinds; "
                "convert them first"
            )
    return {name: np.concatenate([np.asarray(d[name]) for d in datasets]) for name in names}


def train_batches(
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    rows: slice = slice(None),
    trim: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The endless stream of training batches from step ``start_step`` on (full batches, each
    pass shuffled by `epoch_order`; the batch of step ``t`` is `batch_indices` ``(seed, t)``),
    each cut by `trim_padding` when ``trim`` is given (see `batches`).

    Returns:
      An iterator of dicts of numpy arrays (copies), one per step (``rows`` of each global
      batch).

    Raises:
      ValueError / TypeError: at the call (not at the first batch), on arrays that are not
        named (a mapping), a ``start_step`` that is not an int >= 0, a bad seed, batch size or
        ``trim``, or fewer examples than a batch.
    """
    if not (is_int(start_step) and start_step >= 0):
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    names, values, n = _flatten(arrays)
    if names is None:  # (a sequence: "'NoneType' object is not iterable")
        raise TypeError("train_batches needs named arrays (a mapping), got a sequence")
    _check_trim(trim, names, values)
    per_epoch = steps_per_epoch(n, batch_size)
    epoch_order(0, seed=seed)  # the seed's check

    def stream(step):
        epoch, order = None, None
        while True:
            e, index = divmod(step, per_epoch)
            if e != epoch:
                epoch, order = e, epoch_order(n, seed=seed, epoch=e)
            idx = order[index * batch_size : (index + 1) * batch_size]
            if trim is None:
                yield dict(zip(names, (v[idx[rows]] for v in values), strict=True))
            else:  # cut by the whole batch, so that every process cuts alike
                batch = _trimmed(names, [v[idx] for v in values], trim)
                yield dict(zip(names, (x[rows] for x in batch), strict=True))
            step += 1

    return stream(int(start_step))


def trim_padding(batch: Mapping[str, np.ndarray], multiple: int = 8) -> dict[str, np.ndarray]:
    """``batch`` without its padding columns: every array whose axis 1 has the length ``T``
    of ``batch["attention_mask"]`` (``(B, T)``) keeps its first ``L`` positions, ``L`` the
    position after the last real token of any row, rounded up to a multiple of ``multiple``
    and at most ``T`` (at least ``min(multiple, T)``), so that a jitted step compiles for at
    most ``ceil(T / multiple)`` lengths.

    For models that read tokens through the mask (every real token attends to real tokens
    only; padded positions take no loss) the cut changes nothing but the work: the logits of
    the real tokens are those of the full length, up to float rounding, and so are the loss
    and its gradients (without dropout: its masks, drawn for the batch's shape, differ).
    Left-padded rows are kept whole (their last real token is the last position).

    Raises:
      ValueError: ``multiple`` is not an int >= 1, there is no ``(B, T)`` attention mask, or
        a row's ``labels`` past its last real token are not all `IGNORE_LABEL` (padding
        labelled as a class would silently leave the loss).
    """
    names, values = tuple(batch), [np.asarray(v) for v in batch.values()]
    if multiple is None:
        raise ValueError("multiple must be an int >= 1, got None")
    _check_trim(multiple, names, values, name="multiple")
    return dict(zip(names, _trimmed(names, values, multiple), strict=True))


def _check_trim(trim, names, values, name="trim") -> None:
    """Refuse a ``trim`` that could change what the arrays compute, checked on all of them at
    once (a batch cut raises nothing later): besides its type and the mask, a label past a
    row's last real token (it counts uncut, and a batch that cuts it would drop it)."""
    if trim is None:
        return
    if not is_int(trim) or trim < 1:
        none = "None or " if name == "trim" else ""
        raise ValueError(f"{name} must be {none}an int >= 1, got {trim!r}")
    if names is None or "attention_mask" not in names:
        given = "unnamed arrays" if names is None else sorted(names)
        raise ValueError(f"{name} cuts by the 'attention_mask' array; got {given}")
    mask = values[names.index("attention_mask")]
    if mask.ndim != 2:
        raise ValueError(f"{name} needs a (batch, tokens) 'attention_mask', got shape {mask.shape}")
    labels = values[names.index("labels")] if "labels" in names else np.zeros(0)
    if labels.ndim >= 2 and labels.shape[:2] == mask.shape:
        width = mask.shape[1]
        end = np.where(mask.any(axis=1), width - np.argmax(mask[:, ::-1] != 0, axis=1), 0)
        past = np.arange(width) >= end[:, None]  # (rows, tokens): after the last real token
        bad = np.argwhere(
            past.reshape(past.shape + (1,) * (labels.ndim - 2)) & (labels != IGNORE_LABEL)
        )
        if bad.size:
            row, col = (int(i) for i in bad[0][:2])
            raise ValueError(
                f"{name}: labels past the last real token other than IGNORE_LABEL "
                f"({IGNORE_LABEL}), first in row {row}, column {col} (its last real token at "
                f"column {int(end[row]) - 1}; {len(np.unique(bad[:, 0]))} rows): label padding "
                "IGNORE_LABEL, or do not trim"
            )


def _trimmed(names, batch: list[np.ndarray], multiple: int) -> list[np.ndarray]:
    """``batch`` cut after its last real token (`trim_padding`; checked by `_check_trim`)."""
    mask = batch[names.index("attention_mask")]
    width = mask.shape[1]
    real = np.flatnonzero(mask.any(axis=0))
    last = int(real[-1]) + 1 if real.size else 0
    keep = min(width, max(1, -(-last // multiple)) * multiple)
    return [x[:, :keep] if x.ndim >= 2 and x.shape[1] == width else x for x in batch]


def _check_count(num_examples: int) -> int:
    """``num_examples`` as an int >= 0, or ValueError naming it (-5 made -2 batches, 5.5 made
    3.0, and an order of -3 examples was empty)."""
    if not (is_int(num_examples) and num_examples >= 0):
        raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
    return int(num_examples)


def _check_batch_size(batch_size: int) -> None:
    if not is_int(batch_size):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _flatten(arrays: Arrays) -> tuple[tuple[str, ...] | None, tuple[np.ndarray, ...], int]:
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


def _pass(names, values, n, batch_size, order, drop_remainder, pad, rows, trim):
    stop = n - n % batch_size if drop_remainder else n
    fills = [IGNORE_LABEL if name == "labels" else 0 for name in names or [None] * len(values)]
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        index = slice(start, end) if order is None else order[start:end]
        batch = [v[index] for v in values]
        if pad and end - start < batch_size:
            short = batch_size - (end - start)
            batch = [_padded(x, short, f) for x, f in zip(batch, fills, strict=True)]
        if trim is not None:
            batch = _trimmed(names, batch, trim)
        batch = [x[rows] for x in batch]
        yield tuple(batch) if names is None else dict(zip(names, batch, strict=True))


def _padded(x: np.ndarray, short: int, fill: int) -> np.ndarray:
    """``x`` with ``short`` rows of ``fill`` appended; unsigned labels widen to a signed type
    that holds `IGNORE_LABEL` (uint64 to int64: numpy's join of the two is float64)."""
    dtype = x.dtype if fill == 0 else np.result_type(x.dtype, np.min_scalar_type(fill))
    if np.issubdtype(x.dtype, np.integer) and not np.issubdtype(dtype, np.integer):
        top = np.iinfo(np.int64).max
        if x.size and x.max() > top:
            raise ValueError(f"labels of dtype {x.dtype} up to {x.max()}: no class id is > {top}")
        dtype = np.dtype(np.int64)
    pad = np.full((short, *x.shape[1:]), fill, dtype)
    return np.concatenate([x.astype(dtype, copy=False), pad])
