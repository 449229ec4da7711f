"""Classification loss and metrics; eval metrics are sums, reduced once over a whole eval set."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rotjax.data import IGNORE_LABEL, check_labels
from rotjax.tree import wide


def _flat(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logits (N, C), labels (N,), valid (N,))`` from sequence- or token-level shapes, in at
    least float32 (a bfloat16 model's counts and loss sums would round above 256)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} must be labels {labels.shape} plus a class axis")
    logits = wide(logits.reshape(-1, logits.shape[-1]))
    labels = labels.reshape(-1)
    valid = labels != IGNORE_LABEL
    return logits, jnp.where(valid, labels, 0), valid.astype(logits.dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross entropy over the labels that are not `IGNORE_LABEL`.

    Args:
        logits: ``(..., C)``: ``(B, C)`` for sequence, ``(B, T, C)`` for token classification.
        labels: Integer labels of shape ``logits.shape[:-1]``.

    Returns:
        ``(loss, count)``: ``sum_i valid_i * CE_i / max(count, 1)`` and the number of valid
        labels.
    """
    if logits.shape[-1] < 2:  # one class: the loss is 0 whatever the model does
        raise ValueError(
            f"cross_entropy needs >= 2 classes, got logits of shape {logits.shape} "
            "(num_labels=1 is regression in transformers; rotjax trains classifiers only)"
        )
    logits, labels, valid = _flat(logits, labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = valid.sum()
    return (ce * valid).sum() / jnp.maximum(count, 1.0), count


def batch_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Summable statistics of one batch: loss and correct sums, count, confusion counts.

    Args:
        logits: ``(..., C)`` logits.
        labels: Labels of shape ``logits.shape[:-1]``; `IGNORE_LABEL` entries are skipped.

    Returns:
        ``{"loss_sum", "correct", "count", "confusion"}``; ``confusion[i, j]`` counts labels
        ``i`` predicted as ``j`` (float32 counts, exact below 2**24 per batch).
    """
    num_classes = logits.shape[-1]
    flat_logits, flat_labels, valid = _flat(logits, labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(flat_logits, flat_labels)
    pred = jnp.argmax(flat_logits, axis=-1)
    true_1h = jax.nn.one_hot(flat_labels, num_classes, dtype=jnp.float32) * valid[:, None]
    pred_1h = jax.nn.one_hot(pred, num_classes, dtype=jnp.float32)
    return {
        "loss_sum": (ce * valid).sum(),
        "correct": ((pred == flat_labels) * valid).sum(),
        "count": valid.sum(),
        # A matmul rather than a scatter: cheap and sharding-friendly on every backend.
        "confusion": jnp.einsum("nc,nd->cd", true_1h, pred_1h, precision="highest"),
    }


def macro_f1(confusion: np.ndarray) -> float:
    """Macro-averaged F1 from a confusion matrix (rows: true class, columns: prediction).

    Per class ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, averaged over the classes that occur
    as a label or a prediction, which is scikit-learn's ``f1_score(average="macro")`` with its
    default labels (a class that occurs but is never predicted right scores 0).

    Args:
        confusion: ``(C, C)`` counts.

    Returns:
        The macro-F1, or ``nan`` when the matrix is all zeros.
    """
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    denom = support + predicted  # = 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean())


_LOG_FIELDS = ("step", "split", "elapsed")  # of `rotjax.train.fit`'s records, besides metrics
_SUMMARY = ("loss", "accuracy", "macro_f1", "count")
_SUMS = ("loss_sum", "correct", "count", "confusion")  # what `batch_metrics` gives


def check_statistics(names: Iterable[str]) -> None:
    """ValueError if an eval step's statistics (beyond `batch_metrics`') are named as a
    summary metric or a field of fit's log records, which they would replace."""
    if clash := sorted((set(names) - set(_SUMS)) & {*_SUMMARY, *_LOG_FIELDS}):
        raise ValueError(f"eval step statistics {clash} would replace summary or log fields")


