"""OT fusion (Imfeld et al., ICLR 2024, "Transformer Fusion with Optimal Transport"): a
transport map between A's and B's units on every permutable axis, B moved by it, then the
average. The paper's Table 2 baseline.

Here the permutable axes are the spec's permutation groups: the residual stream, each layer's
FFN units and whole heads (per-head features keep their order: OT fusion does not rotate), and,
for grouped-query attention (beyond the paper), the query heads inside each key-value head.
The stream is solved first, then every layer's heads and FFN units ("layer by layer": each
layer's groups touch disjoint params once the stream is fixed), then the query heads of each
(moved) key-value head; with weights, B's moved params give each stage's costs; with
activations, the layers' costs are the same either way for an exact (permutation) map of the
stream, the query heads' costs pair A's key-value head with the B head moved onto it, and the
costs come from B's unmixed activations after a Sinkhorn map (a simplification). The query
heads are always matched exactly (an assignment per key-value head, also under Sinkhorn).
Costs between units, as in the paper, are Euclidean distances between unit-normalised vectors:

- ``"acts"``: standardised activation vectors on the same inputs, ``‖â_i - b̂_j‖ ∝
  sqrt(2 - 2 corr(a_i, b_j))`` (correlations from `rotjax.merge.cross_statistics`);
- ``"wts"``: unit-normalised weight rows (every param the group acts on, concatenated),
  ``sqrt(2 - 2 cos(a_i, b_j))``.

Exact transport between two equal-width sets with uniform masses is a permutation: a linear
assignment (`rotjax.match.assign`), and B moved by it computes what B computed. Entropic
transport (Sinkhorn, through ``ott-jax``; cost normalised by its maximum, regularisation
``epsilon``: the paper's 0.08 for activations, 0.06 for weights) gives a soft map ``T``
(rows summing to 1) that mixes B's units: ``B'[.., i, ..] = Σ_j T[i, j] B[.., j, ..]``.

This is a variant of the paper's algorithm that keeps B's function under exact transport,
not its code (graldij/transformer-fusion), which a reproduction of its numbers would need:
that code transports layer by layer, each layer's weights first moved by the map before it;
maps Q, K and V neuron by neuron over the whole hidden width (features may cross heads, and
Q's and K's maps differ); takes the stream's map after each sublayer as the mean of the
residual's map and the sublayer's output map (a soft map even with exact transport); costs
activations at layer outputs (Q/K/V, the FFN's first layer before its nonlinearity, the
output layers) on a subset of tokens; and costs weights by each layer's incoming rows only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rotjax import symmetry as sym
from rotjax.match import assign
from rotjax.match._align import _rescaled
from rotjax.match._checks import check_concrete, check_pair_devices, non_finite
from rotjax.match._permutations import _perm_costs
from rotjax.match._solvers import SOLVERS
from rotjax.merge._acts import correlations, group_scores
from rotjax.merge._methods import _input_axes, average, check_untraced
from rotjax.tree import averaged, flatten, from_dict, placed_like, to_dict, wide

MODES = ("acts", "wts")
TRANSPORTS = ("exact", "sinkhorn")


class Fusion(NamedTuple):
    """`ot_fusion`'s result: the fused ``params``, the transport ``maps`` per group
    (permutations, or row-stochastic maps under Sinkhorn) and B ``moved`` by them."""

    params: Any  # the fused model
    maps: dict[str, jax.Array]  # group -> permutation (exact) or row-stochastic map (sinkhorn)
    moved: Any  # B moved by the maps (B itself, re-based, for exact transport)


SINKHORN_EPSILON = {"acts": 0.08, "wts": 0.06}
"""`ot_fusion`'s default Sinkhorn regularisation per mode (the paper's values)."""


def ot_fusion(
    spec: sym.Spec,
    params_a: Any,
    params_b: Any,
    *,
    mode: str = "acts",
    cross: Mapping[str, Mapping[str, jax.Array]] | None = None,
    transport: str = "exact",
    epsilon: float | None = None,
    weight: float = 0.5,
    solver: str = "scipy",
) -> Fusion:
    """Fuse B into A by optimal transport of their units, then average (``weight`` on A).

    Args:
      spec: the models' symmetry spec.
      params_a: the anchor A.
      params_b: the model moved onto A.
      mode: ``"acts"`` (needs ``cross``) or ``"wts"``.
      cross: `rotjax.merge.cross_statistics` of (A, B) for ``"acts"``.
      transport: ``"exact"`` (assignment) or ``"sinkhorn"`` (entropic, ``ott-jax``).
      epsilon: Sinkhorn's regularisation on the max-normalised cost (default 0.08 for acts,
        0.06 for wts).
      weight: A's share in the final average.
      solver: the assignment solver for exact transport.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if mode == "acts" and cross is None:
        raise ValueError("mode='acts' needs cross statistics (rotjax.merge.cross_statistics)")
    if mode == "wts" and cross is not None:
        raise ValueError("mode='wts' reads no cross statistics: pass cross=None or mode='acts'")
    if epsilon is not None and transport != "sinkhorn":
        raise ValueError(f"epsilon is Sinkhorn's: transport={transport!r} reads none")
    # (a bool is no number here: True was taken as 1.0, as refit's ridge once was)
    check_untraced(epsilon=epsilon, weight=weight)
    if epsilon is not None and (
        isinstance(epsilon, bool) or not (math.isfinite(epsilon) and epsilon > 0)
    ):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(weight, bool) or not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise ValueError(f"weight (A's share) must be in [0, 1], got {weight!r}")
    if solver not in SOLVERS:  # (checked even where Sinkhorn alone would transport)
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    named = {"params_a": params_a, "params_b": params_b}
    check_concrete(named, "OT fusion solves its transport maps")
    for name, p in named.items():
        sym.validate(spec, p, name)
        # (NaN costs failed in the solver, naming nothing, or as a Sinkhorn "not converged")
        if bad := non_finite(to_dict(p)):
            raise ValueError(f"{name}: NaN or Inf in {bad[:5]}")
    check_pair_devices(named)
    moments = {f"{p}\n{k}": x for p, m in (cross or {}).items() for k, x in m.items()}
    if bad := [b.split("\n") for b in non_finite(moments)]:  # one pass over all of them
        path = bad[0][0]
        raise ValueError(f"cross[{path!r}]: NaN or Inf in {[k for p, k in bad if p == path]}")
    eps = epsilon if epsilon is not None else SINKHORN_EPSILON[mode]
    corr = correlations(cross) if mode == "acts" else None
    roles = (["residual"], ["heads", "ffn"], ["query_heads"])
    maps: dict[str, jax.Array] = {}
    # bfloat16 B rounded once, at the end, not per stage (integer leaves kept as they are)
    moved = jax.tree.map(lambda x: wide(x) if averaged(x) else x, params_b)
    # Weights are scored in float32 (`rotjax.match`) and transported in B's precision: the
    # maps of float64 models are float64, as from activations (rows summing to 1 to 1e-7)
    dt = jnp.result_type(*(x for x in jax.tree.leaves(moved) if averaged(x)))
    for names in (spec.select(roles=r) for r in roles):
        if not names:
            continue
        queries = spec.groups[names[0]].kind == "hperm"
        if mode == "acts":
            # B's side of the correlations moved by the exact maps so far (the heads'), so
            # that each query head meets those of the B head moved onto its own.
            heads = {n: m for n, m in maps.items() if spec.groups[n].role == "heads"}
            seen = _moved_b(spec, corr, heads) if queries else corr
            similarity = group_scores(spec, seen, names, heads="trace")
            if missing := [n for n in names if n not in similarity]:
                raise ValueError(
                    f"cross holds no inputs of any layer that reads the units of {missing} "
                    "(cross_statistics of the whole models is what mode='acts' needs)"
                )
        else:
            similarity = {
                n: s.astype(dt) for n, s in _weight_cosines(spec, params_a, moved, names).items()
            }
        new = {}
        for n, cost in _costs(similarity).items():
            if transport == "exact" or queries:
                new[n] = assign(-cost, solver=solver)
            else:
                new[n] = _sinkhorn(cost, eps)
        moved = transport_params(spec, moved, new)
        maps.update(new)
    fused = average([params_a, moved], [weight, 1.0 - weight])
    # in A's dtypes (`average` gives the first kept model's: float32 B's at weight 0)
    fused = jax.tree.map(
        lambda f, a: placed_like(f.astype(jnp.asarray(a).dtype), a), fused, params_a
    )
    back = lambda m, b: placed_like(m.astype(jnp.asarray(b).dtype), b)
    return Fusion(fused, maps, jax.tree.map(back, moved, params_b))


