"""The one test of "is this option a number" that every option check in rotjax makes (it was
written six ways, which took different things: ``align`` took ``max_sweeps=np.array(3)``,
``align_by_activations`` refused it; wordnet's ``limit`` refused numpy ints)."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(x: Any) -> bool:
    """Whether ``x`` is a Python or numpy integer (of any size), never a bool (True is no
    count). Arrays, 0-d ones included, are not: options are stored, compared and written to
    JSON as numbers (callers that store one take ``int(x)``)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_number(x: Any, kinds: str = "iu") -> bool:
    """`is_int`, or with ``kinds="iuf"`` a real number: a Python or numpy int or float."""
    return is_int(x) or ("f" in kinds and isinstance(x, float | np.floating))
