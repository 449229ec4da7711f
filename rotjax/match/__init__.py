"""Matching: the element of model B's symmetry group that brings B closest to an anchor A.

Files, one job each: ``_align`` (the public API and the coordinate-descent driver), ``_checks``
(input checks), ``_objective`` (the objective and what every stage shares), ``_attention``
(heads, rotations, scales), ``_permutations`` (FFN units, residual stream), ``_solvers`` (the
closed-form block solvers), ``_cpu`` (an XLA:CPU memory workaround), ``_prepare`` (the spec
and params to align with).
"""

from rotjax.match._align import (
    ALL,
    BLOCKS,
    PAPER,
    RESIDUAL_INITS,
    Alignment,
    Diagnostics,
    Options,
    align,
    align_many,
)
from rotjax.match._permutations import permutation_scores
from rotjax.match._prepare import Prepared, prepare
from rotjax.match._solvers import (
    SOLVERS,
    assign,
    best_scale,
    pair_procrustes,
    polar,
    procrustes,
    scale_objective,
)

__all__ = [
    "ALL",
    "BLOCKS",
    "PAPER",
    "RESIDUAL_INITS",
    "SOLVERS",
    "Alignment",
    "Diagnostics",
    "Options",
    "Prepared",
    "align",
    "align_many",
    "assign",
    "best_scale",
    "pair_procrustes",
    "permutation_scores",
    "polar",
    "prepare",
    "procrustes",
    "scale_objective",
]
