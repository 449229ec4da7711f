"""The permutation block: FFN units, the residual stream and the query heads inside each
grouped-query attention group by linear assignment (Git Re-Basin's weight matching), every
other group applied to B."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rotjax import symmetry as sym
from rotjax.match._checks import checked_params
from rotjax.match._objective import Context, masked, moved, sub
from rotjax.match._solvers import assign_all

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _perm_costs(spec, names, exclusive, a, b, t):
    """``C[..., i, j] = Σ_p ⟨A_p[i], (g·B)_p[j]⟩`` per permutation group, the group itself left
    out of g; for a per-head permutation (``hperm``) one such matrix per head h,
    ``C[..., h, i, j] = Σ_p ⟨A_p[h, i], (g·B)_p[h, j]⟩``. ``exclusive`` keeps only params on
    which no other group acts."""
    out = {}
    for n in names:
        g = spec.groups[n]
        k = len(g.batch)
        cost = jnp.zeros((*g.shape, g.shape[-1]), jnp.float32)
        form = "...hir,...hjr->...hij" if g.kind == "hperm" else "...ir,...jr->...ij"
        for path, act in spec.users[n]:
            # Exclusive terms: no other group acts (a rotation of the same axis, applied after
            # the permutation, is still at the identity when they are used).
            others = [x for x in spec.params[path].actions if spec.groups[x.group].kind != "rot"]
            if exclusive and len(others) > 1:
                continue
            bp = sym.apply_to_leaf(spec, path, b[path], t, skip=frozenset([n]))
            am, bm = moved(a[path], act.axes, k), moved(bp, act.axes, k)
            cost = cost + jnp.einsum(form, am, bm, precision=_HIGHEST)
        out[n] = cost
    return out


def perm_stage(ctx: Context, t: dict, active: frozenset, *, names, exclusive=False) -> dict:
    """Solve the permutation groups ``names`` given the others (those in ``active`` applied);
    ``exclusive`` uses only the params no other group acts on (the residual start)."""
    costs = _perm_costs(ctx.spec, tuple(names), exclusive, ctx.a, ctx.b, sub(t, active))
    return masked(t, assign_all(costs, solver=ctx.solver), ctx.masks)


def permutation_scores(
    spec: sym.Spec,
    anchor_params: Any,
    params: Any,
    names: Sequence[str],
    transform: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Git Re-Basin's weight-matching scores ``C[..., i, j] = Σ_p ⟨A_p[.., i, ..],
    (g·B)_p[.., j, ..]⟩`` of each permutation group in ``names``, summed over every param the
    group acts on, with ``g`` the ``transform`` without the group itself (float32); for a
    per-head permutation (``hperm``), one matrix per head: ``C[..., h, i, j]``. A rotation of
    the permuted axis (the stream rotation over the residual permutation) in ``transform``
    is applied without the permutation beneath it, so those scores are not weight matching's
    for that permutation: leave it out (`align` solves the permutation before rotating).

    Raises:
      ValueError: params that do not fit the spec (path and shapes named), of other dtypes, or
        not finite; a name that is not a permutation group of the spec; a ``transform`` that
        names groups the spec lacks or holds misshapen elements (they were ignored, or failed
        inside the einsum).
    """
    flats = checked_params(spec, [("anchor_params", anchor_params), ("params", params)])
    if isinstance(names, str):
        names = [names]
    kinds = {n: spec.groups[n].kind if n in spec.groups else None for n in names}
    if bad := sorted(n for n, k in kinds.items() if k not in ("perm", "hperm")):
        groups = sorted(n for n, g in spec.groups.items() if g.kind in ("perm", "hperm"))
        raise ValueError(f"not permutation groups of the spec: {bad}; those are {groups}")
    moved = sym.check_transform(spec, dict(transform or {}))  # (as arrays: lists too)
    a, b = ({p: jnp.asarray(x, jnp.float32) for p, x in f.items()} for f in flats)
    return _perm_costs(spec, tuple(names), False, a, b, moved)