def summarize(batches: Iterable[Mapping[str, jax.Array | np.ndarray]]) -> dict[str, Any]:
    """Reduces the :func:`batch_metrics` of an eval set to ``loss``, ``accuracy``,
    ``macro_f1`` and ``count``, and any other statistic (of a custom eval step) to its sum
    over the batches: a float, or nested lists for an array.

    A custom statistic is the step's to mask: the filler rows of a padded last batch have
    `rotjax.data.IGNORE_LABEL` labels, which `batch_metrics` skips. Sums run in float64 on the
    host, so the result does not depend on how the set was batched (beyond float32 rounding
    inside each batch's loss sum).

    Raises:
        ValueError: no batches, batches of different statistics, or a statistic named as a
            summary metric or a field of fit's log records (``step``, ``split``,
            ``elapsed``), which it would replace.
    """
    host = jax.device_get(list(batches))
    if not host:
        raise ValueError("no eval batches to summarize")
    if differ := [sorted(b) for b in host if set(b) != set(host[0])]:
        raise ValueError(f"eval batches of different statistics: {sorted(host[0])}, {differ[0]}")
    check_statistics(host[0])
    total = {k: np.sum([np.asarray(b[k], np.float64) for b in host], axis=0) for k in host[0]}
    count = float(total["count"])
    safe = max(count, 1.0)
    summary = {
        "loss": float(total["loss_sum"]) / safe,
        "accuracy": float(total["correct"]) / safe,
        "macro_f1": macro_f1(total["confusion"]),
        "count": round(count),
    }
    return {**summary, **{k: v.tolist() for k, v in total.items() if k not in _SUMS}}


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of always predicting the most frequent training class (labels equal to
    `IGNORE_LABEL` are left out on both sides); other labels are refused as by
    `check_labels`."""
    train_labels, test_labels = np.asarray(train_labels).ravel(), np.asarray(test_labels).ravel()
    for y, side in ((train_labels, "train"), (test_labels, "test")):
        if y.size:  # (an empty list is float64: refused as empty below, not by its dtype)
            check_labels(y, f"majority_baseline: {side} labels")
    train_labels = train_labels[train_labels != IGNORE_LABEL]
    test_labels = test_labels[test_labels != IGNORE_LABEL]
    if not len(train_labels) or not len(test_labels):
        raise ValueError("majority_baseline needs labels on both sides")
    return float(np.mean(test_labels == np.bincount(train_labels).argmax()))


def entity_f1(
    predictions: np.ndarray, labels: np.ndarray, tag_names: tuple[str, ...] | list[str]
) -> float:
    """Entity-level micro F1 of BIO tagging (``seqeval``, the CoNLL measure): a predicted
    entity counts only when its type and its whole span are right.

    Args:
        predictions: ``(N, T)`` predicted tag ids.
        labels: ``(N, T)`` true tag ids; positions labelled `IGNORE_LABEL` (later word pieces,
            special tokens, padding) are left out of both sequences.
        tag_names: tag id -> name (``"O"``, ``"B-x"``, ``"I-x"``).

    Raises:
        ValueError: a tag id outside ``tag_names`` at a labelled position (shapes that
            differ fail in ``zip``).
    """
    from seqeval.metrics import f1_score

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    keep = labels != IGNORE_LABEL
    for name, ids in (("predictions", predictions), ("labels", labels)):
        bad = ids[keep][(ids[keep] < 0) | (ids[keep] >= len(tag_names))]
        if bad.size:  # a negative id would name tag_names[-100], silently
            raise ValueError(
                f"entity_f1: {name} hold tag ids outside [0, {len(tag_names)}) at labelled "
                f"positions, e.g. {int(bad[0])}"
            )
    true = [[tag_names[t] for t in row[k]] for row, k in zip(labels, keep, strict=True)]
    pred = [[tag_names[t] for t in row[k]] for row, k in zip(predictions, keep, strict=True)]
    return float(f1_score(true, pred))
