"""Merging N models of one architecture (same paths and shapes): plain, Fisher-weighted and
RegMean averages. Pure functions: the inputs are never changed, every leaf is computed in at
least float32 (float64 leaves in float64) and comes back in its input dtype and, for sharded
inputs, with its input sharding (the per-kernel RegMean solve multiplies by a small replicated
inverse, so sharded kernels stay sharded)."""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax.match._checks import check_devices, check_sequence, first_traced, non_finite
from rotjax.tree import averaged, flatten, placed_like, traced, wide

_HIGHEST = jax.lax.Precision.HIGHEST


def _leaf_kind(x: Any) -> str:
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "complex"
    return "floating" if jnp.issubdtype(dtype, jnp.floating) else "integer or boolean"


def checked_models(params_list: Sequence[Any], *, at_least: int = 2, first: str | None = None):
    """``(paths, [leaves of each model], treedef)`` after checking that every model has the
    first one's paths and shapes. Messages call the models ``"model i"``, or, given ``first``
    (``[base, *params_list]``: ``"base"``), the first one ``first`` and the others
    ``"params_list[i]"`` from 0.

    Raises:
      ValueError: fewer than ``at_least`` models, paths/shapes that differ (listed), or integer
        or boolean leaves that differ (they have no mean; equal ones are kept).
    """
    check_sequence(params_list)
    if len(params_list) < at_least:
        if first is not None:  # count the models of params_list, not ``first``
            raise ValueError(
                f"params_list needs at least {at_least - 1} model(s) besides {first}, got "
                f"{len(params_list) - 1}"
            )
        raise ValueError(f"merging needs at least {at_least} models, got {len(params_list)}")
    name = lambda i: f"model {i}" if first is None else f"params_list[{i - 1}]" if i else first
    paths, leaves0, treedef = flatten(params_list[0])
    leaves = [leaves0]
    for i, params in enumerate(params_list[1:], start=1):
        p, x, _ = flatten(params)
        if p != paths:
            only = sorted(set(p) ^ set(paths))
            raise ValueError(f"{name(i)} has other params than {name(0)}: {only[:10]}")
        bad = [
            f"  {path}: {name(0)} {np.shape(a)} vs {name(i)} {np.shape(b)}"
            for path, a, b in zip(paths, leaves0, x, strict=True)
            if np.shape(a) != np.shape(b)
        ]
        if bad:
            raise ValueError("params differ in shape between the models:\n" + "\n".join(bad))
        leaves.append(x)
    # Integer and boolean leaves (counters, ids, flags) have no mean: equal, they are kept
    # as they are; different, they were averaged and truncated, silently. (Traced, under a
    # jax.jit, their values are unknown: the first model's are kept.)
    differ = [
        path
        for path, *xs in zip(paths, *leaves, strict=True)
        if not averaged(xs[0])
        and not traced(xs)
        and not all(np.array_equal(np.asarray(xs[0]), np.asarray(x)) for x in xs[1:])
    ]
    if differ:
        raise ValueError(f"integer or boolean params differ between the models: {differ[:10]}")
    # Floating dtypes may differ (the first model's is kept); kinds may not: a later model's
    # integer or complex leaf was averaged into the first's dtype, or decided it, by order
    kinds = [
        f"  {path}: " + " vs ".join(f"{name(i)} {_leaf_kind(x)}" for i, x in enumerate(xs))
        for path, *xs in zip(paths, *leaves, strict=True)
        if len({_leaf_kind(x) for x in xs}) > 1
    ]
    if kinds:
        raise ValueError("params differ in kind between the models:\n" + "\n".join(kinds[:10]))
    check_devices(paths, leaves, name)
    return paths, leaves, treedef


