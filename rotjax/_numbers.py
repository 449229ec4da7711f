"""The one test of "is this option a number" that every option check in rotjax makes (it was
written six ways, which took different things: ``align`` took ``max_sweeps=np.array(3)``,
``align_by_activations`` refused it)."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_number(x: Any, kinds: str = "iu") -> bool:
    """Whether ``x`` is one known number of these numpy dtype kinds (ints by default; ``"iuf"``
    for reals): a Python or numpy scalar or a 0-d array, JAX's included (an element of
    ``jnp.arange(n)``), but never a bool (True is no count) nor a value traced under
    `jax.jit` (an option decides what is computed: it must be known)."""
    if isinstance(x, bool) or np.ndim(x) != 0:
        return False
    try:
        return np.asarray(x).dtype.kind in kinds
    except Exception:  # a tracer (TracerArrayConversionError), or no array at all
        return False


def is_int(x: Any) -> bool:
    """`is_number` of an integer kind: a Python or numpy int or a 0-d integer array."""
    return is_number(x, "iu")
