"""Two models' activations on the same inputs: correlations of every dense layer's input
features, and the permutations they suggest (a start for `rotjax.match.align`, and the
activation costs of OT fusion).

Whatever symmetry element moves model B, B's activations move with it: the stream, the FFN
units and the heads of B are A's up to a permutation (and per-head rotations) when the two
compute similar functions. Correlating the features that every dense layer reads therefore
finds B's stream permutation (from every layer's stream reads at once), each layer's FFN unit
permutation (from the FFN output layer's inputs) and head permutation (from the attention
output layer's inputs, rotation-invariantly) without looking at a single weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.match import assign, polar
from rotjax.match._checks import check_pair_devices
from rotjax.match._stream import stream_polar
from rotjax.merge._capture import calls
from rotjax.merge._methods import _gram_inputs, _input_axes
from rotjax.merge._stats import _check_finite, _split, check_fits
from rotjax.models import model_family
from rotjax.tree import flatten

_HIGHEST = jax.lax.Precision.HIGHEST
ROLES = ("residual", "stream_rotation", "ffn", "heads", "query_heads", "qk_rotation", "vo_rotation")


def cross_statistics(
    model: nn.Module,
    params_a: Any,
    params_b: Any,
    batches: Iterable[Any],
    *,
    include_padding: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, jax.Array]]:
    """Moments of both models' dense-layer inputs on the same batches (real tokens only).

    Returns ``{kernel path: {"count", "sum_a", "sum_b", "sq_a", "sq_b", "cross", "m2_a",
    "m2_b", "cov"}}``: the number of rows n, per-feature sums and sums of squares, ``Σ x_A x_Bᵀ``
    (``(*layers, in, in)``), and the same second moments about the means, ``Σ (x - x̄)²`` and
    ``Σ (x_A - x̄_A)(x_B - x̄_B)ᵀ``: centred within each batch, then combined across batches
    by Chan, Golub and LeVeque's pairwise update (``M = M₁ + M₂ + n₁n₂/n δ_A δ_Bᵀ``, δ the
    difference of the two parts' means), never as ``Σ x² - n x̄²``, which loses every digit
    when a feature's mean is large against its spread (a LayerNorm shift of 300 and a spread of
    1 left float32 5% off the variance in a test). Batches are as for
    `rotjax.merge.statistics`, and so is ``include_padding`` (count padded tokens too, as the
    original RegMean code does); ``progress`` shows a tqdm bar over the batches. Two forward
    passes per batch, one program.
    """
    fam = model_family(model)
    check_fits(model, fam, {"params_a": params_a, "params_b": params_b})
    check_pair_devices({"params_a": params_a, "params_b": params_b})
    step = _cross_step(model, include_padding)
    total = None
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="activations", unit="batch", leave=False)
    for batch in batches:
        inputs, _ = _split(fam, batch)
        if np.shape(inputs[0])[0] == 0:
            continue  # an empty batch adds nothing (and a ViT cannot trace zero images)
        part = step(params_a, params_b, inputs)
        total = part if total is None else _combined_all(total, part)
    if total is None:
        raise ValueError("cross_statistics: no batches (or only empty ones)")
    _check_finite("cross_statistics", total)
    return total


@functools.cache
def _cross_step(model, include_padding):
    fam = model_family(model)

    def step(params_a, params_b, inputs):
        mask = None if include_padding else fam.token_mask(inputs)
        xa = calls(model, params_a, inputs, mask=mask)
        xb = calls(model, params_b, inputs, mask=mask)
        out = {}
        for path, cs in xa.items():  # a layer called more than once: the rows of every call
            parts = [_moments(a, b, w) for (a, w), (b, _) in zip(cs, xb[path], strict=True)]
            out[path] = functools.reduce(_combined, parts)
        return out

    return jax.jit(step)


def _moments(a, b, w):
    """One batch's moments of rows ``a``, ``b`` (``(*layers, rows, in)``) with row weights
    ``w``: about the batch's means (two passes over the rows), and the raw ones from them
    (``Σ x_A x_Bᵀ = C + n x̄_A x̄_Bᵀ``: a sum, no cancellation; one product of the rows)."""
    n = jnp.sum(w, axis=-1)
    w = w[..., None]
    sum_a, sum_b = jnp.sum(a * w, axis=-2), jnp.sum(b * w, axis=-2)
    safe = jnp.maximum(n, 1.0)[..., None]
    mean_a, mean_b = sum_a / safe, sum_b / safe
    ca, cb = a - mean_a[..., None, :], b - mean_b[..., None, :]
    m2_a, m2_b = jnp.sum(ca * ca * w, axis=-2), jnp.sum(cb * cb * w, axis=-2)
    cov = jnp.matmul(jnp.swapaxes(ca * w, -1, -2), cb, precision=_HIGHEST)
    return {
        "count": n,
        "sum_a": sum_a,
        "sum_b": sum_b,
        "sq_a": m2_a + sum_a * mean_a,
        "sq_b": m2_b + sum_b * mean_b,
        "cross": cov + sum_a[..., :, None] * mean_b[..., None, :],
        "m2_a": m2_a,
        "m2_b": m2_b,
        "cov": cov,
    }


def _combined(x, y):
    """The moments of two parts together: raw ones summed, centred ones by the pairwise update
    (Chan, Golub & LeVeque, 1979)."""
    n1, n2 = x["count"], y["count"]
    mean = lambda m, k: m / jnp.maximum(k, 1.0)[..., None]
    da = mean(y["sum_a"], n2) - mean(x["sum_a"], n1)
    db = mean(y["sum_b"], n2) - mean(x["sum_b"], n1)
    f = (n1 * n2 / jnp.maximum(n1 + n2, 1.0))[..., None]
    out = {k: x[k] + y[k] for k in x}
    out["m2_a"] += f * da * da
    out["m2_b"] += f * db * db
    out["cov"] += f[..., None] * da[..., :, None] * db[..., None, :]
    return out


_combined_all = jax.jit(lambda s, t: {p: _combined(x, t[p]) for p, x in s.items()})


def correlations(cross: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """Pearson correlation ``corr[.., i, j]`` of A's input feature i with B's feature j, per
    kernel path. A feature that never varies correlates 0 with everything: one whose variance
    is below the rounding of its mean, ``(4 ε |mean|)²`` (ε the dtype's epsilon), or zero; any
    other counts whatever its scale.

    Raises:
      ValueError: ``cross`` is not `cross_statistics`' (the path and what it lacks named).
    """
    need = {"count", "sum_a", "sum_b", "m2_a", "m2_b", "cov"}
    for path, s in cross.items():  # (a bare KeyError 'count' inside the jit)
        if not isinstance(s, Mapping) or need - set(s):
            lacks = sorted(need - set(s)) if isinstance(s, Mapping) else type(s).__name__
            raise ValueError(f"{path}: not cross_statistics' moments (lacks {lacks})")
    return _correlations({p: dict(s) for p, s in cross.items()})


@jax.jit  # one program, not a few per path
def _correlations(cross):
    out = {}
    for path, s in cross.items():
        n = jnp.maximum(s["count"], 1.0)[..., None]
        va, vb = s["m2_a"] / n, s["m2_b"] / n
        ok_a, ok_b = _varies(va, s["sum_a"] / n), _varies(vb, s["sum_b"] / n)
        sd_a, sd_b = (jnp.sqrt(jnp.where(ok, v, 1.0)) for ok, v in ((ok_a, va), (ok_b, vb)))
        cov = s["cov"] / n[..., None]
        corr = cov / sd_a[..., :, None] / sd_b[..., None, :]
        out[path] = jnp.where(ok_a[..., :, None] & ok_b[..., None, :], corr, 0.0)
    return out


def _varies(var, mean):
    """Whether a feature's variance is above the rounding of its mean (and not zero)."""
    info = jnp.finfo(var.dtype)
    return var > (4 * info.eps * mean) ** 2 + info.tiny


def group_scores(
    spec: sym.Spec, corr: Mapping[str, jax.Array], names, *, heads: str = "nuclear"
) -> dict[str, jax.Array]:
    """Mean correlation of A's unit i with B's unit j, ``S[*batch, i, j]``, for every
    permutation group in ``names`` from the dense layers whose inputs it permutes: the stream
    from every stream read (all layers), a layer's FFN units from its output layer's inputs, a
    layer's heads from its attention output's inputs. A head is d features: ``heads="nuclear"``
    scores a pair of heads by the nuclear norm of their d x d correlation block / d (the best
    rotation's mean correlation: what `rotjax.match.align` solves next), ``"trace"`` by the
    in-order features' mean correlation (no rotation, as OT fusion pairs them). A per-head
    permutation (``hperm``: the query heads inside each key-value head k) scores query head g
    of A's head k with query head g' of B's head k, ``S[*batch, k, g, g']``.

    Raises:
      ValueError: a correlation of a param the spec does not have, or that does not fit its
        kernel's inputs (path and shapes named).
    """
    sym.check_spec(spec)  # (a forgotten spec was JAX's "Non-hashable static arguments")
    if heads not in ("nuclear", "trace"):  # (any other word scored as "trace", silently)
        raise ValueError(f"heads must be 'nuclear' or 'trace', got {heads!r}")
    for path, c in corr.items():
        if path not in spec.params:
            raise ValueError(f"{path}: correlations of a param the spec does not have")
        _gram_inputs(path, spec.params[path].shape, np.shape(c), "a correlation")
    return _group_scores(spec, tuple(names), heads, dict(corr))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one program, not a few per path
def _group_scores(spec, names, heads, corr):
    out = {}
    for name in names:
        g = spec.groups[name]
        total, count = 0.0, 0
        for path, act in spec.users[name]:
            if path not in corr:
                continue
            c = corr[path]
            b = c.ndim - 2
            kernel = spec.params[path].shape
            n_in = _input_axes(path, spec.params[path], c.shape, "a correlation")[1]
            axes = tuple(ax - b for ax in act.axes)  # (head, item) axes for an hperm
            if not all(0 <= ax < n_in for ax in axes):  # acts on an output axis of this kernel
                continue
            in_shape = kernel[b : b + n_in]
            c = c.reshape(*c.shape[:b], *in_shape, *in_shape)
            pairs = [(b + ax, b + n_in + ax) for ax in axes]  # A's axis, B's axis
            c = jnp.moveaxis(c, [x for pair in pairs for x in pair], range(b, b + 2 * len(axes)))
            rest = math.prod(in_shape) // math.prod(c.shape[b : b + 2 * len(axes) : 2])
            c = c.reshape(*c.shape[: b + 2 * len(axes)], rest, rest)
            if g.kind == "hperm":  # the same head on both sides: (*batch, H, n, n', rest, rest)
                c = jnp.moveaxis(jnp.diagonal(c, axis1=b, axis2=b + 1), -1, b)
            if rest == 1:
                s = c[..., 0, 0]
            elif heads == "nuclear":
                s = jnp.linalg.svd(c, compute_uv=False).sum(-1) / rest
            else:
                s = jnp.trace(c, axis1=-2, axis2=-1) / rest
            # A global group (the stream) read by stacked layers: every layer counts.
            extra = s.ndim - (3 if g.kind == "hperm" else 2) - len(g.batch)
            total = total + (jnp.sum(s, axis=tuple(range(extra))) if extra else s)
            count += math.prod(s.shape[:extra]) if extra else 1
        if count:
            out[name] = total / count
    return out


def activation_init(
    spec: sym.Spec,
    cross: Mapping[str, Mapping[str, jax.Array]],
    *,
    params: tuple[Any, Any] | None = None,
    roles=ROLES,
    solver: str = "scipy",
) -> sym.Transform:
    """The element of B's group that best matches A's activations, as a transform to start
    `rotjax.match.align` from:
    ``align(spec, a, b, solve=match.ALL, init=activation_init(spec, cross, params=(a, b)))``.

    - Permutations of the stream, the FFN units and the heads: assignment on `group_scores`;
      then (grouped-query attention) the query heads inside each key-value head, scored with
      B's side of the correlations moved by that head permutation first.
    - A stream rotation (pre-norm models in canonical form, whose stream reads are the
      normalised, mean-free stream itself): ``Q = polar(Σ X_Bᵀ X_A)`` over every stream read of
      every layer (Procrustes on activations, ``Q 1 = 1`` kept), on top of the permutation.
    - With ``params=(A, B)``, each head's rotations (groups ``qk_rotation``, ``vo_rotation``;
      not RoPE's pair rotations): Procrustes of B's head vectors, after the head permutation π,
      onto A's, ``R[h] = polar(Σ y_B[π h]ᵀ y_A[h])``, with y the queries and keys (one R for
      both) or the head outputs that the output projection reads. A query is ``y = x W + b``
      of its layer's input x, so its moments follow from the inputs' without another pass:
      ``Σ y_Bᵀ y_A = W_Bᵀ (Σ x_Bᵀ x_A) W_A + W_Bᵀ s_B b_Aᵀ + b_B s_Aᵀ W_A + n b_B b_Aᵀ``
      (``s`` the input sums, n the rows).

    Groups no dense input reveals (scales, and rotations without ``params``) are left out
    (the identity). ``roles``: those of `ROLES` to solve (a role alone may be a string).
    ``solver``: the assignment solver of the permutations, as `rotjax.match.assign`'s.

    Raises:
      ValueError: a role not in `ROLES` (a typo, or a block of `rotjax.match.align`'s
        ``solve`` such as ``"rotation"``, gave the identity for it, silently), params that do
        not fit the spec (paths and shapes named).
    """
    from rotjax.merge._ot import _moved_b  # (_ot builds on this module)

    sym.check_spec(spec)  # (a forgotten spec was an AttributeError)
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    if unknown := [r for r in roles if r not in ROLES]:
        raise ValueError(f"unknown role(s) {unknown}; expected some of {ROLES}")
    for which, p in zip(("params[0] (A)", "params[1] (B)"), params or (), strict=False):
        sym.validate(spec, p, which)
    names = spec.select(roles=[r for r in roles if r in ("residual", "ffn", "heads")])
    corr = correlations(cross)
    scores = group_scores(spec, corr, names, heads="nuclear")
    out = {n: assign(s, solver=solver) for n, s in scores.items()}
    if queries := spec.select(roles=["query_heads"]) if "query_heads" in roles else ():
        # Query head g of A's key-value head k meets those of the B head moved onto k.
        heads = {n: p for n, p in out.items() if spec.groups[n].role == "heads"}
        scores = group_scores(spec, _moved_b(spec, corr, heads), queries, heads="nuclear")
        out |= {n: assign(s, solver=solver) for n, s in scores.items()}
    cross = {p: dict(s) for p, s in cross.items()}
    for name in spec.select(roles=["stream_rotation"]) if "stream_rotation" in roles else ():
        out[name] = _stream_rotation(spec, name, cross, out.get(spec.groups[name].over))
    if params is not None:
        flat = [dict(zip(*flatten(p)[:2], strict=True)) for p in params]
        for name in spec.select(roles=[r for r in roles if r.endswith("_rotation")]):
            g = spec.groups[name]
            if g.kind != "orth" or g.pairs:
                continue
            r = _head_rotation(spec, name, cross, out.get(g.over), *flat)
            if r is not None:
                out[name] = r
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))  # one program, not a few per path
def _head_rotation(spec, name, cross, perm, flat_a, flat_b):
    m = _head_moments(spec, name, cross, perm, flat_a, flat_b)
    return None if m is None else polar(m)