@jax.jit
def _costs(similarity):
    """The transport cost ``sqrt(2 - 2 s)`` of a similarity s (the distance of unit vectors)."""
    return {n: jnp.sqrt(jnp.maximum(2.0 - 2.0 * s, 0.0)) for n, s in similarity.items()}


def _weight_cosines(spec, params_a, params_b, names):
    """``cos(a_i, b_j)`` of the groups' weight rows (all params each group acts on), each
    model first divided by a power of two near its largest weight (exact, and the cosines do
    not change): weights near 1e-24 squared to 0 in float32 (every cosine 0, the identity
    map), near 1e20 to inf. The scores are `rotjax.match.permutation_scores`' without its
    checks of the whole models, which `ot_fusion` has made."""

    def rescaled(tree):
        return _rescaled({p: jnp.asarray(x) for p, x in to_dict(tree).items()})[0][0]

    a, b = rescaled(params_a), rescaled(params_b)
    cross, na, nb = (
        _perm_costs(spec, tuple(names), False, x, y, {}) for x, y in ((a, b), (a, a), (b, b))
    )
    out = {}
    for n in names:
        da = jnp.sqrt(jnp.diagonal(na[n], axis1=-2, axis2=-1))
        db = jnp.sqrt(jnp.diagonal(nb[n], axis1=-2, axis2=-1))
        out[n] = cross[n] / jnp.maximum(da[..., :, None] * db[..., None, :], 1e-30)
    return out


