"""Merging through task vectors ``τ_i = θ_i - θ_base`` (fine-tunes of one base model): task
arithmetic, TIES and DARE. Every random choice takes a ``jax.random`` key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rotjax.merge._methods import checked_models

TRIMS = ("global", "tensor")


def _task_vectors(base, params_list):
    _, leaves, treedef = checked_models([base, *params_list])
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    taus = [
        [f32(x) - f32(b) for x, b in zip(model, leaves[0], strict=True)] for model in leaves[1:]
    ]
    return leaves[0], taus, treedef


def _rebuild(base_leaves, tau, scale, treedef):
    out = [
        (jnp.asarray(b, jnp.float32) + scale * t).astype(jnp.asarray(b).dtype)
        for b, t in zip(base_leaves, tau, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def task_arithmetic(base: Any, params_list: Sequence[Any], *, scale: float = 1.0) -> Any:
    """``θ = θ_base + λ Σ_i τ_i`` (Ilharco et al., 2023, "Editing Models with Task
    Arithmetic"); ``λ = 1/N`` is the plain average of the models, the paper picks λ on
    validation data."""
    base_leaves, taus, treedef = _task_vectors(base, params_list)
    return _rebuild(base_leaves, [sum(t) for t in zip(*taus, strict=True)], scale, treedef)


def _trim(tau: list[jax.Array], density: float, trim: str) -> list[jax.Array]:
    """Keep the ``density`` fraction of entries of largest magnitude, zero the rest: over the
    whole task vector (``"global"``) or within each tensor (``"tensor"``)."""
    if trim == "global":
        flat = jnp.concatenate([jnp.abs(t).ravel() for t in tau])
        cut = jnp.quantile(flat, 1.0 - density)
        return [jnp.where(jnp.abs(t) >= cut, t, 0.0) for t in tau]
    return [jnp.where(jnp.abs(t) >= jnp.quantile(jnp.abs(t), 1.0 - density), t, 0.0) for t in tau]


def _ties_merge(taus: list[list[jax.Array]]) -> list[jax.Array]:
    """Elect each entry's sign as the sign of the summed values ("mass"), then average the
    entries that agree with it (the disjoint mean; entries that are 0 count nowhere)."""
    out = []
    for entries in zip(*taus, strict=True):
        stack = jnp.stack(entries)
        sign = jnp.sign(jnp.sum(stack, axis=0, keepdims=True))
        agree = (jnp.sign(stack) == sign) & (stack != 0)
        count = jnp.sum(agree, axis=0)
        out.append(jnp.sum(jnp.where(agree, stack, 0.0), axis=0) / jnp.maximum(count, 1))
    return out


def ties(
    base: Any,
    params_list: Sequence[Any],
    *,
    density: float = 0.2,
    scale: float = 1.0,
    trim: str = "global",
) -> Any:
    """TIES-merging (Yadav et al., 2023): trim each task vector to its top ``density``
    fraction by magnitude, elect a sign per entry (the sign of the trimmed vectors' sum), and
    average the entries that agree with it: ``θ = θ_base + λ τ_merged``.

    Args:
      base: the base model the others were fine-tuned from.
      params_list: the fine-tuned models.
      density: the fraction k kept (the paper's default is 20%).
      scale: λ (the paper uses 1 by default and searches 0.8-2.5 on validation data).
      trim: ``"global"``: the top k of the whole flattened task vector, as in the paper's code
        (the default); ``"tensor"``: the top k of every tensor, as mergekit and most tools do.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if trim not in TRIMS:
        raise ValueError(f"trim must be one of {TRIMS}, got {trim!r}")
    base_leaves, taus, treedef = _task_vectors(base, params_list)
    merged = _ties_merge([_trim(t, density, trim) for t in taus])
    return _rebuild(base_leaves, merged, scale, treedef)


def dare(
    base: Any,
    params_list: Sequence[Any],
    *,
    key: jax.Array,
    drop: float = 0.9,
    rescale: bool = True,
    combine: str = "task_arithmetic",
    scale: float = 1.0,
    density: float = 0.2,
    trim: str = "global",
) -> Any:
    """DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry of each task
    vector with probability ``drop`` and rescale the survivors by ``1 / (1 - drop)`` (so each
    entry keeps its expectation), then combine the sparse task vectors by task arithmetic
    (``scale`` λ) or by TIES (``density``, ``trim``, then ``scale``). The paper's headline
    drop rate is 0.9. Model i, leaf k draws its mask from ``fold_in(fold_in(key, i), k)``."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if not 0.0 < density <= 1.0 or trim not in TRIMS:
        raise ValueError(f"need 0 < density <= 1 and trim in {TRIMS}, got {density}, {trim!r}")
    if combine not in ("task_arithmetic", "ties"):
        raise ValueError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    base_leaves, taus, treedef = _task_vectors(base, params_list)
    factor = 1.0 / (1.0 - drop) if rescale else 1.0
    dropped = []
    for i, tau in enumerate(taus):
        k_model = jax.random.fold_in(key, i)
        keep = [
            jax.random.bernoulli(jax.random.fold_in(k_model, k), 1.0 - drop, t.shape)
            for k, t in enumerate(tau)
        ]
        dropped.append([jnp.where(m, t * factor, 0.0) for m, t in zip(keep, tau, strict=True)])
    if combine == "ties":
        merged = _ties_merge([_trim(t, density, trim) for t in dropped])
    else:
        merged = [sum(t) for t in zip(*dropped, strict=True)]
    return _rebuild(base_leaves, merged, scale, treedef)
