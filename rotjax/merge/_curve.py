"""The linear path between two models and its loss barrier (Frankle et al., 2020; Entezari et
al., 2022): ``θ(λ) = (1 - λ) θ_A + λ θ_B``, evaluated at given λ."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rotjax.merge._methods import checked_models, scalar
from rotjax.tree import averaged, traced, wide

HIGHER_IS_BETTER = ("accuracy", "macro_f1", "f1")


class Curve(NamedTuple):
    """`curve`'s result: the points ``lambdas``, each metric's values along the path
    (``metrics``) and each metric's `barrier` (``barrier``)."""

    lambdas: np.ndarray  # (k,), 0 = A, 1 = B
    metrics: dict[str, np.ndarray]  # metric name -> (k,) values along the path
    barrier: dict[str, float]  # metric name -> its barrier (see `barrier`)


def interpolate(params_a: Any, params_b: Any, lam: float) -> Any:
    """``(1 - λ) θ_A + λ θ_B`` leaf by leaf, in A's dtypes; λ a finite real scalar (any
    value: outside [0, 1] the line is extrapolated)."""
    _, leaves, treedef = checked_models([params_a, params_b])
    concrete = not traced(lam)
    real = not concrete or np.issubdtype(np.asarray(lam).dtype, np.number)
    if not real or np.ndim(lam) != 0 or np.iscomplexobj(lam) or (concrete and not np.isfinite(lam)):
        raise ValueError(f"interpolate: lam must be a finite real scalar, got {lam!r}")
    # λ traced (in float64 with x64): one program per architecture serves every point
    return jax.tree.unflatten(treedef, _mix(*leaves, scalar(lam)))


# One compiled program for the whole tree: leaf by leaf, every leaf's two multiplies and add
# would compile and dispatch on their own (a cached demo loaded ~100 such programs). Not
# `average`'s program with weights (1 - λ, λ): it divides by their sum, which float32 rounds
# away from 1 for λ beyond 2^24 (the line extrapolated to half its value, or Inf). At λ = 1/2
# the two agree to the last bit (halves summed, or the sum halved: exact scalings).
@jax.jit
def _mix(la, lb, lam):
    def mix(a, b):
        if not averaged(a):  # equal in every model (`checked_models`)
            return a
        return ((1.0 - lam) * wide(a) + lam * wide(b)).astype(jnp.asarray(a).dtype)

    return [mix(a, b) for a, b in zip(la, lb, strict=True)]


def barrier(lambdas: Sequence[float], values: Sequence[float], *, higher_is_better=False) -> float:
    """The largest gap between the path and the straight line joining its ends:
    ``max_λ L(λ) - ((1 - λ) L(0) + λ L(1))`` for a loss, ``max_λ ((1 - λ) A(0) + λ A(1)) - A(λ)``
    for a score (``higher_is_better``). ``lambdas`` must start at 0, end at 1 and stay within
    (a λ outside would measure a gap to the line's extrapolation)."""
    lam, v = np.asarray(lambdas, np.float64), np.asarray(values, np.float64)
    ok = lam.ndim == 1 and lam.shape == v.shape and lam.size >= 2
    if not (ok and lam[0] == 0.0 and lam[-1] == 1.0 and np.all((lam >= 0.0) & (lam <= 1.0))):
        raise ValueError(
            "barrier needs matching 1-D lambdas and values, from λ = 0 to λ = 1 and within; "
            f"got lambdas {lambdas} for {v.shape[0] if v.ndim else v.size} values"
        )
    line = (1.0 - lam) * v[0] + lam * v[-1]
    return float(np.max(line - v) if higher_is_better else np.max(v - line))


def _metrics(got: Any) -> dict:
    if not isinstance(got, Mapping):  # (a float was "'float' object is not iterable")
        raise TypeError(f"evaluate must return a mapping of metric names to numbers, got {got!r}")
    return dict(got)


def curve(
    evaluate: Callable[[Any], Mapping[str, float]],
    params_a: Any,
    params_b: Any,
    lambdas: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)),
    *,
    higher_is_better: Sequence[str] = HIGHER_IS_BETTER,
    known: Mapping[float, Mapping[str, float]] | None = None,
) -> Curve:
    """``evaluate`` (params -> metrics, e.g. `rotjax.train.evaluator`) along the linear path,
    and each metric's barrier (a score's when its name is in ``higher_is_better``, metric
    names, or one name as a string; a loss's otherwise) when the lambdas, in any order, run
    from 0 to 1 (no barriers otherwise: ``{}``).

    Any two models of one architecture work: A and B, or two merged models. ``known``: metrics
    already measured at some of the λ, used as given instead of evaluating again, e.g. ``{0.0:
    metrics of A, 1.0: metrics of B}`` (an aligned B computes B's function: the same metrics
    up to rounding) or ``{0.5: metrics of merge.average([A, B])}`` (the same params)."""
    lam = np.asarray(lambdas, np.float64)
    if lam.ndim != 1 or not lam.size or not np.all(np.isfinite(lam)):
        raise ValueError(f"lambdas must be a non-empty 1-D sequence of finite numbers: {lambdas}")
    # A known λ is a grid point up to rounding: 0.3 for linspace's 0.30000000000000004, and a
    # float32 λ (0.30000001) for either, so within float32's rounding of λ (at least of 1).
    at = {}
    for x, m in (known or {}).items():
        tol = 4 * np.finfo(np.float32).eps * max(1.0, abs(float(x)))
        near = np.flatnonzero(np.abs(lam - float(x)) <= tol)
        if not near.size:
            raise ValueError(f"known metrics at λ = {x}, which is not among the lambdas")
        at |= {int(i): dict(m) for i in near}
    rows = [
        at[i] if i in at else _metrics(evaluate(interpolate(params_a, params_b, x)))
        for i, x in enumerate(lam.tolist())
    ]
    if any(r.keys() != rows[0].keys() for r in rows):
        raise ValueError(f"the metrics differ along the path: {[sorted(r) for r in rows]}")
    metrics = {k: np.asarray([r[k] for r in rows], np.float64) for k in rows[0]}
    # one name is one name (`k in "macro_f1"` read "f1" and "macro" as scores too)
    scores = {higher_is_better} if isinstance(higher_is_better, str) else set(higher_is_better)
    bars, order = {}, np.argsort(lam, kind="stable")
    if lam[order[0]] == 0.0 and lam[order[-1]] == 1.0:
        bars = {
            k: barrier(lam[order], v[order], higher_is_better=k in scores)
            for k, v in metrics.items()
        }
    return Curve(lam, metrics, bars)
