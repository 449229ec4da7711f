"""The prediction loss: how well a merge agrees with the models it merges, on unlabeled data.
The yardstick by which `align_by_activations` and `align_straight_through` choose."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rotjax._numbers import is_int
from rotjax.match._checks import check_concrete
from rotjax.merge._methods import check_sequence
from rotjax.merge._stats import _inputs, _no_classes, check_fits
from rotjax.models import model_family
from rotjax.tree import wide

MEMORY = 2**28  # bytes of mean predictions kept between calls of a prediction loss


def prediction_loss(
    model: nn.Module,
    params_list: Sequence[Any],
    batches: Iterable[Any],
    *,
    memory: int = MEMORY,
) -> Callable[[Any], float]:
    """``loss(params)``: the cross-entropy ``-Σ_c p̄_c log q_c`` of ``model``'s predictive
    distribution q with ``params`` to the mean distribution ``p̄`` of the models in
    ``params_list``, averaged over the examples of ``batches`` (over real tokens for token-level
    heads; a padded batch's filler examples, all attention mask 0, count nowhere). No labels
    needed; batches are as for `rotjax.merge.statistics`. The targets are kept between calls up
    to ``memory`` bytes (a causal LM's are vocabulary-wide per token: 4 GB for 16 batches of 8 x
    256 tokens of a 32k vocabulary); the batches beyond get theirs recomputed at each call (the
    same loss).

    Raises:
      TypeError: ``params_list`` is not a list or tuple of models.
      ValueError: no batches, no model, a ``memory`` that is not an integer >= 0, or a model
        without a classification head (``config.task`` is None: a bare encoder's outputs
        live in each model's own stream basis, so their mean means nothing).
    """
    return _prediction_loss(model, params_list, batches, memory)[0]


def _prediction_loss(model, params_list, batches, memory):
    """`prediction_loss`, with the batches' inputs and ``target_of(i)``, the mean prediction
    on the i-th batch (kept up to ``memory`` bytes), for a caller that also descends on it."""
    fam = model_family(model)
    if why := _no_classes(model.config):
        raise ValueError(f"prediction_loss needs a model with a classification head ({why})")
    check_sequence(params_list)
    if not params_list:
        raise ValueError("prediction_loss: params_list holds no model to predict with")
    check_memory(memory)
    named = {f"params_list[{i}]": p for i, p in enumerate(params_list)}
    check_concrete(named, "it loops over the batches")
    check_fits(model, fam, named)
    inputs = _inputs(fam, batches)
    if not inputs:
        raise ValueError("prediction_loss: no batches (or only empty ones)")
    target, step, _ = _loss_steps(model)
    kept: dict[int, jax.Array] = {}

    def target_of(i: int) -> jax.Array:
        if i in kept:
            return kept[i]
        t = jnp.mean(jnp.stack([target(p, inputs[i]) for p in params_list]), axis=0)
        if sum(x.nbytes for x in kept.values()) + t.nbytes <= memory:  # batches of any size
            kept[i] = t
        return t

    def loss(params) -> float:
        check_concrete({"params": params}, "the loss loops over the batches")
        total = count = 0.0
        for i, x in enumerate(inputs):
            s, n = step(params, x, target_of(i))
            total, count = total + float(s), count + float(n)
        if not count:  # (0/1 made every candidate tie at 0)
            raise ValueError("prediction_loss: no real token in the batches (every mask is 0)")
        return total / count

    return loss, inputs, target_of


def check_memory(memory: Any) -> None:
    """A byte budget: an integer >= 0 (numpy's too; not a bool)."""
    if not (is_int(memory) and memory >= 0):
        raise ValueError(f"memory must be an integer >= 0 (bytes), got {memory!r}")


@functools.cache
def _loss_steps(model):
    fam = model_family(model)
    logits = lambda params, x: wide(model.apply({"params": params}, *x))  # float64 stays

    def step(params, x, target):
        per = -jnp.sum(target * jax.nn.log_softmax(logits(params, x)), axis=-1)
        mask = fam.token_mask(x)
        if mask is None:  # every token real
            return jnp.sum(per), per.size
        # Real tokens; for one prediction per example, the examples with one (a padded
        # batch's filler examples, all mask 0, count nowhere, as in `statistics`)
        real = mask if per.ndim > 1 else jnp.any(mask, axis=-1)
        w = real.astype(per.dtype).reshape(per.shape)
        return jnp.sum(per * w), jnp.sum(w)

    def mean_and_grad(params, x, target):  # the batch's mean loss and its gradient
        def mean(p):
            s, n = step(p, x, target)
            return s / jnp.maximum(n, 1.0)

        return jax.value_and_grad(mean)(params)

    probs = jax.jit(lambda p, x: jax.nn.softmax(logits(p, x)))
    return probs, jax.jit(step), jax.jit(mean_and_grad)


def _better(loss: float, than: float, rtol: float = 1e-6) -> bool:
    """``loss < than`` by more than float32 rounding (``rtol`` of ``than``: a descent step that
    moved a loss of 0.8857294 to 0.8857293, its last bit, replaced the exact alignment it
    started from), with NaN (a merge whose predictions overflow) worse than any number and
    any finite loss better than an infinite one."""
    margin = rtol * abs(than) if math.isfinite(than) else 0.0
    return not math.isnan(loss) and (math.isnan(than) or loss < than - margin)


def _kept(best: tuple | None, loss: float, *candidate: Any) -> tuple:
    """The candidate kept after one more, offered in order: ``(loss, *candidate)`` if it is the
    first or its loss is `_better` than the kept one's (by more than float32 rounding), else
    ``best`` (ties keep the earlier): the descent offers its steps' elements in order
    (`align_by_activations` breaks its candidates' ties by weight distance: its `_chosen`)."""
    return (loss, *candidate) if best is None or _better(loss, best[0]) else best
