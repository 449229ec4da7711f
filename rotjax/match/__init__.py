"""Matching: the element of model B's symmetry group that brings B closest to an anchor A."""

from rotjax.match._align import ALL, GROUPS, PAPER, Alignment, Diagnostics, align, align_many
from rotjax.match._solvers import SOLVERS, assign, best_scale, polar, procrustes, scale_objective

__all__ = [
    "ALL",
    "GROUPS",
    "PAPER",
    "SOLVERS",
    "Alignment",
    "Diagnostics",
    "align",
    "align_many",
    "assign",
    "best_scale",
    "polar",
    "procrustes",
    "scale_objective",
]
