"""The attention block: head permutations, per-head rotations (Procrustes) and rescalings.

Pairing A's head h with B's head j scores ``Σ_o ‖M_o[h, j]‖_* - ½ Σ_p a_p[h]² ‖B_p[j]‖²`` with
``M_o[h, j] = Σ_p a_p[h] B_p[j]ᵀ A_p[h]`` the cross-covariance of the weights and biases the
rotation o acts on (``a_p = a^{±1}`` the head's current scale on p); the head permutation solves
the assignment on that score (beyond the paper, which keeps it at the identity), then
``R_o[h] = U Vᵀ`` of ``M_o[h, π[h]]`` (paper, Thm. 4.1), one batched `polar` for all of them;
the scales follow from the same cross-covariances (paper, Eq. 11-12).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.match._cpu import one_at_a_time
from rotjax.match._objective import (
    Context,
    action_of,
    el,
    masked,
    moved,
    scale_weight,
    sub,
    total,
)
from rotjax.match._permutations import perm_stage
from rotjax.match._solvers import assign_all, best_scale, pair_procrustes, procrustes

_HIGHEST = jax.lax.Precision.HIGHEST


def _head_skip(spec, hname):
    """The groups left out of B when scoring pairings of heads: the head permutation and the
    per-head elements over it, but not the query-head orders (``hperm``), which the scores
    see attached to B's heads (`_carry_query_orders`)."""
    return frozenset(
        n for n, o in spec.group_items if n == hname or (o.over == hname and o.kind != "hperm")
    )


def _carry_query_orders(spec, heads, t, new):
    """``new`` with the query-head orders of ``t`` (``hperm`` groups over ``heads``) moved
    along with B's heads: the head that was at position h (B's head π[h]) keeps its order
    under the new permutation π', ``σ'[h] = σ[π⁻¹[π'[h]]]``."""
    out = dict(new)
    for r, g in spec.group_items:
        if g.kind == "hperm" and g.over in heads and r in t:
            src = jnp.take_along_axis(
                jnp.argsort(el(spec, t, g.over), axis=-1), el(spec, new, g.over), axis=-1
            )
            out[r] = jnp.take_along_axis(t[r], src[..., None], axis=-2)
    return out