def check_untraced(**options: Any) -> None:
    """TypeError naming the first of ``options`` that is traced (under `jax.jit`, `jax.grad`
    or `jax.vmap`): options checked on the host, or deciding a count or a draw there, must be
    Python numbers (a TracerBoolConversionError came from the range check, and under
    `jax.grad`, which passes the range check, RegMean's α had a NaN derivative on
    rank-deficient Grams)."""
    if name := first_traced(options):
        raise TypeError(
            f"{name} is traced (under jax.grad, jax.vmap or jax.jit): it must be a Python "
            "number (only average's weights, interpolate's lam and the task-vector merges' "
            "scale may be traced)"
        )


def model_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """The models' weights λ (default all 1), checked (n of them, finite, >= 0, not all 0) and
    normalised to sum 1 in float64 (so 1e39 or 1e-46 each survive float32). A weight below
    float32's smallest normal number (1.2e-38) of the largest is 0: the merges compute in
    float32, where it would be flushed to 0 and its model's NaN or Inf multiplied by it.

    Raises:
      TypeError: traced weights (under `jax.grad`, `jax.vmap` or `jax.jit`), which cannot be
        checked on the host: only `average` takes them (and `interpolate` its λ, the
        task-vector merges their ``scale``).
      ValueError: weights that are not as above.
    """
    if traced(weights):
        raise TypeError(
            "weights are traced (under jax.grad, jax.vmap or jax.jit): only merge.average takes "
            "traced weights (merge.interpolate its lam, the task-vector merges their scale); "
            "pass numbers here"
        )
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    # (max, not sum: a sum of finite weights may overflow, with a warning)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.max() > 0:
        raise ValueError(f"weights must be {n} finite numbers >= 0, not all 0; got {weights}")
    w = w / w.max()  # no overflow in the sum
    w = np.where(w < np.finfo(np.float32).tiny, 0.0, w)
    return w / w.sum()


def _weighted(w: np.ndarray, *per_model: Sequence[Any]) -> tuple[np.ndarray, ...]:
    """The weights above 0 and each list's entries of those models: a model of weight 0 is
    left out, never multiplied by 0 (so NaN or Inf in it cannot reach the merge)."""
    keep = _kept(w)
    return (w[keep], *([xs[i] for i in keep] for xs in per_model))


def _kept(w: np.ndarray) -> list[int]:
    """The models of weight above 0 (`_weighted`)."""
    return [i for i, wi in enumerate(w) if wi > 0]


def _host_norm(leaves) -> float:
    """`_global_norm` on the host in float64 (0 for no leaves)."""
    xs = [np.abs(np.asarray(x, np.float64)) for x in leaves]
    top = max((float(x.max(initial=0.0)) for x in xs), default=0.0)
    if not (np.isfinite(top) and top > 0):
        return top
    return top * float(np.sqrt(sum(np.sum(np.square(x / top)) for x in xs)))


@jax.jit
def _global_norm(leaves) -> jax.Array:
    """The L2 norm of all the entries of ``leaves``, scaled by the largest magnitude first
    (squares of 1e-20 underflow and of 1e20 overflow float32; both are valid Fishers)."""
    xs = [jnp.abs(wide(jnp.asarray(x))) for x in leaves]
    top = functools.reduce(jnp.maximum, [jnp.max(x, initial=0) for x in xs], jnp.zeros(()))
    scale = jnp.where(top > 0, top, 1)
    return top * jnp.sqrt(sum(jnp.sum(jnp.square(x / scale)) for x in xs))


def _cast(x, like):
    return x.astype(jnp.asarray(like).dtype)


def _dtypes(leaves) -> list[np.dtype]:
    """The dtypes of ``leaves`` as jax computes in them (a Python float: float32 without x64)."""
    dtype = lambda x: x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return [jax.dtypes.canonicalize_dtype(dtype(x)) for x in leaves]


def _in_dtypes(leaves, dtypes) -> list:
    """``leaves`` cast to ``dtypes`` where they differ: a merge takes the first model's dtypes,
    also when that model has weight 0 (left out, the first kept one's would be taken)."""
    return [x if x.dtype == d else x.astype(d) for x, d in zip(leaves, dtypes, strict=True)]


