"""Fragment builders: small `Spec` pieces for the parts of a transformer, joined with
`Spec.combine` (which checks every axis against its group)."""

from __future__ import annotations

from collections.abc import Sequence

from rotjax.symmetry._spec import Action, Group, ParamSpec, Spec, _fragment, _join

HEAD_ROLES = ("qk_rotation", "vo_rotation", "qk_scale", "vo_scale")


def _path(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def permutation(
    name: str, size: int, *, batch: tuple[int, ...] = (), role: str = "residual", layer=None
) -> Spec:
    """A permutation group of ``size`` elements (the residual stream, FFN hidden units...)."""
    return _fragment({name: Group("perm", size, batch=tuple(batch), role=role, layer=layer)})


def group(name: str, g: Group) -> Spec:
    """One group of any kind (its actions come from `param` fragments)."""
    return _fragment({name: g})


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
    g = {r: _path(prefix, r) for r in ("heads", *HEAD_ROLES)}
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
