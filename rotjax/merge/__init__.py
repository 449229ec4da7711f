"""Merging: fuse N aligned models of one architecture into one.

Matching (`rotjax.match`) is a plug-in before any method here: align B to A, then merge.

- statistics from data, computed once: `statistics` (input Grams, diagonal Fishers),
  `cross_statistics` (two models' activations), `transform_statistics`, `save_statistics`,
  `load_statistics`;
- merges: `average`, `fisher`, `regmean`, and after any of them `circuits` (attention heads
  merged by their query-key and output-value circuits) or `refit` (every dense layer refitted
  in forward order on the merged model's own inputs); relative to a base model
  `task_arithmetic`, `ties`, `dare`; `ot_fusion` (exact or Sinkhorn transport from
  activations or weights);
- alignment from activations: `activation_init` (a start for `rotjax.match.align`),
  `align_by_activations` (that start and weight-matching sweeps, or weight matching from
  its data-free start, chosen by `prediction_loss` on unlabeled data),
  `align_straight_through` (descent on the loss of the merge itself, from any start);
- the linear path: `curve`, `barrier`, `interpolate`.
"""

from rotjax.merge._acts import activation_init, correlations, cross_statistics, group_scores
from rotjax.merge._circuits import circuits
from rotjax.merge._curve import Curve, barrier, curve, interpolate
from rotjax.merge._loss import prediction_loss
from rotjax.merge._methods import average, fisher, model_weights, regmean
from rotjax.merge._ot import SINKHORN_EPSILON, Fusion, ot_fusion, transport_params
from rotjax.merge._refit import refit
from rotjax.merge._select import align_by_activations
from rotjax.merge._stats import (
    FISHERS,
    KINDS,
    load_statistics,
    save_statistics,
    statistics,
    transform_statistics,
)
from rotjax.merge._straight import align_straight_through
from rotjax.merge._task import dare, task_arithmetic, ties

__all__ = [
    "FISHERS",
    "KINDS",
    "SINKHORN_EPSILON",
    "Curve",
    "Fusion",
    "activation_init",
    "align_by_activations",
    "align_straight_through",
    "average",
    "barrier",
    "circuits",
    "correlations",
    "cross_statistics",
    "curve",
    "dare",
    "fisher",
    "group_scores",
    "interpolate",
    "load_statistics",
    "model_weights",
    "ot_fusion",
    "prediction_loss",
    "refit",
    "regmean",
    "save_statistics",
    "statistics",
    "task_arithmetic",
    "ties",
    "transform_statistics",
    "transport_params",
]