def _head_terms(spec, hname, a, b, t):
    """For the params of head group ``hname``: (rotation group or None, scale weight a[h]^±1,
    A and B with head axis (and dim axis) moved to the front, rest flattened)."""
    g = spec.groups[hname]
    k = len(g.batch)
    skip = _head_skip(spec, hname)
    for path, act in spec.users[hname]:
        rot = action_of(spec, path, "orth", skip)
        _, w = scale_weight(spec, path, t, g.shape, skip)
        axes = rot.axes if rot is not None else act.axes
        bp = sym.apply_to_leaf(spec, path, b[path], t, skip=skip)
        am, bm = moved(a[path], axes, k), moved(bp, axes, k)
        if rot is None:  # head axis only: treat as d = 1
            am, bm = am[..., None, :], bm[..., None, :]
        yield (None if rot is None else rot.group), w, am, bm


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _head_scores(spec, heads, rots, a, b, t):
    """Score of pairing A's head h with B's head j, rotations optimal (in ``rots``) or fixed."""
    out = {}
    for hname in heads:
        ms: dict[Any, jax.Array] = {}
        score = 0.0
        for rot, w, am, bm in _head_terms(spec, hname, a, b, t):
            m = (
                jnp.einsum("...jir,...hkr->...hjik", bm, am, precision=_HIGHEST)
                * w[..., :, None, None, None]
            )
            ms[rot] = ms.get(rot, 0.0) + m
            nb = jnp.sum(bm * bm, axis=(-1, -2))
            score = score - 0.5 * (w * w)[..., :, None] * nb[..., None, :]
        for rot, m in ms.items():
            if rot in rots:
                solve = pair_procrustes if spec.groups[rot].pairs else procrustes
                score = score + solve(m)[1]
            elif rot is None:
                score = score + jnp.trace(m, axis1=-1, axis2=-2)
            else:  # fixed rotation R[h]: ⟨R[h], M[h, j]⟩
                score = score + jnp.einsum(
                    "...hik,...hjik->...hj", el(spec, t, rot), m, precision=_HIGHEST
                )
        out[hname] = score
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rotations(spec, rots, scales, a, b, t):
    """Procrustes for every rotation group in ``rots`` given the head permutations and scales
    in ``t``, in one batched polar decomposition over all groups, layers and heads; then the
    best scales of the groups in ``scales`` given those rotations, from the same
    cross-covariances: ``⟨A_p, B_p R⟩ = tr(Rᵀ M_p)`` and ``‖B_p R‖ = ‖B_p‖``, so no second
    pass over the weights. Every param of a group in ``scales`` must carry a rotation in
    ``rots`` (see `merges_scales`). The cross-covariances are computed one layer at a time
    (`one_at_a_time`; all the groups of a layer together, so that its matmuls can run in
    parallel). On accelerators the loop runs the layers in sequence, each still batched over
    heads."""
    keys, by_layer = {}, {}  # r -> its scale keys; layer -> [((r, i), its cross-covariances)]
    for r in rots:
        g = spec.groups[r]
        terms = []
        for path, act in spec.users[r]:
            # B with everything but this rotation and its head's scale applied (so B's head
            # π[h] already sits at h); the scale enters as the weight a[h]^±1.
            scl, w = scale_weight(spec, path, t, g.shape[:-2])
            skip = frozenset([r] if scl is None else [r, scl.group])
            bp = sym.apply_to_leaf(spec, path, b[path], t, skip=skip)
            key = (scl.group, scl.power) if scl is not None and scl.group in scales else None
            terms.append((key, act.axes, w, a[path], bp))
        keys[r] = tuple(dict.fromkeys(k for k, *_ in terms if k is not None))
        for i in range(g.batch[0]) if g.batch else [None]:  # a stacked group: layer by layer
            fn = functools.partial(_covariances, terms, keys[r], len(g.batch), i)
            by_layer.setdefault(g.layer if i is None else i, []).append(((r, i), fn))
    results = {}  # (r, i) -> (M, scale pieces) of group r (at layer i if stacked)
    layer_fns = [lambda us=us: [f() for _, f in us] for us in by_layer.values()]
    for us, outs in zip(by_layer.values(), one_at_a_time(layer_fns), strict=True):
        results.update(zip([ri for ri, _ in us], outs, strict=True))
    ms = {}
    sq_norms = {(n, p): 0.0 for n in scales for p in (1, -1)}  # Σ‖B_p‖² per scale and power
    covs = {key: [] for key in sq_norms}  # (r, Σ B_pᵀ A_p): Σ⟨A_p, B_p R⟩ = Σ tr(Rᵀ B_pᵀ A_p)
    stack = lambda *x: jnp.stack(x)
    for r in rots:
        batch = spec.groups[r].batch
        if batch:
            ms[r], scaled = jax.tree.map(stack, *[results[r, i] for i in range(batch[0])])
        else:
            ms[r], scaled = results[r, None]
        for key, (mk, nb) in zip(keys[r], scaled, strict=True):
            sq_norms[key] = sq_norms[key] + nb
            covs[key].append((r, mk))
    out = {r: pair_procrustes(ms[r])[0] for r in rots if spec.groups[r].pairs}
    full = [r for r in rots if r not in out]  # one batched polar for all of these
    shapes = [ms[r].shape for r in full]
    if full:
        stacked = jnp.concatenate(
            [ms[r].reshape(-1, *s[-2:]) for r, s in zip(full, shapes, strict=True)]
        )
        rs = jnp.split(procrustes(stacked)[0], np.cumsum([math.prod(s[:-2]) for s in shapes])[:-1])
        out.update((r, x.reshape(s)) for r, x, s in zip(full, rs, shapes, strict=True))
    if scales:  # one solve for all heads of all scale groups
        dot = lambda key: sum(
            jnp.einsum("...ik,...ik->...", out[r], mk, precision=_HIGHEST) for r, mk in covs[key]
        )
        scale_shapes = [spec.groups[n].shape for n in scales]
        concat = lambda f: jnp.concatenate(
            [
                jnp.broadcast_to(f(n), s).reshape(-1)
                for n, s in zip(scales, scale_shapes, strict=True)
            ]
        )
        best = best_scale(
            concat(lambda n: sq_norms[n, 1]),
            concat(lambda n: dot((n, 1))),
            concat(lambda n: dot((n, -1))),
            concat(lambda n: sq_norms[n, -1]),
            current=concat(lambda n: el(spec, t, n)),
        )
        ends = np.cumsum([math.prod(s) for s in scale_shapes])[:-1]
        for n, x, s in zip(scales, jnp.split(best, ends), scale_shapes, strict=True):
            out[n] = x.reshape(s)
    return out


