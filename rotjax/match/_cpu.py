"""An XLA:CPU memory workaround: evaluate independent functions one after the other in a loop.

On CPU, XLA allocates the temporaries of independent ops all at once, fresh pages on every
call; for the head-major copies of BERT-base's kernels that the per-head cross-covariances need,
the page faults cost more than the copies (170 MB of them: 0.11 s; looped, one 14 MB buffer:
0.06 s). On accelerators the loop runs the functions in sequence, each still batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def one_at_a_time(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """``[f() for f in fns]``, evaluated in a loop (one per group of ``fns`` with the same
    output shapes) rather than as independent ops, so that their temporaries share a buffer."""
    groups: dict[Any, tuple[Any, list[int]]] = {}  # output shapes -> (them, indices)
    for i, f in enumerate(fns):
        shape = jax.eval_shape(f)
        key = (jax.tree.structure(shape), tuple(jax.tree.leaves(shape)))
        groups.setdefault(key, (shape, []))[1].append(i)
    out: list[Any] = [None] * len(fns)
    for shape, idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = fns[idx[0]]()
            continue
        res = _looped([fns[i] for i in idx], shape)
        for j, i in enumerate(idx):
            out[i] = jax.tree.map(lambda x, j=j: x[j], res)
    return out


def _looped(fns, shape):
    """The outputs of ``fns`` (all of output shapes ``shape``) stacked, computed in a loop."""
    init = jax.tree.map(lambda s: jnp.zeros((len(fns), *s.shape), s.dtype), shape)
    body = lambda j, acc: jax.tree.map(lambda x, y: x.at[j].set(y), acc, jax.lax.switch(j, fns))
    return jax.lax.fori_loop(0, len(fns), body, init)