def _head_moments(spec, name, cross, perm, flat_a, flat_b):
    """``Σ y_B[π h]ᵀ y_A[h]`` per head (``(*batch, H, d, d)``) over the users of the rotation
    group ``name`` whose inputs were captured, or None if there are none."""
    g = spec.groups[name]
    k, H = len(g.batch), g.size
    heads = lambda x, axis: (  # B's heads in the order the permutation gives them
        x if perm is None else jnp.take_along_axis(x, _along(perm, x.ndim, k, axis), axis=axis)
    )
    total = None
    for path, act in spec.users[name]:
        if path not in cross or len(spec.params[path].shape) != k + 3:
            continue
        s = cross[path]
        if act.axes == (k, k + 1):  # (H, d, out): its inputs are heads
            c = s["cross"].reshape(*g.batch, H, g.dim, H, g.dim)
            c = jnp.diagonal(heads(c, k + 2), axis1=k, axis2=k + 2)  # (*batch, d_A, d_B, H)
            m = jnp.moveaxis(c, -1, k).swapaxes(-1, -2)
        elif act.axes == (k + 1, k + 2):  # (in, H, d): y = x W + b
            wa, wb = flat_a[path], heads(flat_b[path], k + 1)
            hi = dict(precision=_HIGHEST)
            m = jnp.einsum("...ihx,...ji,...jhy->...hxy", wb, s["cross"], wa, **hi)
            bias = path.rsplit("/", 1)[0] + "/bias"
            if bias in flat_a:
                ba, bb = flat_a[bias], heads(flat_b[bias], k)
                m += jnp.einsum("...ihx,...i,...hy->...hxy", wb, s["sum_b"], ba, **hi)
                m += jnp.einsum("...hx,...i,...ihy->...hxy", bb, s["sum_a"], wa, **hi)
                m += s["count"][..., None, None, None] * (bb[..., :, None] * ba[..., None, :])
        else:
            continue
        total = m if total is None else total + m
    return total


