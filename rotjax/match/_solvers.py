"""Closed-form block solvers: orthogonal Procrustes, per-head rescaling, linear assignment.

All work on stacked problems (leading batch axes) and all but the host assignment are jittable.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from rotjax import symmetry as sym

SOLVERS = ("scipy", "optax")


def _check_square(name: str, shape: tuple[int, ...], *, even: bool = False) -> None:
    """ValueError unless ``shape`` is a stack of square matrices (of even size if ``even``)."""
    if len(shape) < 2 or shape[-1] != shape[-2] or (even and shape[-1] % 2):
        size = "even-sized square" if even else "square"
        raise ValueError(f"{name} must be {size} matrices (..., n, n), got shape {shape}")


def procrustes(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``argmax_{R ∈ O(d)} tr(Rᵀ M)`` for every ``M`` in ``m[..., d, d]``, and the maximum.

    With ``M = U S Vᵀ``: ``R = U Vᵀ``, the orthogonal polar factor of M (see `polar`), and
    ``max tr(Rᵀ M) = Σ S`` (the nuclear norm of M). Reflections are allowed (the optimum over
    the whole orthogonal group). For the paper's Thm. 4.1, ``M = Σ_p B_pᵀ A_p`` sums the
    cross-covariances of every weight and bias the rotation acts on, so that ``‖A - B R‖²``
    summed over them is minimal.
    """
    r = polar(m)
    return r, jnp.einsum("...ik,...ik->...", r, m, precision=_HIGHEST)


