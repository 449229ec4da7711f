"""The spec and params to align with, for the blocks one means to solve: what `rotjax align`
and `rotjax merge` do before `align`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from rotjax import symmetry as sym


class Prepared(NamedTuple):
    """`prepare`'s result: ``(spec, params, notes)``."""

    spec: sym.Spec  # the family's spec, with the stream rotation where it applies
    params: list[Any]  # the models, in canonical form where the stream rotates (same functions)
    notes: list[str]  # what was done, or why the stream does not rotate


def prepare(config: Any, params_list: Sequence[Any], *, stream: bool = True) -> Prepared:
    """The spec and params for `align` (``solve=ALL``, or any blocks with ``"stream"``).

    The stream rotation is a symmetry of a pre-norm model (ViT, LLaMA) only in its canonical
    form (`rotjax.symmetry.canonicalize`: norms folded into their readers, writers centred for
    LayerNorm), and only the spec built with ``stream_rotation=True`` has its group; `align`
    skips a block the spec has no group for (`Diagnostics.skipped`). So with ``stream`` and a
    pre-norm family this returns every model in canonical form (the same functions in other
    weights: merge them with each other, not with the stored ones) and that spec; otherwise,
    or when a model has no canonical form (a note says why), the family's plain spec and the
    params as given.

    Args:
      config: the models' config (a `rotjax.models` family's).
      params_list: the models' params, e.g. ``[anchor, model]``; not changed.
      stream: whether the stream rotation is wanted (``"stream" in solve``).

    Returns:
      `Prepared` ``(spec, params, notes)``.

    Raises:
      ValueError: ``config`` is of no rotjax family (`rotjax.models.family`).
    """
    from rotjax.models import family  # (here: `rotjax.match` does not import flax otherwise)

    fam = family(config)
    params = list(params_list)
    if not stream:
        return Prepared(fam.symmetry_spec(config), params, [])
    if not fam.pre_norm:
        why = f"no stream rotation: {fam.name} is post-norm (its norms sit on the stream)"
        return Prepared(fam.symmetry_spec(config), params, [why])
    try:  # (a model without a canonical form: a bare ViT encoder's spec, or a β no bias takes)
        stream_spec = fam.stream_spec(config)
        canon = [sym.canonicalize(stream_spec, p) for p in params]
    except ValueError as e:
        return Prepared(fam.symmetry_spec(config), params, [f"no stream rotation: {e}"])
    centred = ", stream centred" if stream_spec.centred else ""
    note = f"models in canonical form (norms folded{centred}) to rotate the stream"
    return Prepared(fam.symmetry_spec(config, stream_rotation=True), canon, [note])
