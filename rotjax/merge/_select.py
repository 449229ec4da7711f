"""Alignment from activations, with the weight-matching sweeps chosen by data.

Weight distance is the wrong yardstick for how well two models merge: on ViT seed pairs the
coordinate descent keeps lowering ``‖A - g·B‖²`` while the accuracy of the average ``(A +
g·B)/2`` rises, then falls. `align_by_activations` therefore starts from the activations
(`activation_init`), refines by weight matching for 0, 1, ..., ``max_sweeps`` sweeps, adds
weight matching from its own data-free start, and keeps the candidate whose average agrees
best with both models on the same unlabeled inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rotjax import match
from rotjax import symmetry as sym
from rotjax.merge._acts import activation_init, cross_statistics
from rotjax.merge._methods import average
from rotjax.merge._stats import _split
from rotjax.models import family


def prediction_loss(
    model: nn.Module,
    params_list: Sequence[Any],
    batches: Iterable[Any],
    *,
    memory: int = 2**28,
) -> Callable[[Any], float]:
    """``loss(params)``: the cross-entropy ``-Σ_c p̄_c log q_c`` of ``model``'s predictive
    distribution q with ``params`` to the mean distribution ``p̄`` of the models in
    ``params_list``, averaged over the examples of ``batches`` (over real tokens for
    token-level heads). No labels needed; batches are as for `rotjax.merge.statistics`. The
    targets are kept between calls up to ``memory`` bytes (a causal LM's are vocabulary-wide
    per token: 4 GB for 16 batches of 8 x 256 tokens of a 32k vocabulary); the batches beyond
    get theirs recomputed at each call (the same loss).

    Raises:
      ValueError: no batches, or a model without a classification head (``config.task`` is
        None: a bare encoder's outputs live in each model's own stream basis, so their mean
        means nothing).
    """
    if model.config.task is None:
        raise ValueError("prediction_loss needs a model with a classification head (task)")
    fam = family(model.config)
    inputs = [_split(fam, b)[0] for b in batches]
    if not inputs:
        raise ValueError("prediction_loss: no batches")
    target, step = _loss_steps(model)
    kept: dict[int, jax.Array] = {}

    def target_of(i: int) -> jax.Array:
        if i in kept:
            return kept[i]
        t = jnp.mean(jnp.stack([target(p, inputs[i]) for p in params_list]), axis=0)
        if (len(kept) + 1) * t.nbytes <= memory:
            kept[i] = t
        return t

    def loss(params) -> float:
        total = count = 0.0
        for i, x in enumerate(inputs):
            s, n = step(params, x, target_of(i))
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    return loss


@functools.cache
def _loss_steps(model):
    fam = family(model.config)
    logits = lambda params, x: model.apply({"params": params}, *x).astype(jnp.float32)

    def step(params, x, target):
        per = -jnp.sum(target * jax.nn.log_softmax(logits(params, x)), axis=-1)
        mask = fam.token_mask(x)
        if per.ndim == 1 or mask is None:  # one prediction per example, or every token real
            return jnp.sum(per), per.size
        w = mask.astype(jnp.float32).reshape(per.shape)
        return jnp.sum(per * w), jnp.sum(w)

    return jax.jit(lambda p, x: jax.nn.softmax(logits(p, x))), jax.jit(step)


def align_by_activations(
    model: nn.Module,
    spec: sym.Spec,
    anchor_params: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    solve: str | Iterable[str] = match.ALL,
    max_sweeps: int = 4,
    weights_start: bool | match.Alignment = True,
    key: jax.Array | None = None,
    solver: str = "scipy",
) -> tuple[match.Alignment, dict[str, Any]]:
    """Align B (``params``) to A (``anchor_params``) from both models' activations on
    ``batches`` (unlabeled; as for `rotjax.merge.statistics`).

    1. The start: `activation_init` of the cross-moments (`cross_statistics`), with the
       params, so every permutation, the stream rotation and each head's rotations come from
       the activations.
    2. Candidates: the start, and `rotjax.match.align` from it over ``solve`` for 1, ...,
       ``max_sweeps`` sweeps (weight matching refines what the activations left open: the
       scales, and groups that no activation reveals); with ``weights_start``, also `align`
       to convergence from its own data-free start (on some seed pairs the better optimum).
       ``weights_start`` may be that alignment itself, already computed
       (``match.align(spec, anchor_params, params, solve=solve)``): it is then not redone.
    3. The one kept: the candidate g whose average ``(A + g·B)/2`` has the least
       `prediction_loss` against A's and B's mean prediction on the same batches; B itself
       (no alignment) is a candidate too, so the choice never predicts worse than not
       aligning (fine-tunes of one model share its basis). Models without a classification
       head have no such loss: `align` runs to convergence from the activation start instead.

    Returns ``(alignment, info)``: ``info["losses"]`` the loss of each candidate from the
    activation start (0, 1, ... sweeps), ``info["weights_loss"]`` that of the data-free
    candidate (None without it), ``info["identity_loss"]`` that of B unaligned,
    ``info["start"]`` the chosen one's start (``"activations"``, ``"weights"`` or
    ``"identity"``) and ``info["sweeps"]`` its sweeps. The alignment's transform is
    complete and its diagnostics are those of its `align` call.
    """
    if not (isinstance(max_sweeps, int) and max_sweeps >= 0):
        raise ValueError(f"max_sweeps must be an int >= 0, got {max_sweeps!r}")
    if not isinstance(weights_start, bool | match.Alignment):
        raise TypeError(f"weights_start must be a bool or an Alignment, got {weights_start!r}")
    batches = list(batches)
    cross = cross_statistics(model, anchor_params, params, batches)
    start = activation_init(spec, cross, params=(anchor_params, params), solver=solver)
    if model.config.task is None:  # nothing to choose by: weight matching to convergence
        res = match.align(
            spec, anchor_params, params, solve=solve, key=key, solver=solver, init=start
        )
        return res, _info([], None, "activations", res.diagnostics.sweeps)
    loss = prediction_loss(model, [anchor_params, params], batches)
    best, losses = None, []  # best: (its loss, its sweeps, its alignment)
    for sweeps in range(max_sweeps + 1):
        res = match.align(
            spec,
            anchor_params,
            params,
            solve=solve if sweeps else (),
            max_sweeps=sweeps or None,
            key=key,
            solver=solver,
            init=start,
        )
        losses.append(loss(average([anchor_params, res.params])))
        if best is None or _better(losses[-1], best[0]):
            best = (losses[-1], sweeps, res)
        if sweeps and res.diagnostics.sweeps < sweeps:  # converged: more give the same
            break
    info = _info(losses, None, "activations", best[1])
    if weights_start is not False:
        res = (
            weights_start
            if isinstance(weights_start, match.Alignment)
            else match.align(spec, anchor_params, params, solve=solve, key=key, solver=solver)
        )
        info["weights_loss"] = loss(average([anchor_params, res.params]))
        if _better(info["weights_loss"], best[0]):
            best = (info["weights_loss"], res.diagnostics.sweeps, res)
            info |= {"start": "weights", "sweeps": res.diagnostics.sweeps}
    # B as it is: fine-tunes of one model already share its basis, and no candidate whose
    # average predicts worse than that one's is kept.
    info["identity_loss"] = loss(average([anchor_params, params]))
    if _better(info["identity_loss"], best[0]):
        res = match.align(spec, anchor_params, params, solve=(), key=key, solver=solver)
        best = (info["identity_loss"], 0, res)
        info |= {"start": "identity", "sweeps": 0}
    return best[2], info


def _better(loss: float, than: float) -> bool:
    """``loss < than``, with NaN (a merge whose predictions overflow) worse than any number."""
    return not math.isnan(loss) and (math.isnan(than) or loss < than)


def _info(losses, weights_loss, start, sweeps) -> dict[str, Any]:
    return {
        "losses": losses,
        "weights_loss": weights_loss,
        "identity_loss": None,
        "start": start,
        "sweeps": sweeps,
    }