def _sinkhorn(cost: jax.Array, epsilon: float) -> jax.Array:
    """Row-stochastic entropic transport maps for a stack of square costs (uniform masses)."""
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    def one(c):
        geom = geometry.Geometry(cost_matrix=c / jnp.maximum(jnp.max(c), 1e-30), epsilon=epsilon)
        out = sinkhorn.Sinkhorn()(linear_problem.LinearProblem(geom))
        return out.matrix / jnp.sum(out.matrix, axis=-1, keepdims=True), out.converged

    flat = cost.reshape(-1, *cost.shape[-2:])
    with jax.numpy_rank_promotion("allow"):  # ott-jax relies on numpy's rank promotion
        maps, converged = jax.jit(jax.vmap(one))(flat)
    if not bool(jnp.all(converged)) or not bool(jnp.all(jnp.isfinite(maps))):
        raise ValueError(
            f"Sinkhorn did not converge for epsilon={epsilon} (cost scaled to [0, 1]); "
            "try a larger epsilon"
        )
    return maps.reshape(cost.shape)


def _moved_b(spec, corr, maps):
    """Correlations ``corr[p][.., i, j]`` (A's input feature i, B's j) with B's side moved by
    ``maps`` as B's params are (`transport_params`; A's side stays): for a permutation, the
    correlations of B moved by it; for a soft map, the covariances of the mixed features
    divided by the unmixed spreads (a simplification, exact as the map sharpens)."""
    acting = {p for n in maps for p, _ in spec.users[n]}
    if not maps or not acting & set(corr):
        return corr
    # The spec of B's side of each flattened correlation: (*batch, n_A, *B's input axes).
    params, shapes = {}, {}
    for path, c in corr.items():
        kernel = spec.params[path]
        b = c.ndim - 2
        n_in = _input_axes(path, kernel, c.shape, "a correlation")[1]
        shapes[path] = (*kernel.shape[:b], c.shape[-2], *kernel.shape[b : b + n_in])
        actions = tuple(
            sym.Action(a.group, tuple(ax + 1 for ax in a.axes), a.power)
            for a in kernel.actions
            if a.group in maps and all(b <= ax < b + n_in for ax in a.axes)
        )
        params[path] = sym.ParamSpec(shapes[path], actions)
    bspec = sym.Spec(spec.group_items, tuple(sorted(params.items())))
    tree = from_dict({p: c.reshape(shapes[p]) for p, c in corr.items()})
    moved = transport_params(bspec, tree, maps)
    return {p: x.reshape(corr[p].shape) for p, x in to_dict(moved).items()}


