"""Merging through task vectors ``τ_i = θ_i - θ_base`` (fine-tunes of one base model): task
arithmetic, TIES and DARE. Every random choice takes a ``jax.random`` key."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax._keys import check_key
from rotjax.merge._methods import check_sequence, check_untraced, checked_models, scalar
from rotjax.models import _layout
from rotjax.tree import averaged, flatten, traced, wide

TRIMS = ("global", "tensor")


def _models(base, params_list, scale):
    """``([leaves of the base, then of each model], treedef)`` after checking them and
    ``scale``: before any work."""
    _check_scale(scale)
    check_sequence(params_list)
    if not params_list:
        raise ValueError("merging task vectors needs at least 1 model besides the base")
    paths, leaves, treedef = checked_models([base, *params_list], first="base")
    # 1e39 is a finite float64 but inf in a float32 merge, where inf·0 made every leaf NaN
    compute = {jnp.promote_types(jnp.result_type(x), jnp.float32) for x in leaves[0] if averaged(x)}
    top = min((float(jnp.finfo(d).max) for d in compute), default=np.inf)
    if not traced(scale) and abs(scale) > top:
        raise ValueError(
            f"scale must be within the merge's float range (|scale| <= {top:.4g}), got {scale!r}"
        )
    return leaves, treedef, _stacked(paths, leaves[0])


def _stacked(paths, leaves) -> tuple[bool | None, ...]:
    """Whether each leaf is a scanned model's stack of layers (under ``layers``, its leading
    axis the layer): a tensor of its own per layer for the trim, as unscanned. A list of
    layers (``layers/0/...``, as other libraries name them) is not a stack. None for an
    integer or boolean leaf: kept, not a task vector's entries (the global trim counts it
    nowhere)."""

    def stacked(path):
        parts = path.split("/")
        return any(
            x == _layout._STACKED and i + 1 < len(parts) and not parts[i + 1].isdigit()
            for i, x in enumerate(parts)
        )

    return tuple(
        (stacked(p) and np.ndim(x) > 0) if averaged(x) else None  # a scalar has no layer axis
        for p, x in zip(paths, leaves, strict=True)
    )


def _merged(models, how, scale, **options):
    """``θ_base + λ how(task vectors, **options)`` as one compiled program (see
    `rotjax.merge._methods`) on ``models`` (`_models`)."""
    leaves, treedef, _ = models
    out = _merged_leaves(how, *_split(options), leaves, scalar(scale))
    return jax.tree.unflatten(treedef, out)


def _of_task_vectors(models, how, **options):
    """``how(task vectors, **options)`` itself, in a program of its own (as `_merged`)."""
    return _task_leaves(how, *_split(options), models[0])


def _split(options):
    """``(static, traced)``: the trim's ``density`` and string options are static (the trim's
    count is exact integer arithmetic on them), the others traced."""
    fixed = lambda k, v: isinstance(v, str) or k in ("density", "stacked")
    static = tuple(
        sorted((k, float(v) if k == "density" else v) for k, v in options.items() if fixed(k, v))
    )
    traced = {k: jax.tree.map(jnp.asarray, v) for k, v in options.items() if not fixed(k, v)}
    return static, traced


def _check_scale(scale) -> None:
    """ValueError unless ``scale`` is a finite real scalar; traced (learned by `jax.grad`,
    swept by `jax.vmap`), only its shape is checked."""
    try:  # an array would scale entry by entry
        ok = np.ndim(scale) == 0 and (traced(scale) or bool(np.isfinite(scale)))
    except TypeError:  # None, a string
        ok = False
    if not ok:
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def _taus(leaves):
    base = leaves[0]
    return [[wide(x) - wide(b) for x, b in zip(model, base, strict=True)] for model in leaves[1:]]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merged_leaves(how, static, traced, leaves, scale):
    merged = how(_taus(leaves), **dict(static), **traced)
    return [
        (wide(b) + scale.astype(wide(b).dtype) * t).astype(jnp.asarray(b).dtype)
        if averaged(b)
        else b  # an integer or boolean leaf: the same in every model (`checked_models`)
        for b, t in zip(leaves[0], merged, strict=True)
    ]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _task_leaves(how, static, traced, leaves):
    return how(_taus(leaves), **dict(static), **traced)


def _sum(taus):
    return [sum(t) for t in zip(*taus, strict=True)]


def task_arithmetic(base: Any, params_list: Sequence[Any], *, scale: float = 1.0) -> Any:
    """``θ = θ_base + λ Σ_i τ_i`` (Ilharco et al., 2023, "Editing Models with Task
    Arithmetic"); ``λ = 1/N`` is the plain average of the models, the paper picks λ on
    validation data. λ may be traced (as every task-vector merge's ``scale``): learned by
    ``jax.grad`` of a loss of the merge, or swept by ``jax.vmap``, in one program."""
    return _merged(_models(base, params_list, scale), _sum, scale)


def _cuts(
    tau: list[jax.Array],
    density: float,
    trim: str,
    stacked: tuple[bool | None, ...] | None = None,
) -> list[jax.Array]:
    """The trim's cut for each leaf of ``tau``, `_keep` then keeps the ``density`` fraction
    of entries of largest magnitude and zeroes the rest: over the whole task vector
    (``"global"``: one cut for all) or within each tensor (``"tensor"``; a ``stacked`` leaf,
    a scanned model's layers, has one cut per layer, broadcast over the rest: the cuts of the
    same model unscanned). The cut is
    ``jnp.quantile``'s: entries at or above the order statistic of magnitude at position
    ``ceil((1 - density)(n - 1))`` survive (``_order_statistic``: no sort). NaN entries
    survive too, as NaN (a broken model shows in the merge rather than vanish from it).
    Leaves whose ``stacked`` is None (integer ones: their task vector is 0) count nowhere."""
    stacked = stacked or (False,) * len(tau)
    if trim == "global":
        counted = [jnp.abs(t) for t, s in zip(tau, stacked, strict=True) if s is not None]
        counted = counted or [jnp.zeros(1)]  # no float leaf: nothing to trim
        return [_order_statistic(counted, 1.0 - density)] * len(tau)
    cut = lambda t: _order_statistic([jnp.abs(t)], 1.0 - density)
    per_layer = lambda t: jax.vmap(cut)(t).reshape(t.shape[:1] + (1,) * (t.ndim - 1))
    return [per_layer(t) if s else cut(t) for t, s in zip(tau, stacked, strict=True)]


def _keep(tau: list[jax.Array], cuts: list[jax.Array]) -> list[jax.Array]:
    keep = lambda t, cut: jnp.where((jnp.abs(t) >= cut) | jnp.isnan(t), t, 0.0)
    return [keep(t, cut) for t, cut in zip(tau, cuts, strict=True)]


def _rank(q: float, n: int) -> int:
    """``ceil(q (n - 1))``, the product taken as an integer when it is one up to float64
    rounding (a relative 1e-12: that rounding is ~1e-16; fractions of a count below n < 2^31
    are 1/100 or more for a density of two decimals)."""
    x = q * (n - 1)
    return round(x) if abs(x - round(x)) <= 1e-12 * max(x, 1.0) else math.ceil(x)


def _order_statistic(parts: list[jax.Array], q: float) -> jax.Array:
    """The ``m``-th smallest (from 0) of the entries of ``parts`` (float32 or float64, >= 0,
    together n < 2^31), ``m = ceil(q (n - 1))``: the smallest value with more than ``m``
    entries at or below it. ``m`` is computed on the host (`_rank`), a product within a
    relative 1e-12 of an integer taken as that integer (``1 - 0.4`` times 25 is 15, not the 16
    that float32 rounding gave, nor float64's ``(1 - 0.7) 10 = 3.0000000000000004`` rounded up
    to 4). Non-negative floats order as their bit patterns do, so 31 (63) bisection steps on
    the integer patterns find it exactly, each one counting over the entries in place: a task
    vector of 22M entries takes 0.66 s where `jnp.quantile`'s sort took 10.8 s."""
    n = sum(p.size for p in parts)
    if n >= 2**31:
        raise ValueError(f"a task vector of {n} entries is too large to trim (at most 2^31 - 1)")
    m = jnp.int32(_rank(q, n))
    dtype = jnp.result_type(*parts)
    ints, steps = (jnp.int64, 63) if dtype == jnp.float64 else (jnp.int32, 31)
    bits = [jax.lax.bitcast_convert_type(jnp.asarray(p, dtype), ints) for p in parts]

    def step(_, bounds):  # invariant: the answer's bits are in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = sum(jnp.sum(b <= mid, dtype=jnp.int32) for b in bits) > m
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    top = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, dtype), ints)
    lo, _ = jax.lax.fori_loop(0, steps, step, (jnp.zeros((), ints), top))
    return jax.lax.bitcast_convert_type(lo, dtype)


