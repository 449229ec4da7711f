"""Input checks of `align`: params against the spec, dtypes, finiteness, layer indices.

Everything here runs before any solve, so bad input fails fast with the offending path named.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.tree import committed, flatten, traced


def check_sequence(value: Any, name: str = "params_list", what: str = "params pytrees") -> None:
    """TypeError unless ``value`` is a list or tuple (of models, or of their statistics): one
    model's params or statistics (a dict) gave a bare KeyError, or were unpacked into its
    keys."""
    if isinstance(value, Mapping | str | bytes) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a list or tuple of {what} (one per model), got a "
            f"{type(value).__name__}"
        )


def first_traced(named: Mapping[str, Any]) -> str | None:
    """The name of the first value of ``named`` (name -> pytree) that holds a tracer, if any."""
    return next((name for name, tree in named.items() if traced(tree)), None)


def check_concrete(named: Mapping[str, Any], steps: str) -> None:
    """TypeError naming the first params tree of ``named`` (name -> tree) that holds a tracer:
    functions that drive their own compiled ``steps`` from Python (and return numbers:
    distances, sums over batches) cannot run under a JAX transformation; JAX's own error
    there was a ConcretizationTypeError about ``float`` deep inside."""
    if what := first_traced(named):
        raise TypeError(
            f"{what} is traced (under jax.jit, jax.grad or jax.vmap): {steps} from Python "
            "and compiles its own steps, so call it on concrete params, outside the "
            "transformation"
        )


def check_devices(paths: Sequence[str], leaves: Sequence[Sequence[Any]], name) -> None:
    """Raise ValueError where the models' leaves (``leaves[i]``: model i's, in ``paths``'
    order; ``name(i)`` its name) are committed to different devices (one program cannot read
    them: JAX's error named an internal argument of a private program, not the param)."""
    for path, *xs in zip(paths, *leaves, strict=True):
        places = {i: sorted(d.id for d in x.devices()) for i, x in enumerate(xs) if committed(x)}
        if len({tuple(v) for v in places.values()}) > 1:
            each = ", ".join(f"{name(i)} on devices {v}" for i, v in places.items())
            raise ValueError(
                f"{path}: the models' params are committed to different devices ({each}); "
                "put them on one device or mesh first (jax.device_put)"
            )


def check_pair_devices(named: Mapping[str, Any]) -> None:
    """`check_devices` of whole params trees by name (``{"params_a": a, "params_b": b}``)."""
    names = list(named)
    flat = [flatten(named[n]) for n in names]
    check_devices(flat[0][0], [f[1] for f in flat], names.__getitem__)


def checked_params(spec: sym.Spec, named: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The leaves by path of every ``(name, params)``, after checking that each fits the
    spec, that all share the first one's dtypes, and that all are finite.

    Raises:
      ValueError: naming the model (``name``) and the offending paths.
    """
    flats, names = [], []
    for what, tree in named:
        try:
            sym.validate(spec, tree)
            sym.check_dtypes(spec, tree)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        paths, leaves, _ = flatten(jax.device_put(tree))  # one transfer for the whole tree
        flats.append(dict(zip(paths, leaves, strict=True)))
        names.append(what)
    first = flats[0]
    problems = [
        f"  {p}: {names[0]} {first[p].dtype} vs {what} {flat[p].dtype}"
        for what, flat in zip(names[1:], flats[1:], strict=True)
        for p in first
        if first[p].dtype != flat[p].dtype
    ]
    if problems:
        raise ValueError("dtypes differ between the models:\n" + "\n".join(problems))
    check_devices(list(first), [[f[p] for p in first] for f in flats], names.__getitem__)
    bad = [
        f"  {what}: {p} {tuple(flat[p].shape)}"
        for what, flat in zip(names, flats, strict=True)
        for p in non_finite(flat)
    ]
    if bad:
        raise ValueError("non-finite values (NaN or Inf) in:\n" + "\n".join(bad))
    return flats


def few(paths: list[str], shown: int = 5) -> str:
    """``"3 param(s): a, b, c"`` (the first ``shown`` named), for one-line errors."""
    more = f", ... ({len(paths) - shown} more)" if len(paths) > shown else ""
    return f"{len(paths)} param(s): {', '.join(paths[:shown])}{more}"


def non_finite(flat: dict[str, jax.Array]) -> list[str]:
    """The paths of the leaves of ``flat`` with a NaN or an Inf. Screened by their sums (NaN
    or Inf propagate; 6x faster than ``all(isfinite)`` on CPU, a reduction of bools), and any
    leaf the screen flags checked exactly (a sum of finite values may overflow). Under a
    `jax.jit` around the caller, concrete leaves (closed over) are still checked, traced ones
    cannot be and are not."""
    flat = {p: x for p, x in flat.items() if not traced(x)}
    with jax.ensure_compile_time_eval():  # eagerly, also while a caller's jit traces
        sums = np.asarray(_finite_sums(flat)) if flat else []
        flagged = [p for p, ok in zip(sorted(flat), sums, strict=True) if not ok]
        return [p for p in flagged if not bool(jnp.isfinite(flat[p]).all())]


@jax.jit
def _finite_sums(flat):
    return jnp.stack([jnp.isfinite(jnp.sum(flat[p])) for p in sorted(flat)])


def max_abs(flat: dict[str, jax.Array]) -> float:
    """The largest magnitude of any leaf (0 for none), in one program."""
    leaves = [x for x in flat.values() if x.size]
    return float(_max_abs(leaves)) if leaves else 0.0


@jax.jit
def _max_abs(leaves):
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))


def as_float32(flat):
    """Solve in float32 whatever the storage dtype (bfloat16 sums would lose the alignment)."""
    return {p: x if x.dtype == jnp.float32 else x.astype(jnp.float32) for p, x in flat.items()}


def num_layers(spec: sym.Spec) -> int:
    """The number of layers the spec's per-layer groups cover (0 if none): the largest
    ``layer + 1`` of an unstacked group, or the leading batch size of a stacked one."""
    sizes = [g.layer + 1 for g in spec.groups.values() if g.layer is not None]
    sizes += [g.batch[0] for g in spec.groups.values() if g.layer is None and g.batch]
    return max(sizes, default=0)


def checked_layers(spec: sym.Spec, layers: tuple[int, ...] | None) -> frozenset[int] | None:
    """``layers`` as a set, after checking each index against the spec's layer count."""
    if layers is None:
        return None
    n = num_layers(spec)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        have = f"layers 0..{n - 1}" if n else "no per-layer groups"
        raise ValueError(f"layers={list(layers)}: {bad} out of range (the model has {have})")
    return frozenset(layers)
