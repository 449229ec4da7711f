"""Align and merge model pairs, and measure the results: the drivers that `reproduce`, the demo
and the merge benchmark share. Everything here is a short composition of public rotjax calls.

    pair = load_pair(dir_a, dir_b)
    variants = align_variants(pair, ["none", "paper", "all", "activations"], unlabeled)
    rows = merge_rows(variants, ["average", "regmean"], evaluate, stats_data=stats_data)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from experiments import train as T
from rotjax import data, hf, match, merge, train
from rotjax import symmetry as sym
from rotjax.merge._straight import _check_descent  # the descent's own checks, run early
from rotjax.models import family

# Alignment variants: name -> match.align options (None: no alignment). "paper" is the
# paper's method; "canonical": both models in canonical form with the stream rotation in the
# spec (pre-norm models); "activations": `rotjax.merge.align_by_activations`;
# "straight-through": that, refined by `rotjax.merge.align_straight_through`.
ALIGNMENTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "ffn only": {"solve": ("ffn",)},  # Git Re-Basin's weight matching of the FFN units
    "paper": {"solve": match.PAPER},
    "paper - attention": {"solve": ("ffn",)},
    "paper - ffn": {"solve": ("rotation", "scale")},
    "paper - rescale": {"solve": ("rotation", "ffn")},
    "all": {"solve": tuple(b for b in match.ALL if b != "stream")},
    "all + stream": {"solve": match.ALL, "canonical": True},
    "activations": {"solve": match.ALL, "activations": True, "canonical": True},
    # then 300 steps of `merge.align_straight_through` on the same unlabeled inputs
    "straight-through": {"solve": match.ALL, "activations": True, "canonical": True, "steps": 300},
}
METHODS = ("average", "circuits", "refit", "fisher", "regmean", "ot-acts", "ot-wts")


def sweep_cap(solve: Sequence[str], max_sweeps: int | None) -> int | None:
    """``max_sweeps`` for an alignment that iterates to convergence (one that solves the
    residual stream: `match.align` runs up to 50 sweeps there), None for a single-pass one
    (the paper's: a cap would make `match.align` sweep that many times)."""
    return max_sweeps if {"residual", "stream"} & set(solve) else None


@dataclasses.dataclass
class Pair:
    """Two models of one architecture (A is the anchor) and what every step needs."""

    config: Any
    a: Any
    b: Any
    names: tuple[str, str] = ("a", "b")
    spec: Any = None

    def __post_init__(self):
        if self.spec is None:
            self.spec = family(self.config).symmetry_spec(self.config)

    @property
    def model(self):
        return family(self.config).Model(self.config)

    def canonical(self) -> Pair:
        """Both models in canonical form, the spec with the stream rotation (pre-norm
        families; `rotjax.symmetry.canonicalize`): the same functions, other weights."""
        fam = family(self.config)
        stream = fam.stream_spec(self.config)
        return Pair(
            self.config,
            sym.canonicalize(stream, self.a),
            sym.canonicalize(stream, self.b),
            self.names,
            fam.symmetry_spec(self.config, stream_rotation=True),
        )


def load_pair(dir_a, dir_b) -> Pair:
    (config, a), (config_b, b) = hf.load(dir_a), hf.load(dir_b)
    if config != config_b:
        raise ValueError(f"{dir_a} and {dir_b} have different architectures")
    return Pair(config, a, b, (str(dir_a), str(dir_b)))


# Evaluation batches of at most 250: XLA:CPU evaluated the project's Fashion-MNIST ViT at 0.81 s
# per 1000 test images in one batch, 0.38-0.40 s in batches of 250 or fewer (2 cores, 2026-12-01).
EVAL_BATCH = 250


def eval_batch(n: int, cap: int = EVAL_BATCH) -> int:
    """A batch size for ``n`` examples split over every device: ``ceil(n / cap)`` batches of
    nearly equal sizes, each a multiple of the devices (``cap`` at most, rounded up to one)."""
    d = jax.device_count()
    per_batch = math.ceil(n / max(1, math.ceil(n / cap)))
    return max(d, math.ceil(per_batch / d) * d)


def by_length(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``(arrays, order)``: token data (with an ``attention_mask``) sorted by length (stable),
    so that batches cut to their longest text (``trim``) hold texts of similar lengths, and
    the order (``sorted = arrays[order]``); other data as it is, order None."""
    if "attention_mask" not in arrays:
        return dict(arrays), None
    order = np.argsort(np.asarray(arrays["attention_mask"]).sum(axis=1), kind="stable")
    return {k: np.asarray(v)[order] for k, v in arrays.items()}, order


def evaluator(model, arrays: Mapping[str, np.ndarray], *, cap: int = EVAL_BATCH):
    """`rotjax.train.evaluator` of ``model`` over ``arrays`` (with ``labels``), in batches of
    `eval_batch` size; token data sorted by length and each batch cut to its longest text
    (`by_length`, `train.TRIM`: the same sums in another order, a fraction of the work)."""
    if "labels" not in arrays:
        raise ValueError(f"evaluator: no labels among {sorted(arrays)}")
    size = eval_batch(len(arrays["labels"]), cap)
    arrays, order = by_length(arrays)
    trim = None if order is None else T.TRIM
    return train.evaluator(model, arrays, batch_size=size, trim=trim)


def predictor(model, arrays: Mapping[str, np.ndarray], *, cap: int = EVAL_BATCH):
    """``params -> argmax predictions`` of ``model`` over ``arrays`` in their order, computed
    like `evaluator`'s metrics (sorted by length, batches cut)."""
    size = eval_batch(len(next(iter(arrays.values()))), cap)
    arrays, order = by_length(arrays)
    trim = None if order is None else T.TRIM
    predict = train.predictor(model, batch_size=size, trim=trim)
    if order is None:
        return lambda params: predict(params, arrays)
    inverse = np.argsort(order)
    return lambda params: predict(params, arrays)[inverse]


def batches(arrays: Mapping[str, np.ndarray], batch_size: int = 50) -> list[dict]:
    """Model-input batches (no labels) of named arrays, as `rotjax.merge.statistics` takes."""
    inputs = {k: v for k, v in arrays.items() if k != "labels"}
    return list(data.batches(inputs, batch_size))


def align_variants(
    pair: Pair,
    names: Sequence[str],
    unlabeled: Mapping[str, np.ndarray] | None = None,
    *,
    key: jax.Array | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    max_sweeps: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``{variant: {"pair": the (aligned) pair, "seconds": ..., "distance": (before, after)}}``:
    ``pair.b`` is B aligned to ``pair.a`` (A itself, or A in canonical form).

    ``options`` adds variants of one's own (name -> `match.align` options, plus
    ``"activations": True`` for an activation start, with `merge.align_by_activations`'
    options such as ``"steps"`` of straight-through descent, and ``"canonical": True`` for the
    canonical form with the stream rotation).

    ``max_sweeps`` caps the coordinate descent of the variants that iterate to convergence
    (those that solve the residual stream: `match.align` runs up to 50 sweeps there), the
    activation variants' data-free candidate included; single-pass variants (the paper's)
    keep their one pass, and the activation start's own candidates their sweeps."""
    table = {**ALIGNMENTS, **(options or {})}
    for name in names:  # every variant's descent options checked before any work
        opts = table[name] or {}
        if opts.get("activations") and opts.get("steps"):  # as the loop below runs it
            descent = {k: opts[k] for k in ("steps", "learning_rate") if k in opts}
            _check_descent(**descent, solve=opts.get("solve", match.ALL))
    out = {}
    canonical, canonical_seconds = None, 0.0
    # Data-free alignments by (canonical form, solved blocks), with their seconds: the
    # activation variants' data-free candidate is the same computation, reused, and its
    # seconds are counted in theirs (each variant's time is what it costs alone).
    plain: dict[tuple, tuple[match.Alignment, float]] = {}
    # Activation alignments by (canonical form, options but the descent's), with their
    # seconds: a straight-through variant descends from the same activation alignment (the
    # descent `align_by_activations(steps=)` runs), reused, and its seconds counted in its own.
    started: dict[tuple, tuple[match.Alignment, float]] = {}
    for name in names:
        opts = table[name]
        if opts is None:
            out[name] = {"pair": pair, "seconds": 0.0, "distance": None}
            continue
        opts = dict(opts)
        solve = tuple(opts.get("solve", match.ALL))
        cap = sweep_cap(solve, max_sweeps)
        if cap is not None and not opts.get("activations"):
            opts.setdefault("max_sweeps", cap)
        base = pair
        in_canonical = opts.pop("canonical", False)
        if in_canonical:
            if canonical is None:  # once, its seconds counted in every canonical variant's
                tic = time.perf_counter()
                canonical = pair.canonical()
                jax.block_until_ready((canonical.a, canonical.b))
                canonical_seconds = time.perf_counter() - tic
            base = canonical
        tic = time.perf_counter()
        reused = 0.0
        from_data = opts.pop("activations", False)
        if from_data:  # sweeps chosen by the data
            descent = {k: opts.pop(k) for k in ("steps", "learning_rate") if k in opts}
            ident = (in_canonical, cap, repr(sorted(opts.items())))
            known = plain.get((in_canonical, solve, cap))
            if ident in started:
                res, reused = started[ident]
            else:
                if known is not None:
                    opts["weights_start"], reused = known
                elif cap is not None and opts.get("weights_start", True) is True:
                    opts["weights_start"] = match.align(
                        base.spec, base.a, base.b, solve=solve, key=key, max_sweeps=cap
                    )
                res, _ = merge.align_by_activations(
                    base.model, base.spec, base.a, base.b, batches(unlabeled), key=key, **opts
                )
                jax.block_until_ready(res.params)
                started[ident] = (res, time.perf_counter() - tic + reused)
            if descent.get("steps"):
                res, _ = merge.align_straight_through(
                    base.model,
                    base.spec,
                    base.a,
                    base.b,
                    batches(unlabeled),
                    init=res,
                    key=key,
                    solve=solve,
                    solver=opts.get("solver", "scipy"),
                    **descent,
                )
        else:
            res = match.align(base.spec, base.a, base.b, key=key, **opts)
        d = res.diagnostics
        aligned = dataclasses.replace(base, b=jax.block_until_ready(res.params))
        seconds = time.perf_counter() - tic + reused
        if not from_data and set(opts) <= {"solve", "max_sweeps"} and opts.get("max_sweeps") == cap:
            # what the data-free candidate of an activation variant computes
            plain[(in_canonical, solve, cap)] = (res, seconds)
        out[name] = {
            "pair": aligned,
            "seconds": seconds + (canonical_seconds if in_canonical else 0.0),
            "distance": (d.distance_before, d.distance_after),
        }
    return out


def merged(
    pair: Pair,
    method: str,
    *,
    stats_data: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    alpha: float = 0.9,
    fisher_kind: str = "exact",
    key: jax.Array | None = None,
    memo: dict | None = None,
) -> tuple[Any, dict[str, float]]:
    """``(merged params, {"statistics": s, "merge": s})`` of A with (aligned) B.

    ``stats_data``: one array dict (shared) or one per model, for Fisher, RegMean, OT-acts
    (computed afresh for every call, so the reported statistics time is real), and the
    unlabeled inputs of refit (all of them; its passes counted as merge time).

    ``memo``: a dict in which each model's Fisher / Gram statistics are kept, by the identity
    of its params tree and data (the same objects, not equal values), and reused: A's are the
    same for every alignment of B in the same form (one memo per set of the other options).
    Their seconds are then not counted again."""
    shared = stats_data if isinstance(stats_data, Mapping) else None
    per_model = [shared, shared] if shared is not None else list(stats_data or [None, None])
    b_aligned = pair.b
    params = [pair.a, b_aligned]
    seconds = {"statistics": 0.0, "merge": 0.0}
    tic = time.perf_counter()
    if method == "average":
        out = merge.average(params)
    elif method == "circuits":  # the average, each attention head from its mean circuits
        out = merge.circuits(pair.spec, merge.average(params), params)
    elif method == "refit":  # the average, each dense layer refitted on the merge's own inputs
        # per-model data: all of it (each model's outputs on every input)
        inputs = shared or data.concat(per_model)
        out = merge.refit(pair.model, merge.average(params), params, batches(inputs))
    elif method in ("fisher", "regmean"):
        kinds = ("fisher",) if method == "fisher" else ("gram",)

        def statistics(p, d):
            known = (memo or {}).get((id(p), id(d), method))
            if known is not None:
                return known[-1]
            size = 25 if method == "fisher" else 50
            out = merge.statistics(
                pair.model, p, batches(d, size), kinds, fisher=fisher_kind, key=key
            )
            if memo is not None:  # params and data kept with them: their ids stay theirs
                memo[id(p), id(d), method] = (p, d, out)
            return out

        stats = jax.block_until_ready(
            [statistics(p, d) for p, d in zip(params, per_model, strict=True)]
        )
        seconds["statistics"] = time.perf_counter() - tic
        tic = time.perf_counter()
        out = (
            merge.fisher(params, stats)
            if method == "fisher"
            else merge.regmean(params, stats, alpha=alpha)
        )
    elif method in ("ot-acts", "ot-wts"):
        cross = None
        if method == "ot-acts":
            cross = jax.block_until_ready(
                merge.cross_statistics(pair.model, pair.a, b_aligned, batches(per_model[0]))
            )
            seconds["statistics"] = time.perf_counter() - tic
            tic = time.perf_counter()
        out = merge.ot_fusion(pair.spec, pair.a, b_aligned, mode=method[3:], cross=cross).params
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    out = jax.block_until_ready(out)  # asynchronous dispatch: the work done, then timed
    seconds["merge"] = time.perf_counter() - tic
    return out, seconds


def merge_rows(
    variants: Mapping[str, Mapping[str, Any]],
    methods: Iterable[str],
    evaluate: Callable[[Any], Mapping[str, float]],
    *,
    reuse_statistics: bool = False,
    **merge_options: Any,
) -> list[dict[str, Any]]:
    """One row per (alignment variant, method): the merged model's metrics and timings.
    ``merge_options`` are `merged`'s; with ``reuse_statistics`` each model's statistics are
    computed once (`merged`'s ``memo``), and the rows' statistics seconds are those of the
    models computed in that row only.

    One thread: evaluating each merge on a worker thread while the next was merged saved ~10%
    of the demo's time but aborted the process now and then (``Fatal Python error: Aborted``
    with the main thread in eager ops and the worker in a jitted evaluation, 3 test runs in
    10, 2026-12-03); JAX is not driven from two threads anywhere in rotjax."""
    rows = []
    memo = {} if reuse_statistics else None
    for name, v in variants.items():
        for method in methods:
            params, seconds = merged(v["pair"], method, memo=memo, **merge_options)
            rows.append(
                {
                    "alignment": name,
                    "method": method,
                    **{k: float(x) for k, x in evaluate(params).items()},
                    "seconds": {"align": v["seconds"], **seconds},
                    "distance": v["distance"],
                }
            )
    return rows
