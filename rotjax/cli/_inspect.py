"""``rotjax inspect DIR``: architecture, symmetry groups and parameter counts."""

from __future__ import annotations

import math

from rotjax import match
from rotjax import symmetry as sym
from rotjax.cli._common import load_models
from rotjax.tree import flatten


def _size(g: sym.Group) -> str:
    if g.kind == "perm":
        return f"{g.size}"
    if g.kind == "hperm":
        return f"{g.size} heads x S_{g.dim}"
    if g.kind == "rot":
        return f"O({g.size - g.keeps_ones})"
    if g.kind == "orth":
        return f"{g.size} heads x " + (f"SO(2)^{g.dim // 2}" if g.pairs else f"O({g.dim})")
    return f"{g.size} heads"


def _dimension(g: sym.Group) -> int:
    """The dimension of a continuous group (manifold dimension of one element)."""
    if g.kind == "orth":
        return g.size * (g.dim // 2 if g.pairs else g.dim * (g.dim - 1) // 2)
    if g.kind == "rot":
        n = g.size - g.keeps_ones
        return n * (n - 1) // 2
    return g.size


def run(args) -> int:
    (config,), (params,), notes = load_models([("checkpoint", args.dir)], writes=False)
    # With the stream rotation where the family has one (`align --solve stream`'s group, which
    # was not listed), else the reason it has none
    spec, _, stream = match.prepare(config, [params], stream=True)
    paths, leaves, _ = flatten(params)
    print(f"{args.dir}: {config.model_type} ({config.task or 'encoder'})")
    for note in notes:
        print(f"  note: {note}")
    print(
        f"  layers {config.num_hidden_layers}, hidden {config.hidden_size}, heads "
        f"{config.num_attention_heads} x {config.head_dim}, ffn {config.intermediate_size}"
    )
    print(f"  parameters {sum(x.size for x in leaves):,} in {len(paths)} tensors")
    print("  symmetry groups:")
    roles = [r for r in sym.ROLES if any(g.role == r for g in spec.groups.values())]
    width = max(12, *map(len, roles))  # one column for every name ("stream_rotation" too)
    for role in roles:
        groups = [g for g in spec.groups.values() if g.role == role]
        sizes = sorted({_size(g) for g in groups}, key=lambda s: (len(s), s))
        count = sum(math.prod(g.batch) for g in groups)
        print(f"    {role:{width}s} {groups[0].kind:5s} x{count:<3d} size {', '.join(sizes)}")
    for note in stream:
        if note.startswith("no stream rotation"):
            print(f"    ({note})")
    discrete = [g for g in spec.groups.values() if g.kind in ("perm", "hperm")]
    dof = sum(
        math.lgamma(g.shape[-1] + 1) / math.log(10) * math.prod(g.shape[:-1]) for g in discrete
    )
    cont = sum(
        math.prod(g.batch) * _dimension(g) for g in spec.groups.values() if g not in discrete
    )
    print(f"  continuous dimensions {cont:,}; discrete elements 10^{dof:,.0f}")
    return 0
