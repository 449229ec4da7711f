"""Symmetry specs: which group acts on which axis of which parameter.

A `Spec` is frozen, hashable data (usable as a static argument of `jax.jit`). It names a set
of groups and, for every parameter path (``"a/b/kernel"``, the path of the leaf in the params
pytree), the parameter's shape and the `Action`s of groups on its axes. Specs for whole models
are assembled from small fragments (`permutation`, `embedding`, `layer_norm`, `dense`, `mlp`,
`attention`, `param`) with `Spec.combine`; the reverse index "group -> (path, action)" is derived
from that one mapping, in the spirit of Git Re-Basin's ``PermutationSpec``.

Group kinds and elements (``*batch`` is the group's batch shape: ``(L,)`` for a group of stacked
layers, one element per layer; ``()`` otherwise):

- ``"perm"`` of size n: ``int32[*batch, n]``, a permutation π.
- ``"hperm"`` over H heads of n items each: ``int32[*batch, H, n]``, one permutation σ[h] of
  the items of each head (the query heads of a grouped-query attention group).
- ``"orth"`` over H heads of width d: ``float[*batch, H, d, d]``, one orthogonal R[h] per head;
  with ``pairs``, only the rotations that commute with RoPE: one SO(2) angle per pair of
  features (i, i + d/2), ``R[i, i] = R[i+d/2, i+d/2] = cos θ_i``, ``R[i, i+d/2] = sin θ_i``,
  ``R[i+d/2, i] = -sin θ_i`` and zeros elsewhere.
- ``"rot"`` of one axis of size n: ``float[*batch, n, n]``, one orthogonal Q (the residual
  stream of a pre-norm model); with ``keeps_ones``, Q fixes the all-ones vector (``Q 1 = 1``).
- ``"scale"`` over H heads: ``float[*batch, H]``, one positive scalar a[h] per head.

How an element acts is documented in `rotjax.symmetry.apply`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from rotjax.tree import flatten

KINDS = ("perm", "hperm", "orth", "rot", "scale")
ROLES = (
    "residual",
    "stream_rotation",
    "ffn",
    "heads",
    "query_heads",
    "qk_rotation",
    "vo_rotation",
    "qk_scale",
    "vo_scale",
)


@dataclasses.dataclass(frozen=True)
class Group:
    """One symmetry group.

    Attributes:
      kind: ``"perm"``, ``"hperm"``, ``"orth"``, ``"rot"`` or ``"scale"``.
      size: n for a permutation or a ``rot``; the number of heads H for ``hperm``, ``orth``
        and ``scale``.
      dim: the head width d (``orth``), the items per head n (``hperm``); None otherwise.
      batch: leading batch shape of the element: ``(L,)`` for stacked layers.
      over: for ``hperm``/``orth``/``rot``/``scale``, the name of the permutation group that
        permutes the same (head) axis (so that `compose` and `invert` know how the two
        interact), or None.
      role: what the group is in a transformer (one of `ROLES`), used to select groups:
        ``residual`` the stream's permutation, ``stream_rotation`` its rotation (pre-norm models
        in canonical form), ``ffn`` the hidden units of a two-layer block (FFN, pooler,
        RoBERTa's head), ``heads`` whole attention heads, ``query_heads`` the query heads inside
        each key-value head's group (grouped-query attention), ``{qk,vo}_{rotation,scale}`` per
        head.
      layer: the layer index of an unstacked per-layer group; None for stacked or global ones.
      keeps_ones: for ``rot``: only the rotations with ``Q 1 = 1`` (LayerNorm models: they
        keep each token's mean, so ``LN(x Q) = LN(x) Q`` at γ = 1, β = 0).
      pairs: for ``orth``: only the block rotations of the pairs (i, i + d/2) that rotary
        position embeddings (transformers' ``rotate_half`` layout) rotate together. Any two
        2-D rotations commute, so ``RoPE_p(q R) · RoPE_s(k R) = RoPE_p(q) · RoPE_s(k)`` at
        every pair of positions; a general O(d) element does not commute with RoPE.
    """

    kind: str
    size: int
    dim: int | None = None
    batch: tuple[int, ...] = ()
    over: str | None = None
    role: str = "ffn"
    layer: int | None = None
    keeps_ones: bool = False
    pairs: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"group kind must be one of {KINDS}, got {self.kind!r}")
        if self.role not in ROLES:
            raise ValueError(f"group role must be one of {ROLES}, got {self.role!r}")
        if (self.kind in ("orth", "hperm")) != (self.dim is not None):
            raise ValueError("`dim` is required for 'orth' and 'hperm' groups and only for them")
        if self.pairs and (self.kind != "orth" or self.dim % 2):
            raise ValueError(f"`pairs` needs an 'orth' group of even dim, got {self}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one element of this group."""
        if self.kind == "orth":
            return (*self.batch, self.size, self.dim, self.dim)
        if self.kind == "rot":
            return (*self.batch, self.size, self.size)
        if self.kind == "hperm":
            return (*self.batch, self.size, self.dim)
        return (*self.batch, self.size)


@dataclasses.dataclass(frozen=True)
class Action:
    """How one group acts on one parameter.

    Attributes:
      group: the group's name.
      axes: ``(axis,)`` for ``perm`` and ``scale`` (the permuted / head axis), ``(head_axis,
        dim_axis)`` for ``orth``, ``(head_axis, item_axis)`` for ``hperm``. Axes index the full
        parameter array, batch axes included.
      power: ``+1`` or ``-1``: a ``scale`` element multiplies by ``a**power`` (Q·a pairs with
        K/a). Must be +1 for the other kinds (an orthogonal R acts alike on both sides of a
        product: ``W R`` and ``Rᵀ W`` both contract the axis with R's first index).
    """

    group: str
    axes: tuple[int, ...]
    power: int = 1


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    actions: tuple[Action, ...] = ()


@dataclasses.dataclass(frozen=True)
class Spec:
    """Frozen symmetry spec: ``group_items`` and ``param_items`` as sorted tuples of pairs.

    Use the `groups` / `params` mappings to read it, and `Spec.combine` to build it.
    """

    group_items: tuple[tuple[str, Group], ...] = ()
    param_items: tuple[tuple[str, ParamSpec], ...] = ()

    def __post_init__(self):
        _check_spec(self)

    @functools.cached_property
    def groups(self) -> Mapping[str, Group]:
        return dict(self.group_items)

    @functools.cached_property
    def params(self) -> Mapping[str, ParamSpec]:
        return dict(self.param_items)

    @functools.cached_property
    def users(self) -> Mapping[str, tuple[tuple[str, Action], ...]]:
        """Reverse index: group name -> the (param path, action) pairs it acts through."""
        out: dict[str, list[tuple[str, Action]]] = {g: [] for g in self.groups}
        for path, p in self.param_items:
            for a in p.actions:
                out[a.group].append((path, a))
        return {g: tuple(v) for g, v in out.items()}

    def select(
        self, *, roles: Iterable[str] | None = None, layers: Iterable[int] | None = None
    ) -> tuple[str, ...]:
        """Names of the groups with one of ``roles`` (and, if given, in one of ``layers``;
        stacked groups, which hold every layer, and global groups always pass that filter).
        One role may be given as a string, one layer as an int.

        Raises:
          ValueError: a role not in `ROLES` (a typo, or a block of `rotjax.match.align`'s
            ``solve`` such as ``"rotation"``, selected no group, silently).
        """
        roles = None if roles is None else {roles} if isinstance(roles, str) else set(roles)
        if roles is not None and (unknown := sorted(roles - set(ROLES))):
            raise ValueError(f"unknown role(s) {unknown}; expected some of {ROLES}")
        single = isinstance(layers, int | np.integer)
        layers = None if layers is None else {int(layers)} if single else set(layers)
        return tuple(
            name
            for name, g in self.group_items
            if (roles is None or g.role in roles)
            and (layers is None or g.layer is None or g.layer in layers)
        )

    @staticmethod
    def combine(*specs: Spec) -> Spec:
        """Union of spec fragments into a complete, checked spec.

        Raises:
          ValueError: a group or path defined twice, an action naming an unknown group,
            axes that do not fit the group's size, head width or batch shape, or a per-head
            group acting on an axis that its ``over`` permutation does not permute.
        """
        joined = _join(*specs)
        return Spec(joined.group_items, joined.param_items)


def _join(*specs: Spec) -> Spec:
    groups: dict[str, Group] = {}
    params: dict[str, ParamSpec] = {}
    for s in specs:
        for name, g in s.group_items:
            if name in groups and groups[name] != g:
                raise ValueError(f"group {name!r} is defined twice, differently")
            groups[name] = g
        for path, p in s.param_items:
            if path in params:
                raise ValueError(f"param {path!r} is defined twice")
            params[path] = p
    return _fragment(groups, params)


def _fragment(groups: Mapping[str, Group] = {}, params: Mapping[str, ParamSpec] = {}) -> Spec:
    """A spec fragment: it may name groups defined in other fragments, so only what it holds
    itself is checked here (every axis against its param and its own groups); `Spec.combine`
    checks the whole."""
    _check(groups, params, complete=False)
    s = object.__new__(Spec)
    object.__setattr__(s, "group_items", tuple(sorted(groups.items())))
    object.__setattr__(s, "param_items", tuple(sorted(params.items())))
    return s


def _check_spec(spec: Spec) -> None:
    _check(dict(spec.group_items), dict(spec.param_items), complete=True)


def _check(groups: Mapping[str, Group], params: Mapping[str, ParamSpec], *, complete: bool):
    """Raise ValueError for the first inconsistency; with ``complete``, every group an action
    or an ``over`` names must be in ``groups``."""
    for name, g in groups.items():
        if g.over is None:
            continue
        o = groups.get(g.over)
        if o is None and not complete:
            continue
        if o is None or o.kind != "perm" or o.size != g.size or o.batch != g.batch:
            raise ValueError(
                f"group {name!r}: over={g.over!r} must name a permutation group of size "
                f"{g.size} and batch {g.batch}"
            )
    for path, p in params.items():
        for a in p.actions:
            where = f"param {path!r} (shape {p.shape})"
            if not all(0 <= ax < len(p.shape) for ax in a.axes):
                raise ValueError(f"{where}: axes {a.axes} of group {a.group!r} out of range")
            if a.power not in (1, -1):
                raise ValueError(f"{where}: power {a.power} is not allowed (only +1 or -1)")
            g = groups.get(a.group)
            if g is None:
                if complete:
                    raise ValueError(f"{where}: unknown group {a.group!r}")
                continue
            n_axes = 2 if g.kind in ("orth", "hperm") else 1
            if len(a.axes) != n_axes or not all(len(g.batch) <= ax for ax in a.axes):
                raise ValueError(f"{where}: bad axes {a.axes} for {g.kind} group {a.group!r}")
            if p.shape[: len(g.batch)] != g.batch:
                raise ValueError(
                    f"{where}: leading axes must be the batch {g.batch} of group {a.group!r}"
                )
            if p.shape[a.axes[0]] != g.size or (g.dim is not None and p.shape[a.axes[1]] != g.dim):
                raise ValueError(f"{where}: axes {a.axes} do not fit group {a.group!r} {g.shape}")
            if g.kind != "scale" and a.power != 1:
                raise ValueError(f"{where}: power {a.power} is not allowed for {g.kind} groups")
            if complete and g.over is not None:
                # `compose` and `invert` move g's elements with the heads `over` permutes: it
                # must permute this very axis of every param g acts on.
                over = [b.axes for b in p.actions if b.group == g.over]
                if (a.axes[0],) not in over:
                    raise ValueError(
                        f"{where}: group {a.group!r} acts on axis {a.axes[0]}, which its "
                        f"over={g.over!r} does not permute here (it permutes "
                        f"{[ax[0] for ax in over] or 'no axis'})"
                    )
            if complete and g.kind != "perm" and g.over is None:
                # Nor may it share that axis with a permutation unknown to it: `compose` and
                # `invert` would not move its elements with that permutation's.
                perms = [
                    b.group
                    for b in p.actions
                    if b.axes == (a.axes[0],) and groups[b.group].kind == "perm"
                ]
                if perms:
                    raise ValueError(
                        f"{where}: group {a.group!r} acts on axis {a.axes[0]}, which "
                        f"permutation {perms[0]!r} permutes too: set over={perms[0]!r}"
                    )


def check_dtypes(spec: Spec, params: Any, groups: Any = None) -> None:
    """Refuse integer and boolean leaves that a rotation or a scale of ``groups`` (default:
    every group of the spec) acts on: moved in floating point and cast back to their dtype,
    they would be rounded, and the function changed. Permutations move any dtype exactly.

    Raises:
      ValueError: naming every such path with its dtype and shape.
    """
    groups = spec.groups if groups is None else groups
    paths, leaves, _ = flatten(params)
    bad = [
        f"  {p}: {jnp.result_type(x)} {np.shape(x)}"
        for p, x in zip(paths, leaves, strict=True)
        if p in spec.params
        and not jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        and any(
            a.group in groups and spec.groups[a.group].kind in ("orth", "rot", "scale")
            for a in spec.params[p].actions
        )
    ]
    if bad:
        raise ValueError(
            "integer or boolean params under a rotation or a scale (they would be rounded "
            "back to their dtype: the function changed); cast them to a floating dtype:\n"
            + "\n".join(bad)
        )


def check_spec(spec: Any) -> None:
    """Raise TypeError unless ``spec`` is a `Spec` (a family's ``symmetry_spec(cfg)``): the
    first argument of `apply`, `validate`, ``match.align`` and the merges that take one."""
    if not isinstance(spec, Spec):
        raise TypeError(
            f"spec must be a rotjax.symmetry.Spec (e.g. bert.symmetry_spec(cfg)), got "
            f"{type(spec).__name__}"
        )


def validate(spec: Spec, params: Any, what: str | None = None) -> None:
    """Check that ``params`` has exactly the spec's paths and shapes; raise otherwise.

    Raises:
      ValueError: listing every path only in the spec, only in the params, and every path
        whose shape differs (both shapes given); prefixed by ``what`` (``"params_a: "``),
        the caller's name of the tree, if given.
    """
    check_spec(spec)
    paths, leaves, _ = flatten(params)
    got = {p: tuple(getattr(x, "shape", ())) for p, x in zip(paths, leaves, strict=True)}
    want = spec.params
    problems = [f"  only in the spec:   {p}  {want[p].shape}" for p in want if p not in got]
    problems += [f"  only in the params: {p}  {got[p]}" for p in got if p not in want]
    problems += [
        f"  wrong shape:        {p}  params {got[p]} vs spec {want[p].shape}"
        for p in want
        if p in got and got[p] != want[p].shape
    ]
    if problems:
        head = f"{what}: " if what else ""
        raise ValueError(
            f"{head}params do not match the symmetry spec:\n"
            + "\n".join(problems)
            + _hint(set(want), set(got))
        )


def _hint(want: set[str], got: set[str]) -> str:
    """What the usual mistakes look like, said: the variables dict given for its params (every
    path one level down), or a scanned model's params for an unscanned one (or the reverse)."""
    tops = {p.split("/", 1)[0] for p in got}
    if len(tops) == 1 and all("/" in p for p in got):
        (top,) = tops
        if {p.split("/", 1)[1] for p in got} == want:
            return (
                f"\nhint: every param sits one level down, under {top!r}: pass params[{top!r}] "
                "(a Flax variables dict holds the params under 'params')"
            )
    stacked = lambda paths: any("/layers/" in f"/{p}" for p in paths)
    one = lambda paths: {re.sub(r"(^|/)layer_\d+(/|$)", r"\1layers\2", p) for p in paths}
    if stacked(want) != stacked(got) and one(want) == one(got):  # the layout is all that differs
        mine, theirs = ("stacked", "per-layer") if stacked(got) else ("per-layer", "stacked")
        return (
            f"\nhint: the params hold {mine} layers where the spec wants {theirs} ones: build "
            "the config with the other scan_layers, or convert the params "
            "(rotjax.models.stack_layers / unstack_layers)"
        )
    return ""