def _elected(taus: list[list[jax.Array]]) -> tuple[list[jax.Array], list[jax.Array]]:
    """Each entry's values stacked over the models, and its elected sign: the sign of their
    sum ("mass")."""
    stacks = [jnp.stack(entries) for entries in zip(*taus, strict=True)]
    return stacks, [jnp.sign(jnp.sum(stack, axis=0, keepdims=True)) for stack in stacks]


def _majority(taus: list[list[jax.Array]]) -> jax.Array:
    """The sign of the balance of all entries' elected signs (+1 or -1; 0 if they tie).

    Computed in a program of its own (`_of_task_vectors`): inside the merge's
    program XLA fused this scalar's whole sum over the leaves into every leaf's output,
    quadratic in the number of leaves (TIES on a 104-leaf ViT compiled in 17 s; split, in
    1.8 s and 1.0 s)."""
    _, signs = _elected(taus)
    return jnp.sign(
        sum(jnp.sum(s > 0, dtype=jnp.int32) - jnp.sum(s < 0, dtype=jnp.int32) for s in signs)
    )


def _ties_merge(taus: list[list[jax.Array]], majority: jax.Array) -> list[jax.Array]:
    """Elect each entry's sign as the sign of the summed values ("mass"), then average the
    entries that agree with it (the disjoint mean; entries that are 0 count nowhere). An entry
    whose values sum to exactly 0 takes ``majority``, the majority of all entries' elected
    signs (`_majority`), as the paper's code resolves zero signs
    (``resolve_zero_signs(..., "majority")``); where that majority is a tie too, the entry
    is 0 (the paper's code would average its negative values)."""
    stacks, signs = _elected(taus)
    majority = majority.astype(stacks[0].dtype)
    out = []
    for stack, sign in zip(stacks, signs, strict=True):
        sign = jnp.where(sign == 0, majority, sign)
        agree = (jnp.sign(stack) == sign) & (stack != 0)
        count = jnp.sum(agree, axis=0, dtype=stack.dtype)  # (strict dtype promotion too)
        mean = jnp.sum(jnp.where(agree, stack, 0.0), axis=0) / jnp.maximum(count, 1)
        out.append(jnp.where(jnp.isnan(sign[0]), jnp.nan, mean))  # NaN in, NaN out
    return out


