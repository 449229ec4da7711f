"""The objective ``J(g) = Σ_p ‖A_p - (g·B)_p‖²`` and what every block stage shares: the typed
`Context`, partial transforms, layer masks and the axis bookkeeping of the cross-covariances."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.tree import flatten, placed_like


class Context(NamedTuple):
    """What every block stage reads.

    Attributes:
      spec: the models' symmetry spec.
      a: the anchor's leaves by path (float32).
      b: the aligned model's leaves by path (float32), never transformed in place.
      solver: the assignment solver (``"scipy"`` or ``"optax"``).
      masks: for stacked groups and a layer subset, ``bool[L]`` of the layers to solve.
      paths: the params some solved group acts on (the others are constants of J).
    """

    spec: sym.Spec
    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    solver: str
    masks: dict[str, jax.Array]
    paths: tuple[str, ...]


def sub(t: dict, names) -> dict:
    """The part of transform ``t`` to apply: the groups in ``names`` (the rest is identity)."""
    return {n: t[n] for n in sorted(names)}


def el(spec: sym.Spec, t: dict, name: str) -> jax.Array:
    """``t[name]``, or the identity element when ``t`` leaves the group out."""
    return t[name] if name in t else sym.identity_element(spec.groups[name])


def moved(x: jax.Array, axes, k: int) -> jax.Array:
    """Move ``axes`` to positions k, k+1, ... and flatten the rest (after them) into one axis."""
    x = jnp.moveaxis(x, axes, tuple(range(k, k + len(axes))))
    return x.reshape((*x.shape[: k + len(axes)], -1))


def action_of(spec: sym.Spec, path: str, kind: str, among=None):
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


def scale_weight(spec: sym.Spec, path: str, t: dict, shape, among=None):
    """``(scale action or None, a[h]^±1)``: the factor the head's current scale puts on
    ``path`` (ones of ``shape`` when no scale acts on it)."""
    scl = action_of(spec, path, "scale", among)
    if scl is None:
        return None, jnp.ones(shape, jnp.float32)
    return scl, el(spec, t, scl.group) ** scl.power


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _distances_jit(spec, paths, keep, a, b, t):
    new = {p: sym.apply_to_leaf(spec, p, b[p], t) for p in paths}
    d = [jnp.sum((a[p] - new[p]) ** 2) for p in paths]
    return (jnp.stack(d) if d else jnp.zeros((0,))), (new if keep else None)


def distances(spec, paths, a, b, t, keep=False):
    """``‖A_p - (t·B)_p‖²`` for every path, in one program and one transfer; with ``keep``,
    also the transformed leaves ``(t·B)_p`` (float32)."""
    d, new = _distances_jit(spec, tuple(paths), keep, a, b, t)
    return dict(zip(paths, np.asarray(d).tolist(), strict=True)), new


def total(ctx: Context, t: dict) -> float:
    """J over the touched params at the (partial) transform ``t``."""
    return float(np.sum(_distances_jit(ctx.spec, ctx.paths, False, ctx.a, ctx.b, t)[0]))


def replaced(params: Any, new: dict) -> Any:
    """``params`` with the leaves at the paths of ``new`` replaced, cast to their dtypes and
    placed on their shardings (the stream's update let XLA choose: sharded query, key and
    value kernels came back in another layout)."""
    all_paths, leaves, treedef = flatten(params)
    out = [
        placed_like(new[p].astype(x.dtype), x) if p in new else x
        for p, x in zip(all_paths, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def layer_masks(spec: sym.Spec, names, layers) -> dict[str, jax.Array]:
    """For stacked groups and a layer subset: bool[L] of the layers to solve."""
    if layers is None:
        return {}
    masks = {}
    for n in names:
        g = spec.groups[n]
        if g.layer is None and g.batch:
            masks[n] = jnp.asarray([i in layers for i in range(g.batch[0])])
    return masks


def masked(t_old: dict, new: dict, masks: dict) -> dict:
    """``t_old`` updated with ``new``, except in the stacked layers that ``masks`` leaves out."""
    out = dict(t_old)
    for n, v in new.items():
        m = masks.get(n)
        if m is not None:
            v = jnp.where(m.reshape(m.shape + (1,) * (v.ndim - 1)), v, t_old[n])
        out[n] = v
    return out