def _along(perm, ndim, k, axis):
    """``perm`` (``(*batch, H)``) shaped to gather axis ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[:k] = perm.shape[:k]
    shape[axis] = perm.shape[-1]
    return perm.reshape(shape)


@functools.partial(jax.jit, static_argnums=(0, 1))  # one program, not a few per path
def _stream_rotation(spec, name, cross, perm):
    """Procrustes of the stream reads, B's after the stream permutation ``perm``."""
    g = spec.groups[name]
    m = jnp.zeros((g.size, g.size), jnp.float32)
    for path, act in spec.users[name]:
        if path not in cross:
            continue
        kernel = spec.params[path].shape
        c = cross[path]["cross"]  # Σ x_A x_Bᵀ, (*layers, in, in)
        if act.axes[0] != c.ndim - 2 or kernel[act.axes[0]] != c.shape[-1]:
            continue  # the stream is an output axis of this kernel
        m = m + jnp.sum(c.reshape(-1, g.size, g.size), axis=0)
    if perm is not None:  # B's features in the order the permutation gives them
        m = m[:, perm]
    m = m.T  # Σ x_B x_Aᵀ: rows B's features, columns A's
    # In m's dtype: a float64 model's rotation orthogonal to float64's precision
    return stream_polar(m, keeps_ones=g.keeps_ones)
