"""Params of a new model from a pretrained one: a task head on a pretrained encoder."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rotjax.tree import flatten


def with_pretrained(shapes: Any, pretrained: Any, key: jax.Array, *, std: float = 0.02) -> Any:
    """Params of structure ``shapes``: pretrained leaves where ``pretrained`` has the path,
    new ones elsewhere (a task head on a pretrained encoder).

    New kernels are drawn from ``normal(std)`` (each from ``fold_in(key, leaf index)``), new
    biases are zero, as transformers initialises a new head.

    Args:
      shapes: the target model's params or their ``jax.ShapeDtypeStruct`` (e.g.
        ``rotjax.models.family(config).param_shapes(config)``).
      pretrained: params of the pretrained model (a subset of the paths of ``shapes``).
      key: draws the new kernels.
      std: their standard deviation (the config's ``initializer_range``).

    Raises:
      ValueError: a pretrained leaf of another shape or not in ``shapes``, or a new leaf that
        is neither a kernel nor a bias (naming the path).
    """
    paths, leaves, treedef = flatten(shapes)
    source = dict(zip(*flatten(pretrained)[:2], strict=True))
    unexpected = sorted(set(source) - set(paths))
    if unexpected:
        raise ValueError(f"pretrained params not in the model: {unexpected}")
    out = []
    for i, (path, s) in enumerate(zip(paths, leaves, strict=True)):
        if path in source:
            value = jnp.asarray(source[path])
            if value.shape != s.shape:
                raise ValueError(f"{path}: pretrained shape {value.shape}, model {s.shape}")
            out.append(value.astype(s.dtype))
        elif path.endswith("/kernel"):
            out.append(std * jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype))
        elif path.endswith("/bias"):
            out.append(jnp.zeros(s.shape, s.dtype))
        else:
            raise ValueError(f"{path} is neither pretrained nor a kernel or bias to initialize")
    return jax.tree.unflatten(treedef, out)
