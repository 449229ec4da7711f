"""Align model B to an anchor A: the element g of B's symmetry group minimising ‖A - g·B‖².

The objective is the squared Frobenius distance summed over every parameter,
``J(g) = Σ_p ‖A_p - (g·B)_p‖²``; since g is a symmetry, ``g·B`` computes exactly what B does.
It is minimised block by block, each block in closed form given the others:

- ``attention`` (per layer, all layers at once): the head permutation π and the rotations
  ``R_qk, R_vo`` jointly, given the scales. Pairing A's head h with B's head j scores
  ``Σ_o ‖M_o[h, j]‖_* - ½ Σ_p a_p[h]² ‖B_p[j]‖²`` with ``M_o[h, j] = Σ_p a_p[h] B_p[j]ᵀ A_p[h]``
  the cross-covariance of the weights and biases the rotation o acts on (``a_p = a^{±1}`` the
  head's current scale on p); π solves the assignment on that score (beyond the paper, which
  keeps π = id), then ``R_o[h] = U Vᵀ`` of ``M_o[h, π[h]]`` (paper, Thm. 4.1), one batched
  `polar` for all of them; the scales follow from the same cross-covariances.
- ``scale``: per head, ``a`` minimising ``Σ‖A_+ - a B_+‖² + Σ‖A_- - B_-/a‖²``, the least root
  of a quartic (paper, Eq. 11-12), see `best_scale`.
- ``hidden`` (FFN units, pooler units) and ``residual`` (the stream): linear assignment on
  ``C[i, j] = Σ_p ⟨A_p[.., i, ..], B_p[.., j, ..]⟩`` with every other group applied to B (Git
  Re-Basin's weight matching).

Without the residual group the blocks are independent up to the rotation-scale coupling and
one pass in the order attention, scale, hidden is the paper's method. With it, the groups
interact and the blocks are swept by coordinate descent (after the first sweep in a random
order per sweep when a key is given) until the objective stops improving. Every block step is
an exact minimisation, or for the head permutation the best of several candidates that
include the current one, so the objective never increases.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.match._solvers import assign_all, best_scale, procrustes

# What `solve=` accepts, and the group roles each name covers.
GROUPS = {
    "rotation": ("qk_rotation", "vo_rotation"),
    "scale": ("qk_scale", "vo_scale"),
    "hidden": ("hidden",),
    "heads": ("heads",),
    "residual": ("residual",),
}
PAPER = ("rotation", "scale", "hidden")
ALL = tuple(GROUPS)


class Diagnostics(NamedTuple):
    """What `align` did. Distances are squared Frobenius norms ``‖A_p - (g·B)_p‖²``."""

    objective_before: float  # Σ_p over all params, at the identity
    objective_after: float  # Σ_p at the returned transform
    groups: dict[str, tuple[float, float]]  # group -> (before, after) summed over its params
    params: dict[str, tuple[float, float]]  # param path -> (before, after)
    history: list[tuple[str, float]]  # (stage, objective after it), in order
    sweeps: int
    seconds: dict[str, float]  # wall time per stage kind (+ "apply", "total")


class Alignment(NamedTuple):
    params: Any  # g·B, same structure and dtypes as the input
    transform: sym.Transform  # g (complete: every group of the spec)
    diagnostics: Diagnostics


def align(
    spec: sym.Spec,
    anchor_params: Any,
    params: Any,
    *,
    solve: Iterable[str] = PAPER,
    layers: Iterable[int] | None = None,
    solver: str = "scipy",
    residual_init: str = "independent",
    max_sweeps: int | None = None,
    tol: float = 1e-6,
    key: jax.Array | None = None,
) -> Alignment:
    """Align ``params`` (model B) to ``anchor_params`` (model A) over the groups in ``solve``.

    Args:
      spec: the models' symmetry spec (e.g. ``bert.symmetry_spec(config)``).
      anchor_params: A's params; not changed.
      params: B's params; not changed.
      solve: group kinds to solve, from ``"rotation"``, ``"scale"``, ``"hidden"`` (FFN and
        pooler units), ``"heads"`` and ``"residual"``; the others stay at the identity. The
        default is the paper's method.
      layers: solve per-layer groups of these layers only (the paper's layer-subset study);
        None for all.
      solver: linear assignment on the host (``"scipy"``) or in a jitted graph (``"optax"``).
      residual_init: start the residual permutation from the terms that depend on no other
        group (``"independent"``: embeddings, LayerNorms, output biases, classifier) or from
        the identity (``"identity"``), which is a fixed point of the stream update when the
        per-layer groups were fitted with the stream at the identity.
      max_sweeps: coordinate-descent sweeps; default 1 without the residual group (the paper's
        single pass), else 50.
      tol: stop when a sweep improves the objective by less than ``tol`` relatively.
      key: shuffles the block order of every sweep after the first (which runs in the fixed
        order attention, scale, hidden, residual); None keeps the fixed order.

    Returns:
      `Alignment` ``(params, transform, diagnostics)``: ``params == apply(spec, params,
      transform)`` in the input's dtypes.

    Raises:
      ValueError: params that do not fit the spec (path and shapes named), non-finite values,
        dtypes that differ between the models, or bad options. Nothing is returned then.
    """
    t_start = time.perf_counter()
    solve = _checked_options(solve, residual_init)
    a_flat, b_flat = _checked_inputs(spec, anchor_params, params)
    return _align(
        spec,
        a_flat,
        b_flat,
        params,
        solve=solve,
        layers=layers,
        solver=solver,
        residual_init=residual_init,
        max_sweeps=max_sweeps,
        tol=tol,
        key=key,
        t_start=t_start,
    )


def _checked_options(solve, residual_init):
    solve = tuple(solve)
    unknown = sorted(set(solve) - set(GROUPS))
    if unknown:
        raise ValueError(f"solve: unknown group kinds {unknown}; choose from {list(GROUPS)}")
    if residual_init not in ("independent", "identity"):
        raise ValueError(
            f"residual_init must be 'independent' or 'identity', not {residual_init!r}"
        )
    return solve


def _align(
    spec,
    a_flat,
    b_flat,
    params,
    *,
    solve,
    layers,
    solver,
    residual_init,
    max_sweeps,
    tol,
    key,
    t_start,
):
    """`align` on checked float32 leaves ``a_flat``, ``b_flat`` (path -> array) of the anchor
    and of ``params``."""
    roles = {r for s in solve for r in GROUPS[s]}
    layer_set = None if layers is None else {int(i) for i in layers}
    names = spec.select(roles=roles, layers=layer_set)
    masks = _layer_masks(spec, names, layer_set)
    by_role = lambda *rs: tuple(n for n in names if spec.groups[n].role in rs)

    stages: dict[str, Any] = {}
    stage_groups: dict[str, tuple[str, ...]] = {}
    heads, rots = by_role("heads"), by_role("qk_rotation", "vo_rotation")
    scales = by_role("qk_scale", "vo_scale")
    # Scales of rotated params are solved right after the rotations, from the same
    # cross-covariances (one pass over the weights for both); others get their own stage.
    merged = scales if rots and _merges_scales(spec, rots, scales) else ()
    if heads or rots:
        stages["attention"] = functools.partial(
            _attention_stage, heads=heads, rots=rots, scales=merged
        )
        stage_groups["attention"] = heads + rots + merged
    if scales and not merged:
        stages["scale"] = functools.partial(_scale_stage, names=scales)
        stage_groups["scale"] = scales
    if hidden := by_role("hidden"):
        stages["hidden"] = functools.partial(_perm_stage, names=hidden)
        stage_groups["hidden"] = hidden
    residual = by_role("residual")
    if residual:
        stages["residual"] = functools.partial(_perm_stage, names=residual)
        stage_groups["residual"] = residual
    if max_sweeps is None:
        max_sweeps = 50 if residual else 1

    # Only the params some solved group acts on can move; the rest is a constant of J, left out.
    paths = tuple(sorted({p for n in names for p, _ in spec.users[n]}))
    t = sym.identity(spec)
    # Groups that may differ from the identity so far: the others are not applied at all, so
    # the paper's single pass never gathers by identity permutations.
    active: set[str] = set()
    seconds = dict.fromkeys([*stages, "objective", "apply"], 0.0)
    dist0, _ = _distances(spec, paths, a_flat, b_flat, {})
    objective = before = float(sum(dist0.values()))
    dist1 = dist0  # distances at the current transform
    history: list[tuple[str, float]] = [("identity", before)]
    ctx = dict(spec=spec, a=a_flat, b=b_flat, solver=solver, masks=masks, paths=paths)

    if residual and residual_init == "independent":
        tic = time.perf_counter()
        t = _perm_stage(t, names=residual, exclusive=True, active=frozenset(), **ctx)
        active |= set(residual)
        seconds["residual"] += time.perf_counter() - tic
        dist1, _ = _distances(spec, paths, a_flat, b_flat, _sub(t, active))
        objective = float(sum(dist1.values()))
        history.append(("residual_init", objective))

    order = list(stages)
    sweeps = 0
    new = {}  # (g·B)_p of the touched paths, kept from the last pass of the last sweep
    for sweep in range(max_sweeps):
        if key is not None and sweep > 0:
            perm = jax.random.permutation(jax.random.fold_in(key, sweep), len(order))
            order = [list(stages)[int(i)] for i in perm]
        start_sweep = objective
        for name in order:
            tic = time.perf_counter()
            t = stages[name](t, active=frozenset(active), **ctx)
            jax.block_until_ready(t)
            active |= set(stage_groups[name])
            seconds[name] += time.perf_counter() - tic
            tic = time.perf_counter()
            last = name == order[-1]
            dist1, new = _distances(spec, paths, a_flat, b_flat, _sub(t, active), keep=last)
            objective = float(sum(dist1.values()))
            seconds["objective"] += time.perf_counter() - tic
            history.append((name, objective))
        sweeps += 1
        if start_sweep - objective <= tol * max(start_sweep, 1e-30):
            break

    tic = time.perf_counter()
    aligned = jax.block_until_ready(_replaced(params, new or {}))
    seconds["apply"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - t_start
    groups = {
        g: tuple(float(sum(d[p] for p, _ in spec.users[g])) for d in (dist0, dist1)) for g in names
    }
    diag = Diagnostics(
        objective_before=before,
        objective_after=float(sum(dist1.values())),
        groups=groups,
        params={p: (dist0[p], dist1[p]) for p in dist0},
        history=history,
        sweeps=sweeps,
        seconds=seconds,
    )
    return Alignment(aligned, t, diag)


def align_many(
    spec: sym.Spec, params_list: Sequence[Any], *, anchor: int | None = None, **options: Any
) -> tuple[int, list[Alignment]]:
    """Align every model of ``params_list`` to one anchor among them.

    The anchor is ``anchor`` if given, else the model closest to the parameter average
    (``argmin_i Σ_p ‖θ_i,p - θ̄_p‖²``), as in the paper's code. Returns ``(anchor index,
    alignments)`` with one `Alignment` per model (the anchor's is the identity); ``options``
    go to `align`.
    """
    if len(params_list) < 1:
        raise ValueError("align_many needs at least one model")
    if anchor is not None and not 0 <= anchor < len(params_list):
        raise ValueError(f"anchor={anchor} is out of range for {len(params_list)} models")
    t_start = time.perf_counter()
    defaults = {
        k: v.default
        for k, v in inspect.signature(align).parameters.items()
        if v.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if unknown := sorted(set(options) - set(defaults)):
        raise TypeError(f"align_many: unknown options {unknown}; `align` takes {list(defaults)}")
    options = {**defaults, **options}
    solve = _checked_options(options.pop("solve"), options["residual_init"])
    # Every model checked once, against the first (dtypes must agree across all of them).
    flats = [_checked_inputs(spec, params_list[0], p)[1] for p in params_list]
    if anchor is None:
        mean = {p: sum(f[p] for f in flats) / len(flats) for p in flats[0]}
        dists = [float(sum(jnp.sum((f[p] - mean[p]) ** 2) for p in mean)) for f in flats]
        anchor = int(np.argmin(dists))
    return anchor, [
        _align(
            spec,
            flats[anchor],
            f,
            p,
            solve=() if i == anchor else solve,
            t_start=t_start if i == 0 else time.perf_counter(),
            **options,
        )
        for i, (f, p) in enumerate(zip(flats, params_list, strict=True))
    ]


# ---------------------------------------------------------------------------------------------
# Input checks.


def _checked_inputs(spec, anchor_params, params):
    out = []
    for what, tree in (("anchor_params", anchor_params), ("params", params)):
        try:
            sym.validate(spec, tree)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        paths, leaves, _ = sym.flatten(jax.device_put(tree))  # one transfer for the whole tree
        out.append(dict(zip(paths, leaves, strict=True)))
    a, b = out
    problems = [
        f"  {p}: anchor {a[p].dtype} vs params {b[p].dtype}" for p in a if a[p].dtype != b[p].dtype
    ]
    if problems:
        raise ValueError("dtypes differ between the models:\n" + "\n".join(problems))
    bad = [
        f"  {what}: {p}"
        for what, flat in (("anchor_params", a), ("params", b))
        for p in _non_finite(flat)
    ]
    if bad:
        raise ValueError("non-finite values (NaN or Inf) in:\n" + "\n".join(bad))
    # Solve in float32 whatever the storage dtype (bfloat16 sums would lose the alignment).
    return _float32(a), _float32(b)


def _non_finite(flat):
    """The paths of the leaves of ``flat`` with a NaN or an Inf. Screened by their sums (NaN
    or Inf propagate; 6x faster than ``all(isfinite)`` on CPU, a reduction of bools), and any
    leaf the screen flags checked exactly (a sum of finite values may overflow)."""
    sums = np.asarray(_finite_sums(flat)) if flat else []
    flagged = [p for p, ok in zip(sorted(flat), sums, strict=True) if not ok]
    return [p for p in flagged if not bool(jnp.isfinite(flat[p]).all())]


@jax.jit
def _finite_sums(flat):
    return jnp.stack([jnp.isfinite(jnp.sum(flat[p])) for p in sorted(flat)])


def _float32(flat):
    return {p: x if x.dtype == jnp.float32 else x.astype(jnp.float32) for p, x in flat.items()}


def _layer_masks(spec, names, layers):
    """For stacked groups and a layer subset: bool[L] of the layers to solve."""
    if layers is None:
        return {}
    masks = {}
    for n in names:
        g = spec.groups[n]
        if g.layer is None and g.batch:
            masks[n] = jnp.asarray([i in layers for i in range(g.batch[0])])
    return masks


def _masked(t_old, new, masks):
    out = dict(t_old)
    for n, v in new.items():
        m = masks.get(n)
        if m is not None:
            v = jnp.where(m.reshape(m.shape + (1,) * (v.ndim - 1)), v, t_old[n])
        out[n] = v
    return out


# ---------------------------------------------------------------------------------------------
# Objective.


def _sub(t, names):
    """The part of transform ``t`` to apply: the groups in ``names`` (the rest is identity)."""
    return {n: t[n] for n in sorted(names)}


def _el(spec, t, name):
    """``t[name]``, or the identity element when ``t`` leaves the group out."""
    return t[name] if name in t else sym.identity_element(spec.groups[name])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _distances_jit(spec, paths, keep, a, b, t):
    new = {p: sym.apply_to_leaf(spec, p, b[p], t) for p in paths}
    d = [jnp.sum((a[p] - new[p]) ** 2) for p in paths]
    return (jnp.stack(d) if d else jnp.zeros((0,))), (new if keep else None)


def _distances(spec, paths, a, b, t, keep=False):
    """``‖A_p - (t·B)_p‖²`` for every path, in one program and one transfer; with ``keep``,
    also the transformed leaves ``(t·B)_p`` (float32)."""
    d, new = _distances_jit(spec, paths, keep, a, b, t)
    return dict(zip(paths, np.asarray(d).tolist(), strict=True)), new


def _total(spec, paths, a, b, t) -> float:
    return float(np.sum(_distances_jit(spec, paths, False, a, b, t)[0]))


def _replaced(params, new):
    """``params`` with the leaves at the paths of ``new`` replaced, cast to their dtypes."""
    all_paths, leaves, treedef = sym.flatten(params)
    out = [
        new[p].astype(x.dtype) if p in new else x for p, x in zip(all_paths, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Block stages: each takes and returns a complete transform.


def _moved(x, axes, k):
    """Move ``axes`` to positions k, k+1, ... and flatten the rest (after them) into one axis."""
    x = jnp.moveaxis(x, axes, tuple(range(k, k + len(axes))))
    return x.reshape((*x.shape[: k + len(axes)], -1))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _perm_costs(spec, names, exclusive, a, b, t):
    """``C[..., i, j] = Σ_p ⟨A_p[i], (g·B)_p[j]⟩`` per permutation group, the group itself left
    out of g; ``exclusive`` keeps only params on which no other group acts."""
    out = {}
    for n in names:
        g = spec.groups[n]
        k = len(g.batch)
        cost = jnp.zeros((*g.batch, g.size, g.size), jnp.float32)
        for path, act in spec.users[n]:
            if exclusive and len(spec.params[path].actions) > 1:
                continue
            bp = sym.apply_to_leaf(spec, path, b[path], t, skip=frozenset([n]))
            am, bm = _moved(a[path], act.axes, k), _moved(bp, act.axes, k)
            cost = cost + jnp.einsum("...ir,...jr->...ij", am, bm)
        out[n] = cost
    return out


def _perm_stage(t, *, spec, a, b, solver, masks, paths, active, names, exclusive=False):
    del paths
    costs = _perm_costs(spec, names, exclusive, a, b, _sub(t, active))
    return _masked(t, assign_all(costs, solver=solver), masks)


def _action_of(spec, path, kind, among=None):
    """The action of a ``kind`` group (``"orth"``, ``"scale"``, ...) on ``path``, if any;
    with ``among``, only groups in it count."""
    return next(
        (
            x
            for x in spec.params[path].actions
            if spec.groups[x.group].kind == kind and (among is None or x.group in among)
        ),
        None,
    )


def _scale_weight(spec, path, t, shape, among=None):
    """``(scale action or None, a[h]^±1)``: the factor the head's current scale puts on
    ``path`` (ones of ``shape`` when no scale acts on it)."""
    scl = _action_of(spec, path, "scale", among)
    if scl is None:
        return None, jnp.ones(shape, jnp.float32)
    return scl, _el(spec, t, scl.group) ** scl.power


def _head_terms(spec, hname, a, b, t):
    """For the params of head group ``hname``: (rotation group or None, scale weight a[h]^±1,
    A and B with head axis (and dim axis) moved to the front, rest flattened)."""
    g = spec.groups[hname]
    k = len(g.batch)
    skip = frozenset(n for n, o in spec.group_items if n == hname or o.over == hname)
    for path, act in spec.users[hname]:
        rot = _action_of(spec, path, "orth", skip)
        _, w = _scale_weight(spec, path, t, g.shape, skip)
        axes = rot.axes if rot is not None else act.axes
        bp = sym.apply_to_leaf(spec, path, b[path], t, skip=skip)
        am, bm = _moved(a[path], axes, k), _moved(bp, axes, k)
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
            m = jnp.einsum("...jir,...hkr->...hjik", bm, am) * w[..., :, None, None, None]
            ms[rot] = ms.get(rot, 0.0) + m
            nb = jnp.sum(bm * bm, axis=(-1, -2))
            score = score - 0.5 * (w * w)[..., :, None] * nb[..., None, :]
        for rot, m in ms.items():
            if rot in rots:
                score = score + procrustes(m)[1]
            elif rot is None:
                score = score + jnp.trace(m, axis1=-1, axis2=-2)
            else:  # fixed rotation R[h]: ⟨R[h], M[h, j]⟩
                score = score + jnp.einsum("...hik,...hjik->...hj", _el(spec, t, rot), m)
        out[hname] = score
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rotations(spec, rots, scales, a, b, t):
    """Procrustes for every rotation group in ``rots`` given the head permutations and scales
    in ``t``, in one batched polar decomposition over all groups, layers and heads; then the
    best scales of the groups in ``scales`` given those rotations, from the same
    cross-covariances: ``⟨A_p, B_p R⟩ = tr(Rᵀ M_p)`` and ``‖B_p R‖ = ‖B_p‖``, so no second
    pass over the weights. Every param of a group in ``scales`` must carry a rotation in
    ``rots`` (see `_merges_scales`). The cross-covariances are computed one layer at a time
    (`_one_at_a_time`; all the groups of a layer together, so that its matmuls can run in
    parallel). On accelerators the loop runs the layers in sequence, each still batched over
    heads."""
    keys, by_layer = {}, {}  # r -> its scale keys; layer -> [((r, i), its cross-covariances)]
    for r in rots:
        g = spec.groups[r]
        terms = []
        for path, act in spec.users[r]:
            # B with everything but this rotation and its head's scale applied (so B's head
            # π[h] already sits at h); the scale enters as the weight a[h]^±1.
            scl, w = _scale_weight(spec, path, t, g.shape[:-2])
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
    for us, outs in zip(by_layer.values(), _one_at_a_time(layer_fns), strict=True):
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
    shapes = [ms[r].shape for r in rots]
    stacked = jnp.concatenate(
        [ms[r].reshape(-1, *s[-2:]) for r, s in zip(rots, shapes, strict=True)]
    )
    rs = procrustes(stacked)[0]
    sizes = np.cumsum([math.prod(s[:-2]) for s in shapes])[:-1]
    out = {r: x.reshape(s) for r, x, s in zip(rots, jnp.split(rs, sizes), shapes, strict=True)}
    if scales:  # one solve for all heads of all scale groups
        dot = lambda key: sum(jnp.einsum("...ik,...ik->...", out[r], mk) for r, mk in covs[key])
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
        am, bm = _moved(ap, axes, k), _moved(bp, axes, k)
        m = jnp.einsum("...hir,...hkr->...hik", bm, am)
        m_all = m_all + m * w[..., None, None]
        if key is not None:
            mk, nb = per_scale[key]
            per_scale[key] = (mk + m, nb + jnp.sum(bm * bm, axis=(-2, -1)))
    return m_all, [per_scale[key] for key in keys]


def _one_at_a_time(fns):
    """``[f() for f in fns]``, evaluated one after the other in a loop (per group of ``fns``
    with the same output shapes) rather than as independent ops. Their temporaries (the
    head-major copies of the kernels that the per-head matmuls need) then share one buffer:
    on CPU, XLA otherwise allocates them all at once, fresh pages every call, and the page
    faults cost more than the copies (BERT-base: 170 MB of them, 0.11 s -> 14 MB, 0.06 s)."""
    groups: dict[Any, tuple[Any, list[int]]] = {}  # output shapes -> (them, indices)
    for i, f in enumerate(fns):
        shape = jax.eval_shape(f)
        key = (jax.tree.structure(shape), tuple(jax.tree.leaves(shape)))
        groups.setdefault(key, (shape, []))[1].append(i)
    out: list[Any] = [None] * len(fns)
    for shape, idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = fns[idx[0]]()
            continue
        res = _looped([fns[i] for i in idx], shape)
        for j, i in enumerate(idx):
            out[i] = jax.tree.map(lambda x, j=j: x[j], res)
    return out


def _looped(fns, shape):
    """The outputs of ``fns`` (all of output shapes ``shape``) stacked, computed in a loop."""
    init = jax.tree.map(lambda s: jnp.zeros((len(fns), *s.shape), s.dtype), shape)
    body = lambda j, acc: jax.tree.map(lambda x, y: x.at[j].set(y), acc, jax.lax.switch(j, fns))
    return jax.lax.fori_loop(0, len(fns), body, init)


def _merges_scales(spec, rots, scales):
    """Whether every param of every group in ``scales`` also carries a rotation of ``rots``,
    so that `_rotations` can solve the scales from its cross-covariances."""
    return all(
        any(x.group in rots for x in spec.params[path].actions)
        for n in scales
        for path, _ in spec.users[n]
    )


def _attention_stage(t, *, spec, a, b, solver, masks, paths, active, heads, rots, scales=()):
    """Heads, rotations and (when `_merges_scales`) scales. Candidate head permutations come
    from the exact score above (given the current scales) and from the invariant score of
    `_head_invariants`; each is completed by the Procrustes rotations and then the scales,
    and the best of them and of the current π is kept, so the objective never increases."""
    sub = lambda t: _sub(t, active | set(heads))  # the head permutations as they stand
    complete = lambda c: _masked(c, _rotations(spec, rots, scales, a, b, sub(c)), masks)
    if not heads:
        return complete(t) if rots else t
    candidates = [t]
    scores = _head_scores(spec, heads, rots, a, b, _sub(t, active))
    for s in (scores, _head_invariants(spec, heads, a, b)):
        candidates.append(_masked(t, assign_all(s, solver=solver), masks))
    if rots:
        candidates = [complete(c) for c in candidates]
    solved = active | set(heads + rots + scales)
    return min(candidates, key=lambda c: _total(spec, paths, a, b, _sub(c, solved)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _head_invariants(spec, heads, a, b):
    """``⟨S^A_h, S^B_j⟩`` for the bilinear forms ``S_h = W_Q[h] W_K[h]ᵀ`` and ``W_V[h] W_O[h]``
    (biases as an extra input row), which no rotation or rescaling of the head changes: for a
    planted head permutation the identity pairing maximises it (Cauchy-Schwarz), whatever the
    rotations and scales. Computed as ``⟨A_Qᵀ B_Q, A_Kᵀ B_K⟩`` from d x d cross-covariances."""
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
                scl = _action_of(spec, path, "scale")
                power = 1 if scl is None else scl.power
                am, bm = _moved(a[path], act.axes, k), _moved(b[path], act.axes, k)
                m = jnp.einsum("...hir,...jkr->...hjik", am, bm)
                sides[power] = sides.get(power, 0.0) + m
            if len(sides) == 2:
                score = score + jnp.einsum("...hjik,...hjik->...hj", sides[1], sides[-1])
        out[hname] = score
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
            am, bm = _moved(a[path], act.axes, k), _moved(bp, act.axes, k)
            coef[act.power][0] = coef[act.power][0] + jnp.sum(bm * bm, -1)
            coef[act.power][1] = coef[act.power][1] + jnp.sum(am * bm, -1)
        (c1, b1), (c2, b2) = coef[1], coef[-1]
        zeros = jnp.zeros(g.shape, jnp.float32)
        out[n] = best_scale(c1 + zeros, b1 + zeros, b2 + zeros, c2 + zeros)
    return out


def _scale_stage(t, *, spec, a, b, solver, masks, paths, active, names):
    del solver, paths
    return _masked(t, _scales(spec, names, a, b, _sub(t, active)), masks)