MAX_RIDGE = 1e8
"""The largest ridge taken (also in float64): beyond it a ridge's solve is its start to
float32's precision, and ``ridge`` times a Gram's diagonal overflows float32 sooner (NaN
kernels, silently: a ridge of 3e38, a finite float32)."""


def check_ridge(ridge) -> None:
    """ValueError unless ``ridge`` is a number in ``[0, MAX_RIDGE]`` (not a bool); TypeError
    if it is traced (`check_untraced`)."""
    check_untraced(ridge=ridge)
    if isinstance(ridge, bool) or not (np.isfinite(ridge) and 0 <= ridge <= MAX_RIDGE):
        raise ValueError(
            f"ridge must be a number in [0, 1e8] (beyond, the solve is its start to "
            f"float32's precision), got {ridge!r}"
        )


def scalar(v) -> jax.Array:
    """A weight or option as an array of the widest float enabled (float64 with
    ``jax_enable_x64``): the programs cast it to each leaf's compute dtype (`wide`), so float64
    models merge with float64 weights and float32 ones in float32."""
    return jnp.asarray(v, jnp.result_type(float))


def average(params_list: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """``θ = Σ_i λ_i θ_i / Σ_i λ_i`` (simple averaging; λ = 1 by default). A model of weight 0
    is left out (as in `fisher` and `regmean`): NaN or Inf in it do not reach the merge.

    The weights may be traced, so that merge coefficients can be learned by gradient descent
    (``jax.grad`` of a loss of the merge with respect to λ, as AdaMerging does) or swept by
    ``jax.vmap``: traced weights are used as given, divided by their sum (one program for
    every λ), unchecked, and a model of weight 0 is then multiplied by 0, not left out.
    """
    _, leaves, treedef = checked_models(params_list)
    dtypes = _dtypes(leaves[0])
    if traced(weights):
        w = jnp.stack([scalar(x) for x in weights]) if isinstance(weights, Sequence) else weights
        if jnp.shape(w) != (len(params_list),):
            raise ValueError(
                f"weights must be {len(params_list)} numbers, got shape {jnp.shape(w)}"
            )
    else:
        w, leaves = _weighted(model_weights(weights, len(params_list)), leaves)
    return jax.tree.unflatten(treedef, _in_dtypes(_average_leaves(scalar(w), leaves), dtypes))


# The merges run as one compiled program per architecture (leaf by leaf, every leaf's small
# op would compile and dispatch on its own; TIES and DARE two or three: see `_task`); inputs
# may be sharded, outputs keep their layout.
@jax.jit
def _average_leaves(w, leaves):
    return [_weighted_mean(w, xs) for xs in zip(*leaves, strict=True)]


def _weighted_mean(w, xs):
    if not averaged(xs[0]):  # equal in every model (`checked_models`)
        return xs[0]
    w = w.astype(wide(xs[0]).dtype)
    total = sum(w[i] * wide(x) for i, x in enumerate(xs))
    return _cast(total / jnp.sum(w), xs[0])


def _statistics(stats_list: Any, n: int) -> None:
    check_sequence(stats_list, "stats_list", "statistics")
    if len(stats_list) != n:
        raise ValueError(f"{n} models but {len(stats_list)} statistics")


def _kind(stats: Any, i: int, kind: str) -> Mapping[str, Any]:
    """Model ``i``'s statistics of ``kind`` (``"fisher"``, ``"gram"``), refused by name if
    they are no dict or lack it."""
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"stats_list[{i}] must be a dict of statistics, got a {type(stats).__name__}"
        )
    if kind not in stats:
        raise ValueError(f"stats_list[{i}] holds no {kind!r} (compute kinds=({kind!r},))")
    return stats[kind]


def _check_fishers(paths, leaves, fs, ids) -> None:
    """Every Fisher has its param's shape (no silent broadcasting); ``ids``: the models'
    indices in ``stats_list``."""
    bad = [
        f"  {p}: param {np.shape(x)} vs stats_list[{i}] fisher {np.shape(f[p])}"
        for i, f in zip(ids, fs, strict=True)
        for p, x in zip(paths, leaves, strict=True)
        if p in f and np.shape(f[p]) != np.shape(x)
    ]
    if bad:
        raise ValueError("Fishers that do not fit their params:\n" + "\n".join(bad))


