"""Refitting a merged model's dense layers, in forward order, on its own inputs.

RegMean (Jin et al., 2023) merges each dense layer from the inputs that *each model* feeds it,
as if the merged model would see them too. It does not: every merged layer changes what the
next one reads, and for models trained from different seeds that drift compounds. RegMean++
(Nguyen et al., 2025) therefore takes each layer's inputs from the merged model, its earlier
layers already merged. `refit` goes one step further and fits the models' *outputs*: for each
dense layer p, in the order the forward pass calls them, with ``x̃ = [x, 1]`` and ``W̃ = [W; b]``
(the bias a row when the layer has one),

    W̃*_p = argmin_W Σ_i λ_i ‖X̂_p W - X̃_{i,p} W̃_{i,p}‖² + ρ (tr Ĝ_p / n) ‖W - W̃_p‖²
         = W̃_p + (Ĝ_p + ρ (tr Ĝ_p / n) I)⁻¹ (Σ_i λ_i X̂_pᵀ X̃_{i,p} W̃_{i,p} - Ĝ_p W̃_p),

where ``X̂_p`` are the merged model's inputs to p (every layer before p refitted), ``X̃_{i,p}``
model i's own inputs to p on the same examples, ``Ĝ_p = X̂_pᵀ X̂_p`` (n its size) and λ the
models' weights (summing to 1), ``W̃_p`` the layer as ``merged`` has it: the closed-form
least-squares layer that best reproduces the mean of what the models' layers output, from what
the merged model actually feeds it. Layers that read the same
input (a head's query, key and value; SwiGLU's gate and up) are refitted together. The ridge ρ
(relative to the mean input energy) pulls towards the start, and directions the inputs never
take (a LayerNorm's outputs ``x̃`` are linearly dependent, so ``Ĝ`` is singular) keep the
start's weights. Inputs that reach a layer's weights other than through its calls are not fitted:
DeBERTa-v3's relative embeddings reach the shared query/key maps that way (``share_att_key``),
so its position terms (c2p, p2c) follow whatever the token fit makes of those maps, compared
with no model's; DeBERTa-v2's separate position projections are called on them and fitted.

Everything that is not a dense layer (norms, embeddings, the patch convolution) stays as
``merged`` has it, so `refit` is a plug-in after any merge: ``refit(model, average(ps), ps,
batches)``. The models should be aligned first (the targets of one layer are then comparable
across models). Cost: one forward pass of the merged model per stage (a stage: the layers
that read one input), up to that stage's layer where the model is not scanned, over the
batches; the models' own inputs ``X̃_{i,p}`` come from one pass of each model, kept while they
fit in ``memory`` bytes (else one pass of each model per stage, the same result).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rotjax.match._checks import check_concrete
from rotjax.merge._capture import calls, capture, dense_input_axes, first_calls, kernel_path
from rotjax.merge._loss import check_memory
from rotjax.merge._methods import (
    _pinv_psd,
    _weighted,
    check_ridge,
    check_sequence,
    checked_models,
    model_weights,
    scalar,
)
from rotjax.merge._stats import _inputs, check_fits
from rotjax.models import model_family
from rotjax.tree import placed_like, wide

_HIGHEST = jax.lax.Precision.HIGHEST


def refit(
    model: nn.Module,
    merged: Any,
    params_list: Sequence[Any],
    batches: Iterable[Any],
    *,
    weights: Sequence[float] | None = None,
    ridge: float = 1e-4,
    include_padding: bool = False,
    memory: int = 2**31,
    progress: bool = False,
) -> Any:
    """``merged`` with every dense layer (kernel and bias) refitted by least squares, in
    forward order, from the merged model's own inputs to the λ-weighted mean of the models'
    outputs (the formula in this module's docstring).

    Args:
      model: The Flax module of every params tree here.
      merged: A merge of ``params_list`` (e.g. `average`): the start, and the source of every
        param that is not a dense layer's.
      params_list: The N ≥ 1 models (aligned to one another), as for `average`.
      batches: Unlabeled model inputs, as for `rotjax.merge.statistics` (tuples of
        ``model.apply``'s positional arguments or dicts of named arrays), read once per stage.
      weights: λ, one per model (default all 1; a model of weight 0 is left out).
      ridge: ρ in [0, 1e8], relative to the mean diagonal of each layer's input Gram: how strongly
        each layer is held to ``merged``'s. It also keeps float32 stable: on a tiny random
        post-norm BERT, a float32 refit's logits were 7e-5 from a float64 one's at 1e-4, but
        3% at 1e-6 and 0 (rounding in directions of little input energy, inverted).
      include_padding: Count padded tokens as rows (default: real tokens only).
      memory: Bytes that the models' inputs to every dense layer, over all batches, may take
        on the devices: within it they are computed once and kept (the demo's 4-layer
        Fashion-MNIST ViT on 500 images: 124 MiB per model, and refit took 3.6 s instead of
        7.3 s, 2 cores); above it they are recomputed for every stage. The same results, up to
        float32 rounding of differently compiled programs. The default, 2 GiB, holds MiniLM's
        on 250 texts of 48 tokens (2 models: 1.6 GB).
      progress: A progress bar over the stages.

    Returns:
      A params tree like ``merged`` (which is not changed), leaves in their input dtypes and
      shardings.

    Raises:
      TypeError: ``params_list`` is not a list or tuple of models.
      ValueError: Models that differ in paths or shapes, bad weights or ridge, no batches (or
        only empty ones), non-finite moments of a layer's inputs (NaN or Inf in the batches).
    """
    check_sequence(params_list)
    paths, leaves, treedef = checked_models([merged, *params_list], first="merged")
    # a model of weight 0 is left out (its passes not run, its values never read)
    lam, params_list, models = _weighted(
        model_weights(weights, len(params_list)), params_list, leaves[1:]
    )
    leaves = [leaves[0], *models]
    check_ridge(ridge)
    check_memory(memory)
    fam = model_family(model)
    members = {f"params_list[{i}]": p for i, p in enumerate(params_list)}
    check_concrete({"merged": merged, **members}, "it loops over the batches")
    check_fits(model, fam, {"merged": merged})  # (the models: checked_models, against it)
    inputs = _inputs(fam, batches)
    if not inputs:
        raise ValueError("refit: no batches (or only empty ones)")
    masks = [None if include_padding else fam.token_mask(x) for x in inputs]
    flat = dict(zip(paths, leaves[0], strict=True))
    models = [dict(zip(paths, x, strict=True)) for x in leaves[1:]]
    stages = _stages(model, params_list[0], inputs[0], masks[0])
    every = tuple(sorted({group[0] for group, _ in stages}))  # a stage's first reads its input
    kept = None  # kept[i][b]: model i's inputs to every dense layer on batch b
    keep = _rows(model, every)
    if memory > 0 and _bytes(keep, params_list[0], inputs, masks) * len(models) <= memory:
        kept = [[keep(p, x, m) for x, m in zip(inputs, masks, strict=True)] for p in params_list]
    if progress:
        from tqdm.auto import tqdm

        stages = tqdm(stages, desc="refit", unit="stage", leave=False)
    lam, ridge = scalar(lam / lam.sum()), scalar(ridge)  # float64 with x64
    for group, index in stages:
        rows = _rows(model, group[:1], early=not index)
        current = jax.tree.unflatten(treedef, [flat[p] for p in paths])
        at = tuple(jnp.int32(i) for i in index)
        total = None
        for b, (x, mask) in enumerate(zip(inputs, masks, strict=True)):
            theirs = (
                [k[b][group[0]] for k in kept]
                if kept is not None
                else [rows(p, x, mask)[group[0]] for p in params_list]
            )
            part = _moments(rows(current, x, mask)[group[0]], theirs, at)
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        g_aug, cross_aug = total
        if not all(bool(jnp.isfinite(m).all()) for m in (g_aug, *cross_aug)):
            where = group[0] + (
                f" (layer {', '.join(map(str, index))} of its stack)" if index else ""
            )
            raise ValueError(
                f"refit: non-finite moments (NaN or Inf) of the inputs of {where}: the batches "
                "hold NaN or Inf, or values whose products overflow float32"
            )
        if not float(jnp.trace(g_aug)) > 0:  # no rows reached this stage: keep it
            continue
        for kernel in group:
            has_bias = _bias(kernel) in flat
            cols = slice(None) if has_bias else slice(0, -1)  # the ones column for a bias
            g, cross = g_aug[cols, cols], [c[cols, cols] for c in cross_aug]
            n_in = g.shape[0] - has_bias
            targets = [_augmented(m, kernel, index, n_in, has_bias) for m in models]
            start = _augmented(flat, kernel, index, n_in, has_bias)
            w = _solve(g, cross, targets, lam, ridge, start)
            flat[kernel] = _put(flat[kernel], index, w[:n_in])
            if has_bias:
                flat[_bias(kernel)] = _put(flat[_bias(kernel)], index, w[n_in])
    return jax.tree.unflatten(treedef, [flat[p] for p in paths])


def _bias(kernel: str) -> str:
    return kernel.rsplit("/", 1)[0] + "/bias"


def _stages(model, params, inputs, mask) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """``[(kernel paths, layer index)]`` in forward order: each group the dense layers that
    read one input (consecutive calls on the same array), each scanned group once per layer
    (index into the stacked axis; ``()`` for layers that are not scanned)."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = [None]

    def interceptor(next_fun, args, kwargs, context):
        if dense_input_axes(context.module) is not None and context.method_name == "__call__":
            path = kernel_path(context.module)
            if path not in seen:  # a scan's body is traced more than once; a layer may be
                seen.add(path)  # called twice: its first call places it
                if groups and args[0] is last[0]:
                    groups[-1].append(path)
                else:
                    groups.append([path])
            last[0] = args[0]
        return next_fun(*args, **kwargs)

    # one abstract pass: the call order (interceptor) and each layer's stacking (capture's
    # scalars come back with the scan's layer axes)
    sizes = lambda p, x, m: capture(model, p, x, lambda r, w: jnp.zeros(()), mask=m)[1]
    with nn.intercept_methods(interceptor):
        lead = jax.eval_shape(sizes, params, inputs, mask)
    out: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    run: list[tuple[str, ...]] = []  # consecutive groups of one scan: layer by layer

    def flush():
        shape = lead[run[0][0]].shape if run else ()
        out.extend((g, i) for i in np.ndindex(*shape) for g in run)
        run.clear()

    for group in map(tuple, groups):
        shape = lead[group[0]].shape
        if run and lead[run[0][0]].shape != shape:
            flush()
        run.append(group)
        if not shape:
            flush()
    flush()
    return out


@functools.cache
def _rows(model, kernels: tuple[str, ...], early: bool = False):
    """Jitted ``(params, inputs, mask) -> {kernel: [(rows, weights)] per call}``: what each of
    ``kernels``' layers reads in one forward pass (computed only up to the last of them where
    the layers are not scanned: the rest is dead code to XLA). ``early``: layers outside a
    scan, traced only that far too (`first_calls`: on the demo's 4-layer ViT the 17 stages'
    programs have 3256 equations in all instead of 6426, and traced in 3.2-3.4 s instead of
    5.8-7.9 s, 2 shared cores; the refitted params bitwise the same)."""

    def rows(params, inputs, mask):
        if early:
            return first_calls(model, params, inputs, kernels, mask=mask)
        every = calls(model, params, inputs, mask=mask)
        return {k: every[k] for k in kernels}

    return jax.jit(rows)


def _bytes(fn, params, inputs, masks) -> int:
    """The bytes of ``fn(params, x, mask)`` summed over the batches (shapes only)."""
    sizes: dict[Any, int] = {}
    total = 0
    for x, mask in zip(inputs, masks, strict=True):
        shapes = tuple(jnp.shape(a) for a in jax.tree.leaves((x, mask)))
        if shapes not in sizes:
            out = jax.eval_shape(fn, params, x, mask)
            sizes[shapes] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(out))
        total += sizes[shapes]
    return total


@jax.jit
def _moments(mine, theirs, index):
    """``(Ĝ, [X̂ᵀ X̃_i])`` of one batch, from the merged model's calls of a layer (``mine``) and
    each model's (``theirs``), augmented by a column of ones (the bias row), at layer ``index``
    of a scanned stack (a traced index: one program serves every layer)."""
    g, cross = 0.0, [0.0] * len(theirs)
    for k, (rows, w) in enumerate(mine):
        rows = _with_ones(rows[index])
        weighted = (rows * w[index][:, None]).T
        g = g + jnp.matmul(weighted, rows, precision=_HIGHEST)
        for i, model_calls in enumerate(theirs):
            other = _with_ones(model_calls[k][0][index])
            cross[i] = cross[i] + jnp.matmul(weighted, other, precision=_HIGHEST)
    return g, cross


def _with_ones(rows):
    return jnp.concatenate([rows, jnp.ones((*rows.shape[:-1], 1), rows.dtype)], axis=-1)


def _augmented(flat, kernel, index, n_in, has_bias):
    """``W̃ = [W; b]`` of one layer (index into a scanned stack), ``(n_in (+1), n_out)``."""
    w = wide(flat[kernel][index]).reshape(n_in, -1)
    if not has_bias:
        return w
    b = wide(flat[_bias(kernel)][index]).reshape(1, -1)
    return jnp.concatenate([w, b], axis=0)


@jax.jit
def _solve(g, cross, targets, lam, ridge, start):
    """``W̃ + (Ĝ + ρ tr(Ĝ)/n I)⁺ (Σ_i λ_i C_i W̃_i - Ĝ W̃)`` by Ĝ's eigendecomposition (a
    pseudo-inverse: at ρ = 0 directions with no input energy keep the start ``W̃``)."""
    hi = dict(precision=_HIGHEST)
    pairs = enumerate(zip(cross, targets, strict=True))
    rhs = sum(lam[i] * jnp.matmul(c, t, **hi) for i, (c, t) in pairs) - jnp.matmul(g, start, **hi)
    n = g.shape[0]
    inv = _pinv_psd(g + ridge * jnp.trace(g) / n * jnp.eye(n, dtype=g.dtype))
    return start + jnp.matmul(inv, rhs, **hi)


def _put(x, index, value):
    """``x`` with ``x[index]`` replaced by ``value`` (reshaped to it), in ``x``'s dtype and,
    for a jax array committed to devices, its sharding (an uncommitted one stays free to move,
    as every other merge's results are)."""
    value = jnp.asarray(value).reshape(x.shape[len(index) :]).astype(x.dtype)
    return placed_like(jnp.asarray(x).at[index].set(value) if index else value, x)