def transport_params(spec: sym.Spec, params: Any, maps: Mapping[str, jax.Array]) -> Any:
    """``params`` moved by permutation groups' maps: an int permutation acts as the group
    element (`rotjax.symmetry.apply`), a float map ``T[*batch, n, n]`` (rows summing to 1) as
    ``W'[.., i, ..] = Σ_j T[i, j] W[.., j, ..]`` on every axis the group acts on. In the order
    `ot_fusion` solves them, so that ``transport_params(spec, B, fusion.maps)`` is
    ``fusion.moved``: the permutations of whole units, the soft maps, then the query heads'
    permutations inside each (moved) key-value head.

    Raises:
      ValueError: params that do not fit the spec, a map of a group the spec lacks or that is
        not a permutation group, a permutation that is not one, a soft map of a per-head
        permutation group, of the wrong shape or with NaN or Inf (the group named).
    """
    sym.validate(spec, params)
    if unknown := sorted(set(maps) - set(spec.groups)):
        raise ValueError(f"maps of groups that are not in the spec: {unknown}")
    exact = {n: m for n, m in maps.items() if jnp.issubdtype(jnp.asarray(m).dtype, jnp.integer)}
    soft = {n: m for n, m in maps.items() if n not in exact}
    sym.check_elements(spec, exact)
    for n, m in soft.items():
        g = spec.groups[n]
        want = (*g.shape, g.shape[-1])
        if g.kind != "perm" or jnp.shape(m) != want:
            raise ValueError(
                f"maps[{n!r}]: a soft map (float) must be {want} for a permutation group of "
                f"whole units; the group is a {g.kind!r} group of shape {g.shape}, the map "
                f"{tuple(jnp.shape(m))}"
            )
        if not bool(jnp.all(jnp.isfinite(m))):
            raise ValueError(f"maps[{n!r}]: NaN or Inf in the soft map")
    inner = {n: m for n, m in exact.items() if spec.groups[n].kind == "hperm"}
    if outer := {n: m for n, m in exact.items() if n not in inner}:
        params = sym.apply(spec, params, outer)
    if soft:
        params = _mixed(spec, params, soft)
    return sym.apply(spec, params, inner) if inner else params


def _mixed(spec, params, soft):
    """``params`` with every axis of a group in ``soft`` mixed by its map (`_mix`)."""
    paths, leaves, treedef = flatten(params)  # the tree's own type kept (a FrozenDict too)
    out = []
    for path, x in zip(paths, leaves, strict=True):
        y = wide(x)  # several maps on one leaf: rounded to its dtype once
        for a in spec.params[path].actions:
            if a.group in soft:
                y = _mix(soft[a.group], y, a.axes[0], len(spec.groups[a.group].batch))
        out.append(placed_like(y.astype(jnp.asarray(x).dtype), x))
    return jax.tree.unflatten(treedef, out)


def _mix(t, x, axis, k):
    """``x'[.., i, ..] = Σ_j t[.., i, j] x[.., j, ..]`` on ``axis``, batched over k leading axes."""
    moved = jnp.moveaxis(x, axis, k)
    flat = moved.reshape(*moved.shape[: k + 1], -1)
    out = jnp.einsum("...ij,...jr->...ir", t, flat, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out.reshape(moved.shape), k, axis)
