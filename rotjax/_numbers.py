"""The one test of "is this option a number" that every option check in rotjax makes (it was
written six ways, which took different things: ``align`` took ``max_sweeps=np.array(3)``,
``align_by_activations`` refused it; wordnet's ``limit`` refused numpy ints)."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(x: Any, *, arrays: bool = False) -> bool:
    """Whether ``x`` is a Python or numpy integer (of any size), never a bool (True is no
    count); with ``arrays``, also a known 0-d integer array, numpy's or JAX's (an element of
    ``jnp.arange(n)``), for checks that then store ``int(x)``: an array kept as an option
    reaches JSON records, dict keys and comparisons with 2**32, which it fails."""
    return is_number(x, "iu", arrays=arrays)


def is_number(x: Any, kinds: str = "iu", *, arrays: bool = False) -> bool:
    """`is_int`, or with ``kinds="iuf"`` a real number: a Python or numpy int or float (with
    ``arrays``, or a known 0-d array of one)."""
    if isinstance(x, bool | np.bool_):
        return False
    if isinstance(x, int | np.integer) or ("f" in kinds and isinstance(x, float | np.floating)):
        return True
    if not arrays:
        return False
    try:  # (a tracer, under jax.jit, is no known value; a ragged list no array)
        return np.ndim(x) == 0 and np.asarray(x).dtype.kind in kinds
    except Exception:
        return False
