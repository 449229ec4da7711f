"""Transforms: elements of a spec's symmetry group, as plain dicts ``group name -> array``.

A transform may name any subset of the spec's groups; a missing group is the identity. `apply`
is pure and jittable (the spec is static); `identity`, `sample`, `invert` and `compose` return
complete transforms (every group of the spec).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax._keys import check_key
from rotjax.symmetry._canonical import norm_at
from rotjax.symmetry._spec import Action, Group, Spec, check_dtypes, check_spec, validate
from rotjax.tree import committed, flatten, placed_like, traced

Transform = dict[str, jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST
_ORDER = {"perm": 0, "hperm": 1, "orth": 1, "rot": 1, "scale": 2}


def identity(spec: Spec) -> Transform:
    """The identity element: arange permutations, identity matrices, unit scales (built in
    one compiled program: op by op, the many small arrays of a big spec take ~40 ms)."""
    check_spec(spec)  # (a forgotten spec was JAX's "Non-hashable static arguments")
    return _identity(spec)


@functools.partial(jax.jit, static_argnums=0)
def _identity(spec: Spec) -> Transform:
    return {name: identity_element(g) for name, g in spec.group_items}


def identity_element(g: Group) -> jax.Array:
    """The identity element of one group."""
    if g.kind in ("perm", "hperm"):
        return jnp.broadcast_to(jnp.arange(g.shape[-1], dtype=jnp.int32), g.shape)
    if g.kind in ("orth", "rot"):
        return jnp.broadcast_to(jnp.eye(g.shape[-1], dtype=jnp.float32), g.shape)
    return jnp.ones(g.shape, jnp.float32)


def ones_complement(n: int, dtype: Any = jnp.float32) -> jax.Array:
    """``U (n, n-1)``: an orthonormal basis of the complement of the all-ones vector (the
    normalised Helmert contrasts), so that ``Q = U R Uᵀ + 11ᵀ/n`` is orthogonal with
    ``Q 1 = 1`` for every orthogonal ``R``, and every such Q is of that form. Computed in
    float64, rounded once to ``dtype``."""
    k = np.arange(1, n)
    u = np.zeros((n, n - 1))
    for j in k:  # column j: j entries 1/sqrt(j(j+1)), then -j/sqrt(j(j+1)), then zeros
        u[:j, j - 1] = 1.0 / np.sqrt(j * (j + 1))
        u[j, j - 1] = -j / np.sqrt(j * (j + 1))
    return jnp.asarray(u, dtype)


def pair_rotations(cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``R (..., d, d)`` rotating each pair of features (i, i + d/2) by the angle whose
    cosine and sine are ``cos[..., i]``, ``sin[..., i]`` (arrays of shape ``(..., d/2)``):
    the elements of an ``orth`` group with ``pairs``."""
    eye = jnp.eye(jnp.shape(cos)[-1], dtype=jnp.result_type(cos, sin))
    c, s = (jnp.einsum("...i,ij->...ij", x, eye, precision=_HIGHEST) for x in (cos, sin))
    top, bottom = jnp.concatenate([c, s], axis=-1), jnp.concatenate([-s, c], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)


