"""The stream block: an orthogonal Q on the residual stream of a pre-norm model in canonical
form (`rotjax.symmetry.canonicalize`), in closed form given every other group.

``J`` depends on Q through ``Σ_p ‖A_p - B̃_p Q‖²`` over every param with the stream axis (B̃:
B with every other group applied, the stream permutation included: Q acts after it), so Q
maximises ``tr(Qᵀ M)`` with ``M = Σ_p B̃_pᵀ A_p`` (``D x D``, stream axis against stream axis):
the orthogonal polar factor of M. With ``Q 1 = 1`` (LayerNorm models) ``Q = U R Uᵀ + 11ᵀ/D``
for U an orthonormal basis of the complement of 1, and ``tr(Qᵀ M) = tr(Rᵀ Uᵀ M U) + const``,
so ``R = polar(Uᵀ M U)``. Q contains every permutation of the stream: once it is solved the
stream permutation is frozen (its assignment would see B rotated after it, the wrong order),
so the permutation serves as Q's starting point, and Q can only improve on it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rotjax import symmetry as sym
from rotjax.match._objective import Context, masked, moved, sub
from rotjax.match._solvers import polar

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stream_rotations(spec, names, exclusive, a, b, t):
    out = {}
    for n in names:
        g = spec.groups[n]
        k = len(g.batch)
        m = jnp.zeros(g.shape, jnp.float32)
        for path, act in spec.users[n]:
            over = spec.groups[n].over
            if exclusive and any(x.group not in (n, over) for x in spec.params[path].actions):
                continue
            bp = sym.apply_to_leaf(spec, path, b[path], t, skip=frozenset([n]))
            am, bm = moved(a[path], act.axes, k), moved(bp, act.axes, k)
            m = m + jnp.einsum("...ir,...jr->...ij", bm, am, precision=_HIGHEST)
        out[n] = stream_polar(m, keeps_ones=g.keeps_ones)
    return out


def stream_polar(m: jax.Array, *, keeps_ones: bool) -> jax.Array:
    """The orthogonal Q nearest ``m[..., D, D]`` (maximising ``tr(Qᵀ M)``), in ``m``'s dtype:
    ``polar(M)``, or with ``keeps_ones`` (``Q 1 = 1``) ``U polar(Uᵀ M U) Uᵀ + 11ᵀ/D`` with U
    an orthonormal basis of the complement of 1 (`rotjax.symmetry.ones_complement`)."""
    if not keeps_ones:
        return polar(m)
    d = m.shape[-1]
    u = sym.ones_complement(d, m.dtype)
    r = polar(jnp.einsum("ia,...ij,jb->...ab", u, m, u, precision=_HIGHEST))
    ones = jnp.full((d, d), 1.0 / d, m.dtype)
    return jnp.einsum("ia,...ab,jb->...ij", u, r, u, precision=_HIGHEST) + ones


def stream_stage(
    ctx: Context, t: dict, active: frozenset, *, names, exclusive: bool = False
) -> dict:
    """Solve the stream rotations ``names`` given every other group in ``active``;
    ``exclusive`` uses only the params on which no other group acts (embeddings, norms,
    classifier: the start, like the stream permutation's)."""
    new = _stream_rotations(ctx.spec, tuple(names), exclusive, ctx.a, ctx.b, sub(t, active))
    return masked(t, new, ctx.masks)