def ties(
    base: Any,
    params_list: Sequence[Any],
    *,
    density: float = 0.2,
    scale: float = 1.0,
    trim: str = "global",
) -> Any:
    """TIES-merging (Yadav et al., 2023): trim each task vector to its top ``density``
    fraction by magnitude, elect a sign per entry (the sign of the trimmed vectors' sum), and
    average the entries that agree with it: ``θ = θ_base + λ τ_merged``.

    Args:
      base: the base model the others were fine-tuned from.
      params_list: the fine-tuned models.
      density: the fraction k kept (the paper's default is 20%): the entries at or above the
        (1 - k) quantile of the magnitudes (numpy's default rule), so ``1 + floor(k (n - 1))``
        of n entries without ties in magnitude; the paper's code keeps ``floor(k n) + 1``
        and mergekit ``floor(k n)``, at most one entry from it.
      scale: λ (the paper uses 1 by default and searches 0.8-2.5 on validation data); it
        may be traced (`task_arithmetic`).
      trim: ``"global"``: the top k of the whole flattened task vector, as in the paper's code
        (the default); ``"tensor"``: the top k of every tensor, as mergekit and most tools do
        (a scanned model's stacked layers, which rotjax's models keep under a module named
        ``layers``: of every layer's tensor, as unscanned; a leaf under ``layers`` of another
        model counts as such a stack too). A sum of exactly 0 takes the majority over the
        whole task vector either way (mergekit's per-tensor merge elects + there).
    """
    check_untraced(density=density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if trim not in TRIMS:
        raise ValueError(f"trim must be one of {TRIMS}, got {trim!r}")
    models = _models(base, params_list, scale)
    _check_real(base, "ties")
    given = _of_task_vectors(models, _ties, density=density, trim=trim, stacked=models[2])
    return _merged(models, _ties, scale, given=given)


def _check_real(base: Any, method: str) -> None:
    """ValueError naming complex leaves: TIES elects a sign per entry, which a complex number
    has not (comparing phases, entries of other phases vanished from the merge, silently)."""
    paths, leaves, _ = flatten(base)
    bad = [p for p, x in zip(paths, leaves, strict=True) if jnp.iscomplexobj(x)]
    if bad:
        raise ValueError(f"{method}: complex params have no sign to elect: {bad[:10]}")


def _ties(taus, density=None, trim=None, given=None, stacked=None):
    """TIES in two programs (see `_majority`): the first (``density`` and ``trim``) returns
    ``given``: each model's trim cuts (`_cuts`) and the majority sign; the second the merged
    task vector given them (one program for every density and trim)."""
    if given is None:
        cuts = [_cuts(t, density, trim, stacked) for t in taus]
        return cuts, _majority([_keep(t, c) for t, c in zip(taus, cuts, strict=True)])
    cuts, majority = given
    return _ties_merge([_keep(t, c) for t, c in zip(taus, cuts, strict=True)], majority)


def dare(
    base: Any,
    params_list: Sequence[Any],
    *,
    key: jax.Array,
    drop: float = 0.9,
    rescale: bool = True,
    combine: str = "task_arithmetic",
    scale: float = 1.0,
    density: float | None = None,
    trim: str | None = None,
) -> Any:
    """DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry of each task
    vector with probability ``drop`` and rescale the survivors by ``1 / (1 - drop)`` (so each
    entry keeps its expectation), then combine the sparse task vectors by task arithmetic
    (``scale`` λ) or by TIES (``density``, ``trim``, then ``scale``). The paper's headline
    drop rate is 0.9. Model i draws one mask for its whole task vector (its leaves in ``jax.tree``
    order, flattened and concatenated) from ``fold_in(key, i)``. A NaN entry is never dropped
    (a broken model shows in the merge rather than vanish from it, as with TIES).

    ``density`` and ``trim`` are TIES' (0.2 and ``"global"`` by default), read only with
    ``combine="ties"`` and refused with task arithmetic (which ignored them). The trim's
    ``density`` is a fraction of all entries, the dropped ones included: it trims only when
    ``density`` is below the fraction that survived the drop,
    ``1 - drop`` in expectation (over a large task vector, ``trim="global"``, that is what it
    is; a small tensor under ``trim="tensor"`` may keep more survivors than that, and lose
    some to the trim). At the defaults (0.2 ≥ 0.1, global) every survivor is kept and TIES
    contributes its sign election and disjoint mean: DARE-TIES as the DARE paper's code
    (MergeLM) computes it, DARE then TIES at a density of 0.2. (mergekit's ``dare_ties`` is
    another merge: it sums the agreeing entries instead of averaging them and rescales each
    tensor to its L1 norm instead of by ``1 / (1 - drop)``.)"""
    check_key(key)
    check_untraced(drop=drop, density=density)
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if combine not in ("task_arithmetic", "ties"):
        raise ValueError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    if combine == "task_arithmetic" and (density is not None or trim is not None):
        raise ValueError("density and trim are TIES' options: they apply only with combine='ties'")
    density, trim = 0.2 if density is None else density, "global" if trim is None else trim
    if not 0.0 < density <= 1.0 or trim not in TRIMS:
        raise ValueError(f"need 0 < density <= 1 and trim in {TRIMS}, got {density}, {trim!r}")
    factor = 1.0 / (1.0 - drop) if rescale else 1.0
    models = _models(base, params_list, scale)
    if combine == "ties":
        _check_real(base, "dare with combine='ties'")
    ties_options = {"density": density, "trim": trim, "stacked": models[2]}
    ties_options = ties_options if combine == "ties" else {}
    shapes = tuple(np.shape(x) for x in models[0][0])
    p = scalar(1.0 - drop)
    keep = [_draw(jax.random.fold_in(key, i), p, shapes) for i in range(len(params_list))]
    dropped = {"keep": keep, "factor": factor, "combine": combine}
    if combine == "ties":
        given = _of_task_vectors(models, _dare, **dropped, **ties_options)
        ties_options = {"given": given}
    return _merged(models, _dare, scale, **dropped, **ties_options)


@functools.partial(jax.jit, static_argnums=2)
def _draw(key, p, shapes):
    """A model's masks, one per leaf of ``shapes``: one draw for its whole flattened task
    vector (its leaves in ``jax.tree`` order), split, in a program of its own. Drawn inside
    the merge, one draw per leaf shape took XLA as long to compile as the rest, and one draw
    split there had XLA copy the random-bits computation into the leaves' fused consumers
    (DARE-TIES on a 104-leaf ViT: its two programs compiled in 4.3 + 6.3 s; 2.0 + 1.6 s
    given the masks, which take one byte an entry a model)."""
    sizes = [math.prod(s) for s in shapes]
    keep = jax.random.bernoulli(key, p, (sum(sizes),))
    parts = jnp.split(keep, np.cumsum(sizes)[:-1])
    return [m.reshape(s) for m, s in zip(parts, shapes, strict=True)]


def _dare(taus, keep, factor, combine, **options):
    # A NaN entry is never dropped (as TIES' trim keeps it): a broken model shows in the merge.
    dropped = [
        [jnp.where(m | jnp.isnan(t), t * factor, 0.0) for m, t in zip(masks, tau, strict=True)]
        for masks, tau in zip(keep, taus, strict=True)
    ]
    return _ties(dropped, **options) if combine == "ties" else _sum(dropped)