def _check_cover(paths, stats: Sequence[Mapping[str, Any]], kind: str, ids=None) -> None:
    """Each statistic names a param and is there for every model or for none: one that only some
    models have would silently merge its param as a plain average. ``ids``: the models'
    indices in ``stats_list`` (default 0, 1, ...)."""
    known, bad = set(paths), []
    ids = range(len(stats)) if ids is None else ids
    for p in sorted(set().union(*stats)):
        has = [i for i, s in zip(ids, stats, strict=True) if p in s]
        if p not in known:
            bad.append(f"  {p}: in stats_list{has}, but the models have no such param")
        elif len(has) < len(stats):
            bad.append(f"  {p}: in stats_list{has} only")
    if bad:
        raise ValueError(f"{kind} statistics that not all models share:\n" + "\n".join(bad))


def _gram_inputs(path, kernel_shape, gram_shape, what="a Gram") -> tuple[int, int]:
    """``(batch axes, input axes)`` of a kernel that a Gram of ``gram_shape`` (``(*batch, n,
    n)``, the kernel's leading stacked axes, then its first input axes flattened to n) fits;
    ValueError naming the path and both shapes otherwise."""
    b = len(gram_shape) - 2
    if b >= 0 and gram_shape[-1] == gram_shape[-2] and kernel_shape[:b] == gram_shape[:b]:
        for k in range(1, len(kernel_shape) - b):
            if int(np.prod(kernel_shape[b : b + k])) == gram_shape[-1]:
                return b, k
    raise ValueError(f"{path}: {what} of shape {gram_shape} does not fit the kernel {kernel_shape}")


def _input_axes(path: str, kernel, shape, what="a Gram") -> tuple[int, int]:
    """`_gram_inputs` of a kernel of a spec (a `rotjax.symmetry.ParamSpec`). Size-1 axes
    leave the count ambiguous (a head_dim of 1: an (H, 1, D) output kernel's Gram is (H, H),
    one input axis or two): the count that splits no group action's axes between the inputs
    and the outputs."""
    b, n_in = _gram_inputs(path, kernel.shape, shape, what)
    split = lambda n: any(b <= min(a.axes) < b + n <= max(a.axes) for a in kernel.actions)
    while split(n_in) and b + n_in < len(kernel.shape) - 1 and kernel.shape[b + n_in] == 1:
        n_in += 1
    return b, n_in


