"""The canonical form of a pre-norm transformer, where its residual stream can rotate.

In a pre-norm model every read of the stream goes through a norm. Two function-preserving
steps bring it to a form in which a continuous group acts on the stream:

1. **fold** each norm's scale γ and shift β into the dense maps that read its output:
   ``LN(x) W + b = n(x) (diag(γ) W) + (β W + b)`` with ``n(x) = (x - μ) / σ``, so
   ``W ← diag(γ) W``, ``b ← b + β W``, then γ = 1, β = 0;
2. **centre** (LayerNorm only) every writer of the stream over the stream axis: ``n(x - c 1) =
   n(x)`` for any per-token c, because every reader subtracts the mean; afterwards the stream
   is mean-free.

Then for any orthogonal Q with ``Q 1 = 1`` (so ``1ᵀ Q = 1ᵀ``: Q keeps each token's mean and the
norm of its deviations from it), ``LN(x Q) = LN(x) Q`` for every x once γ = 1, β = 0, so
writers ``W_out ← W_out Q`` and readers ``W_in ← Qᵀ W_in`` preserve the function: the group
O(D-1) acting on the complement of the all-ones vector, which holds all D! permutations. Step 2
is not what the rotation needs: it removes the writers' component along 1, which every reader
discards, so that the weight distance matching minimises counts only what is read. (An
RMSNorm model needs no centring and admits all of O(D).) Post-norm models (BERT, RoBERTa)
have no such form: their norm sits on the stream itself.

A family describes its stream as data (`StreamSpec`): which norm feeds which readers, and
which params write to the stream on which axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax.symmetry._spec import Action, Group, Spec
from rotjax.tree import flatten, placed_like, to_dict, wide


@dataclasses.dataclass(frozen=True)
class Norm:
    """One norm and the dense layers that read its output.

    Attributes:
      path: the norm's params prefix (``path/scale``, and ``path/bias`` but for RMSNorm).
      readers: prefixes of the dense layers reading it (``prefix/kernel`` with the stream as
        its first axis after the batch axes, and ``prefix/bias`` if the layer has one).
      batch: leading (stacked-layer) axes shared by the norm and its readers.
    """

    path: str
    readers: tuple[str, ...]
    batch: int = 0


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """The residual stream of a pre-norm model: its norms and its writers.

    Attributes:
      dim: the stream width D.
      norms: every norm reading the stream.
      writers: ``(param path, stream axis)`` of every param written into the stream.
      centred: LayerNorm (True: writers are centred) or RMSNorm (False).
    """

    dim: int
    norms: tuple[Norm, ...]
    writers: tuple[tuple[str, int], ...]
    centred: bool = True


def with_stream_rotation(spec: Spec, stream: StreamSpec, residual: str, name: str) -> Spec:
    """``spec`` plus the stream rotation group ``name`` (kind ``rot``, role
    ``stream_rotation``), acting wherever the stream permutation ``residual`` acts except on
    the norms' own params (γ = 1, β = 0 in the canonical form, where this group is a symmetry).
    It keeps the all-ones vector for LayerNorm streams (``stream.centred``).

    Raises:
      ValueError: ``name`` already names a group of ``spec``, or ``residual`` does not.
    """
    if name in spec.groups:
        raise ValueError(f"with_stream_rotation: the spec already has a group {name!r}")
    if residual not in spec.groups:
        raise ValueError(f"with_stream_rotation: the spec has no group {residual!r}")
    norms = {f"{n.path}/{leaf}" for n in stream.norms for leaf in ("scale", "bias")}
    group = Group(
        "rot", stream.dim, over=residual, role="stream_rotation", keeps_ones=stream.centred
    )
    params = {
        path: p
        if path in norms
        else dataclasses.replace(
            p,
            actions=(*p.actions, *(Action(name, a.axes) for a in p.actions if a.group == residual)),
        )
        for path, p in spec.param_items
    }
    return Spec(tuple(sorted((*spec.group_items, (name, group)))), tuple(sorted(params.items())))


def canonicalize(stream: StreamSpec, params: Any) -> Any:
    """The canonical form of ``params`` (see the module docstring): a new pytree computing the
    same function, every norm at γ = 1, β = 0 (if it has a β) and (for LayerNorm) every
    writer mean-free.

    Raises:
      TypeError: ``stream`` is not a `StreamSpec`.
      ValueError: a param the stream names missing, or a norm's scale or bias not of the
        stream's width (path and shapes named); a norm with β ≠ 0 whose reader has no bias to
        take ``β W`` (naming it).
    """
    if not isinstance(stream, StreamSpec):
        raise TypeError(f"stream must be a StreamSpec (family.stream_spec), got {stream!r}")
    paths, leaves, treedef = flatten(params)
    flat = dict(zip(paths, leaves, strict=True))
    # (each was a bare KeyError, or JAX's broadcasting error naming no path)
    need = [f"{n.path}/scale" for n in stream.norms] + [p for p, _ in stream.writers]
    need += [f"{r}/kernel" for n in stream.norms for r in n.readers]
    missing = [p for p in need if p not in flat]
    if missing:
        raise ValueError(f"params lack what the stream spec names: {missing[:5]}")
    for norm in stream.norms:
        for leaf in ("scale", "bias"):
            p = f"{norm.path}/{leaf}"
            if p in flat and np.shape(flat[p])[norm.batch :] != (stream.dim,):
                raise ValueError(
                    f"{p}: shape {np.shape(flat[p])}, where the stream is {stream.dim} wide"
                )
    for norm in stream.norms:  # a β that no reader's bias can take
        beta = flat.get(f"{norm.path}/bias")
        for reader in norm.readers:
            if beta is not None and f"{reader}/bias" not in flat and np.any(np.asarray(beta)):
                raise ValueError(
                    f"{norm.path}/bias is not 0 but {reader} has no bias to fold it into "
                    "(a ViT with qkv_bias=False): this model has no canonical form"
                )
    out = _canonical(stream, flat)  # the same paths, in the caller's containers (FrozenDict)
    return jax.tree_util.tree_unflatten(treedef, [placed_like(out[p], flat[p]) for p in paths])


@functools.partial(jax.jit, static_argnums=0)  # one program, however it is called
def _canonical(stream: StreamSpec, flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = dict(flat)
    for norm in stream.norms:
        gamma = wide(flat[f"{norm.path}/scale"])
        has_bias = f"{norm.path}/bias" in flat  # RMSNorm has none
        beta = wide(flat[f"{norm.path}/bias"]) if has_bias else jnp.zeros_like(gamma)
        b = norm.batch
        for reader in norm.readers:
            kernel = flat[f"{reader}/kernel"]
            w = wide(kernel)
            # β W: contract β with the kernel's input (stream) axis, after the batch axes.
            lead = beta.shape[:b] + (1,) * (w.ndim - b - 1) + beta.shape[b:]
            shift = jnp.sum(jnp.moveaxis(w, b, -1) * beta.reshape(lead), axis=-1)
            bias = f"{reader}/bias"
            if bias in flat:  # (else β = 0: `canonicalize` checked)
                out[bias] = (wide(flat[bias]) + shift).astype(flat[bias].dtype)
            g = gamma.reshape(gamma.shape + (1,) * (w.ndim - b - 1))
            out[f"{reader}/kernel"] = (g * w).astype(kernel.dtype)
        out[f"{norm.path}/scale"] = jnp.ones_like(flat[f"{norm.path}/scale"])
        if has_bias:
            out[f"{norm.path}/bias"] = jnp.zeros_like(flat[f"{norm.path}/bias"])
    if stream.centred:
        for path, axis in stream.writers:
            x = wide(out[path])
            out[path] = (x - jnp.mean(x, axis=axis, keepdims=True)).astype(out[path].dtype)
    return out


def norm_at(x: Any, want: float) -> bool:
    """Whether the norm param ``x`` (a γ or β) is ``want`` (1 or 0) to 4 ulps of float32, or of
    its dtype if finer: a merge of canonical models, computed in float32, is ulps off (bfloat16
    or float16 ones round back to exactly 1 and 0, and their 4 ulps, 0.03 in bfloat16, would
    let γ = 0.97 through). Read at trace time under `jax.jit` (the value must be known)."""
    eps = 4 * float(min(jnp.finfo(x.dtype).eps, jnp.finfo(jnp.float32).eps))
    with jax.ensure_compile_time_eval():
        return bool(jnp.all(jnp.abs(x - want) <= eps))


def is_canonical(stream: StreamSpec, params: Any, *, atol: float | None = None) -> bool:
    """Whether every norm is at γ = 1, β = 0 (to a few ulps: `norm_at`, as `rotjax.symmetry.
    apply` and `rotjax.match.align` take them) and (LayerNorm) every writer is mean-free, to
    ``atol`` relative to the writer's largest magnitude (default: 1e-5, or the writer's
    dtype's epsilon if larger: a bfloat16 writer, centred then rounded, keeps a mean of its
    rounding, ~1e-4 relative). Read at trace time under `jax.jit`, as `norm_at`: the params
    must be known there (closed over), not traced."""
    flat = to_dict(params)
    for norm in stream.norms:
        bias = flat.get(f"{norm.path}/bias")
        if not norm_at(flat[f"{norm.path}/scale"], 1) or (
            bias is not None and not norm_at(bias, 0)
        ):
            return False
    if stream.centred:
        for path, axis in stream.writers:
            eps = float(jnp.finfo(jnp.asarray(flat[path]).dtype).eps)
            tol = atol if atol is not None else max(1e-5, eps)
            with jax.ensure_compile_time_eval():  # (under a jit, a traced mean has no float)
                x = wide(flat[path])  # float64 checked in float64
                scale = jnp.maximum(jnp.max(jnp.abs(x)), 1e-30)
                if float(jnp.max(jnp.abs(jnp.mean(x, axis=axis)))) > tol * float(scale):
                    return False
    return True
