"""Going between the unscanned (``layer_i``) and scanned (``layers``) params layouts."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_LAYER = re.compile(r"layer_(\d+)")
_STACKED = "layers"


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Stack ``layer_0 ... layer_{L-1}`` into one ``layers`` subtree with a leading layer axis.

    Turns the params of a model with ``scan_layers=False`` into those of the same model with
    ``scan_layers=True`` (``encoder/layer_i/.../kernel (D, F)`` ->
    ``encoder/layers/.../kernel (L, D, F)``); change the config with
    ``dataclasses.replace(config, scan_layers=True)``. Works under `jax.jit`; numpy leaves stay
    numpy (no XLA program is compiled), jax leaves give jax arrays.

    Args:
      params: A nested dict of arrays. Every dict holding ``layer_i`` keys must hold all of
        ``layer_0 ... layer_{L-1}``, each with the same structure and shapes.

    Returns:
      A new nested dict (the input is not modified).

    Raises:
      ValueError: Layer indices not contiguous from 0, two keys of one index (``layer_1``,
        ``layer_01``), a ``layers`` key beside ``layer_i`` keys, or layers of different
        structure or shapes (naming the offending path).
    """
    return _stack(params, "")


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Split every ``layers`` subtree along its leading axis into ``layer_0 ... layer_{L-1}``.

    The inverse of `stack_layers`: turns the params of a model with ``scan_layers=True`` into
    those of the same model with ``scan_layers=False``.

    Args:
      params: A nested dict of arrays; each ``layers`` subtree's leaves share their leading
        axis size L.

    Returns:
      A new nested dict (the input is not modified).

    Raises:
      ValueError: If leaves of one ``layers`` subtree disagree on L (naming the path).
    """
    return _unstack(params, "")


def _stack(tree: Any, where: str) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    found = [(int(m.group(1)), k) for k in tree if (m := _LAYER.fullmatch(str(k)))]
    layers = dict(found)
    if len(layers) < len(found):  # layer_1 and layer_01: the last one stood for both
        count = Counter(i for i, _ in found)
        clash = sorted(str(k) for i, k in found if count[i] > 1)
        raise ValueError(f"{where or '/'}: {clash} name the same layer")
    out = {k: _stack(v, f"{where}{k}/") for k, v in tree.items() if k not in layers.values()}
    if not layers:
        return out
    if _STACKED in tree:
        raise ValueError(f"{where or '/'} has both {_STACKED!r} and layer_i keys")
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"{where or '/'}: layer indices {sorted(layers)} are not 0..L-1")
    subtrees = [_stack(tree[layers[i]], f"{where}{layers[i]}/") for i in range(len(layers))]
    first = jax.tree.structure(subtrees[0])
    for i, t in enumerate(subtrees):
        if jax.tree.structure(t) != first:
            raise ValueError(f"{where}layer_{i} differs in structure from {where}layer_0")

    def stack(*xs):
        shapes = {np.shape(x) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"layers under {where or '/'} differ in shape: {sorted(shapes)}")
        if any(isinstance(x, jax.Array) for x in xs):
            return jnp.stack(xs)
        return np.stack(xs)

    out[_STACKED] = jax.tree.map(stack, *subtrees)
    return out


def _unstack(tree: Any, where: str) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    out = {k: _unstack(v, f"{where}{k}/") for k, v in tree.items() if k != _STACKED}
    if _STACKED not in tree:
        return out
    stacked = tree[_STACKED]
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{where}{_STACKED}: leaves disagree on the layer axis: {sizes}")
    (n,) = sizes
    for i in range(n):
        name = f"layer_{i}"
        if name in out:
            raise ValueError(f"{where or '/'} has both {_STACKED!r} and {name!r}")
        out[name] = _unstack(jax.tree.map(lambda x, i=i: x[i], stacked), f"{where}{name}/")
    return out
