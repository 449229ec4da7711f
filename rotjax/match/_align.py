"""Align model B to an anchor A: the element g of B's symmetry group minimising ‖A - g·B‖².

The objective is the squared Frobenius distance summed over every parameter,
``J(g) = Σ_p ‖A_p - (g·B)_p‖²``; since g is a symmetry, ``g·B`` computes exactly what B does.
It is minimised block by block, each block in closed form given the others:

- ``attention`` (per layer, all layers at once): the head permutation and the rotations
  ``R_qk, R_vo`` jointly, given the scales, then the scales (`rotjax.match._attention`);
- ``scale`` alone when no rotation is solved: per head, ``a`` minimising
  ``Σ‖A_+ - a B_+‖² + Σ‖A_- - B_-/a‖²``, the positive root of a quartic with the least
  objective (paper, Eq. 11-12; `best_scale`);
- ``query_heads`` (grouped-query attention: the query heads inside each key-value head's
  group), ``ffn`` (FFN units, pooler units) and ``residual`` (the stream): linear assignment
  on ``C[i, j] = Σ_p ⟨A_p[.., i, ..], B_p[.., j, ..]⟩`` with every other group applied to B
  (Git Re-Basin's weight matching; `rotjax.match._permutations`), for the query heads one
  G x G assignment per layer and key-value head, on the query kernels and biases (the Q/K
  rotation and scale applied) and the output kernel's slices (the V/O rotation applied).

Without the residual group the blocks are independent up to the rotation-scale coupling and
one pass in the order attention, scale, ffn is the paper's method. With it, with the stream
rotation (``stream``, pre-norm models in canonical form: `rotjax.match._stream`), or with the
query heads solved together with the attention block (the rotations are fitted to the query heads
in their current order, and the other way round), the groups interact and the blocks are
swept by coordinate descent (after the first sweep in a random order per sweep when a key is
given) until the objective stops improving. Every block step is an exact minimisation, or
for the head permutation the best of several candidates that include the current one, so the
objective never increases.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax._keys import check_key
from rotjax._numbers import is_int, is_number
from rotjax.match._attention import attention_stage, merges_scales, scale_stage
from rotjax.match._checks import (
    as_float32,
    check_concrete,
    check_sequence,
    checked_layers,
    checked_params,
    max_abs,
)
from rotjax.match._objective import Context, distances, layer_masks, replaced, sub, total
from rotjax.match._permutations import perm_stage
from rotjax.match._solvers import SOLVERS
from rotjax.match._stream import stream_polar, stream_stage

# The `solve=` vocabulary: block name -> the group roles it covers.
BLOCKS = {
    "rotation": ("qk_rotation", "vo_rotation"),
    "scale": ("qk_scale", "vo_scale"),
    "ffn": ("ffn",),
    "heads": ("heads",),
    "query_heads": ("query_heads",),
    "residual": ("residual",),
    "stream": ("stream_rotation",),
}
PAPER = ("rotation", "scale", "ffn")
ALL = tuple(BLOCKS)
RESIDUAL_INITS = ("independent", "identity")
_SOLVES = "alignment solves assignments and measures distances"  # (`check_concrete`)


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
    """The options of `align` and `align_many`, checked when built (see `align` for each).

    ``solve`` may be one block name (``"rotation"``) or several; names are stripped of spaces.
    """

    solve: tuple[str, ...] = PAPER
    layers: tuple[int, ...] | None = None
    solver: str = "scipy"
    residual_init: str = "independent"
    max_sweeps: int | None = None
    tol: float = 1e-6
    key: jax.Array | None = None
    init: Mapping[str, jax.Array] | None = None

    def __post_init__(self):
        solve = (self.solve,) if isinstance(self.solve, str) else tuple(self.solve)
        solve = tuple(str(s).strip() for s in solve)
        object.__setattr__(self, "solve", solve)
        if unknown := sorted(set(solve) - set(BLOCKS)):
            raise ValueError(
                f"solve: unknown blocks {unknown}; choose from {list(BLOCKS)} (all of them: "
                "match.ALL, the paper's: match.PAPER)"
            )
        if self.layers is not None:
            layers = (self.layers,) if np.ndim(self.layers) == 0 else tuple(self.layers)
            if not all(is_int(i, arrays=True) for i in layers):
                raise ValueError(f"layers must be integers, got {list(layers)}")
            object.__setattr__(self, "layers", tuple(int(i) for i in layers))
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.residual_init not in RESIDUAL_INITS:
            raise ValueError(
                f"residual_init must be one of {RESIDUAL_INITS}, got {self.residual_init!r}"
            )
        if self.max_sweeps is not None and (
            not is_int(self.max_sweeps, arrays=True) or self.max_sweeps < 1
        ):
            raise ValueError(f"max_sweeps must be None or an int >= 1, got {self.max_sweeps!r}")
        if self.max_sweeps is not None:
            object.__setattr__(self, "max_sweeps", int(self.max_sweeps))
        real = is_number(self.tol, kinds="iuf", arrays=True)
        if not (real and np.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be finite and >= 0, got {self.tol!r}")
        object.__setattr__(self, "tol", float(self.tol))
        if self.key is not None:
            check_key(self.key)

    @property
    def roles(self) -> frozenset[str]:
        """The roles of the groups the ``solve`` blocks solve (`BLOCKS`)."""
        return frozenset(r for b in self.solve for r in BLOCKS[b])

    @classmethod
    def of(cls, **options: Any) -> Options:
        """Options from keywords; unknown ones raise TypeError naming them."""
        known = [f.name for f in dataclasses.fields(cls)]
        if unknown := sorted(set(options) - set(known)):
            raise TypeError(f"unknown options {unknown}; the options are {known}")
        return cls(**options)


def absent_blocks(spec: sym.Spec, solve: Iterable[str]) -> tuple[str, ...]:
    """The blocks of ``solve`` (`BLOCKS` names) that ``spec`` has no group for."""
    return tuple(b for b in solve if not spec.select(roles=BLOCKS[b]))


class Diagnostics(NamedTuple):
    """What `align` did. Distances are squared Frobenius norms ``‖A_p - (g·B)_p‖²``."""

    distance_before: float  # Σ_p over all params, at the identity
    distance_after: float  # Σ_p over all params, at the returned transform
    touched_before: float  # Σ_p over the params a solved or init group acts on (others fixed)
    touched_after: float
    groups: dict[str, tuple[float, float]]  # group -> (before, after) summed over its params
    params: dict[str, tuple[float, float]]  # param path -> (before, after), every param
    history: list[tuple[str, float]]  # (stage, distance over all params after it), in order
    sweeps: int
    seconds: dict[str, float]  # wall time per stage kind (+ "objective", "apply", "total")
    # blocks of ``solve`` the spec has no group for, not solved (e.g. "stream" without the
    # stream rotation's group: `prepare`; "query_heads" without grouped-query attention)
    skipped: tuple[str, ...] = ()


class Alignment(NamedTuple):
    """`align`'s result: ``params`` (g·B), ``transform`` (g, every group of the spec) and
    ``diagnostics`` (`Diagnostics`: distances before and after, per group and param, sweeps,
    timings)."""

    params: Any  # g·B, same structure and dtypes as the input
    transform: sym.Transform  # g (complete: every group of the spec)
    diagnostics: Diagnostics


def align(
    spec: sym.Spec,
    anchor_params: Any,
    params: Any,
    *,
    solve: str | Iterable[str] = Options.solve,
    layers: Iterable[int] | None = Options.layers,
    solver: str = Options.solver,
    residual_init: str = Options.residual_init,
    max_sweeps: int | None = Options.max_sweeps,
    tol: float = Options.tol,
    key: jax.Array | None = Options.key,
    init: Mapping[str, jax.Array] | None = Options.init,
) -> Alignment:
    """Align ``params`` (model B) to ``anchor_params`` (model A) over the groups in ``solve``.

    Args:
      spec: the models' symmetry spec (``rotjax.models.family(config).symmetry_spec(config)``,
        or `prepare`'s, which has the stream rotation of pre-norm models in canonical form).
      anchor_params: A's params; not changed.
      params: B's params; not changed.
      solve: blocks to solve, from ``"rotation"``, ``"scale"``, ``"ffn"`` (FFN units and the
        pooler's / head's units), ``"heads"``, ``"query_heads"`` (grouped-query attention:
        the query heads inside each key-value group), ``"residual"`` and ``"stream"`` (or one
        such name); the others stay at the identity (or at ``init``). The default is the
        paper's method, `ALL` every block. A block the spec has no group for is skipped and
        named in ``diagnostics.skipped`` (`ALL` on BERT: ``"query_heads"`` and ``"stream"``;
        ``"stream"`` on a ViT or LLaMA unless the spec and both models come from `prepare`).
      layers: solve per-layer groups of these layers only (the paper's layer-subset study);
        None for all. Each must be a layer of the model; none (``[]``) solves the global
        groups only (refused when ``solve`` holds no global group and there is no ``init``:
        nothing would be done).
      solver: linear assignment on the host (``"scipy"``) or in a jitted graph (``"optax"``).
      residual_init: start the residual permutation from the terms that depend on no other
        group (``"independent"``: embeddings, LayerNorms, output biases, classifier) or from
        the identity (``"identity"``), which is a fixed point of the stream update when the
        per-layer groups were fitted with the stream at the identity. The stream rotation's
        start follows it too: ``"independent"`` first fits the rotation to the terms that
        involve no other group, kept when it lowers the objective. Ignored for the group(s)
        ``init`` holds.
      max_sweeps: coordinate-descent sweeps; default 1 without the residual group and the
        stream rotation (the paper's single pass), else 50; 50 too when the query heads are
        solved with heads or rotations.
      tol: stop when a sweep improves the objective by less than ``tol`` relatively.
      key: shuffles the block order of every sweep after the first (which runs in the fixed
        order attention, scale, query_heads, ffn, residual, stream); None keeps the fixed
        order.
      init: a (partial) transform to start from, e.g. `rotjax.merge.activation_init`'s; the
        descent refines it (the groups it holds are applied from the start, solved or not).

    Returns:
      `Alignment` ``(params, transform, diagnostics)``: ``params == apply(spec, params,
      transform)`` in the input's dtypes.

    Raises:
      ValueError: params that do not fit the spec (path and shapes named), non-finite values,
        dtypes that differ between the models, a stream rotation (solved, or in ``init``
        other than the identity) of a B whose norms are not at γ = 1, β = 0 (not in canonical
        form: the rotation would change its function), or bad options, before any work.
    """
    t_start = time.perf_counter()
    options = Options(solve, layers, solver, residual_init, max_sweeps, tol, key, init)
    layer_set, a_flat, b_flat = checked_pair(spec, options, anchor_params, params)
    return _align(spec, a_flat, b_flat, params, options, layer_set, t_start)


def checked_pair(
    spec: sym.Spec, options: Options, anchor_params: Any, params: Any
) -> tuple[frozenset[int] | None, dict[str, jax.Array], dict[str, jax.Array]]:
    """What `align` refuses, refused before any work: ``(layer set, A's leaves, B's leaves)``
    (path -> array) after checking the options against the spec, both models against it and
    B's canonical form where a stream rotation would move it (only B moves: A may be any)."""
    layer_set = _checked_against(spec, options)
    named = [("anchor_params", anchor_params), ("params", params)]
    check_concrete(dict(named), _SOLVES)
    a_flat, b_flat = checked_params(spec, named)
    _check_stream_form(spec, options, [("params", b_flat)])
    return layer_set, a_flat, b_flat


def align_many(
    spec: sym.Spec, params_list: Sequence[Any], *, anchor: int | None = None, **options: Any
) -> tuple[int, list[Alignment]]:
    """Align every model of ``params_list`` to one anchor among them.

    The anchor is ``anchor`` if given, else the model closest to the parameter average
    by the paper code's measure, the sum of each param's distance (``argmin_i Σ_p ‖θ_i,p -
    θ̄_p‖``, not squared: with three or more models the squares can choose another; with
    two both are equally close). Returns ``(anchor index,
    alignments)`` with one `Alignment` per model (the anchor's is the identity); ``options``
    are those of `align` (`Options`).
    """
    check_sequence(params_list)  # (a generator: "object of type 'generator' has no len()")
    if len(params_list) < 1:
        raise ValueError("align_many needs at least one model")
    if anchor is not None and not is_int(anchor, arrays=True):
        raise ValueError(f"anchor must be an integer index or None, got {anchor!r}")
    if anchor is not None and not 0 <= anchor < len(params_list):
        raise ValueError(f"anchor={anchor} is out of range for {len(params_list)} models")
    t_start = time.perf_counter()
    opts = Options.of(**options)
    layer_set = _checked_against(spec, opts)
    named = [(f"params_list[{i}]", p) for i, p in enumerate(params_list)]
    check_concrete(dict(named), _SOLVES)
    flats = checked_params(spec, named)
    if anchor is None:  # (on the models scaled as `align` solves them: no overflow)
        scaled, _ = _rescaled(*flats)
        anchor = np.argmin(_distances_to_mean(scaled))
    anchor = int(anchor)  # (a numpy int given: returned as the int promised)
    moved = [(f"params_list[{i}]", f) for i, f in enumerate(flats) if i != anchor]
    _check_stream_form(spec, opts, moved)
    return anchor, [
        _align(
            spec,
            flats[anchor],
            f,
            p,
            dataclasses.replace(opts, solve=(), init=None) if i == anchor else opts,
            layer_set,
            t_start if i == 0 else time.perf_counter(),
        )
        for i, (f, p) in enumerate(zip(flats, params_list, strict=True))
    ]


@jax.jit
def _distances_to_mean(flats) -> jax.Array:
    """``Σ_p ‖θ_i,p - θ̄_p‖`` of each model i, in one program (eagerly, each leaf's ops were
    dispatched one by one and each model's sum read back on its own)."""
    mean = {p: sum(f[p] for f in flats) / len(flats) for p in flats[0]}
    return jnp.stack([sum(jnp.linalg.norm(f[p] - mean[p]) for p in mean) for f in flats])


def _rescaled(*flats, limit=2.0**20):
    """The models (path -> leaf, any float dtype) in float32, all divided by one power of two
    just above their largest magnitude when it is above ``limit`` or below ``1 / limit`` (else
    unchanged), and that power. Squares of weights near 1e20 overflow float32, those of
    weights near 1e-20 fall below its normal range, which XLA:CPU flushes to zero (align then
    solved zero matrices); the division comes first, in the leaves' own dtype (exact), so
    float64 weights beyond float32's range are solved too."""
    big = max(max_abs(flat) for flat in flats)
    scale = 1.0
    if big != 0 and not 1 / limit <= big <= limit:
        # Within 2^±126 unless every leaf is float64: XLA divides by multiplying with the
        # reciprocal, and 2^-127 is subnormal in float32, which XLA:CPU flushes to zero (every
        # param became 0 for weights near 1e38).
        wide = all(x.dtype == jnp.float64 for flat in flats for x in flat.values())
        bound = 1000.0 if wide else 126.0
        scale = 2.0 ** float(np.clip(np.ceil(np.log2(big)), -bound, bound))
    div = lambda x: x if scale == 1.0 else x / jnp.asarray(scale, x.dtype)
    return [as_float32({p: div(x) for p, x in flat.items()}) for flat in flats], scale


def _orthogonal_in_float64(spec: sym.Spec, transform: dict) -> dict:
    """``transform`` with its rotations made orthogonal in float64 (they were solved in
    float32, orthogonal to ~1e-7: applied to float64 weights they would change the function
    at that level): the nearest orthogonal matrix (`stream_polar`, keeping the all-ones
    vector where the group does)."""
    out = dict(transform)
    for name, el in transform.items():
        g = spec.groups[name]
        if g.kind in ("orth", "rot"):
            q = jnp.asarray(el, jnp.float64)
            out[name] = stream_polar(q, keeps_ones=g.kind == "rot" and g.keeps_ones)
    return out


def _check_stream_form(spec: sym.Spec, options: Options, flats) -> None:
    """A stream rotation (solved, or in ``init`` other than the identity) is a symmetry only
    of models whose norms are at γ = 1, β = 0 (`rotjax.symmetry.canonicalize`): refuse models
    to be moved (``flats``: not the anchor, which only serves as a target) that are not,
    naming the first such norm. The norms are the params the stream's permutation group acts
    on and its rotation does not (they are never rotated)."""
    solved = options.roles
    given = sym.moved_streams(spec, options.init) if options.init else []
    streams = [
        n
        for n, g in spec.groups.items()
        if g.role == "stream_rotation" and ("stream_rotation" in solved or n in given)
    ]
    for name in streams:
        for model, flat in flats:
            sym.check_stream_form(spec, name, flat, model)


def _checked_against(spec: sym.Spec, options: Options) -> frozenset[int] | None:
    """The options' layer set, after checking the solved blocks, the layers and the init
    against the spec (blocks the spec lacks are skipped, as `ALL` names every block; but a
    ``solve`` of which the spec has no block at all would silently solve nothing)."""
    sym.check_spec(spec)
    roles = options.roles
    if options.solve and not spec.select(roles=roles):
        present = sorted({g.role for g in spec.groups.values()})
        raise ValueError(
            f"solve={list(options.solve)}: the spec has no groups of these blocks (its groups' "
            f"roles: {present})"
        )
    if options.init is not None:
        try:
            sym.check_elements(spec, options.init)
        except (TypeError, ValueError) as e:
            raise type(e)(f"init: {e}") from None
        solved = {spec.groups[n].role for n in spec.select(roles=roles)}
        if (
            "residual" in solved
            and "stream_rotation" not in solved
            and (r := sym.moved_streams(spec, options.init))
        ):
            # It would act after the permutation, which `align` then does not solve (below):
            # the permutation was returned unsolved, silently.
            raise ValueError(
                f"solve has 'residual' but init fixes the stream rotation {r} (not the "
                f"identity) and solve has not 'stream': solve 'stream' too (its rotation holds "
                f"every permutation of the stream) or leave {r} out of init"
            )
    layer_set = checked_layers(spec, options.layers)
    per_layer = lambda g: g.layer is not None or bool(g.batch)  # unstacked or stacked
    solved = spec.select(roles=roles)
    if (
        options.solve
        and not options.init  # (an init alone moves B)
        and layer_set == frozenset()
        and all(per_layer(spec.groups[n]) for n in solved)
    ):
        raise ValueError(  # no layer, no global group: it returned B unmoved, silently
            f"layers={list(options.layers)} with solve={list(options.solve)} solves no group: "
            f"every solved group is per layer (layers=None solves every layer)"
        )
    return layer_set


def _stages(spec, names, rotated=False):
    """``{stage: (function(ctx, t, active) -> t, the groups it solves)}`` in sweep order."""
    by_role = lambda *rs: tuple(n for n in names if spec.groups[n].role in rs)
    heads, rots = by_role("heads"), by_role("qk_rotation", "vo_rotation")
    scales = by_role("qk_scale", "vo_scale")
    # Scales of rotated params are solved right after the rotations, from the same
    # cross-covariances (one pass over the weights for both); others get their own stage.
    merged = scales if rots and merges_scales(spec, rots, scales) else ()
    queries = by_role("query_heads")
    stages = {}
    if heads or rots:
        # The query heads are matched inside the attention block too (`attention_stage`).
        fn = functools.partial(attention_stage, heads=heads, rots=rots, scales=merged)
        if heads:
            fn = functools.partial(fn, queries=queries)
        stages["attention"] = (fn, heads + rots + merged + (queries if heads else ()))
    if scales and not merged:
        stages["scale"] = (functools.partial(scale_stage, names=scales), scales)
    # After the attention block: the query heads are matched with the key-value heads, their
    # rotations and scales in place (all shared by the group, so they commute with σ).
    if perms := by_role("query_heads"):
        stages["query_heads"] = (functools.partial(perm_stage, names=perms), perms)
    if perms := by_role("ffn"):
        stages["ffn"] = (functools.partial(perm_stage, names=perms), perms)
    streams = by_role("stream_rotation")
    # The stream rotation holds every permutation of the stream: with it, the stream
    # permutation is only its starting point (see rotjax.match._stream).
    if (perms := by_role("residual")) and not streams and not rotated:
        stages["residual"] = (functools.partial(perm_stage, names=perms), perms)
    if streams:
        stages["stream"] = (functools.partial(stream_stage, names=streams), streams)
    return stages


def _align(spec, a_flat, b_flat, params, options, layer_set, t_start):
    """`align` on checked float32 leaves ``a_flat``, ``b_flat`` (path -> array) of the anchor
    and of ``params``."""
    # Finite but huge (tiny) weights would overflow (underflow) float32 in the squared distances
    # and the cross-covariances. Every block's optimum is the same for c·A and c·B, so both
    # models are solved divided by a power of two (exact in floating point), and the distances
    # scaled back.
    original = b_flat  # in its own dtypes
    (a_flat, b_flat), scale = _rescaled(a_flat, b_flat)
    sq = scale * scale
    names = spec.select(roles=options.roles, layers=layer_set)
    # (elements given as lists, which the checks and `sym.apply` take, as arrays for the jit)
    init = {n: jnp.asarray(e) for n, e in (options.init or {}).items()}
    # A stream rotation in the start still acts after the stream permutation: the
    # permutation's assignment would see B in the wrong order, so it is not solved then (the
    # rotation, solved, holds every permutation; `_checked_against` refuses it unsolved).
    rotated = bool(sym.moved_streams(spec, init))
    ident = sym.identity(spec)
    stages = _stages(spec, names, rotated)
    residual = tuple(n for n in names if spec.groups[n].role == "residual")
    streams = tuple(n for n in names if spec.groups[n].role == "stream_rotation")
    # The query heads and the attention block are fitted to each other: coordinate descent too.
    coupled = "query_heads" in stages and "attention" in stages
    max_sweeps = options.max_sweeps or (50 if residual or streams or coupled else 1)

    # Only the params some solved (or initialised) group acts on can move; the rest is a
    # constant of J, measured once. (The "touched" distances are over these params.)
    moving = set(names) | set(init)
    paths = tuple(sorted({p for n in moving for p, _ in spec.users[n]}))
    ctx = Context(spec, a_flat, b_flat, options.solver, layer_masks(spec, names, layer_set), paths)
    all_before, _ = distances(spec, tuple(sorted(a_flat)), a_flat, b_flat, {})
    all_before = {p: v * sq for p, v in all_before.items()}
    const = sum(v for p, v in all_before.items() if p not in set(paths))
    t = {**ident, **init}
    # Groups that may differ from the identity so far: the others are not applied at all, so
    # the paper's single pass never gathers by identity permutations.
    active: set[str] = set(init)
    seconds = dict.fromkeys([*stages, "objective", "apply"], 0.0)
    dist1 = {p: all_before[p] for p in paths}  # touched distances at the current transform
    history: list[tuple[str, float]] = [("identity", sum(all_before.values()))]

    def measure(stage, keep=False):
        nonlocal dist1
        tic = time.perf_counter()
        dist1, new = distances(spec, paths, a_flat, b_flat, sub(t, active), keep=keep)
        dist1 = {p: v * sq for p, v in dist1.items()}
        seconds["objective"] += time.perf_counter() - tic
        history.append((stage, const + sum(dist1.values())))
        return new

    if init:
        measure("init")
    independent = options.residual_init == "independent"
    if residual and independent and not set(residual) & set(init) and not rotated:
        # The permutation from the terms no other group acts on, kept when it lowers J: the
        # other groups may already be better placed than these terms say (an init), or B's
        # layers may sit on A's while only those terms differ, where it tripled J (the
        # descent from it settled far from the identity).
        tic = time.perf_counter()
        start = perm_stage(ctx, t, frozenset(active), names=residual, exclusive=True)
        better = total(ctx, sub(start, active | set(residual))) < total(ctx, sub(t, active))
        seconds["residual"] = seconds.get("residual", 0.0) + time.perf_counter() - tic
        # (active either way, at the identity if not better: the jitted stages' inputs
        # then have one structure whatever the weights, and compile once per shape)
        active |= set(residual)
        if better:
            t = start
            measure("residual_init")
    if streams and independent and not set(streams) & set(init):
        # The rotation from the same terms, on top of the permutation, kept when it lowers J.
        tic = time.perf_counter()
        start = stream_stage(ctx, t, frozenset(active), names=streams, exclusive=True)
        keep = total(ctx, sub(start, active | set(streams))) < total(ctx, sub(t, active))
        seconds["stream"] = seconds.get("stream", 0.0) + time.perf_counter() - tic
        active |= set(streams)
        if keep:
            t = start
            measure("stream_init")

    order = list(stages)
    sweeps = 0
    new = None  # (g·B)_p of the touched paths, kept from the last pass of the last sweep
    for sweep in range(max_sweeps):
        if options.key is not None and sweep > 0:
            perm = jax.random.permutation(jax.random.fold_in(options.key, sweep), len(order))
            order = [list(stages)[int(i)] for i in perm]
        start_sweep = history[-1][1]
        for name in order:
            fn, solved = stages[name]
            tic = time.perf_counter()
            t = jax.block_until_ready(fn(ctx, t, frozenset(active)))
            active |= set(solved)
            seconds[name] += time.perf_counter() - tic
            new = measure(name, keep=name == order[-1])
        sweeps += 1
        # (J in the original units: the floor is the solved units' 1e-30)
        if start_sweep - history[-1][1] <= options.tol * max(start_sweep, 1e-30 * sq):
            break
    if new is None and active:  # no stage ran (only an init): the transformed leaves
        _, new = distances(spec, paths, a_flat, b_flat, sub(t, active), keep=True)

    tic = time.perf_counter()
    if new and any(x.dtype == jnp.float64 for x in original.values()):
        # The solved transform applied to B's own leaves: the float32 copy the solve read would
        # round every moved weight (its range too: weights may lie beyond float32's).
        t = {**t, **_orthogonal_in_float64(spec, sub(t, active))}  # returned as applied
        new = {p: sym.apply_to_leaf(spec, p, original[p], sub(t, active)) for p in new}
    elif scale != 1.0 and new:
        dt = lambda p: original[p].dtype
        new = {p: x.astype(dt(p)) * jnp.asarray(scale, dt(p)) for p, x in new.items()}
    # Integer or boolean leaves (moved by permutations only: `check_dtypes`) are permuted
    # exactly from B's own: the solve read them as rescaled float32, so they came back
    # truncated (to 0 where the weights were rescaled) or rounded (beyond 2^24).
    exact = [p for p in new or () if not jnp.issubdtype(original[p].dtype, jnp.inexact)]
    new = {
        **(new or {}),
        **{p: sym.apply_to_leaf(spec, p, original[p], sub(t, active)) for p in exact},
    }
    aligned = jax.block_until_ready(replaced(params, new))
    seconds["apply"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - t_start
    after = {**all_before, **dist1}
    groups = {
        g: tuple(float(sum(d[p] for p, _ in spec.users[g])) for d in (all_before, after))
        for g in names
    }
    diag = Diagnostics(
        distance_before=float(sum(all_before.values())),
        distance_after=float(sum(after.values())),
        touched_before=float(sum(all_before[p] for p in paths)),
        touched_after=float(sum(dist1.values())),
        groups=groups,
        params={p: (all_before[p], after[p]) for p in sorted(all_before)},
        history=history,
        sweeps=sweeps,
        seconds=seconds,
        skipped=absent_blocks(spec, options.solve),
    )
    return Alignment(aligned, t, diag)