def fisher(
    params_list: Sequence[Any],
    stats_list: Sequence[Mapping[str, Any]],
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
    normalize: bool = False,
) -> Any:
    """Fisher-weighted averaging (Matena & Raffel, 2022):
    ``θ = Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i`` elementwise, with ``F̃ = max(F, eps)``.

    Args:
      params_list: the models (N >= 2).
      stats_list: their statistics with ``"fisher"`` (`rotjax.merge.statistics`), in order.
      weights: λ (default 1 each; a model of weight 0 is left out).
      eps: the floor on the Fisher (> 0) (the paper's code uses 1e-6; it applies it to the target
        model only, here to all), which keeps parameters no data touches an average weighted
        by λ (by λ_i / ‖F_i‖ with ``normalize``, as in the paper's code).
      normalize: divide each model's λ by the global L2 norm of its Fisher (the paper's
        ``normalize_fishers``, on by default in its code, off here), so that models trained
        to different loss scales count alike.

    Every param with a Fisher is merged by it, a classification head's too, and the norms
    cover them all; the paper's code merges the body only and keeps the first model's head
    (to do that here: merge params and Fishers without the head's paths, then put model 0's
    head back). Heads of different sizes are refused with the rest.

    Raises:
      ValueError: models that differ, missing Fishers, a Fisher of another shape than its
        param, or that only some models have, or of a param the models lack (paths and shapes
        named), a Fisher with NaN or Inf, eps <= 0, bad weights, a zero Fisher to normalise
        (of a model of weight > 0: the others are not read). Under `jax.jit`, traced
        Fishers are not checked for NaN, nor their norms for zero.
      TypeError: ``params_list`` or ``stats_list`` not a list or tuple, or statistics that
        are no dict.
    """
    paths, leaves, treedef = checked_models(params_list)
    _statistics(stats_list, len(params_list))
    check_untraced(eps=eps)
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    w = model_weights(weights, len(params_list))
    kept = _kept(w)  # a model of weight 0 is never read: its statistics may lack Fishers
    fs = [_kind(s, i, "fisher") if i in kept else {} for i, s in enumerate(stats_list)]
    _check_cover(paths, [fs[i] for i in kept], "fisher", ids=kept)
    _check_fishers(paths, leaves[0], [fs[i] for i in kept], kept)
    # A NaN Fisher would make the merge of its entry the plain average, silently.
    bad = [f"  stats_list[{i}]: {p}" for i in kept for p in non_finite(dict(fs[i]))]
    if bad:
        raise ValueError("Fishers with NaN or Inf:\n" + "\n".join(bad))
    dtypes, first = _dtypes(leaves[0]), leaves[0]
    if normalize:
        with jax.ensure_compile_time_eval():  # concrete Fishers: eagerly, also under a jit
            norms = [_global_norm(list(f.values())) if i in kept else 1.0 for i, f in enumerate(fs)]
        if traced(norms):  # traced: not known, not checked
            w, leaves, fs = _weighted(w, leaves, fs)
            w = w / jnp.stack([norms[i] for i in kept])
            w = w / jnp.sum(w)
        else:
            # (float32 on the device: a subnormal largest entry is flushed to 0 and a norm
            # beyond float32's range is inf there; in float64 on the host then)
            norms = np.asarray(
                [
                    float(x) if np.isfinite(x) and x > 0 else _host_norm(list(fs[i].values()))
                    for i, x in enumerate(norms)
                ]
            )
            if bad := [i for i in kept if not (np.isfinite(norms[i]) and norms[i] > 0)]:
                raise ValueError(
                    f"normalize: the Fishers of stats_list{bad} are zero or not finite"
                )
            w, leaves, fs = _weighted(model_weights(w / norms, len(fs)), leaves, fs)
    else:
        w, leaves, fs = _weighted(w, leaves, fs)
    # No Fisher for a param (None): a plain average.
    per_path = [[f[p] for f in fs] if p in fs[0] else None for p in paths]
    out = _in_dtypes(_fisher_leaves(scalar(w), scalar(eps), leaves, per_path), dtypes)
    # XLA lays each product out as the Fisher or the param is (Fishers computed on another
    # sharding): back in the first model's layout
    return jax.tree.unflatten(treedef, [placed_like(o, x) for o, x in zip(out, first, strict=True)])


@jax.jit
def _fisher_leaves(w, eps, leaves, fishers):
    out = []
    for xs, f in zip(zip(*leaves, strict=True), fishers, strict=True):
        if f is None or not averaged(xs[0]):  # no Fisher, or an integer leaf (kept)
            out.append(_weighted_mean(w, xs))
            continue
        dt = wide(xs[0]).dtype
        fl = [
            w[i].astype(dt) * jnp.maximum(fi.astype(dt), eps.astype(dt)) for i, fi in enumerate(f)
        ]
        # Relative to the largest, per entry: F·θ of a Fisher near float32's top (1e37)
        # would overflow, and the ratio is the same.
        top = functools.reduce(jnp.maximum, fl)
        fl = [fi / jnp.where(top > 0, top, 1) for fi in fl]
        num = sum(fi * wide(x) for fi, x in zip(fl, xs, strict=True))
        den = sum(fl)
        # A floor λ·eps below the dtype's normal range is flushed to zero on CPU: an entry of
        # zero Fisher in every model would be 0/0. It is the plain average, as a floor gives.
        merged = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), wide(_weighted_mean(w, xs)))
        out.append(_cast(merged, xs[0]))
    return out


