"""Merging attention heads by their circuits, not by their factors.

A head computes through two bilinear maps (Elhage et al., 2021, "A Mathematical Framework for
Transformer Circuits"): the query-key circuit ``x̃_i W̃_Q W̃_Kᵀ x̃_jᵀ`` (the attention logits,
``x̃ = [x, 1]`` so that biases are rows of ``W̃ = [W; b]``) and the output-value circuit
``x̃_j W̃_V W_O`` (what a token attended to writes). Only the products ``M_QK = W̃_Q W̃_Kᵀ``
and ``M_OV = W̃_V W_O`` are functions of the model; the factors are defined up to every
invertible d x d map G (``W̃_Q G``, ``W̃_K G⁻ᵀ``): the paper's per-head rotations and scales are
the orthogonal and diagonal parts of that symmetry. Averaging the factors of two models mixes
in cross terms ``W̃_Q^A (W̃_K^B)ᵀ`` even when the factors are aligned; averaging the circuits
does not, and needs no alignment of G at all.

`circuits` therefore merges each head's circuits, ``M = Σ_i λ_i M_i / Σ λ_i``, and factors the
result back to the model's head width d by its truncated SVD (Eckart-Young: the best rank-d
approximation in Frobenius norm; ``M`` has rank up to N d). Everything but the heads' Q, K, V,
O (their kernels and biases) comes from a merge of the caller's choice (`average`, `fisher`,
`regmean`, ...), so the circuits are a plug-in after any method, as matching is one before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.match import polar
from rotjax.merge._methods import _weighted, checked_models, model_weights, scalar
from rotjax.tree import placed_like, wide

_HIGHEST = jax.lax.Precision.HIGHEST
_ROLES = {"qk_rotation": "qk_scale", "vo_rotation": "vo_scale"}


def circuits(
    spec: sym.Spec,
    merged: Any,
    params_list: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
) -> Any:
    """``merged`` with every attention head replaced by the merge of the heads' circuits.

    For each head (each element of a spec group of role ``qk_rotation`` or ``vo_rotation``),
    the params that group rotates are split by the matching ``*_scale`` group into the left
    factor (scaled by ``a``: W̃_Q, W̃_V, with DeBERTa's position query projection) and the right
    one (scaled by ``1/a``: W̃_K, W_O, ...), each viewed as ``F (d, r)``; the head's circuit is
    ``M_i = F_leftᵀ F_right`` and the merged head is the best rank-d factorisation of
    ``Σ_i λ_i M_i / Σ λ_i``: ``U_d S_d^½`` and ``V_d S_d^½`` (computed from QR factors of the
    stacked factors, never forming M: ``r`` can be the model width), turned by the orthogonal
    map that brings them closest to ``merged``'s own factors (only to keep the params near the
    base merge; the function does not depend on it).

    Exact for the models themselves: ``circuits(spec, a, [a, a])`` computes ``a``'s function
    (other factors of the same circuits). Invariant to each model's per-head rotations and
    scales (and any invertible per-head map), so it needs no alignment of them; head and stream
    permutations must still be aligned (`rotjax.match.align`), as for every merge.

    Heads whose query-key circuit depends on the positions (rotary embeddings: the group's
    ``pairs``) keep ``merged``'s Q and K; their value-output circuits are merged. DeBERTa-v2
    with separate position projections and both c2p and p2c: the circuit merged is
    ``[W_Q | W_PQ]ᵀ [W_K | W_PK]``, whose position-to-position block the model never computes;
    the rank-d fit spends some of its accuracy on it (exact still for identical models).

    Args:
      spec: the models' symmetry spec (`rotjax.models.family(config).symmetry_spec`).
      merged: the base merge (e.g. ``merge.average(params_list)``): every param the circuits do
        not replace comes from it.
      params_list: the (aligned) models, N >= 2.
      weights: λ, one per model (default all 1; a model of weight 0 is left out).

    Returns:
      A new params pytree like ``merged`` (leaves keep their dtypes).

    Raises:
      ValueError: params that differ between the models or from ``merged``, params that do not
        fit the spec, bad weights, or a rotated param that no scale group assigns to a side.
    """
    checked_models(params_list)
    paths, (base_leaves, *leaves), treedef = checked_models([merged, *params_list], first="merged")
    sym.validate(spec, params_list[0])
    w, leaves = _weighted(model_weights(weights, len(params_list)), leaves)  # weight 0: left out
    w = scalar(w / w.sum())  # float64 with x64
    base = dict(zip(paths, base_leaves, strict=True))
    models = [dict(zip(paths, x, strict=True)) for x in leaves]
    out = dict(base)
    for name, g in spec.group_items:
        if g.kind != "orth" or g.role not in _ROLES or (g.pairs and g.role == "qk_rotation"):
            continue
        sides = _sides(spec, name, g)
        views = {p: _View(g, a, np.shape(base[p])) for p, a in sides["left"] + sides["right"]}
        left, right = [p for p, _ in sides["left"]], [p for p, _ in sides["right"]]
        new_left, new_right = _merge_heads(
            [_stack(views, m, left) for m in models],
            [_stack(views, m, right) for m in models],
            w,
            _stack(views, base, left),
            _stack(views, base, right),
        )
        for ps, new in ((left, new_left), (right, new_right)):
            splits = np.cumsum([views[p].width for p in ps])[:-1]
            for p, part in zip(ps, jnp.split(new, splits, axis=-1), strict=True):
                leaf = views[p].back(part).astype(jnp.asarray(base[p]).dtype)
                out[p] = placed_like(leaf, base[p])  # a sharded model stays sharded
    return jax.tree.unflatten(treedef, [out[p] for p in paths])


def _sides(spec: sym.Spec, name: str, g: sym.Group) -> dict[str, list]:
    """The params ``name`` rotates, split by the power of the scale group of the same heads."""
    scales = [
        s
        for s, h in spec.group_items
        if (h.kind, h.role, h.over, h.batch, h.layer)
        == ("scale", _ROLES[g.role], g.over, g.batch, g.layer)
    ]
    powers = {}
    for s in scales:
        powers |= {p: a.power for p, a in spec.users[s]}
    sides: dict[str, list] = {"left": [], "right": []}
    for p, a in spec.users[name]:
        if p not in powers:
            raise ValueError(
                f"circuits: {p} is rotated by {name} but scaled by no {_ROLES[g.role]} group,"
                " so its side of the circuit is unknown"
            )
        sides["left" if powers[p] > 0 else "right"].append((p, a))
    if not (sides["left"] and sides["right"]):
        raise ValueError(f"circuits: {name} rotates params of only one side: {sides}")
    return sides


def _stack(views, params, paths):
    return jnp.concatenate([views[p].to(params[p]) for p in paths], axis=-1)


class _View:
    """A param seen as ``(*batch, heads, d, r)``: batch axes first, then the group's head and
    dim axes, every other axis flattened into r (``to``), and back (``back``)."""

    def __init__(self, g: sym.Group, action: sym.Action, shape: tuple[int, ...]):
        k = len(g.batch)
        head, dim = action.axes
        rest = [i for i in range(k, len(shape)) if i not in (head, dim)]
        self.order = [*range(k), head, dim, *rest]
        self.moved = tuple(shape[i] for i in self.order)
        self.lead = self.moved[: k + 2]
        self.width = int(np.prod(self.moved[k + 2 :], dtype=np.int64))

    def to(self, x) -> jax.Array:
        return jnp.transpose(wide(x), self.order).reshape(*self.lead, -1)

    def back(self, y) -> jax.Array:
        return jnp.transpose(y.reshape(self.moved), np.argsort(self.order))


@jax.jit
def _merge_heads(lefts, rights, w, base_left, base_right):
    """The rank-d factors ``(F_L, F_R)``, each ``(..., d, r)``, of ``Σ_i w_i L_iᵀ R_i``.

    With ``A = [w_1 L_1; ...; w_N L_N]`` and ``B = [R_1; ...; R_N]`` (``(..., N d, r)``), the sum
    is ``Aᵀ B = Q_A (R_A R_Bᵀ) Q_Bᵀ`` from the QR factors ``Aᵀ = Q_A R_A``, ``Bᵀ = Q_B R_B``; the
    SVD of the small core ``R_A R_Bᵀ = U S Vᵀ`` gives ``F_L = (Q_A U_d S_d^½)ᵀ``, ``F_R = (Q_B
    V_d S_d^½)ᵀ``, then both turned by ``O = polar(F_L^base F_Lᵀ + F_R^base F_Rᵀ)``, the
    rotation closest to the base factors (``F_Lᵀ F_R`` does not change).
    """
    mm = lambda x, y: jnp.matmul(x, y, precision=_HIGHEST)
    t = lambda x: jnp.swapaxes(x, -1, -2)
    d = lefts[0].shape[-2]
    a = jnp.concatenate([wi * x for wi, x in zip(w, lefts, strict=True)], axis=-2)
    b = jnp.concatenate(rights, axis=-2)
    qa, ra = jnp.linalg.qr(t(a))
    qb, rb = jnp.linalg.qr(t(b))
    u, s, vt = jnp.linalg.svd(mm(ra, t(rb)), full_matrices=False)
    root = jnp.sqrt(s[..., :d])[..., :, None]
    f_left = t(mm(qa, u[..., :d])) * root
    f_right = mm(vt[..., :d, :], t(qb)) * root
    if (short := d - f_left.shape[-2]) > 0:  # rank r < d (a head wider than its input + 1)
        pad = [(0, 0)] * (f_left.ndim - 2) + [(0, short), (0, 0)]  # zero rows: the same sum
        f_left, f_right = jnp.pad(f_left, pad), jnp.pad(f_right, pad)
    o = polar(mm(base_left, t(f_left)) + mm(base_right, t(f_right)))
    return mm(o, f_left), mm(o, f_right)
