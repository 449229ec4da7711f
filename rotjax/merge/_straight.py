"""Alignment by the merge's own loss: Git Re-Basin's straight-through estimator (Ainsworth et
al. 2023, section 3.3), with a loss that needs no labels.

Weight matching minimises ``‖A - g·B‖²``, a proxy; what matters is how well the merge ``M =
(A + g·B)/2`` predicts. g mixes permutations with rotations and scales, so it is not
differentiated: a free copy θ of B's weights is learned instead, and each step merges its
projection onto B's orbit,

    g(θ) = argmin_g ‖θ - g·B‖²          (`rotjax.match.align`, from the last step's g)
    L(θ) = ℓ((A + g(θ)·B) / 2)           ℓ: `prediction_loss` (to A's and B's mean prediction)
    θ ← θ - adam(∂ℓ/∂M)                  straight-through: ∂(g(θ)·B)/∂θ taken as the identity
                                         (∂ℓ/∂θ would be ∂ℓ/∂M / 2: Adam does not see the 2).

θ starts at g₀·B. Every result is a symmetry element applied to B, so the merge stays a plain
average of A and an exact reparametrisation of B; the element kept is the one whose average
has the least loss over all batches, measured every ``every`` steps, the start included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rotjax import match
from rotjax import symmetry as sym
from rotjax._numbers import is_int, is_number
from rotjax.merge._loss import MEMORY, _kept, _loss_steps, _prediction_loss
from rotjax.merge._methods import average
from rotjax.tree import wide

LEARNING_RATE = 1e-3  # Adam's step on the element's parameters: the descents' default


def align_straight_through(
    model: nn.Module,
    spec: sym.Spec,
    anchor_params: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    init: match.Alignment | Mapping[str, jax.Array] | None = None,
    steps: int = 300,
    learning_rate: float = LEARNING_RATE,
    every: int = 10,
    solve: str | Iterable[str] = match.ALL,
    sweeps: int = 2,
    key: jax.Array | None = None,
    solver: str = "scipy",
    progress: bool = False,
) -> tuple[match.Alignment, dict[str, Any]]:
    """Align B (``params``) to A (``anchor_params``) by descent on the loss of their average.

    Each of ``steps`` steps takes one of ``batches`` (unlabeled; as for
    `rotjax.merge.statistics`; in a random order per pass with ``key``, else in turn),
    projects θ onto B's orbit by ``sweeps`` sweeps of `rotjax.match.align` over ``solve`` from
    the last projection (``key``, split from the batch order's, also shuffles their block
    order, afresh each step), and moves θ by Adam (``learning_rate``) along the gradient of
    the cross-entropy of ``(A + g·B)/2`` to the mean of A's and B's predictions on that batch
    (each step its batch's mean: a small last batch moves θ as much as a full one). θ, Adam's
    state and the gradient are in float32 at least; the merge is computed as it is returned
    (g·B in B's dtypes, averaged in A's). The
    loss over all batches (`prediction_loss`) is measured at the start and every ``every``
    steps (and after the last, or where an overflow stopped the descent); the best element is
    returned, never one worse than ``init`` (by more than float32 rounding: 1e-6 relative).
    ``solver``: the projections' assignment solver (`rotjax.match.assign`'s); ``progress``: a
    tqdm bar over the steps.

    ``init`` is the start: an `Alignment` of B to A (e.g. `align_by_activations`'), a
    transform, or None for B as it is. Any start can end in a good merge, a good start in a
    better one (measured in the README's Merging section).

    Returns ``(alignment, info)``: ``info["losses"]`` lists ``(step, loss)`` of every
    measurement (step 0: the start), ``info["step"]`` the kept one's step and, if a batch's
    loss or gradient overflowed (NaN or Inf: no step can be taken from it),
    ``info["stopped"]`` the step where the descent stopped. The alignment's diagnostics are
    those of its `rotjax.match.align` call against A (``solve=()``).

    Raises:
      ValueError: a model without a classification head, no batches, or bad options (named).
    """
    solve = _check_descent(steps, learning_rate, every, sweeps, solve, key=key, solver=solver)
    loss, inputs, target_of = _prediction_loss(model, [anchor_params, params], batches, MEMORY)
    return _descend(
        model,
        spec,
        anchor_params,
        params,
        init,
        loss,
        inputs,
        target_of,
        steps=steps,
        learning_rate=learning_rate,
        every=every,
        solve=solve,
        sweeps=sweeps,
        key=key,
        solver=solver,
        progress=progress,
    )


def _check_descent(
    steps,
    learning_rate=LEARNING_RATE,
    every=1,
    sweeps=1,
    solve=match.ALL,
    *,
    key=None,
    solver="scipy",
) -> tuple[str, ...]:
    """The descent's options, checked before any work (`align_by_activations` too), with
    ``solve``, ``key`` and ``solver`` as `rotjax.match.align` checks them (also with no
    steps); ``solve`` returned as a tuple (an iterator is read once)."""
    for name, value, low in (("steps", steps, 0), ("every", every, 1), ("sweeps", sweeps, 1)):
        if not (is_int(value) and value >= low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (is_number(learning_rate, "iuf") and 0 < learning_rate < float("inf")):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
    solve = match.Options(solve=solve, solver=solver, key=key).solve
    if steps and not solve:
        raise ValueError("solve is empty: the descent would have no element to move")
    return solve


def _descend(
    model,
    spec,
    anchor_params,
    params,
    init,
    loss: Callable[[Any], float],
    inputs: list,
    target_of: Callable[[int], jax.Array],
    *,
    steps,
    learning_rate,
    every,
    solve,
    sweeps,
    key,
    solver,
    progress,
    start_loss: float | None = None,
):
    """`align_straight_through` on a loss, its batches' inputs and targets already built, and
    the start's loss if known (`align_by_activations` shares them)."""
    transform = init.transform if isinstance(init, match.Alignment) else init
    start = match.align(spec, anchor_params, params, solve=(), init=transform, solver=solver)
    like_b = lambda tree: jax.tree.map(lambda x, p: x.astype(p.dtype), tree, params)
    merge_with = lambda moved: average([anchor_params, like_b(moved)])
    if start_loss is None:
        start_loss = loss(merge_with(start.params))
    best = (start_loss, 0, start.transform)
    info: dict[str, Any] = {"losses": [(0, start_loss)], "step": 0}
    if steps == 0:
        return start, info
    theta, b = jax.tree.map(wide, start.params), jax.tree.map(wide, params)
    del start  # (only its transform is needed, in ``best``)
    state, g = optax.adam(learning_rate).init(theta), best[2]
    _, _, mean_and_grad = _loss_steps(model)
    order: list[int] = []
    # Independent draws: each pass's batch order, and each projection's block order.
    k_order = k_align = None
    if key is not None:
        k_order, k_align = jax.random.split(key)

    def measure(step, merged, g, best, bar):
        """The loss of the element after ``step`` updates, recorded; the best so far."""
        now = loss(merged)
        info["losses"].append((step, now))
        best = _kept(best, now, step, g)
        if bar is not None:
            bar.set_postfix(loss=f"{now:.4f}", best=f"{best[0]:.4f}")
        return best

    with contextlib.ExitStack() as stack:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=steps, desc="straight-through", leave=False))
        for step in range(steps + 1):
            k = None if k_align is None else jax.random.fold_in(k_align, step)
            proj = match.align(
                spec, theta, b, solve=solve, init=g, max_sweeps=sweeps, key=k, solver=solver
            )  # the element after ``step`` updates
            g, merged = proj.transform, merge_with(proj.params)
            measured = bool(step) and (step % every == 0 or step == steps)
            if measured:
                best = measure(step, merged, g, best, bar)
            if step == steps:
                break
            if not order:  # a new pass over the batches
                if k_order is None:
                    order = list(range(len(inputs)))
                else:
                    perm = jax.random.permutation(jax.random.fold_in(k_order, step), len(inputs))
                    order = [int(i) for i in perm]
            i = order.pop(0)
            # ∂ℓ/∂M in float32 at least: bfloat16's 8 bits would round the gradient away
            value, grads = mean_and_grad(jax.tree.map(wide, merged), inputs[i], target_of(i))
            if not bool(_all_finite(value, grads)):  # a step would make θ NaN
                info["stopped"] = step
                if step and not measured:  # this element may still be the best
                    best = measure(step, merged, g, best, bar)
                break
            theta, state = _adam_step(learning_rate, theta, state, grads)
            del proj, merged, grads  # params-sized, not needed by the next projection
            if bar is not None:
                bar.update()
    info["step"] = best[1]
    res = match.align(spec, anchor_params, params, solve=(), init=best[2], solver=solver)
    return res, info


@jax.jit
def _adam_step(learning_rate, theta, state, grads):
    """One Adam update of θ, as one program (eagerly, optax's few ops per leaf were dispatched
    one by one: 0.34 s of a MiniLM-size step against 0.06 s)."""
    updates, state = optax.adam(learning_rate).update(jax.tree.map(wide, grads), state, theta)
    return optax.apply_updates(theta, updates), state


@jax.jit
def _all_finite(value, grads) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grads)]
    return jnp.all(jnp.stack([jnp.isfinite(value), *leaves]))