def pair_procrustes(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`procrustes` over the pair rotations only (``orth`` groups with ``pairs``: one SO(2)
    angle per pair of features (i, i + d/2), the rotations that commute with RoPE).

    With R's pair block ``[[c, s], [-s, c]]`` on rows and columns (i, i + d/2):
    ``tr(Rᵀ M) = Σ_i c_i u_i + s_i v_i`` for ``u_i = M[i, i] + M[i', i']`` and
    ``v_i = M[i, i'] - M[i', i]`` (i' = i + d/2), maximised by ``(c_i, s_i) = (u_i, v_i) /
    ‖(u_i, v_i)‖`` (a 2-D polar factor per pair), with maximum ``Σ_i ‖(u_i, v_i)‖``. A pair
    with ``u = v = 0`` takes the identity.

    Raises:
      ValueError: ``m`` is not a stack of square matrices of even size.
    """
    _check_square("m", np.shape(m), even=True)
    h = m.shape[-1] // 2
    diag = lambda x: jnp.diagonal(x, axis1=-2, axis2=-1)
    u = diag(m[..., :h, :h]) + diag(m[..., h:, h:])
    v = diag(m[..., :h, h:]) - diag(m[..., h:, :h])
    norm = jnp.hypot(u, v)
    safe = jnp.where(norm > 0, norm, 1.0)
    cos, sin = jnp.where(norm > 0, u / safe, 1.0), jnp.where(norm > 0, v / safe, 0.0)
    return sym.pair_rotations(cos, sin), jnp.sum(norm, axis=-1)


_HIGHEST = jax.lax.Precision.HIGHEST
# Newton-Schulz: quintic steps (Muon's coefficients) lift small singular values ~3.4x per
# step into [0.7, 1.2]; cubic steps σ(3 - σ²)/2 then converge quadratically to 1.
_QUINTIC = (3.4445, -4.7750, 2.0315)
_CUBIC = (1.5, -0.5, 0.0)


@functools.partial(jax.jit, static_argnames="max_steps")  # one program, also called eagerly
def polar(m: jax.Array, *, max_steps: int = 12) -> jax.Array:
    """The orthogonal polar factor ``U Vᵀ`` of every ``M = U S Vᵀ`` in ``m[..., d, d]``.

    Jittable and vmappable, not differentiable in reverse mode (its iteration is a
    ``lax.while_loop``; so is `procrustes`): to learn a rotation by gradient, parametrise it
    (e.g. ``expm`` of a skew-symmetric matrix) and move params with `rotjax.symmetry.apply`,
    which is differentiable.

    Newton-Schulz iteration ``X ← p(X Xᵀ) X`` from ``X₀ = M / λ^½``, with λ ≥ σ_max(M)² the
    smaller of ``‖M Mᵀ‖_F`` and the largest absolute row sum of ``M Mᵀ`` (singular values in
    (0, 1]); it keeps U and V and maps every singular value to 1: matmuls only, so it is fast
    on every backend and batches perfectly. Quintic steps while some ``|X Xᵀ - I|`` entry
    exceeds 1/2 (at most ``max_steps / 2``), then cubic steps until ``‖X Xᵀ - I‖_F < 1e-3``
    (``max_steps`` steps in all), then one more cubic step (quadratic convergence takes that
    to float32 rounding; two more for float64). Matrices that do not get there
    (rank-deficient M, condition number beyond a few thousand) take the SVD instead, computed
    only when some matrix of the batch needs it, and then for a quarter of the batch when at
    most a quarter needs it.
    Either way the result is ``U Vᵀ`` to the rounding of ``m``'s dtype.

    Raises:
      ValueError: ``m`` is not a stack of square matrices (also for `procrustes`).
    """
    m = jnp.asarray(m)
    _check_square("m", m.shape)
    if m.size == 0:  # no matrices (or 0 x 0 ones)
        return m
    x, ok = _newton_schulz(m, max_steps)
    d = m.shape[-1]
    flat_m, flat_x, flat_ok = m.reshape(-1, d, d), x.reshape(-1, d, d), ok.reshape(-1)
    n = flat_m.shape[0]
    # The SVD for the matrices Newton-Schulz left (all of them first in `failed`): a batch of
    # n/4 (rounded up) when that holds them all, else all n.
    sizes = sorted({-(-n // 4), n})
    failed = jnp.argsort(flat_ok, stable=True)

    def svd_fix(size):
        def fix(x):
            idx = failed[:size]
            u, _, vt = jnp.linalg.svd(flat_m[idx], full_matrices=False)
            return x.at[idx].set(jnp.matmul(u, vt, precision=_HIGHEST))

        return fix

    count = jnp.sum(~flat_ok)
    which = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), count))
    out = jax.lax.switch(which, [lambda x: x] + [svd_fix(s) for s in sizes], flat_x)
    return out.reshape(m.shape)


def _newton_schulz(m, max_steps, pieces=2):
    """`polar` by Newton-Schulz alone: ``(X, ok)`` with ``ok`` where X is orthogonal.

    The batch is iterated in ``pieces`` independent parts: XLA:CPU runs each matmul on one
    thread and independent ones side by side, so that halves keep two cores busy (1.6x on
    BERT-base's 288 heads); elsewhere they are just two matmuls per step instead of one."""
    if math.prod(m.shape[:-2]) >= 2 * pieces:
        parts = jnp.array_split(m.reshape(-1, *m.shape[-2:]), pieces)
    else:
        parts = [m]
    eye = lambda g: jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), g.shape)
    mm = lambda x, y: jnp.matmul(x, y, precision=_HIGHEST)
    # X Xᵀ rather than XᵀX (same singular values; contracting minor axes, the fast matmul
    # form on CPU), so a step is X ← p(X Xᵀ) X.
    gram = lambda x: mm(x, jnp.swapaxes(x, -1, -2))
    off = lambda g: g - eye(g)  # X Xᵀ - I
    step = lambda coef: (
        lambda x, g: mm(coef[0] * eye(g) + coef[1] * g + (coef[2] * mm(g, g) if coef[2] else 0), x)
    )
    quintic_step, cubic_step = step(_QUINTIC), step(_CUBIC)
    largest = lambda f, gs: jnp.max(jnp.stack([jnp.max(f(g)) for g in gs]))

    def start(m):
        g0 = gram(m)
        # λ_max(G) = σ_max² is at most ‖G‖_F and at most the largest absolute row sum of G
        # (Gershgorin); the second is tight for the nearly diagonal G of well-conditioned M.
        rows = jnp.max(jnp.sum(jnp.abs(g0), axis=-1, keepdims=True), axis=-2, keepdims=True)
        norm = jnp.sqrt(jnp.minimum(jnp.linalg.norm(g0, axis=(-2, -1), keepdims=True), rows))
        safe = jnp.where(norm > 0, norm, 1)
        return m / safe, g0 / (safe * safe)

    def cond(state):
        _, gs, i = state
        far = largest(lambda g: jnp.linalg.norm(off(g), axis=(-2, -1)), gs)
        return (far > 1e-3) & (i < max_steps)

    def body(state):
        xs, gs, i = state
        # Quintic steps while needed, at most half of them (a matrix that never converges,
        # such as M = 0, must not keep the others from their cubic steps).
        quintic = (largest(lambda g: jnp.abs(off(g)), gs) > 0.5) & (2 * i < max_steps)
        xs = [
            jax.lax.cond(quintic, quintic_step, cubic_step, x, g)
            for x, g in zip(xs, gs, strict=True)
        ]
        return xs, [gram(x) for x in xs], i + 1

    xs, gs = zip(*[start(p) for p in parts], strict=True)
    xs, gs, _ = jax.lax.while_loop(cond, body, (list(xs), list(gs), 0))
    err = jnp.concatenate([jnp.linalg.norm(off(g), axis=(-2, -1)).reshape(-1) for g in gs])
    # ‖X Xᵀ - I‖_F < 1e-3 bounds every |σ - 1| by 5e-4; one more cubic step (|σ - 1| → ~1.5
    # (σ - 1)²) takes that to float32 rounding (4e-7), two more to float64's (2e-13, 1e-16).
    for k in range(3 if m.dtype == jnp.float64 else 1):
        gs = gs if k == 0 else [gram(x) for x in xs]
        xs = [cubic_step(x, g) for x, g in zip(xs, gs, strict=True)]
    return jnp.concatenate(xs).reshape(m.shape), err.reshape(m.shape[:-2]) < 1e-3  # NaN: not ok


def scale_objective(a, c1, b1, b2, c2):
    """``f(a) = c1 a² - 2 b1 a - 2 b2 / a + c2 / a²``: the rescaling objective up to a constant.

    For a head with weights ``W_+`` scaled by ``a`` (Q, or V) and ``W_-`` by ``1/a`` (K, or O):
    ``Σ‖A_+ - a B_+‖² + Σ‖A_- - B_- / a‖²  = f(a) + const`` with ``c1 = Σ‖B_+‖²``,
    ``b1 = Σ⟨A_+, B_+⟩``, ``b2 = Σ⟨A_-, B_-⟩``, ``c2 = Σ‖B_-‖²`` (paper, Eq. 11-12).
    """
    return c1 * a * a - 2 * b1 * a - 2 * b2 / a + c2 / (a * a)


def best_scale(c1, b1, b2, c2, *, current=None, grid: int = 256, iters: int = 60) -> jax.Array:
    """``argmin_{a > 0} f(a)`` (see `scale_objective`), elementwise over the arrays.

    Stationary points are the positive roots of the quartic ``c1 a⁴ - b1 a³ + b2 a - c2``
    (``f'(a) = 2 q(a) / a³``). They lie in ``[1 / (1 + max(|b2|, |b1|, c1) / c2),
    1 + max(|b1|, |b2|, c2) / c1]`` (Cauchy's bound on q and on its reciprocal). Every sign
    change of q from - to + on a log-spaced grid of that interval brackets a local minimum,
    refined by bisection in log space; the candidate (or interval end) with the least objective
    wins. Vectorised and jittable (no eigen-solver, so it runs the same on any accelerator).
    A head with nothing to fit (``c1 = c2 = 0``) keeps ``a = 1``. The interval is clipped to
    ``[1e-12, 1e12]`` and the grid reads the sign of ``q(a) / a²``, whose terms stay within
    float32 there (``[1e-6, 1e6]`` before, for ``q`` itself: a scale of 1e-7 between the
    models came back as 1e-6). ``current`` (the scales in place, > 0) is a candidate too, so
    the objective never rises where two minima share one grid cell and bisection finds the
    worse (a coordinate descent stays monotone). It is weighed against the best root by the
    factored gap ``f(a) - f(b) = (a - b) (c1 (a + b) - 2 b1 + 2 b2 / (ab) - c2 (a + b) / (ab)²)``:
    f's own terms cancel to float32's eps of their size, which hid every scale within
    ``sqrt(eps) ≈ 3e-4`` of ``current`` (it was kept, up to 3e-4 off the minimum).
    """
    c1, b1, b2, c2 = (jnp.asarray(x, jnp.float32) for x in (c1, b1, b2, c2))
    tiny = jnp.finfo(jnp.float32).tiny
    hi = 1 + jnp.maximum(jnp.maximum(jnp.abs(b1), jnp.abs(b2)), c2) / jnp.maximum(c1, tiny)
    lo = 1 / (1 + jnp.maximum(jnp.maximum(jnp.abs(b1), jnp.abs(b2)), c1) / jnp.maximum(c2, tiny))
    lo_log, hi_log = jnp.log(jnp.clip(lo, 1e-12, 1.0)), jnp.log(jnp.clip(hi, 1.0, 1e12))
    t = jnp.linspace(0.0, 1.0, grid).reshape((1,) * c1.ndim + (grid,))
    logs = lo_log[..., None] + (hi_log - lo_log)[..., None] * t  # (..., grid)
    ex = lambda x: x[..., None]
    quartic = lambda la: _quartic(jnp.exp(la), ex(c1), ex(b1), ex(b2), ex(c2))
    q = quartic(logs)
    left, right = logs[..., :-1], logs[..., 1:]
    bracket = (q[..., :-1] < 0) & (q[..., 1:] >= 0)

    def bisect(_, lr):
        left, right = lr
        mid = 0.5 * (left + right)
        neg = quartic(mid) < 0
        return jnp.where(neg, mid, left), jnp.where(neg, right, mid)

    left, right = jax.lax.fori_loop(0, iters, bisect, (left, right))
    roots = jnp.exp(0.5 * (left + right))
    cand = jnp.concatenate([roots, jnp.exp(logs[..., :1]), jnp.exp(logs[..., -1:])], axis=-1)
    valid = jnp.concatenate([bracket, jnp.ones((*bracket.shape[:-1], 2), bool)], axis=-1)
    f = scale_objective(cand, ex(c1), ex(b1), ex(b2), ex(c2))
    best = jnp.take_along_axis(cand, jnp.argmin(jnp.where(valid, f, jnp.inf), -1)[..., None], -1)
    best = best[..., 0]
    if current is not None:  # ties keep the root
        current = jnp.broadcast_to(jnp.asarray(current, jnp.float32), c1.shape)
        ab = current * best
        gap = (current - best) * (
            c1 * (current + best) - 2 * b1 + 2 * b2 / ab - c2 * (current + best) / (ab * ab)
        )
        best = jnp.where((current > 0) & (gap < 0), current, best)
    return jnp.where((c1 > 0) | (c2 > 0), best, 1.0)


def _quartic(a, c1, b1, b2, c2):
    """``q(a) / a²`` (the sign of ``f'``): ``c1 a² - b1 a + b2 / a - c2 / a²``."""
    return (c1 * a - b1) * a + (b2 - c2 / a) / a


def assign(score: np.ndarray | jax.Array, *, solver: str = "scipy") -> jax.Array:
    """``π = argmax_π Σ_i score[..., i, π[i]]`` for every matrix of ``score[..., n, n]``.

    ``"scipy"`` solves each matrix on the host with `scipy.optimize.linear_sum_assignment`
    (Jonker-Volgenant), independent matrices on a thread pool; ``"optax"`` uses
    `optax.assignment.hungarian_algorithm`, which traces into a jitted graph (for accelerators).
    Returns int32 permutations of shape ``score.shape[:-1]``.

    Raises:
      ValueError: a score that is not a stack of square matrices (a rectangular one was
        solved as a partial assignment, silently), or another solver.
      TypeError: a traced score with ``"scipy"`` (under `jax.jit`: use ``"optax"``).
    """
    _check_square("score", np.shape(score))
    if solver == "scipy" and isinstance(score, jax.core.Tracer):
        raise TypeError(
            "score is traced (under jax.jit or jax.vmap): solver='scipy' solves on the host; "
            "solver='optax' traces"
        )
    return assign_all({"": score}, solver=solver)[""]


def assign_all(scores: dict, *, solver: str = "scipy") -> dict:
    """`assign` for every value of ``scores`` (stacks of matrices of any sizes): with
    ``"scipy"``, all the matrices of all the stacks share one thread pool, so that the
    solves of different layers run concurrently (scipy releases the GIL)."""
    if solver == "optax":
        return {k: _assign_optax(jnp.asarray(v)) for k, v in scores.items()}
    if solver != "scipy":
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    # Zero-copy views of the device buffers on CPU; each matrix goes to float64 (what scipy
    # solves in) in its own worker: converting the stacks up front through jax takes longer
    # than the solves (1.7 s for BERT-base's 12 FFN matrices of 3072 x 3072).
    stacks = {k: np.asarray(v) for k, v in scores.items()}
    tasks = [m for s in stacks.values() for m in s.reshape(-1, *s.shape[-2:])]
    solve = lambda m: scipy.optimize.linear_sum_assignment(m.astype(np.float64), maximize=True)[1]
    if len(tasks) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(len(tasks), os.cpu_count() or 1)) as pool:
            cols = list(pool.map(solve, tasks))
    else:
        cols = [solve(m) for m in tasks]
    out, i = {}, 0
    for k, s in stacks.items():
        n = math.prod(s.shape[:-2])
        out[k] = jnp.asarray(np.stack(cols[i : i + n]).reshape(s.shape[:-1]), jnp.int32)
        i += n
    return out


@jax.jit
def _assign_optax(score: jax.Array) -> jax.Array:
    def one(m):
        rows, cols = optax.assignment.hungarian_algorithm(-m)
        return cols[jnp.argsort(rows)].astype(jnp.int32)

    flat = score.reshape(-1, *score.shape[-2:])
    return jax.vmap(one)(flat).reshape(score.shape[:-1])
