"""What the dense layers of a real Flax forward pass see, captured by method interception.

`capture` runs ``model.apply`` with an interceptor (`flax.linen.intercept_methods`) on every
``nn.Dense`` / ``nn.DenseGeneral`` call: the layer's input, flattened to rows of its contracted
features, goes through a function whose result is sown into the ``"stats"`` collection, keyed
by the layer's kernel path. The models' layer scan carries ``"stats"`` on its variable axis, so
the layers of a scanned model give stacked, per-layer results. Nothing here copies the model.
A layer's contracted features are read from its input's trailing axes (those of every
rotjax model's layers); a ``DenseGeneral`` over other axes, or with batch dims, is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rotjax.tree import to_dict, wide

STATS = "stats"
_FIELD = "rotjax_capture"


def dense_input_axes(module: nn.Module) -> int | None:
    """How many trailing input axes a dense layer contracts (None: not a dense layer)."""
    if isinstance(module, nn.Dense):
        return 1
    if isinstance(module, nn.DenseGeneral):
        return len(module.axis) if isinstance(module.axis, tuple | list) else 1  # Flax takes both
    return None


def _contracted(module: nn.Module, x: jax.Array) -> int | None:
    """`dense_input_axes` of a layer called on ``x``, which must be its trailing axes, in
    order (what rotjax's models contract): a ValueError names any other layer."""
    n_in = dense_input_axes(module)
    if n_in is None or not isinstance(module, nn.DenseGeneral):
        return n_in
    axes = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    ndim = jnp.ndim(x)
    if module.batch_dims or tuple(a % ndim for a in axes) != tuple(range(ndim - n_in, ndim)):
        raise ValueError(
            f"{kernel_path(module)}: a DenseGeneral contracting axes {module.axis} (batch_dims "
            f"{module.batch_dims}) of an input of shape {jnp.shape(x)}; rotjax reads a dense "
            "layer's features from its input's trailing axes, in order"
        )
    return n_in


def kernel_path(module: nn.Module) -> str:
    """The "/" path of a dense layer's kernel in the params, as `capture` keys it."""
    return "/".join(module.path) + "/kernel"


def _add(prev, new):
    return new if prev is None else jax.tree.map(jnp.add, prev, new)


def _rows(x: jax.Array, n_in: int, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """A dense layer's input ``x`` as ``(rows, weights)`` (see `capture`)."""
    lead = x.shape[: x.ndim - n_in]
    rows = wide(x.reshape(math.prod(lead), math.prod(x.shape[x.ndim - n_in :])))
    if mask is not None and lead == mask.shape:
        return rows, mask.reshape(-1).astype(rows.dtype)
    if mask is not None and lead == mask.shape[:1]:  # a row per example: those with a token
        return rows, jnp.any(mask, axis=-1).astype(rows.dtype)
    return rows, jnp.ones(rows.shape[:1], rows.dtype)


def capture(
    model: nn.Module,
    params: Any,
    inputs: tuple[Any, ...],
    fn: Callable[[jax.Array, jax.Array], Any],
    *,
    mask: jax.Array | None = None,
    combine: Callable[[Any, Any], Any] = _add,
) -> tuple[Any, dict[str, Any]]:
    """``(output, {kernel path: fn(rows, weights)})`` of one forward pass (inference mode).

    For a dense layer with kernel ``(*in, *out)`` called on ``x`` of shape ``(*lead, *in)``,
    ``rows`` is ``x`` reshaped to ``(prod(lead), prod(in))`` and ``weights`` is ``(prod(lead),)``:
    the token ``mask`` (``(batch, tokens)``, 1 = real) where ``lead`` is ``(batch, tokens)``,
    else, one row per example (as for the pooler), 1 for the examples with a real token (a
    batch's filler example, all mask 0, has weight 0) and ones without a mask. Results are folded by
    ``combine(None, first)``, then ``combine(so far, next)`` for a layer called again (default:
    summed).
    Paths of scanned layers (``encoder/layers/...``) hold results stacked along the layers.
    """

    def interceptor(next_fun, args, kwargs, context):
        if (
            context.method_name != "__call__"
            or (n_in := _contracted(context.module, args[0])) is None
        ):
            return next_fun(*args, **kwargs)
        rows, weights = _rows(args[0], n_in, mask)
        context.module.sow(
            STATS, _FIELD, fn(rows, weights), init_fn=lambda: None, reduce_fn=combine
        )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out, state = model.apply({"params": params}, *inputs, mutable=[STATS])
    captured: dict[str, dict[str, Any]] = {}
    for path, leaf in to_dict(state.get(STATS, {})).items():
        module, _, field = path.partition(f"/{_FIELD}")
        captured.setdefault(f"{module}/kernel", {})[field.lstrip("/")] = leaf
    return out, {p: v[""] if set(v) == {""} else v for p, v in captured.items()}


def calls(
    model: nn.Module, params: Any, inputs: tuple[Any, ...], *, mask: jax.Array | None = None
) -> dict[str, list[tuple[jax.Array, jax.Array]]]:
    """``{kernel path: [(rows, weights) of each call, in call order]}`` of one forward pass:
    `capture` keeping a layer's calls apart (a layer called twice, e.g. one tied across
    positions, may read rows of two shapes). rotjax's own models call each dense layer once
    (DeBERTa-v3's shared query/key maps apply to the relative embeddings by their weights, not
    by a second call, so a layer's statistics stay its tokens')."""
    keep = lambda rows, w: ((rows, w),)
    concat = lambda so_far, new: new if so_far is None else so_far + new
    captured = capture(model, params, inputs, keep, mask=mask, combine=concat)[1]
    return {
        path: [(c[f"{i}/0"], c[f"{i}/1"]) for i in range(len(c) // 2)]
        for path, c in captured.items()
    }


class _Enough(Exception):
    """`first_calls`' signal: every wanted layer was called, the rest of the pass is not needed."""


def first_calls(
    model: nn.Module,
    params: Any,
    inputs: tuple[Any, ...],
    kernels: frozenset[str] | set[str] | tuple[str, ...],
    *,
    mask: jax.Array | None = None,
) -> dict[str, list[tuple[jax.Array, jax.Array]]]:
    """`calls` of ``kernels`` only, the forward pass run (and traced, under `jax.jit`) only up
    to the first call of another dense layer after each of ``kernels`` was called: what follows
    is never traced, lowered or computed. For layers outside a scan (the calls of a scanned
    layer are its scan body's: use `calls`) that are called once per pass, or consecutively."""
    wanted = frozenset(kernels)
    seen: dict[str, list[tuple[jax.Array, jax.Array]]] = {}

    def interceptor(next_fun, args, kwargs, context):
        if (
            context.method_name != "__call__"
            or (n_in := _contracted(context.module, args[0])) is None
        ):
            return next_fun(*args, **kwargs)
        path = kernel_path(context.module)
        if path in wanted:
            seen.setdefault(path, []).append(_rows(args[0], n_in, mask))
        elif wanted <= seen.keys():
            raise _Enough
        return next_fun(*args, **kwargs)

    try:
        with nn.intercept_methods(interceptor):
            model.apply({"params": params}, *inputs)
    except _Enough:
        pass
    missing = wanted - seen.keys()
    if missing:
        raise ValueError(f"first_calls: no call of {sorted(missing)} in the forward pass")
    return seen
