"""The one check of a ``jax.random`` key that every random choice in rotjax makes first."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def check_key(key: Any, name: str = "key") -> None:
    """Raise ValueError unless ``key`` is one ``jax.random`` key: a typed ``jax.random.key``
    (shape ``()``) or raw ``jax.random.PRNGKey`` data (``uint32`` of shape ``(2,)``), traced
    or not. (An int or None failed inside JAX, naming none of rotjax's arguments.)"""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == np.uint32 and np.shape(key) == (2,)
    if not ((typed and np.shape(key) == ()) or raw):
        raise ValueError(f"{name} must be a jax.random.key, got {key!r}")