def _covariances(terms, keys, k, layer):
    """For one rotation group (of one ``layer`` of it if stacked): ``M = Σ_p a_p[h] B_pᵀ A_p``
    per head, and for each scale ``keys[j]`` the unweighted ``Σ_p B_pᵀ A_p`` and ``Σ_p ‖B_p‖²``
    over the params it scales."""
    m_all, per_scale = 0.0, {key: (0.0, 0.0) for key in keys}
    if layer is not None:
        k = k - 1
    for key, axes, w, ap, bp in terms:
        if layer is not None:
            ap, bp, w, axes = ap[layer], bp[layer], w[layer], tuple(x - 1 for x in axes)
        am, bm = moved(ap, axes, k), moved(bp, axes, k)
        m = jnp.einsum("...hir,...hkr->...hik", bm, am, precision=_HIGHEST)
        m_all = m_all + m * w[..., None, None]
        if key is not None:
            mk, nb = per_scale[key]
            per_scale[key] = (mk + m, nb + jnp.sum(bm * bm, axis=(-2, -1)))
    return m_all, [per_scale[key] for key in keys]


def merges_scales(spec, rots, scales):
    """Whether every param of every group in ``scales`` also carries a rotation of ``rots``,
    so that `_rotations` can solve the scales from its cross-covariances."""
    return all(
        any(x.group in rots for x in spec.params[path].actions)
        for n in scales
        for path, _ in spec.users[n]
    )