def sample(spec: Spec, key: jax.Array, *, log_scale_std: float = 0.5) -> Transform:
    """A random group element.

    Permutations are uniform; rotations are Haar-distributed on O(d) (reflections included),
    those that keep the all-ones vector on the O(n-1) of its complement, pair rotations have
    uniform angles; scales are log-normal, ``a = exp(log_scale_std * N(0, 1))``.
    """
    check_spec(spec)  # (a forgotten spec was an AttributeError)
    check_key(key)
    if isinstance(log_scale_std, bool) or not np.isfinite(log_scale_std) or log_scale_std < 0:
        raise ValueError(f"log_scale_std must be a finite number >= 0, got {log_scale_std!r}")
    # Op by op, not jitted: one XLA:CPU program with 12 or more QR factorisations (MiniLM's
    # 12 jax.random.orthogonal) never finished (jax 0.10.2, 2026-12-03).
    keys = jax.random.split(key, max(len(spec.group_items), 1))
    out = {}
    for k, (name, g) in zip(keys, spec.group_items, strict=False):
        if g.kind in ("perm", "hperm"):
            u = jax.random.uniform(k, g.shape)
            out[name] = jnp.argsort(u, axis=-1).astype(jnp.int32)
        elif g.kind == "orth" and g.pairs:
            theta = jax.random.uniform(k, (*g.batch, g.size, g.dim // 2), maxval=2 * jnp.pi)
            out[name] = pair_rotations(jnp.cos(theta), jnp.sin(theta))
        elif g.kind == "orth":
            out[name] = jax.random.orthogonal(k, g.dim, shape=(*g.batch, g.size))
        elif g.kind == "rot" and g.keeps_ones:
            r = jax.random.orthogonal(k, g.size - 1, shape=g.batch)
            u = ones_complement(g.size, r.dtype)  # float64 under x64, as r
            ones = jnp.full((g.size, g.size), 1.0 / g.size, r.dtype)
            out[name] = (
                jnp.matmul(jnp.matmul(u, r, precision=_HIGHEST), u.T, precision=_HIGHEST) + ones
            )
        elif g.kind == "rot":
            out[name] = jax.random.orthogonal(k, g.size, shape=g.batch)
        else:
            out[name] = jnp.exp(log_scale_std * jax.random.normal(k, g.shape))
    return out


def apply(
    spec: Spec, params: Any, transform: Mapping[str, jax.Array], *, check_form: bool = True
) -> Any:
    """Act on ``params`` with ``transform``; returns a new pytree of the same structure.

    With π a permutation, R[h] the orthogonal matrix and a[h] the scale of head h, every
    parameter ``W`` is changed, axis by axis, by the groups acting on it:

    - ``perm`` on axis k: ``W'[..., i, ...] = W[..., π[i], ...]`` (a gather along k);
    - ``hperm`` on (head axis, item axis): ``W'[.., h, .., i, ..] = W[.., h, .., σ[h, i], ..]``,
      e.g. ``W_Q'[:, k, g] = W_Q[:, k, σ[k, g]]`` and ``W_O'[k, g] = W_O[k, σ[k, g]]`` for the
      query heads g of key-value head k;
    - ``orth`` on (head axis, dim axis): ``W'[.., h, .., j, ..] = Σ_i W[.., h, .., i, ..] R[h]_ij``,
      i.e. ``W_Q[:, h] R[h]`` for query/key/value kernels and ``R[h]ᵀ W_O[h]`` for the
      output kernel (whose d axis comes first);
    - ``rot`` on one axis: ``W'[.., j, ..] = Σ_i W[.., i, ..] Q_ij``: the stream ``x`` becomes
      ``x Q``; its writers ``W_out Q``, its readers ``Qᵀ W_in`` (both: contract with Q's first
      index);
    - ``scale`` on the head axis: ``W'[.., h, ..] = a[h]^power W[.., h, ..]``.

    Permutations act first, then per-head permutations and rotations, then scales, so for a
    head permutation π of the same axis: ``W_Q'[:, h] = a[h] W_Q[:, π[h]] R[h]`` and
    ``W_Q'[:, k, g] = W_Q[:, π[k], σ[k, g]]``. Batched (stacked-layer) groups act
    layer by layer on the leading axes (permutations through `jax.vmap`, rotations as batch
    dimensions of one contraction, scales by broadcasting). Floating-point work runs at
    ``Precision.HIGHEST`` in the promoted dtype; every leaf keeps its dtype and, if it is
    committed to devices (sharded), its sharding. ``check_form=False`` skips the check
    below, for pytrees keyed like a model's params that are not a model (its statistics).

    Raises:
      ValueError: the params do not fit the spec (`validate`), the transform names an
        unknown group or has a wrongly shaped element, it would rotate or rescale an integer
        or boolean leaf (`check_dtypes`), or it rotates the residual stream (other than by the
        identity) of a model not in canonical form (`check_stream_form`; where the values
        are known: not under `jax.jit`).
    """
    validate(spec, params)
    elements = check_transform(spec, transform)
    check_dtypes(spec, params, transform)
    paths, leaves, treedef = flatten(params)
    for name in moved_streams(spec, elements) if check_form else ():
        check_stream_form(spec, name, dict(zip(paths, leaves, strict=True)), "params")
    moved = [
        i for i, p in enumerate(paths) if any(a.group in transform for a in spec.params[p].actions)
    ]
    places = tuple(_named_sharding(leaves[i]) for i in moved)
    new = _apply_leaves(
        spec, tuple(paths[i] for i in moved), places, [leaves[i] for i in moved], elements
    )
    out = list(leaves)  # the leaves no group in the transform acts on: as they are
    for i, y in zip(moved, new, strict=True):
        out[i] = placed_like(y, leaves[i])
    return jax.tree_util.tree_unflatten(treedef, out)


def moved_streams(spec: Spec, elements: Mapping[str, Any]) -> list[str]:
    """The stream rotation groups that ``elements`` moves: known (not traced) and not the
    identity (an identity rotation, as in any complete transform, acts on nothing)."""
    with jax.ensure_compile_time_eval():  # known values, also while a jit traces
        return [
            n
            for n, x in elements.items()
            if spec.groups[n].role == "stream_rotation"
            and not traced(x)
            and not bool(jnp.all(jnp.asarray(x) == identity_element(spec.groups[n])))
        ]


def check_stream_form(spec: Spec, name: str, flat: Mapping[str, Any], what: str) -> None:
    """ValueError unless the model (``flat``: path -> leaf, named ``what``) is one that the
    stream rotation group ``name`` moves without changing its function: every norm at
    γ = 1, β = 0 (`rotjax.symmetry.canonicalize`; to a few ulps, `norm_at`), naming the
    first that is not. The norms are the params the stream's permutation group acts on and
    its rotation does not. Traced values (under `jax.jit`) are not checked."""
    rotated = {path for path, _ in spec.users[name]}
    norms = [p for p, _ in spec.users[spec.groups[name].over] if p not in rotated]
    for path in norms:
        x, want = flat[path], 1 if path.endswith("scale") else 0
        if not traced(x) and not norm_at(x, want):
            raise ValueError(
                f"{what}: the stream rotation is a symmetry of canonical forms only (every "
                f"norm at scale 1, bias 0: rotjax.symmetry.canonicalize); {path} "
                f"{tuple(x.shape)} is not {want}"
            )


def _named_sharding(x: Any) -> jax.sharding.NamedSharding | None:
    """A committed leaf's sharding over a mesh, else None (one device or none chosen)."""
    if not committed(x):
        return None  # (a traced leaf: its program's caller decides)
    return x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one program, however it is called
def _apply_leaves(spec: Spec, paths: tuple[str, ...], places, leaves, transform) -> list[jax.Array]:
    """The moved leaves, each computed in its input's mesh sharding (``places``; XLA would
    often compute a gathered leaf whole on every device)."""
    out = []
    for p, place, x in zip(paths, places, leaves, strict=True):
        y = apply_to_leaf(spec, p, x, transform)
        out.append(y if place is None else jax.lax.with_sharding_constraint(y, place))
    return out


def apply_to_leaf(
    spec: Spec,
    path: str,
    leaf: jax.Array,
    transform: Mapping[str, jax.Array],
    *,
    skip: frozenset[str] = frozenset(),
) -> jax.Array:
    """`apply` for the one parameter at ``path``, leaving out the groups in ``skip``: every
    group's action in the promoted dtype, rounded to the leaf's dtype once, at the end (a
    bfloat16 kernel rotated then rescaled, rounded after each, came out a third less
    accurate, and unlike `rotjax.match.align`'s)."""
    acts = [a for a in spec.params[path].actions if a.group in transform and a.group not in skip]
    out = leaf = jnp.asarray(leaf)
    for a in sorted(acts, key=lambda a: _ORDER[spec.groups[a.group].kind]):
        out = _act(spec.groups[a.group], a, out, transform[a.group])
    return out.astype(leaf.dtype)


def _act(g: Group, a: Action, x: jax.Array, el: jax.Array) -> jax.Array:
    k = len(g.batch)
    if g.kind == "perm":
        take = lambda x, p: jnp.take(x, p, axis=a.axes[0] - k)
        for _ in range(k):
            take = jax.vmap(take)
        return take(x, el)
    if g.kind == "hperm":  # head h's items gathered by σ[h], batched over k axes
        head, item = a.axes[0] - k, a.axes[1] - k
        item = item - (item > head)  # once the head axis is mapped over
        take = lambda xh, s: jnp.take(xh, s, axis=item)
        take = jax.vmap(take, in_axes=(head, 0), out_axes=head)
        for _ in range(k):
            take = jax.vmap(take)
        return take(x, el)
    dtype = jnp.result_type(x.dtype, el.dtype)
    if g.kind == "rot":  # x[..i..] -> Σ_i x[..i..] Q[i, j] at i's place, batched over k axes
        ax = a.axes[0]
        batch = tuple(range(k))
        dims = (((ax,), (k,)), (batch, batch))
        y = jax.lax.dot_general(x.astype(dtype), el.astype(dtype), dims, precision=_HIGHEST)
        # y's axes: batch, x's other axes in order, j.
        order = [*batch, *(i for i in range(x.ndim) if i not in (*batch, ax)), ax]
        return jnp.transpose(y, np.argsort(order))
    if g.kind == "orth":  # x[..h..d..] -> Σ_d x[..h..d..] R[h, d, z] at d's place
        head, dim = a.axes
        batch = tuple(range(k))
        dims = (((dim,), (k + 1,)), ((*batch, head), (*batch, k)))
        y = jax.lax.dot_general(x.astype(dtype), el.astype(dtype), dims, precision=_HIGHEST)
        # y's axes: batch, head, x's other axes in order, z. (A batched dot_general and one
        # transpose: ~1.4x faster on CPU than the einsum's path for (hidden, heads, head_dim).)
        order = [*batch, head, *(i for i in range(x.ndim) if i not in (*batch, head, dim)), dim]
        return jnp.transpose(y, np.argsort(order))
    shape = [1] * x.ndim
    shape[:k] = g.batch
    shape[a.axes[0]] = g.size
    s = el.astype(dtype).reshape(shape) ** a.power
    return x.astype(dtype) * s


def check_transform(spec: Spec, transform: Mapping[str, jax.Array]) -> Transform:
    """Raise ValueError for an unknown group name, a wrongly shaped element, a complex one,
    a permutation that is not integer, or, where its values are known (not traced under
    `jax.jit`), not a permutation of ``0..n-1`` (`jnp.take` would fill an index out of range
    with NaN, and a repeated one would copy a unit: another function, silently), a rotation
    or scale with NaN or Inf, or a scale of 0. Rotations and scales are not checked to be
    orthogonal or positive here (`check_elements` does), as `apply` also serves their
    relaxations.

    Returns:
      The transform with every element a jax array (an element may be given as a list,
      which is no pytree leaf: jitted code needs the array).

    Raises:
      TypeError: ``spec`` is not a `Spec` or ``transform`` is not a mapping.
    """
    check_spec(spec)
    if not isinstance(transform, Mapping):
        raise TypeError(
            "a transform is a mapping of group names to elements (sym.identity(spec) for "
            f"none), got {type(transform).__name__}"
        )
    unknown = sorted(set(transform) - set(spec.groups))
    if unknown:
        raise ValueError(f"transform names groups that are not in the spec: {unknown}")
    for name, el in transform.items():
        g = spec.groups[name]
        if tuple(jnp.shape(el)) != g.shape:
            raise ValueError(
                f"transform[{name!r}] has shape {tuple(jnp.shape(el))}, expected {g.shape} "
                f"({g.kind} group)"
            )
        dtype = el.dtype if hasattr(el, "dtype") else np.asarray(el).dtype
        if g.kind in ("perm", "hperm") and not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"transform[{name!r}] has dtype {dtype}: a permutation is integer indices "
                f"({g.kind} group)"
            )
        if g.kind in ("perm", "hperm") and not traced(el):
            _check_permutation(name, g, el)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            # cast to the params' real dtype, its imaginary part was dropped, silently
            raise ValueError(
                f"transform[{name!r}] has dtype {dtype}: the {g.kind} group's elements are real"
            )
        if g.kind in ("orth", "rot", "scale") and not traced(el):
            _check_finite(name, g, el)
    return {n: jnp.asarray(e) for n, e in transform.items()}


def _check_finite(name: str, g: Group, el: Any) -> None:
    """NaN or Inf in a rotation or scale, or a scale of 0 (the params it divides, as ``W_O /
    a``, would be Inf): every param it acts on would be NaN or Inf, silently."""
    x = np.asarray(el)
    if not np.isfinite(x).all():
        raise ValueError(f"transform[{name!r}] holds NaN or Inf ({g.kind} group)")
    if g.kind == "scale" and (x == 0).any():
        raise ValueError(
            f"transform[{name!r}] holds a scale of 0: the params it divides would be Inf "
            "(scale group)"
        )


def _check_permutation(name: str, g: Group, el: Any) -> None:
    x = np.asarray(el)
    if not (np.sort(x, axis=-1) == np.arange(x.shape[-1])).all():
        what = "a permutation of 0..n-1" + " per head" * (g.kind == "hperm")
        raise ValueError(f"transform[{name!r}] is not {what} ({g.kind} group)")


def check_elements(spec: Spec, transform: Mapping[str, jax.Array], *, atol: float = 1e-4) -> None:
    """Raise ValueError unless every element is one of its group (and `check_transform`):
    permutations of ``0..n-1``, orthogonal matrices (``‖R Rᵀ - I‖ <= atol``, and ``Q 1 = 1``
    where the group keeps the ones), finite positive scales."""
    check_transform(spec, transform)
    for name, el in transform.items():
        g = spec.groups[name]
        if g.kind in ("perm", "hperm"):  # checked by check_transform
            continue
        x = np.asarray(el, np.float64)
        if g.kind in ("orth", "rot"):
            eye = np.eye(x.shape[-1])
            ok = np.abs(x @ np.swapaxes(x, -1, -2) - eye).max(initial=0.0) <= atol
            what = "orthogonal"
            if ok and g.keeps_ones:
                ok = np.abs(x @ np.ones(g.size) - 1.0).max(initial=0.0) <= atol
                what = "orthogonal with Q 1 = 1"
            if ok and g.pairs:
                h = g.dim // 2
                diag = lambda m: np.diagonal(m, axis1=-2, axis2=-1)
                c, s = diag(x[..., :h, :h]), diag(x[..., :h, h:])
                ok = np.abs(x - pair_rotations(c, s)).max(initial=0.0) <= atol
                what = "a rotation of each pair (i, i + d/2)"
        else:
            ok = (x > 0).all()  # (finite: `check_transform`)
            what = "finite and positive"
        if not ok:
            raise ValueError(f"transform[{name!r}] is not {what} ({g.kind} group)")


def _full(spec: Spec, t: Mapping[str, jax.Array]) -> Transform:
    t = check_transform(spec, t)
    return {name: t[name] if name in t else identity_element(g) for name, g in spec.group_items}


def _gather_heads(x: jax.Array, perm: jax.Array, trailing: int) -> jax.Array:
    """``x[..., perm[h], <trailing axes>]`` batched over the leading axes."""
    idx = perm.reshape(perm.shape + (1,) * trailing)
    return jnp.take_along_axis(x, idx, axis=perm.ndim - 1)


def _gather_both(q: jax.Array, perm: jax.Array) -> jax.Array:
    """``q[..., perm[a], perm[b]]``: rows and columns gathered, batched over leading axes."""
    rows = _gather_heads(q, perm, 1)
    return jnp.take_along_axis(rows, perm[..., None, :], axis=-1)


def compose(spec: Spec, first: Mapping[str, jax.Array], second: Mapping[str, jax.Array]):
    """The transform equal to applying ``first``, then ``second``.

    ``apply(spec, apply(spec, p, first), second) == apply(spec, p, compose(spec, first,
    second))``. With π the permutation acting on the same axis:
    ``π = π1[π2]``, ``σ[h] = σ1[π2[h]][σ2[h]]``, ``R[h] = R1[π2[h]] R2[h]``,
    ``a[h] = a1[π2[h]] a2[h]``, and for a ``rot``
    ``Q = Q1[π2][:, π2] Q2`` (``P1 Q1 P2 Q2 = P1 P2 (P2ᵀ Q1 P2) Q2``).
    """
    t1, t2 = _full(spec, first), _full(spec, second)
    out = {}
    for name, g in spec.group_items:
        if g.kind == "perm":
            out[name] = jnp.take_along_axis(t1[name], t2[name], axis=-1)
            continue
        p2 = t2[g.over] if g.over else identity_element(Group("perm", g.size, batch=g.batch))
        if g.kind == "hperm":
            out[name] = jnp.take_along_axis(_gather_heads(t1[name], p2, 1), t2[name], axis=-1)
        elif g.kind == "orth":
            out[name] = jnp.matmul(_gather_heads(t1[name], p2, 2), t2[name], precision=_HIGHEST)
        elif g.kind == "rot":  # (P1 Q1)(P2 Q2) = P1 P2 (P2ᵀ Q1 P2) Q2
            out[name] = jnp.matmul(_gather_both(t1[name], p2), t2[name], precision=_HIGHEST)
        else:
            out[name] = _gather_heads(t1[name], p2, 0) * t2[name]
    return out


def invert(spec: Spec, transform: Mapping[str, jax.Array]) -> Transform:
    """The inverse element: ``apply(spec, apply(spec, p, t), invert(spec, t)) == p``.

    ``π⁻¹ = argsort(π)``, ``σ⁻¹[h] = argsort(σ[π⁻¹[h]])``, ``R⁻¹[h] = R[π⁻¹[h]]ᵀ``,
    ``a⁻¹[h] = 1 / a[π⁻¹[h]]``, and for a ``rot`` ``Q⁻¹ = Qᵀ[π⁻¹][:, π⁻¹]``. For elements
    of the groups: a relaxed rotation (any matrix, which `apply` also takes) is transposed
    here, not inverted (`check_elements` tells them apart; `compose` takes any).
    """
    t = _full(spec, transform)
    inv_perm = {
        n: jnp.argsort(t[n], axis=-1).astype(jnp.int32)
        for n, g in spec.group_items
        if g.kind == "perm"
    }
    out = dict(inv_perm)
    for name, g in spec.group_items:
        if g.kind == "perm":
            continue
        p = inv_perm[g.over] if g.over else identity_element(Group("perm", g.size, batch=g.batch))
        if g.kind == "hperm":
            out[name] = jnp.argsort(_gather_heads(t[name], p, 1), axis=-1).astype(jnp.int32)
        elif g.kind == "orth":
            out[name] = jnp.swapaxes(_gather_heads(t[name], p, 2), -1, -2)
        elif g.kind == "rot":  # (P Q)⁻¹ = Qᵀ Pᵀ = Pᵀ (P Qᵀ Pᵀ)
            out[name] = _gather_both(jnp.swapaxes(t[name], -1, -2), p)
        else:
            out[name] = 1.0 / _gather_heads(t[name], p, 0)
    return out