def regmean(
    params_list: Sequence[Any],
    stats_list: Sequence[Mapping[str, Any]],
    *,
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
    rest: str = "average",
    ridge: float = 1e-8,
) -> Any:
    """RegMean (Jin et al., 2023): per dense kernel, the minimiser of
    ``Σ_i (λ_i / n_i) ‖X_i W - X_i W_i‖²``, ``W* = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_i``, with
    ``G_i = X_iᵀ X_i / n_i`` the per-row mean Gram of kernel i's inputs (from
    `rotjax.merge.statistics`: each model's data counts alike whatever its size, as in the
    paper's code; scale ``weights`` by the ``tokens`` counts for the plain sum) and
    ``G̃ = α G + (1 - α) diag(G)``: α = 1 is the exact least-squares merge, α = 0 a
    per-input-feature weighted average. The paper's code scales the off-diagonal terms the same
    way (0.9 here; its configs' values under ``alpha``); its Grams include padded tokens
    (``statistics(include_padding=True)`` reproduces that) and, for DeBERTa, the rows of the
    relative-position embeddings that the shared query and key projections also read (which
    rotjax's capture does not see: its Grams are the tokens').

    Args:
      params_list: the models (N >= 2).
      stats_list: their statistics with ``"gram"`` (and ``"fisher"`` for ``rest="fisher"``).
      alpha: the off-diagonal scale α in [0, 1]. The reference code's configs (Jin et al.)
        use 0.1 (emotion, NER), 0.9 (NER out of domain) or 1 (GLUE, where it is unset); the
        rotation paper's ViT config keeps only the diagonal (α = 0).
      weights: λ (default 1 each; a model of weight 0 is left out).
      rest: how params without a Gram (biases, embeddings, LayerNorms, the patch embedding)
        merge: ``"average"`` or ``"fisher"`` (Fisher-weighted, by `fisher` with its default
        ``eps`` and no normalisation; call `fisher` for others and take those params from it).
      ridge: holds each kernel to the average ``W̄ = Σ λ_i W_i / Σ λ_i``, each input row j by
        its own ``s_j = ridge · T_jj`` (``T = Σ λ_i G̃_i``, so S = ridge · diag(T)):
        ``W* = W̄ + (T + S)⁺ Σ λ_i G̃_i (W_i - W̄)``, the minimiser of the objective above plus
        ``Σ_j s_j ‖W_j - W̄_j‖²`` (at 0 the formula above; it shrinks towards W̄, not towards
        0; relative to each input's scale, as α's diagonal is, so the merge does not depend on
        the inputs' units: inputs ``X S``, kernels ``S⁻¹ W_i`` give ``S⁻¹ W*``); the default
        1e-8 changes nothing measurably. The pseudo-inverse (`_pinv_equilibrated`) is taken
        of ``T + S`` scaled to unit diagonal, its eigenvalues below ``16 ε`` times the largest
        (float32 rounding of zero) counting as 0. Directions
        no data excites (an input that is always 0, or at α = 1 more inputs than rows) are not
        fitted: the kernel keeps the average there (a kernel whose Grams are all zero, one no
        data reaches, comes back as the average), so at α = 1 the merge is the least-squares
        one nearest the average in the inputs' scale (least ``Σ_j T_jj ‖W_j - W̄_j‖²``).

    Raises:
      ValueError: models that differ, missing statistics, a Gram that does not fit its kernel,
        or that only some models have, or of a param the models lack (paths and shapes
        named), a Gram with NaN or Inf (not checked when traced, under `jax.jit`), alpha
        outside [0, 1], ridge outside [0, 1e8], bad weights.
      TypeError: ``params_list`` or ``stats_list`` not a list or tuple, or statistics that
        are no dict.
    """
    check_untraced(alpha=alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if rest not in ("average", "fisher"):
        raise ValueError(f"rest must be 'average' or 'fisher', got {rest!r}")
    check_ridge(ridge)
    paths, leaves, treedef = checked_models(params_list)
    _statistics(stats_list, len(params_list))
    w = model_weights(weights, len(params_list))
    kept = _kept(w)  # a model of weight 0 is not read: its statistics may be anything
    of = {i: _kind(stats_list[i], i, "gram") for i in kept}  # each kept model's Grams
    _check_cover(paths, list(of.values()), "gram", ids=kept)
    # A NaN or Inf Gram would make its kernel's solve NaN throughout.
    bad = [f"  stats_list[{i}] gram {p}" for i in kept for p in non_finite(dict(of[i]))]
    if bad:
        raise ValueError("Grams with NaN or Inf:\n" + "\n".join(bad))
    merged = (
        fisher(params_list, stats_list, weights=weights)
        if rest == "fisher"
        else average(params_list, weights)
    )
    out = flatten(merged)[1]  # in the first model's dtypes
    ks = [k for k, p in enumerate(paths) if p in of[kept[0]]]
    for k in ks:
        for i in kept:
            _gram_inputs(paths[k], np.shape(leaves[0][k]), np.shape(of[i][paths[k]]))
    w, leaves, stats_list = _weighted(w, leaves, stats_list)
    kernels = [[x[k] for x in leaves] for k in ks]
    grams = [[s["gram"][paths[k]] for s in stats_list] for k in ks]
    scalars = scalar(w), scalar(alpha), scalar(ridge)
    for k, new in zip(ks, _regmean_kernels(kernels, grams, *scalars), strict=True):
        out[k] = new.astype(out[k].dtype)
    return jax.tree.unflatten(treedef, out)


@jax.jit
def _regmean_kernels(kernels, grams, w, alpha, ridge):
    return [_regmean_kernel(x, g, w, alpha, ridge) for x, g in zip(kernels, grams, strict=True)]


def _regmean_kernel(kernels, grams, w, alpha, ridge):
    """``(Σ λ G̃)⁻¹ Σ λ G̃ W`` for one (possibly stacked) kernel, contracting its input axes."""
    n = np.shape(grams[0])[-1]
    b, n_in = _gram_inputs("", np.shape(kernels[0]), np.shape(grams[0]))
    dt = wide(kernels[0]).dtype
    w, alpha, ridge = w.astype(dt), alpha.astype(dt), ridge.astype(dt)
    eye = jnp.eye(n, dtype=dt).reshape((1,) * b + (n, n))
    reduced = [alpha * jnp.asarray(g, dt) + (1 - alpha) * jnp.asarray(g, dt) * eye for g in grams]
    total = sum(w[i] * g for i, g in enumerate(reduced))
    total = total + ridge * jnp.diagonal(total, axis1=-2, axis2=-1)[..., None] * eye
    # Directions no data excites (an input that is always 0, fewer rows than inputs at α = 1)
    # have no energy in Σ λ G̃ and none in the right-hand side: the pseudo-inverse leaves them
    # at the average, where a float32 inverse of the singular matrix would amplify rounding.
    # Rounding leaves their eigenvalues near ε max(e) (1.2-1.6e-7 max(e) measured in float32,
    # n = 64 to 768), while an uncentred Gram's data directions reach down to ~1e-4 max(e)
    # (a large mean takes the top one): the cut at 16 ε max(e) keeps every data direction
    # (`numpy.linalg.lstsq`'s n ε, 9e-5 max(e) at n = 768, cut some). The cut is taken on
    # ``D T D``, D = diag(T)^(-1/2) (T = Σ λ G̃; unit diagonal, `_pinv_equilibrated`), as the
    # merge does not depend on the inputs' units (X ↦ X S, W_i ↦ S⁻¹ W_i gives S⁻¹ W*): on T
    # itself an input of mean square 5e5 times below the largest one's (an exact diagonal at
    # α = 0) fell below the cut and came back as the average.
    inv = _pinv_equilibrated(total, rcond=16 * jnp.finfo(dt).eps)
    xs = [wide(x) for x in kernels]
    mean = sum(w[i] * x for i, x in enumerate(xs)) / jnp.sum(w)
    # W* = W̄ + (Σ λ G̃ + sI)⁻¹ Σ λ G̃ (W_i - W̄), at s = 0 (Σ λ G̃)⁻¹ Σ λ G̃ W_i; it solves only
    # for the correction to the average: identical models come back exactly, and the inverse's
    # float32 error scales with the models' differences, not with their weights.
    rhs = sum(
        w[i] * _contract_in(g, x - mean, b, n_in)
        for i, (g, x) in enumerate(zip(reduced, xs, strict=True))
    )
    # One step of iterative refinement (matmuls only, so a sharded kernel stays sharded).
    delta = _contract_in(inv, rhs, b, n_in)
    delta = delta + _contract_in(inv, rhs - _contract_in(total, delta, b, n_in), b, n_in)
    return _cast(mean + delta, kernels[0])


def _pinv_equilibrated(g: jax.Array, rcond: float) -> jax.Array:
    """``D (D G D)⁺ D`` with ``D = diag(G)^(-1/2)`` (0 where the diagonal is 0: a PSD matrix's
    row and column are 0 there too): `_pinv_psd` of G with unit diagonal, so that its cut is
    relative to each input's own scale, not the largest input's (``G⁻¹`` itself when G is
    regular)."""
    d = jnp.diagonal(g, axis1=-2, axis2=-1)
    s = jnp.where(d > 0, jax.lax.rsqrt(jnp.where(d > 0, d, 1)), 0)
    return (
        s[..., :, None] * _pinv_psd(s[..., :, None] * g * s[..., None, :], rcond) * s[..., None, :]
    )


def _pinv_psd(g: jax.Array, rcond: float | None = None) -> jax.Array:
    """The pseudo-inverse ``G⁺`` of symmetric positive semi-definite matrices (``(*batch, n,
    n)``) by their eigendecomposition ``G = V diag(e) Vᵀ``: ``V diag(1/e) Vᵀ`` over the
    eigenvalues above ``rcond · max(e)``, 0 for the others (directions the matrix does not
    reach, up to its rounding); ``rcond`` defaults to ``n ε`` (ε the dtype's epsilon), as
    `numpy.linalg.lstsq`'s."""
    n = g.shape[-1]
    e, v = jnp.linalg.eigh((g + jnp.swapaxes(g, -1, -2)) / 2)
    rcond = n * jnp.finfo(e.dtype).eps if rcond is None else rcond
    cut = rcond * jnp.max(e, axis=-1, keepdims=True)
    inv = jnp.where(e > cut, 1.0 / jnp.where(e > cut, e, 1.0), 0.0)
    return jnp.matmul(v * inv[..., None, :], jnp.swapaxes(v, -1, -2), precision=_HIGHEST)


def _contract_in(g, x, b, n_in):
    """``Σ_j G[.., i, j] X[.., j, ...]`` with G ``(*batch, N, N)`` and X's ``n_in`` input axes
    (after the batch axes) flattened to N: an einsum over X's own axes, so whatever sharding X
    has on its other axes is kept."""
    letters = iter(string.ascii_letters)
    batch = "".join(next(letters) for _ in range(b))
    ins_out = "".join(next(letters) for _ in range(n_in))
    ins_sum = "".join(next(letters) for _ in range(n_in))
    rest = "".join(next(letters) for _ in range(x.ndim - b - n_in))
    in_shape = x.shape[b : b + n_in]
    g = g.reshape(*g.shape[:b], *in_shape, *in_shape)
    spec = f"{batch}{ins_out}{ins_sum},{batch}{ins_sum}{rest}->{batch}{ins_out}{rest}"
    return jnp.einsum(spec, g, x, precision=_HIGHEST)