def attention_stage(
    ctx: Context, t: dict, active: frozenset, *, heads, rots, scales=(), queries=()
) -> dict:
    """Heads, rotations and (when `merges_scales`) scales. Candidate head permutations come
    from the exact score above (given the current scales and query-head orders) and from the
    invariant scores of `_head_invariants` (one blind to the query-head orders when the model
    has them); each is completed by the Procrustes rotations and then the scales (with the
    query-head orders ``queries`` solved in between, then the rotations again: a pairing of
    heads is judged with its query heads matched), and the best of them and of the current
    state is kept, so the objective never increases."""
    spec, a, b = ctx.spec, ctx.a, ctx.b
    upto = lambda c, extra: sub(c, active | set(heads) | set(extra))
    # The rotations given everything else, the scales solved so far included (the first
    # sweep's second solve, after the query-head orders, saw them as 1).
    rotate = lambda c, extra=(): masked(
        c, _rotations(spec, rots, scales, a, b, upto(c, (*extra, *scales))), ctx.masks
    )
    orders = frozenset(active | set(heads + rots + scales))

    def complete(c):
        """``c`` completed: the rotations; with query heads, from two starts (B's current
        query-head orders, and the rotation-invariant ones of `_query_invariants`, which
        rotations fitted to wrong orders cannot mislead), the orders by exact assignment
        given the rotations and the rotations again."""
        if not queries:
            return [rotate(c) if rots else c]
        view = upto(c, queries)
        blind = masked(
            c,
            assign_all(_query_invariants(spec, queries, a, b, view), solver=ctx.solver),
            ctx.masks,
        )
        out = []
        for start in (c, blind):
            start = rotate(start, queries) if rots else start
            start = perm_stage(ctx, start, orders, names=queries)
            out.append(rotate(start, queries) if rots else start)
        return out

    if not heads:
        return complete(t)[0] if rots else t
    candidates = [t]
    # B's query heads in their current orders, attached to B's heads (not to positions).
    ident = {h: sym.identity_element(spec.groups[h]) for h in heads}
    view = _carry_query_orders(spec, heads, sub(t, active), {**sub(t, active), **ident})
    scores = [_head_scores(spec, heads, rots, a, b, view)]
    scores.append(_head_invariants(spec, heads, a, b, view, False))
    if any(g.kind == "hperm" and g.over in heads for _, g in spec.group_items):
        scores.append(_head_invariants(spec, heads, a, b, view, True))
    for s in scores:
        c = masked(t, assign_all(s, solver=ctx.solver), ctx.masks)
        candidates.append(_carry_query_orders(spec, heads, t, c))
    if rots or queries:  # the current state stays a candidate
        candidates = [t, *(x for c in candidates for x in complete(c))]
    solved = active | set(heads + rots + scales + queries)
    return min(candidates, key=lambda c: total(ctx, sub(c, solved)))


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _head_invariants(spec, heads, a, b, t, blind=False):
    """``⟨S^A_h, S^B_j⟩`` for the bilinear forms ``S_h = W_Q[h] W_K[h]ᵀ`` and ``W_V[h] W_O[h]``
    (biases as an extra input row), which no rotation or rescaling of the head changes: for a
    planted head permutation the identity pairing maximises it (Cauchy-Schwarz), whatever the
    rotations and scales. Computed as ``⟨A_Qᵀ B_Q, A_Kᵀ B_K⟩`` from d x d cross-covariances.
    With grouped-query heads, ``blind`` sums the forms over the query heads of each group,
    ``Σ_g S_h,g``, which no order of the query heads changes either (the exact score and the
    unblinded one see B's query heads in their current orders, which may be wrong)."""
    out = {}
    for hname in heads:
        g = spec.groups[hname]
        k = len(g.batch)
        score = jnp.zeros((*g.shape, g.size), jnp.float32)
        for r in (n for n, o in spec.group_items if o.over == hname and o.kind == "orth"):
            sides: dict[int, Any] = {}
            for path, act in spec.users[r]:
                # Q and V kernels carry the stream first; K and O the other way round: sort the
                # two sides of the bilinear form by the power of the scale acting on them.
                scl = action_of(spec, path, "scale")
                power = 1 if scl is None else scl.power
                # B with the groups of other axes applied (the stream, mainly), not its heads'.
                skip = _head_skip(spec, hname)
                bp = sym.apply_to_leaf(spec, path, b[path], t, skip=skip)
                ap, axes = a[path], act.axes
                query = action_of(spec, path, "hperm")
                if blind and query is not None:  # Σ over the query heads of the group
                    q = query.axes[1]
                    ap, bp = ap.sum(q), bp.sum(q)
                    axes = tuple(x - (x > q) for x in axes)
                am, bm = moved(ap, axes, k), moved(bp, axes, k)
                m = jnp.einsum("...hir,...jkr->...hjik", am, bm, precision=_HIGHEST)
                sides[power] = sides.get(power, 0.0) + m
            if len(sides) == 2:
                score = score + jnp.einsum(
                    "...hjik,...hjik->...hj", sides[1], sides[-1], precision=_HIGHEST
                )
        out[hname] = score
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _query_invariants(spec, queries, a, b, t):
    """For each query-head group (``hperm`` over the key-value heads): the score
    ``C[h, i, j] = ⟨S^A_h,i, S^B_h,j⟩`` of pairing A's query head i of key-value head h with
    B's query head j of the same head, for the forms ``S_h,i = W_Q[h, i] W_K[h]ᵀ`` and
    ``W_V[h] W_O[h, i]`` of `_head_invariants`, B's heads permuted (``t``'s head permutation):
    blind to the head's rotations and scales, so rotations fitted to wrong orders cannot
    hold the orders in place."""
    out = {}
    for n in queries:
        g = spec.groups[n]
        k = len(g.batch)
        skip = frozenset(
            x for x, o in spec.group_items if x == n or (o.over == g.over and o.kind != "perm")
        )
        score = jnp.zeros((*g.shape, g.shape[-1]), jnp.float32)
        for r in (x for x, o in spec.group_items if o.over == g.over and o.kind == "orth"):
            sides: dict[int, Any] = {}
            for path, act in spec.users[r]:
                scl = action_of(spec, path, "scale")
                power = 1 if scl is None else scl.power
                bp = sym.apply_to_leaf(spec, path, b[path], t, skip=skip)
                query = action_of(spec, path, "hperm", (n,))
                if query is None:  # one per key-value head: (..., h, 1, 1, d, d)
                    am, bm = moved(a[path], act.axes, k), moved(bp, act.axes, k)
                    m = jnp.einsum("...hir,...hkr->...hik", am, bm, precision=_HIGHEST)[
                        ..., :, None, None, :, :
                    ]
                else:  # (..., h, i, j, d, d)
                    axes = (act.axes[0], query.axes[1], act.axes[1])
                    am, bm = moved(a[path], axes, k), moved(bp, axes, k)
                    m = jnp.einsum("...hxir,...hykr->...hxyik", am, bm, precision=_HIGHEST)
                sides[power] = sides.get(power, 0.0) + m
            if len(sides) == 2:
                score = score + jnp.sum(sides[1] * sides[-1], axis=(-2, -1))
        out[n] = score
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scales(spec, names, a, b, t):
    out = {}
    for n in names:
        g = spec.groups[n]
        k = len(g.batch)
        coef = {1: [0.0, 0.0], -1: [0.0, 0.0]}  # power -> [Σ‖B‖², Σ⟨A, B⟩] per head
        for path, act in spec.users[n]:
            bp = sym.apply_to_leaf(spec, path, b[path], t, skip=frozenset([n]))
            am, bm = moved(a[path], act.axes, k), moved(bp, act.axes, k)
            coef[act.power][0] = coef[act.power][0] + jnp.sum(bm * bm, -1)
            coef[act.power][1] = coef[act.power][1] + jnp.sum(am * bm, -1)
        (c1, b1), (c2, b2) = coef[1], coef[-1]
        zeros = jnp.zeros(g.shape, jnp.float32)
        out[n] = best_scale(c1 + zeros, b1 + zeros, b2 + zeros, c2 + zeros, current=el(spec, t, n))
    return out


def scale_stage(ctx: Context, t: dict, active: frozenset, *, names) -> dict:
    """The scales of ``names`` alone (their params carry no solved rotation)."""
    new = _scales(ctx.spec, tuple(names), ctx.a, ctx.b, sub(t, active))
    return masked(t, new, ctx.masks)
