"""Alignment from activations, with the weight-matching sweeps chosen by data.

Weight distance is the wrong yardstick for how well two models merge: on ViT seed pairs the
coordinate descent keeps lowering ``‖A - g·B‖²`` while the accuracy of the average ``(A +
g·B)/2`` rises, then falls. `align_by_activations` therefore starts from the activations
(`activation_init`), refines by weight matching for 0, 1, ..., ``max_sweeps`` sweeps, adds
weight matching from its own data-free start, and keeps the candidate whose average agrees
best with both models on the same unlabeled inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax

from rotjax import match
from rotjax import symmetry as sym
from rotjax._numbers import is_int
from rotjax.match._align import checked_pair
from rotjax.merge._acts import ROLES, activation_init, cross_statistics
from rotjax.merge._loss import MEMORY, _better, _kept, _prediction_loss
from rotjax.merge._methods import average
from rotjax.merge._stats import _no_classes
from rotjax.merge._straight import LEARNING_RATE, _check_descent, _descend
from rotjax.models import model_family


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
    steps: int = 0,
    learning_rate: float = LEARNING_RATE,
    progress: bool = False,
) -> tuple[match.Alignment, dict[str, Any]]:
    """Align B (``params``) to A (``anchor_params``) from both models' activations on
    ``batches`` (unlabeled; as for `rotjax.merge.statistics`).

    1. The start: `activation_init` of the cross-moments (`cross_statistics`), with the
       params, so every permutation, the stream rotation and each head's rotations that
       ``solve`` solves come from the activations (the groups it leaves out stay at the
       identity, as `align` leaves them).
    2. Candidates: the start, and `rotjax.match.align` from it over ``solve`` for 1, ...,
       ``max_sweeps`` sweeps (weight matching refines what the activations left open: the
       scales, and groups that no activation reveals); with ``weights_start``, also `align`
       from its own data-free start, with its default sweeps (to convergence where the blocks
       couple: the stream, residual or query heads; on some seed pairs the better optimum).
       ``weights_start`` may be that alignment itself, already computed
       (``match.align(spec, anchor_params, params, solve=solve)``): it is then not redone.
    3. The one kept: the candidate g whose average ``(A + g·B)/2`` has the least
       `prediction_loss` against A's and B's mean prediction on the same batches; B itself
       (no alignment) is a candidate too, so the choice never predicts worse than not
       aligning (by more than float32 rounding, 1e-6 relative; fine-tunes of one model share
       its basis). Candidates that predict alike (neither better by that margin) are decided
       by the weight distance ``‖A - g·B‖²``, the nearer kept. Models without a classification
       head of 2 or more classes have no such loss: `align` runs (its default sweeps) from the
       activation start instead.
    4. With ``steps`` > 0, the kept one refined by `align_straight_through` (``steps`` steps
       of ``learning_rate`` on the same batches and loss, measured every 10 steps, 2 sweeps
       per projection; ``progress``: its tqdm bar). ``key`` shuffles `align`'s block order
       and the descent's batch order; ``solver`` is the assignment solver of every step
       (`rotjax.match.assign`'s).

    Returns ``(alignment, info)``: ``info["losses"]`` the loss of each candidate from the
    activation start (0, 1, ... sweeps), ``info["weights_loss"]`` that of the data-free
    candidate (None without it), ``info["identity_loss"]`` that of B unaligned,
    ``info["start"]`` the chosen one's start (``"activations"``, ``"weights"`` or
    ``"identity"``) and ``info["sweeps"]`` its sweeps (of the candidate, before any descent);
    with ``steps``, ``info["straight_through"]`` is the descent's info (its ``"losses"`` are
    ``(step, loss)`` pairs, step 0 the candidate). The alignment's transform is complete and
    its diagnostics are those of its last `align` call.
    """
    if not (is_int(max_sweeps, arrays=True) and max_sweeps >= 0):
        raise ValueError(f"max_sweeps must be an int >= 0, got {max_sweeps!r}")
    max_sweeps = int(max_sweeps)  # (as align's Options takes it)
    if not isinstance(weights_start, bool | match.Alignment):
        raise TypeError(f"weights_start must be a bool or an Alignment, got {weights_start!r}")
    solve = _check_descent(steps, learning_rate, solve=solve, key=key, solver=solver)
    model_family(model)  # (a module of no known family: said before any work)
    if steps and (why := _no_classes(model.config)):
        raise ValueError(f"steps > 0 needs a model with a classification head ({why})")
    # What `align` would refuse, refused before the forward passes (the start below holds
    # only groups that ``solve`` solves: no stream rotation unless it does)
    options = match.Options(solve=solve, solver=solver, key=key)
    checked_pair(spec, options, anchor_params, params)
    roles = tuple(r for r in ROLES if r in options.roles)
    batches = list(batches)
    cross = cross_statistics(model, anchor_params, params, batches)
    start = activation_init(spec, cross, params=(anchor_params, params), roles=roles, solver=solver)
    del cross  # (two in x in moments per dense kernel: several times the params)
    if _no_classes(model.config):  # nothing to choose by: weight matching alone
        res = match.align(
            spec, anchor_params, params, solve=solve, key=key, solver=solver, init=start
        )
        return res, _info([], None, "activations", res.diagnostics.sweeps)
    loss, inputs, target_of = _prediction_loss(model, [anchor_params, params], batches, MEMORY)
    best, losses = None, []  # best: (loss, weight distance, start, sweeps, alignment)
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
        best = _chosen(best, losses[-1], res.diagnostics.distance_after, "activations", sweeps, res)
        if sweeps and res.diagnostics.sweeps < sweeps:  # converged: more give the same
            break
    unaligned = res.diagnostics.distance_before  # (B's weight distance to A at the identity)
    info = _info(losses, None, None, None)
    if weights_start is not False:
        res = (
            weights_start
            if isinstance(weights_start, match.Alignment)
            else match.align(spec, anchor_params, params, solve=solve, key=key, solver=solver)
        )
        info["weights_loss"] = loss(average([anchor_params, res.params]))
        distance = res.diagnostics.distance_after
        best = _chosen(best, info["weights_loss"], distance, "weights", res.diagnostics.sweeps, res)
    # B as it is: fine-tunes of one model already share its basis, and no candidate whose
    # average predicts worse than that one's is kept.
    info["identity_loss"] = loss(average([anchor_params, params]))
    best = _chosen(best, info["identity_loss"], unaligned, "identity", 0, None)
    best_loss, _, info["start"], info["sweeps"], res = best
    del best
    if res is None:  # (only built when kept)
        res = match.align(spec, anchor_params, params, solve=(), key=key, solver=solver)
    if steps:
        transform = res.transform
        del res  # the descent's θ is the one copy of B's params it needs
        res, info["straight_through"] = _descend(
            model,
            spec,
            anchor_params,
            params,
            transform,
            loss,
            inputs,
            target_of,
            steps=steps,
            learning_rate=learning_rate,
            every=10,
            solve=solve,
            sweeps=2,
            key=key,
            solver=solver,
            progress=progress,
            start_loss=best_loss,
        )
    return res, info


def _chosen(best: tuple | None, loss: float, distance: float, *candidate: Any) -> tuple:
    """The candidate kept after one more, offered in order: ``(loss, distance, *candidate)``
    if it is the first or predicts `_better` than the kept one (by more than float32
    rounding), or if neither predicts better and it is nearer A in weights (``distance``:
    ``‖A - g·B‖²``); else ``best``. The loss is flat at its minimum: on a planted pair the
    exact alignment and the activation start it refines (no scales solved) predicted alike
    to 1e-7 relative while their averages were 1e-2 apart, and the earlier one was kept."""
    if best is not None and not _better(best[0], loss) and distance < best[1]:
        return (loss, distance, *candidate)
    return _kept(best, loss, distance, *candidate)


def _info(losses, weights_loss, start, sweeps) -> dict[str, Any]:
    return {
        "losses": losses,
        "weights_loss": weights_loss,
        "identity_loss": None,
        "start": start,
        "sweeps": sweeps,
    }
