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
- ``"orth"`` over H heads of width d: ``float[*batch, H, d, d]``, one orthogonal R[h] per head.
- ``"scale"`` over H heads: ``float[*batch, H]``, one positive scalar a[h] per head.

How an element acts is documented in `rotjax.symmetry.apply`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rotjax.tree import flatten

KINDS = ("perm", "orth", "scale")
ROLES = ("residual", "ffn", "heads", "qk_rotation", "vo_rotation", "qk_scale", "vo_scale")


@dataclasses.dataclass(frozen=True)
class Group:
    """One symmetry group.

    Attributes:
      kind: ``"perm"``, ``"orth"`` or ``"scale"``.
      size: n for a permutation; the number of heads H for ``orth`` and ``scale``.
      dim: the head width d (``orth`` only).
      batch: leading batch shape of the element: ``(L,)`` for stacked layers.
      over: for ``orth``/``scale``, the name of the permutation group that permutes the same
        head axis (so that `compose` and `invert` know how the two interact), or None.
      role: what the group is in a transformer (one of `ROLES`), used to select groups:
        ``residual`` the stream, ``ffn`` the hidden units of a two-layer block (FFN, pooler,
        RoBERTa's head), ``heads`` whole attention heads, ``{qk,vo}_{rotation,scale}`` per head.
      layer: the layer index of an unstacked per-layer group; None for stacked or global ones.
    """

    kind: str
    size: int
    dim: int | None = None
    batch: tuple[int, ...] = ()
    over: str | None = None
    role: str = "ffn"
    layer: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"group kind must be one of {KINDS}, got {self.kind!r}")
        if self.role not in ROLES:
            raise ValueError(f"group role must be one of {ROLES}, got {self.role!r}")
        if (self.kind == "orth") != (self.dim is not None):
            raise ValueError("`dim` is required for 'orth' groups and only for them")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one element of this group."""
        if self.kind == "orth":
            return (*self.batch, self.size, self.dim, self.dim)
        return (*self.batch, self.size)


@dataclasses.dataclass(frozen=True)
class Action:
    """How one group acts on one parameter.

    Attributes:
      group: the group's name.
      axes: ``(axis,)`` for ``perm`` and ``scale`` (the permuted / head axis), ``(head_axis,
        dim_axis)`` for ``orth``. Axes index the full parameter array, batch axes included.
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
        stacked groups, which hold every layer, and global groups always pass that filter)."""
        roles = None if roles is None else set(roles)
        layers = None if layers is None else set(layers)
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
          ValueError: a group or path defined twice, an action naming an unknown group, or
            axes that do not fit the group's size, head width or batch shape.
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
            n_axes = 2 if g.kind == "orth" else 1
            if len(a.axes) != n_axes or not all(len(g.batch) <= ax for ax in a.axes):
                raise ValueError(f"{where}: bad axes {a.axes} for {g.kind} group {a.group!r}")
            if p.shape[: len(g.batch)] != g.batch:
                raise ValueError(
                    f"{where}: leading axes must be the batch {g.batch} of group {a.group!r}"
                )
            if p.shape[a.axes[0]] != g.size or (g.kind == "orth" and p.shape[a.axes[1]] != g.dim):
                raise ValueError(f"{where}: axes {a.axes} do not fit group {a.group!r} {g.shape}")
            if g.kind != "scale" and a.power != 1:
                raise ValueError(f"{where}: power {a.power} is not allowed for {g.kind} groups")


# ---------------------------------------------------------------------------------------------
# Fragment builders. Each returns a small `Spec`; `Spec.combine` joins them.


def _path(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def permutation(
    name: str, size: int, *, batch: tuple[int, ...] = (), role: str = "residual", layer=None
) -> Spec:
    """A permutation group of ``size`` elements (the residual stream, FFN hidden units...)."""
    return _fragment({name: Group("perm", size, batch=tuple(batch), role=role, layer=layer)})


def param(path: str, shape: Sequence[int], *actions: Action) -> Spec:
    """One parameter of the given shape with the given actions (none: it is left alone)."""
    return _fragment(params={path: ParamSpec(tuple(shape), tuple(actions))})


def embedding(path: str, num: int, dim: int, group: str | None, *, batch=()) -> Spec:
    """``path/embedding`` of shape ``(*batch, num, dim)``; ``group`` permutes the features."""
    acts = () if group is None else (Action(group, (len(batch) + 1,)),)
    return param(f"{path}/embedding", (*batch, num, dim), *acts)


def layer_norm(path: str, dim: int, group: str | None, *, batch=()) -> Spec:
    """``path/{scale,bias}``: LayerNorm commutes with permutations of its features (only)."""
    acts = () if group is None else (Action(group, (len(batch),)),)
    return _join(
        param(f"{path}/scale", (*batch, dim), *acts), param(f"{path}/bias", (*batch, dim), *acts)
    )


def dense(
    path: str,
    in_dim: int,
    out_dim: int,
    *,
    in_group: str | None = None,
    out_group: str | None = None,
    batch: tuple[int, ...] = (),
    use_bias: bool = True,
) -> Spec:
    """``path/kernel`` ``(*batch, in, out)`` and ``path/bias`` ``(*batch, out)``."""
    b = len(batch)
    k_acts = [Action(g, (ax,)) for g, ax in ((in_group, b), (out_group, b + 1)) if g]
    frags = [param(f"{path}/kernel", (*batch, in_dim, out_dim), *k_acts)]
    if use_bias:
        acts = () if out_group is None else (Action(out_group, (b,)),)
        frags.append(param(f"{path}/bias", (*batch, out_dim), *acts))
    return _join(*frags)


def mlp(
    prefix: str,
    *,
    hidden_size: int,
    intermediate_size: int,
    stream: str | None,
    batch: tuple[int, ...] = (),
    layer: int | None = None,
    names: tuple[str, str] = ("intermediate", "output"),
) -> Spec:
    """``dense -> elementwise -> dense`` with a permutation group ``{prefix}/units`` (role
    ``ffn``) of the intermediate units; ``stream`` permutes the input of the first and output
    of the second."""
    hidden = _path(prefix, "units")
    return _join(
        permutation(hidden, intermediate_size, batch=batch, role="ffn", layer=layer),
        dense(
            _path(prefix, names[0]),
            hidden_size,
            intermediate_size,
            in_group=stream,
            out_group=hidden,
            batch=batch,
        ),
        dense(
            _path(prefix, names[1]),
            intermediate_size,
            hidden_size,
            in_group=hidden,
            out_group=stream,
            batch=batch,
        ),
    )


def attention(
    prefix: str,
    *,
    hidden_size: int,
    num_heads: int,
    head_dim: int,
    stream: str | None,
    batch: tuple[int, ...] = (),
    layer: int | None = None,
    qkv_bias: bool = True,
    out_bias: bool = True,
    names: tuple[str, str, str, str] = ("query", "key", "value", "out"),
) -> Spec:
    """Multi-head self-attention with kernels ``(D, H, d)`` and output ``(H, d, D)``.

    Groups, all named ``{prefix}/<role>``:

    - ``heads``: permutation of whole heads (Q, K, V, O together);
    - ``qk_rotation``: per head R[h] ∈ O(d): ``W_Q[:, h] ← W_Q[:, h] R[h]``, the same for K and
      the biases, so ``q kᵀ`` is unchanged (paper, Sec. 4);
    - ``vo_rotation``: per head ``W_V[:, h] ← W_V[:, h] R[h]``, ``W_O[h] ← R[h]ᵀ W_O[h]``;
    - ``qk_scale``: ``Q·a[h]``, ``K/a[h]``; ``vo_scale``: ``V·a[h]``, ``O/a[h]`` (a > 0).
    """
    b = len(batch)
    H, d, D = num_heads, head_dim, hidden_size
    g = {r: _path(prefix, r) for r in ROLES[2:]}
    frags = [
        permutation(g["heads"], H, batch=batch, role="heads", layer=layer),
        _fragment(
            {
                g[r]: Group(kind, H, d if kind == "orth" else None, batch, g["heads"], r, layer)
                for r, kind in [
                    ("qk_rotation", "orth"),
                    ("vo_rotation", "orth"),
                    ("qk_scale", "scale"),
                    ("vo_scale", "scale"),
                ]
            }
        ),
    ]
    for name, rot, scl, power in [
        (names[0], "qk_rotation", "qk_scale", 1),
        (names[1], "qk_rotation", "qk_scale", -1),
        (names[2], "vo_rotation", "vo_scale", 1),
    ]:
        head = [Action(g["heads"], (b + 1,)), Action(g[rot], (b + 1, b + 2))]
        head.append(Action(g[scl], (b + 1,), power))
        stream_act = [Action(stream, (b,))] if stream else []
        frags.append(param(_path(prefix, name, "kernel"), (*batch, D, H, d), *stream_act, *head))
        if qkv_bias:
            bias_acts = [Action(a.group, tuple(x - 1 for x in a.axes), a.power) for a in head]
            frags.append(param(_path(prefix, name, "bias"), (*batch, H, d), *bias_acts))
    out_acts = [
        Action(g["heads"], (b,)),
        Action(g["vo_rotation"], (b, b + 1)),
        Action(g["vo_scale"], (b,), -1),
    ]
    if stream:
        out_acts.append(Action(stream, (b + 2,)))
    frags.append(param(_path(prefix, names[3], "kernel"), (*batch, H, d, D), *out_acts))
    if out_bias:
        frags.append(
            param(
                _path(prefix, names[3], "bias"),
                (*batch, D),
                *([Action(stream, (b,))] * bool(stream)),
            )
        )
    return _join(*frags)


def validate(spec: Spec, params: Any) -> None:
    """Check that ``params`` has exactly the spec's paths and shapes; raise otherwise.

    Raises:
      ValueError: listing every path only in the spec, only in the params, and every path
        whose shape differs (both shapes given).
    """
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
        raise ValueError("params do not match the symmetry spec:\n" + "\n".join(problems))
