"""Params pytrees <-> ``"/"`` paths: the addressing that specs, statistics and checkpoints share.

A leaf's path joins its keys with ``"/"``: ``"encoder/layer_0/attention/query/kernel"``. Works on
any pytree of dicts (Linen ``params``, ``FrozenDict``, Flax NNX pure dicts, stacked layers).
Leaf helpers every transform and merge shares: `placed_like` (keep a leaf's sharding, if it is
`committed`) and `wide` (compute in at least float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


def traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` (params, a number, a sequence of them) is a JAX tracer:
    values unknown while `jax.jit`, `jax.grad` or `jax.vmap` trace."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def flatten(params: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)`` of any params pytree, leaves in ``jax.tree`` order."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    path = lambda kp: jax.tree_util.keystr(kp, simple=True, separator="/")
    paths = [path(kp) for kp, _ in leaves_with_paths]
    return paths, [leaf for _, leaf in leaves_with_paths], treedef


def to_dict(params: Any) -> dict[str, Any]:
    """``{path: leaf}`` of a params pytree (the leaves themselves, not copies).

    Raises:
      ValueError: two leaves of one path (a key holding "/": ``{"a/b": x, "a": {"b": y}}``;
        the second overwrote the first, unseen by every check that reads the dict).
    """
    paths, leaves, _ = flatten(params)
    flat = dict(zip(paths, leaves, strict=True))
    if len(flat) < len(paths):
        shared = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"leaves share the paths {shared} (a key holding '/')")
    return flat


def from_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict whose `to_dict` is ``flat`` (the inverse of `to_dict` for nested dicts).

    Raises:
      ValueError: a path that is also the prefix of another (a leaf cannot hold children).
    """
    out: dict[str, Any] = {}
    made = {id(out)}  # the subtrees built here: a leaf that is a dict is a leaf (not written to)
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for i, p in enumerate(parents):
            if p not in node:
                node[p] = {}
                made.add(id(node[p]))
            node = node[p]
            if id(node) not in made:
                raise ValueError(f"{'/'.join(parents[: i + 1])} is both a leaf and a subtree")
        if name in node:
            raise ValueError(f"{path} is both a leaf and a subtree")
        node[name] = leaf
    return out


def concrete(x: Any) -> bool:
    """Whether ``x`` is a jax array with values (not a tracer inside a transformation)."""
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def committed(x: Any) -> bool:
    """Whether ``x`` is a concrete jax array committed to devices (a user's sharded or
    device-pinned parameter, which computations must not move)."""
    return concrete(x) and x.committed


def placed_like(new: Any, old: Any) -> Any:
    """``new`` on ``old``'s sharding when ``old`` is `committed`; otherwise ``new`` as it is.
    Gathers and contractions let XLA choose their outputs' layout (often replicated): the
    transforms of a pytree put each result back where its input was, so a sharded model
    stays sharded."""
    if committed(old) and concrete(new) and new.sharding != old.sharding:
        return jax.device_put(new, old.sharding)
    return new


def averaged(x: Any) -> bool:
    """Whether a merge averages leaf ``x``: a floating (or complex) dtype. Integer and boolean
    leaves (counters, ids, flags) have no mean: merges keep them, equal in every model."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def wide(x: Any) -> jax.Array:
    """``x`` as a jax array in at least float32: bfloat16 models' statistics, merges and
    metrics are computed in float32, float64 ones (with ``jax_enable_x64``) in float64."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
