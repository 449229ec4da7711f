"""Merging: statistics against oracles (numpy lstsq, per-example gradient loops), symmetry
equivariance of the statistics, every method on planted and hand-computed cases, sharding.

Tolerances: float32 at matmul precision "highest"; a merge of identical or re-aligned models is
exact up to rounding of a few sums and one small inverse (1e-5 relative); oracles in float64 are
compared at 1e-4 (RegMean's inverse of a Gram with condition number up to ~1e2).
"""

import dataclasses
import re
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers import CONFIGS, compiled, inputs, scanned
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.special import log_softmax, softmax

from rotjax import match, merge, tree
from rotjax import symmetry as sym
from rotjax.data import IGNORE_LABEL
from rotjax.merge import _task
from rotjax.merge._capture import capture
from rotjax.merge._stats import _lookup_tables
from rotjax.models import Family, family, stack_layers
from rotjax.symmetry import _transform as sym_transform
from rotjax.tree import from_dict, to_dict

TOL = 1e-5


def batches_of(config, key, n=3, batch=4):
    return [inputs(config, jax.random.fold_in(key, i), batch=batch) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# RegMean, Fisher and the plain average on hand-made layers.


def _layer_models(seed, n_models=3, d_in=5, d_out=3, rows=40):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(rows, d_in)) * rng.uniform(0.3, 3, d_in) for _ in range(n_models)]
    ws = [rng.normal(size=(d_in, d_out)) for _ in range(n_models)]
    params = [{"w": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.ones(d_out)}} for w in ws]
    stats = [{"gram": {"w/kernel": jnp.asarray(x.T @ x / rows, jnp.float32)}} for x in xs]
    return xs, ws, params, stats


def test_regmean_is_the_least_squares_merge_at_alpha_1(seed):
    xs, ws, params, stats = _layer_models(seed)
    got = merge.regmean(params, stats, alpha=1.0)
    # Oracle: argmin_W Σ_i ‖X_i W - X_i W_i‖² (equal row counts, so per-row means change nothing).
    oracle = np.linalg.lstsq(
        np.concatenate(xs), np.concatenate([x @ w for x, w in zip(xs, ws, strict=True)])
    )[0]
    np.testing.assert_allclose(got["w"]["kernel"], oracle, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["w"]["bias"], 1.0)  # not a dense kernel: averaged
    # α = 0: each input feature j is a Gram-diagonal-weighted average of the models' rows.
    diag = np.stack([np.diag(np.asarray(s["gram"]["w/kernel"], np.float64)) for s in stats])
    want = np.einsum("ij,ijk->jk", diag, np.stack(ws)) / diag.sum(0)[:, None]
    got0 = merge.regmean(params, stats, alpha=0.0)
    # Weighted means of O(1) entries: float32 rounding is absolute (~1e-7 each), so an entry that
    # cancels to ~1e-4 needs an absolute floor as well.
    np.testing.assert_allclose(got0["w"]["kernel"], want, rtol=1e-5, atol=1e-6)
    # A ridge holds the kernel to the average (the docstring said it shrank it towards 0):
    # argmin_W Σ_i ‖X_i (W - W_i)‖² / n + Σ_j s_j ‖W_j - W̄_j‖², s = ridge · diag(Σ G), in float64
    rows, mean, ridge = len(xs[0]), np.mean(ws, axis=0), 0.5
    g = sum(x.T @ x for x in xs) / rows
    s = np.diag(ridge * np.diag(g))
    rhs = sum(x.T @ x @ w for x, w in zip(xs, ws, strict=True)) / rows + s @ mean
    want = np.linalg.solve(g + s, rhs)
    got = merge.regmean(params, stats, alpha=1.0, ridge=ridge)["w"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # 0 < α < 1 with model weights: the formula, in float64 (a merge taking α² for α, right at
    # α = 0 and 1, was caught only by a sharding test). The default ridge (1e-8) is below the
    # tolerance.
    lam = np.array([0.2, 0.5, 0.3])
    for alpha in (0.3, 0.9):
        gt = [(alpha * x.T @ x + (1 - alpha) * np.diag(np.sum(x * x, 0))) / rows for x in xs]
        want = np.linalg.solve(
            sum(c * g for c, g in zip(lam, gt, strict=True)),
            sum(c * g @ w for c, g, w in zip(lam, gt, ws, strict=True)),
        )
        got = merge.regmean(params, stats, alpha=alpha, weights=lam)["w"]["kernel"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"alpha={alpha}")


def test_regmean_on_fewer_rows_than_inputs_is_the_least_squares_merge_nearest_the_average(seed):
    """Grams of rank below their width (16 + 16 rows for 64 inputs; a wide FFN kernel on little
    data): at α = 1 the least-squares merge is not unique, and RegMean returns the one nearest
    the average in the inputs' scale, least ``Σ_j ‖X e_j‖² ‖W_j - W̄_j‖²`` (float64 lstsq's
    minimum-norm solution in the inputs scaled to unit norm). In float32 an inverse of the
    singular sum returned weights ~1000 times too large (outputs 30 times the target); the
    pseudo-inverse leaves the directions no row reaches at the average."""
    xs, ws, params, stats = _layer_models(seed, n_models=2, d_in=64, d_out=4, rows=16)
    got = np.asarray(merge.regmean(params, stats, alpha=1.0)["w"]["kernel"], np.float64)
    x, mean = np.concatenate(xs), np.mean(ws, axis=0)
    y = np.concatenate([xi @ w for xi, w in zip(xs, ws, strict=True)])
    norms = np.linalg.norm(x, axis=0)
    oracle = mean + np.linalg.lstsq(x / norms, y - x @ mean)[0] / norms[:, None]
    # Float32 Grams of a 32-rank sum (condition ~1e3 on its range): ~1e-4 relative.
    np.testing.assert_allclose(got, oracle, rtol=0, atol=1e-3 * np.abs(oracle).max())


def test_regmean_solves_the_weak_directions_of_a_full_rank_gram(seed):
    """The pseudo-inverse cuts only float32's rounding of zero: two Grams with eigenvalues down
    to 1e-4 of the largest (in a shared random basis, one model's 10x the other's in each
    direction), whose exact α = 1 merge weights each direction by ``λ1 / (λ1 + λ2)``. With
    numpy's ``n ε`` cutoff (3e-5 of the largest at n = 256) the weakest directions fell back to
    the average: 0.12-0.18 of the largest weight off, against 3.5e-4-5.1e-4 here (5 seeds)."""
    rng = np.random.default_rng(seed)
    n = 256
    q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    lam1 = np.logspace(0, -4, n)
    lam2 = lam1 * np.where(rng.random(n) < 0.5, 0.1, 10.0)
    ws = [rng.normal(size=(n, 4)) for _ in range(2)]
    share = lambda lam: q @ np.diag(lam / (lam1 + lam2)) @ q.T
    want = share(lam1) @ ws[0] + share(lam2) @ ws[1]
    params = [{"w": {"kernel": jnp.asarray(w, jnp.float32)}} for w in ws]
    stats = [
        {"gram": {"w/kernel": jnp.asarray(q @ np.diag(lam) @ q.T, jnp.float32)}}
        for lam in (lam1, lam2)
    ]
    got = np.asarray(merge.regmean(params, stats, alpha=1.0)["w"]["kernel"], np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())


def test_regmean_does_not_depend_on_the_inputs_units(seed):
    """Inputs rescaled by S (``X ↦ X S``, so ``W_i ↦ S⁻¹ W_i`` computes the same) give the merge
    ``S⁻¹ W*``, at every α, with S over six decades (mean squares over twelve): the
    pseudo-inverse's cut was relative to the largest input's scale, and an input of mean
    square 5e5 times below it came back as the plain average (an exact diagonal at α = 0)."""
    xs, ws, params, stats = _layer_models(seed, d_in=6)
    s = np.logspace(-3, 3, 6)
    moved = [{"w": {"kernel": jnp.asarray(w / s[:, None], jnp.float32)}} for w in ws]
    grams = [{"gram": {"w/kernel": jnp.asarray(s[:, None] * (x.T @ x / len(x)) * s)}} for x in xs]
    for alpha in (0.0, 0.5, 1.0):
        want = np.asarray(merge.regmean(params, stats, alpha=alpha)["w"]["kernel"], np.float64)
        got = np.asarray(merge.regmean(moved, grams, alpha=alpha)["w"]["kernel"], np.float64)
        # The same float32 solve up to the rounding of the scaled inputs (condition ~1e2).
        np.testing.assert_allclose(got * s[:, None], want, rtol=1e-4, atol=1e-5)


def test_fisher_merge_formula_floor_and_equal_fishers(seed):
    _, ws, params, _ = _layer_models(seed, n_models=2)
    rng = np.random.default_rng(seed)
    fs = [{"w/kernel": jnp.asarray(rng.uniform(0, 2, w.shape), jnp.float32)} for w in ws]
    stats = [{"fisher": f} for f in fs]
    got = merge.fisher(params, stats, weights=[1.0, 3.0], eps=0.5)
    fl = [
        np.maximum(np.asarray(f["w/kernel"]), 0.5) * c for f, c in zip(fs, [1.0, 3.0], strict=True)
    ]
    want = (fl[0] * ws[0] + fl[1] * ws[1]) / (fl[0] + fl[1])
    np.testing.assert_allclose(got["w"]["kernel"], want, rtol=1e-5, atol=1e-6)  # as above
    np.testing.assert_allclose(got["w"]["bias"], 1.0)  # no Fisher: the average
    # Only the Fishers' ratios count: near float32's top too (F·θ overflowed to Inf)
    big = [{"fisher": {"w/kernel": f["w/kernel"] * 1e37}} for f in fs]
    far = jax.tree.map(lambda x: x * 100, params)
    scaled = merge.fisher(far, big, weights=[1.0, 3.0], eps=0.5e37)
    np.testing.assert_allclose(scaled["w"]["kernel"], want * 100, rtol=1e-5, atol=1e-4)
    equal = [{"fisher": fs[0]}, {"fisher": fs[0]}]
    avg = merge.average(params)
    assert rel_err(merge.fisher(params, equal), avg) <= TOL
    with pytest.raises(ValueError, match=r"stats_list\[0\] holds no 'fisher'"):
        merge.fisher(params, [{}, {}])


def test_merges_jit_with_params_and_statistics_traced(seed):
    """Every data-free or statistics-driven merge runs under `jax.jit` (params, statistics and
    DARE's key traced; weights and options static) and gives its eager result; concrete
    statistics closed over are still checked for NaN. Fisher and RegMean failed on their
    host-side NaN checks."""
    _, ws, params, stats = _layer_models(seed, n_models=3)
    rng = np.random.default_rng(seed + 1)
    for s, w in zip(stats, ws, strict=True):
        s["fisher"] = {"w/kernel": jnp.asarray(rng.uniform(0, 2, w.shape), jnp.float32)}
    key = jax.random.key(seed)
    for p in params:  # an integer leaf (a counter), equal in every model: kept
        p["step"] = jnp.asarray(7)
    calls = {
        "average": lambda ps, ss: merge.average(ps, weights=[1.0, 2.0, 0.5]),
        "task_arithmetic": lambda ps, ss: merge.task_arithmetic(ps[0], ps[1:], scale=0.7),
        "fisher": lambda ps, ss: merge.fisher(ps, ss, weights=[1.0, 2.0, 0.5], eps=1e-3),
        "fisher, normalize": lambda ps, ss: merge.fisher(ps, ss, normalize=True),
        "regmean": lambda ps, ss: merge.regmean(ps, ss, weights=[1.0, 0.0, 2.0]),
        "regmean, rest=fisher": lambda ps, ss: merge.regmean(ps, ss, alpha=0.5, rest="fisher"),
        "ties": lambda ps, ss: merge.ties(ps[0], ps[1:], density=0.5),
        "dare": lambda ps, ss, k: merge.dare(ps[0], ps[1:], key=k, drop=0.5),
    }
    for name, call in calls.items():
        args = (params, stats, key) if name == "dare" else (params, stats)
        eager, jitted = call(*args), jax.jit(call)(*args)
        # one program against several: fused float32 sums round differently (1e-6)
        assert rel_err(jitted, eager) <= 1e-6, name
    nan = [
        dict(s, fisher={"w/kernel": s["fisher"]["w/kernel"].at[0, 0].set(jnp.nan)}) for s in stats
    ]
    with pytest.raises(ValueError, match=r"Fishers with NaN or Inf:\n  stats_list\[0\]: w/kernel"):
        jax.jit(lambda ps: merge.fisher(ps, nan))(params)


def test_merges_refuse_misfit_statistics_and_survive_degenerate_ones(seed):
    """Statistics of the wrong shape are refused naming the path (a (1, d_out) Fisher was
    broadcast before); all-zero Grams (a kernel no data reaches) give the average, not NaN;
    weights anywhere in float64's range work; zero Fishers cannot be normalised."""
    _, ws, params, stats = _layer_models(seed, n_models=2)
    avg = merge.average(params)
    fisher = [{"fisher": {"w/kernel": jnp.ones((1, ws[0].shape[1]))}}] * 2
    with pytest.raises(ValueError, match=r"w/kernel: param \(\d+, \d+\) vs stats_list\[0\]"):
        merge.fisher(params, fisher)
    # ... named by its index in stats_list when a model of weight 0 comes first (it was
    # numbered among the kept models only: stats_list[1] for the third model)
    three = [ones_ := {"fisher": {"w/kernel": jnp.ones(ws[0].shape)}}, ones_, fisher[0]]
    with pytest.raises(ValueError, match=r"w/kernel: param \(\d+, \d+\) vs stats_list\[2\]"):
        merge.fisher([*params, params[0]], three, weights=[0, 1, 1])
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        merge.fisher(params, [{"fisher": {}}] * 2, eps=0.0)
    # A NaN Fisher entry made that entry the plain average, silently.
    nan = {"fisher": {"w/kernel": jnp.ones(ws[0].shape).at[0, 0].set(jnp.nan)}}
    ones = {"fisher": {"w/kernel": jnp.ones(ws[0].shape)}}
    with pytest.raises(ValueError, match=r"Fishers with NaN or Inf:\n  stats_list\[1\]: w/kernel"):
        merge.fisher(params, [ones, nan])
    zero = [{"fisher": {"w/kernel": jnp.zeros(ws[0].shape)}}, {"fisher": {}}]
    with pytest.raises(ValueError, match=r"normalize: the Fishers of stats_list\[0, 1\]"):
        merge.fisher(params, [zero[0]] * 2, normalize=True)
    # ... but Fishers whose norm float32 cannot hold are normalised: a subnormal largest entry
    # (flushed to 0 on the device) and entries of 1e38 (whose norm is beyond float32)
    for size, other in ((1e-44, 1.0), (1e38, 1e38)):
        odd = {"fisher": {"w/kernel": jnp.full(ws[0].shape, size, jnp.float32)}}
        same = {"fisher": {"w/kernel": jnp.full(ws[0].shape, other, jnp.float32)}}
        got = merge.fisher(params, [odd, same], normalize=True)
        # each Fisher constant: the average weighted by F̃_i / ‖F_i‖ (F̃ = max(F, eps))
        fs, root = np.float32([size, other]).astype(np.float64), np.sqrt(ws[0].size)
        want = merge.average(params, weights=list(np.maximum(fs, 1e-6) / (fs * root)))
        assert rel_err(got["w"]["kernel"], want["w"]["kernel"]) <= TOL
    # A statistic only some models have, or of a param they lack, is refused naming it (it was
    # merged as a plain average, silently): for the Fisher and for RegMean's Grams.
    with pytest.raises(ValueError, match=r"w/kernel: in stats_list\[0\] only"):
        merge.fisher(params, zero)
    typo = [{"fisher": {"w/kernal": f["fisher"]["w/kernel"]}} for f in fisher]
    with pytest.raises(ValueError, match=r"w/kernal: in stats_list\[0, 1\], but the models"):
        merge.fisher(params, typo)
    with pytest.raises(ValueError, match=r"gram statistics .*\n  w/kernel: in stats_list\[1\]"):
        merge.regmean(params, [{"gram": {}}, stats[1]])
    typo = [{"gram": {"v/kernel": s["gram"]["w/kernel"]}} for s in stats]
    with pytest.raises(ValueError, match=r"v/kernel: in stats_list\[0, 1\], but the models"):
        merge.regmean(params, typo)
    with pytest.raises(ValueError, match=r"w/kernel: a Gram of shape \(2, 2\) does not fit"):
        merge.regmean(params, [{"gram": {"w/kernel": jnp.eye(2)}}] * 2)
    # A ridge beyond 1e8 (the average to float32's precision) overflowed ridge · diag(T): NaN
    # kernels at 3e38, finite in float32
    for bad in (-1.0, 3e38):
        with pytest.raises(ValueError, match=r"ridge must be a number in \[0, 1e8\]"):
            merge.regmean(params, stats, ridge=bad)
    held = merge.regmean(params, stats, ridge=1e8)
    assert rel_err(held, merge.average(params)) <= 1e-6
    inf = [stats[0], {"gram": {"w/kernel": stats[1]["gram"]["w/kernel"].at[0, 1].set(jnp.inf)}}]
    with pytest.raises(
        ValueError, match=r"Grams with NaN or Inf:\n  stats_list\[1\] gram w/kernel"
    ):
        merge.regmean(params, inf)  # (its kernel came back NaN throughout)
    zeros = [{"gram": {"w/kernel": jnp.zeros_like(s["gram"]["w/kernel"])}} for s in stats]
    for ridge in (1e-8, 0.0):
        assert rel_err(merge.regmean(params, zeros, ridge=ridge), avg) <= TOL
    # An input no data excites (a zero row and column in every Gram): at ridge 0 too, its row of
    # the kernel is the average and the others are the least-squares merge of the rest (the
    # inverse was NaN for the whole kernel).
    dead = [
        {"gram": {"w/kernel": s["gram"]["w/kernel"].at[0, :].set(0).at[:, 0].set(0)}} for s in stats
    ]
    got = merge.regmean(params, dead, alpha=1.0, ridge=0.0)["w"]["kernel"]
    g = [np.asarray(d["gram"]["w/kernel"], np.float64)[1:, 1:] for d in dead]
    want = np.linalg.solve(g[0] + g[1], g[0] @ ws[0][1:] + g[1] @ ws[1][1:])
    np.testing.assert_allclose(got[0], (ws[0][0] + ws[1][0]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1:], want, rtol=1e-4, atol=1e-5)
    # A floor λ·eps below float32's normal range is flushed to zero on the CPU: an entry of zero
    # Fisher everywhere is the average (it was 0/0).
    zero_f = [{"fisher": {"w/kernel": jnp.zeros(ws[0].shape)}}] * 2
    for eps in (2e-38, 1e-6):
        assert rel_err(merge.fisher(params, zero_f, eps=eps), avg) <= TOL
    for w in (1e39, 1e-46, 1e308):  # beyond float32 at both ends: normalised in float64 first
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 1e308 + 1e308 overflowed float64, with a warning
            assert rel_err(merge.average(params, [w, w]), avg) <= TOL
        assert (
            rel_err(merge.regmean(params, stats, weights=[w, w]), merge.regmean(params, stats))
            <= TOL
        )
    with pytest.raises(ValueError, match=r"params_list\[1\] has other params than base"):
        merge.ties(params[0], [params[0], {"v": params[0]["w"]}])
    with pytest.raises(ValueError, match="at least 1 model besides the base"):
        merge.task_arithmetic(params[0], [])
    # Complex entries have no sign to elect: 1+1j and 1+2j merged to 0, silently. Task
    # arithmetic takes them (a sum).
    z = [{"w": jnp.zeros(2, jnp.complex64), "r": jnp.zeros(2)}]
    z += [{"w": jnp.array([1 + 1j, 3j], jnp.complex64), "r": jnp.ones(2)}]
    z += [{"w": jnp.array([1 + 2j, 1j], jnp.complex64), "r": jnp.ones(2)}]
    for ties_ in (
        lambda: merge.ties(z[0], z[1:]),
        lambda: merge.dare(z[0], z[1:], key=jax.random.key(seed), combine="ties"),
    ):
        with pytest.raises(ValueError, match=r"complex params have no sign to elect: \['w'\]"):
            ties_()
    np.testing.assert_allclose(merge.task_arithmetic(z[0], z[1:])["w"], [2 + 3j, 4j])
    # TIES' options given to DARE with task arithmetic were ignored, silently.
    for options in ({"density": 0.5}, {"trim": "tensor"}):
        with pytest.raises(ValueError, match="apply only with combine='ties'"):
            merge.dare(params[0], params, key=jax.random.key(seed), **options)
    # A NaN entry stays NaN through TIES' trim and sign election (both dropped it to 0).
    broken = {"w": {**params[1]["w"], "kernel": params[1]["w"]["kernel"].at[0, 0].set(jnp.nan)}}
    for trim in ("global", "tensor"):
        got = np.asarray(
            merge.ties(params[0], [params[1], broken], density=0.5, trim=trim)["w"]["kernel"]
        )
        assert np.isnan(got[0, 0]) and np.isfinite(got.ravel()[1:]).all(), trim
    # And through DARE's drop, whatever the draw (it dropped it to 0 nine times in ten).
    for i in range(8):
        for combine in ("task_arithmetic", "ties"):
            got = merge.dare(
                params[0], [params[1], broken], key=jax.random.key(i), combine=combine
            )["w"]["kernel"]
            assert np.isnan(got[0, 0]) and np.isfinite(np.asarray(got).ravel()[1:]).all()


@pytest.mark.parametrize(
    "name", ["bert-h3d4-l2", "vit-h3d4-l2", "llama-k2g2d6-l2-seq", "deberta-v3-h3d5-l2-seq"]
)
def test_merging_identical_models_returns_them(name, key):
    config = scanned(CONFIGS[name])
    c = compiled(config)
    a = c.init(key, 0.3)
    base = c.init(jax.random.fold_in(key, 1), 0.3)
    stats = merge.statistics(c.model, a, batches_of(config, key, n=2))
    pair = [a, a]
    assert rel_err(merge.average(pair), a) <= TOL
    assert rel_err(merge.fisher(pair, [stats, stats]), a) <= TOL
    assert rel_err(merge.regmean(pair, [stats, stats]), a) <= TOL
    # Task-vector merges are the identity with these settings (λ = 1/N; no trimming or drop).
    assert rel_err(merge.task_arithmetic(base, pair, scale=0.5), a) <= TOL
    assert rel_err(merge.ties(base, pair, density=1.0), a) <= TOL
    dare = merge.dare(base, pair, key=key, drop=0.0, combine="ties", density=1.0)
    assert rel_err(dare, a) <= TOL
    spec = c.spec
    for mode in ("wts", "acts"):
        # 32 examples: the pooler and classifier see one row per example, and with 4 two
        # units' correlations could tie with their own (ROTJAX_SEED=862689169: a swap of two)
        cross = merge.cross_statistics(c.model, a, a, batches_of(config, key, n=2, batch=16))
        cross = cross if mode == "acts" else None
        assert rel_err(merge.ot_fusion(spec, a, a, mode=mode, cross=cross).params, a) <= TOL
    # Cross statistics of another model, or without the inputs of some group's readers (whose
    # units went untransported), are refused by name.
    path = next(iter(cross))
    cut = {k: v[..., :-1] if k in ("sum_a", "m2_a") else v for k, v in cross[path].items()}
    cut["cov"] = cross[path]["cov"][..., :-1, :]
    with pytest.raises(ValueError, match=rf"{path}: a correlation of shape .* does not fit"):
        merge.ot_fusion(spec, a, a, mode="acts", cross={**cross, path: cut})
    ffn = spec.select(roles=["ffn"])[0]
    readers = {p for p, _ in spec.users[ffn]}
    partial = {p: v for p, v in cross.items() if p not in readers}
    with pytest.raises(ValueError, match=rf"cross holds no inputs .* the units of \['{ffn}'"):
        merge.ot_fusion(spec, a, a, mode="acts", cross=partial)
    # Options the chosen transport does not read are refused, and so are bad values.
    for bad, message in (
        (dict(mode="wts", cross=cross), "mode='wts' reads no cross statistics"),
        (dict(mode="wts", epsilon=0.1), "epsilon is Sinkhorn's: transport='exact' reads none"),
        (dict(mode="wts", transport="sinkhorn", epsilon=-0.06), "epsilon must be a finite"),
        (dict(mode="wts", transport="sinkhorn", epsilon=np.inf), "epsilon must be a finite"),
        (dict(mode="wts", weight=1.2), r"weight \(A's share\) must be in \[0, 1\]"),
        # a bool is no number (True was taken as 1.0: A returned, Sinkhorn at epsilon 1)
        (dict(mode="wts", weight=True), r"weight \(A's share\) must be in \[0, 1\]"),
        (dict(mode="wts", transport="sinkhorn", epsilon=True), "epsilon must be a finite"),
        (dict(mode="wts", transport="sinkhorn", solver="scpy"), "solver must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            merge.ot_fusion(spec, a, a, **bad)
    # Params the spec does not describe: named, on the Sinkhorn path too (a bare KeyError)
    lacking = dict(sorted(to_dict(a).items())[1:])  # its first param left out
    with pytest.raises(ValueError, match="params_b: "):
        merge.ot_fusion(spec, a, from_dict(lacking), mode="wts", transport="sinkhorn")


def test_per_tensor_trim_of_a_list_of_layers_and_models_given_as_a_list(seed):
    """TIES' per-tensor trim cuts a scanned stack (``layers/w``) layer by layer, and a list of
    layers (``layers/0/w``, as other libraries name them) tensor by tensor, like any other
    key (it was cut row by row, a bias not at all). One model's params where a list of models
    belongs are refused (a bare KeyError, or its keys unpacked as models)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2, 10)) * np.array([[1.0], [0.01]])
    bias = rng.normal(size=5)
    kept = lambda t: np.count_nonzero(np.asarray(t), axis=-1)
    merged = {}
    for name in ("layers", "blocks"):
        tree = {name: {"0": {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(bias)}}}
        base = jax.tree.map(jnp.zeros_like, tree)
        merged[name] = merge.ties(base, [tree], density=0.2, trim="tensor")[name]["0"]
    assert kept(merged["blocks"]["w"]).tolist() == [4, 0]  # the top 20% of the whole tensor
    assert kept(merged["blocks"]["b"]) == 1
    jax.tree.map(np.testing.assert_array_equal, merged["layers"], merged["blocks"])
    stack = {"layers": {"w": jnp.asarray(w, jnp.float32)}}  # scanned: its rows are the layers
    per_layer = merge.ties(
        {"layers": {"w": jnp.zeros((2, 10))}}, [stack], density=0.2, trim="tensor"
    )
    assert kept(per_layer["layers"]["w"]).tolist() == [2, 2]
    # A scalar under "layers" has no layer axis: trimmed as a tensor of its own (vmap over
    # its axis 0 crashed).
    scalar = lambda t: {"layers": {"t": jnp.float32(t)}, "w": jnp.arange(4.0) * t}
    got = merge.ties(scalar(0.0), [scalar(1.5)], density=0.5, trim="tensor")
    assert float(got["layers"]["t"]) == 1.5 and kept(got["w"]) == 2
    one = {"w": jnp.ones(3), "b": jnp.zeros(3)}
    for call in (
        lambda: merge.average(one),
        lambda: merge.task_arithmetic(one, one),
        lambda: merge.refit(None, one, one, []),
    ):
        with pytest.raises(TypeError, match="params_list must be a list or tuple of params"):
            call()
    # One model's statistics where the list goes: fisher indexed the key "fisher" as a string
    # (a TypeError naming neither), regmean raised a bare KeyError 0.
    stats = {"fisher": {"w": jnp.ones(3), "b": jnp.ones(3)}, "gram": {}}
    for method in (merge.fisher, merge.regmean):
        with pytest.raises(TypeError, match="stats_list must be a list or tuple of statistics"):
            method([one, one], stats)
        with pytest.raises(TypeError, match=r"stats_list\[1\] must be a dict of statistics"):
            method([one, one], [stats, ["fisher"]])


def test_ties_and_dare_by_hand(key, monkeypatch):
    base = {"w": jnp.zeros(6)}
    a = {"w": jnp.array([3.0, -2.0, 0.5, 1.0, 0.0, -4.0])}
    b = {"w": jnp.array([-1.0, -3.0, 0.2, 2.0, 5.0, 1.0])}
    # Global trim to the top half of each task vector by magnitude:
    #   a keeps [3, -2, ., ., ., -4], b keeps [., -3, ., 2, 5, .].
    # Elected signs (sum of trimmed values): [+, -, 0, +, +, -]; disjoint means:
    #   [3, (-2 - 3)/2, 0, 2, 5, -4].
    got = merge.ties(base, [a, b], density=0.5, scale=1.0)
    np.testing.assert_allclose(got["w"], [3.0, -2.5, 0.0, 2.0, 5.0, -4.0])
    with jax.numpy_dtype_promotion("strict"):  # as some codebases run (an int32 count was
        strict = merge.ties(base, [a, b], density=0.5)  # divided into float32: an error)
    np.testing.assert_array_equal(strict["w"], got["w"])
    np.testing.assert_allclose(merge.ties(base, [a, b], density=0.5, scale=2.0)["w"], 2 * got["w"])
    # λ is one finite number: an array scaled entry by entry (silently), NaN gave a NaN model.
    for bad in (np.nan, np.inf, [1.0, 2.0, 3.0, 1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            merge.task_arithmetic(base, [a, b], scale=bad)
        with pytest.raises(ValueError, match="scale must be a finite number"):
            merge.dare(base, [a, b], key=key, scale=bad)
    # Checked before any program runs (TIES and DARE-TIES run two).
    monkeypatch.setattr(_task, "_task_leaves", lambda *a: pytest.fail("a program ran"))
    for bad in (np.nan, None, [1.0, 2.0]):
        for merge_ in (
            lambda s: merge.task_arithmetic(base, [a, b], scale=s),
            lambda s: merge.ties(base, [a, b], scale=s),
            lambda s: merge.dare(base, [a, b], key=key, combine="ties", scale=s),
        ):
            with pytest.raises(ValueError, match="scale must be a finite number"):
                merge_(bad)
        # finite in float64 but not in the float32 merge: inf·0 made every entry NaN
        with pytest.raises(
            ValueError, match=r"scale must be within .* \(\|scale\| <= 3.403e\+38\)"
        ):
            merge_(1e39)
    monkeypatch.undo()
    huge = merge.task_arithmetic(base, [a, b], scale=1e37)  # within float32: computed
    np.testing.assert_allclose(huge["w"], 1e37 * (a["w"] + b["w"]), rtol=1e-6)
    # An entry whose values sum to exactly 0 takes the majority of the elected signs (the
    # paper's code): here + (two entries +), then - (two entries -).
    zero = {"w": jnp.zeros(3)}
    for sign in (1.0, -1.0):
        x, y = {"w": sign * jnp.array([1.0, 2.0, 3.0])}, {"w": sign * jnp.array([-1.0, 1.0, 1.0])}
        np.testing.assert_allclose(
            merge.ties(zero, [x, y], density=1.0)["w"], sign * np.array([1.0, 1.5, 2.0])
        )
    # A tie of the majority too leaves the entry at 0 (the documented rule).
    x, y = {"w": jnp.array([1.0, -1.0, 2.0])}, {"w": jnp.array([-1.0, 1.0, -2.0])}
    np.testing.assert_array_equal(merge.ties(zero, [x, y], density=1.0)["w"], [0.0, 0.0, 0.0])
    # The majority is that of the trimmed vectors' signs: untrimmed, the three small negative
    # entries outvote the one positive (majority -, the tie at entry 0 would give -4); the
    # trim (2 of 5 entries each) leaves only entries 0 and 1, and the majority +.
    x = {"w": jnp.array([4.0, 3.0, -0.1, -0.1, -0.1])}
    y = {"w": jnp.array([-4.0, 2.0, -0.1, -0.1, -0.1])}
    got = merge.ties({"w": jnp.zeros(5)}, [x, y], density=0.4)["w"]
    np.testing.assert_allclose(got, [4.0, 2.5, 0.0, 0.0, 0.0])
    two = {"w": jnp.zeros(6), "v": jnp.zeros(2)}
    aa, bb = {**a, "v": jnp.array([0.1, 0.2])}, {**b, "v": jnp.array([-0.3, 0.0])}
    # Per tensor: v keeps its own top half ([., 0.2] and [-0.3, .]) although both entries are
    # smaller than every entry of w that survives the global trim.
    per = merge.ties(two, [aa, bb], density=0.5, trim="tensor")
    np.testing.assert_allclose(per["v"], [-0.3, 0.2], rtol=1e-6)
    glob = merge.ties(two, [aa, bb], density=0.5, trim="global")
    np.testing.assert_allclose(glob["v"], [0.0, 0.0])
    np.testing.assert_allclose(
        merge.task_arithmetic(base, [a, b], scale=0.5)["w"], (a["w"] + b["w"]) / 2
    )
    # DARE: survivors are rescaled by 1/(1 - p); the masks come from the key.
    d = merge.dare(base, [a], key=key, drop=0.5, scale=1.0)["w"]
    kept = np.asarray(d) != 0
    np.testing.assert_allclose(np.asarray(d)[kept], 2 * np.asarray(a["w"])[kept])
    assert rel_err(merge.dare(base, [a], key=key, drop=0.5)["w"], d) == 0
    many = merge.dare({"w": jnp.zeros(20000)}, [{"w": jnp.ones(20000)}], key=key, drop=0.9)
    assert abs(float(jnp.mean(many["w"])) - 1.0) < 0.1  # each entry keeps its expectation
    # DARE-TIES: the trim's density counts dropped entries too, so it trims only below 1 - drop.
    zero = {"w": jnp.zeros(20000)}
    tasks = [{"w": jax.random.normal(jax.random.fold_in(key, i), (20000,))} for i in (1, 2)]
    dare_ties = lambda density: merge.dare(
        zero, tasks, key=key, drop=0.9, combine="ties", density=density
    )["w"]
    every = dare_ties(1.0)
    assert rel_err(dare_ties(0.2), every) == 0  # the defaults: every survivor kept
    kept = lambda w: int(jnp.count_nonzero(w))
    assert kept(dare_ties(0.05)) < kept(every) <= 2 * 0.1 * 20000 * 1.1
    # DARE-TIES is TIES on the dropped task vectors (model i's drawn from fold_in(key, i); the
    # base in the other place draws nothing), ties resolved by the same majority: half the
    # entries of b are -a's, so where both survive their sum is exactly 0.
    x = jax.random.normal(jax.random.fold_in(key, 3), (2, 400))
    a, b = {"w": x[0]}, {"w": jnp.where(jnp.arange(400) % 2 == 0, -x[0], x[1])}
    zero = {"w": jnp.zeros(400)}
    one = lambda i, m: merge.dare(zero, [m, zero] if i == 0 else [zero, m], key=key, drop=0.5)
    want = merge.ties(zero, [one(0, a), one(1, b)], density=0.3)["w"]
    got = merge.dare(zero, [a, b], key=key, drop=0.5, combine="ties", density=0.3)["w"]
    np.testing.assert_array_equal(got, want)


def test_per_tensor_trim_of_a_scanned_model_trims_each_layer(key):
    """``trim="tensor"`` on a scanned model's stacked layers cuts each layer as the same model
    unscanned does (one cut for the stack kept all of the large layer and none of the small).
    DARE draws the same masks in both layouts (the leaves' entries in the same order)."""
    k = jax.random.split(key, 6)
    layer = lambda i, size: {"w": size * jax.random.normal(k[i], (4, 5))}
    unscanned = [
        {"encoder": {"layer_0": layer(2 * i, 1.0), "layer_1": layer(2 * i + 1, 0.01)}}
        for i in range(3)
    ]
    for p, i in zip(unscanned, (0, 1, 2), strict=True):
        p["head"] = {"b": jax.random.normal(jax.random.fold_in(key, i), (3,))}
    scanned = [stack_layers(p) for p in unscanned]
    assert scanned[0]["encoder"]["layers"]["w"].shape == (2, 4, 5)
    for merge_ in (
        lambda ps: merge.ties(ps[0], ps[1:], density=0.5, trim="tensor"),
        lambda ps: merge.dare(
            ps[0], ps[1:], key=key, drop=0.3, combine="ties", density=0.4, trim="tensor"
        ),
    ):
        want, got = stack_layers(merge_(unscanned)), merge_(scanned)
        for path, w in to_dict(want).items():
            np.testing.assert_array_equal(to_dict(got)[path], w, err_msg=path)
        small = got["encoder"]["layers"]["w"][1] - scanned[0]["encoder"]["layers"]["w"][1]
        assert int(jnp.count_nonzero(small)) > 0  # the small layer kept its own top entries


def test_trim_counts_exactly_and_float64_merges_keep_their_precision():
    """The trim's count is exact where ``(1 - density)(n - 1)`` is an integer (float32 made
    0.6 * 25 into 16, keeping 10 of 26 entries where the quantile's cut keeps 11; float64 makes
    0.3 * 10 into 3.0000000000000004). float64 params (with x64) merge in float64: a 1e-10
    difference survived nowhere (float32 arithmetic, cast back)."""
    for n, density, kept in ((26, 0.4, 11), (11, 0.7, 8)):
        t = jnp.arange(1, n + 1, dtype=jnp.float32)
        got = merge.ties({"w": jnp.zeros(n)}, [{"w": t}], density=density)["w"]
        assert int(jnp.count_nonzero(got)) == kept, (n, density)
    # Large vectors: a tolerance relative to the product rounded 57,000,018.05 down.
    assert _task._rank(0.95, 60_000_020) == 57_000_019
    assert _task._rank(0.8, 1_000_000_000) == 800_000_000  # 0.8 * 999,999,999 = ...999.2
    assert _task._rank(1 - 0.7, 1_000_000_001) == 300_000_000  # not 300,000,000.00000006's
    with jax.enable_x64(True):
        one = {"w": jnp.ones(3, jnp.float64)}
        x, y = ({"w": one["w"] + d} for d in (1e-10, 3e-10))
        stats = [{"fisher": {"w": jnp.ones(3, jnp.float32)}}] * 2
        for merged in (
            merge.average([x, y]),
            merge.fisher([x, y], stats),
            merge.task_arithmetic(one, [x, y], scale=0.5),
            merge.ties(one, [x, y], density=1.0),  # the disjoint mean
            merge.interpolate(x, y, 0.5),
        ):
            assert merged["w"].dtype == jnp.float64
            np.testing.assert_allclose(merged["w"] - 1.0, 2e-10, rtol=1e-5)
        # Weights, λ, α and Grams in float64 too (they were float32: 2/3 came out 0.66666669,
        # a λ of 0.1 as 0.10000000149).
        z, o = {"w": jnp.zeros((2, 2), jnp.float64)}, {"w": jnp.ones((2, 2), jnp.float64)}
        f64 = lambda v: {"fisher": {"w": jnp.full((2, 2), v, jnp.float64)}}
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 5, 2))
        grams = [xi.T @ xi / 5 for xi in x]
        want = np.linalg.solve(grams[0] + 2 * grams[1], 2 * grams[1] @ np.ones((2, 2)))
        for merged, expected in (
            (merge.average([z, o], weights=[1, 2]), 2 / 3),
            (merge.task_arithmetic(z, [o], scale=0.1), 0.1),
            (merge.fisher([z, o], [f64(1.0), f64(3.0)], weights=[1, 2]), 6 / 7),
            (merge.ties(z, [o, o], density=1.0, scale=0.1), 0.1),
            (merge.regmean([z, o], [{"gram": {"w": jnp.asarray(g)}} for g in grams],
                           weights=[1, 2], alpha=1.0, ridge=0.0), want),
        ):  # fmt: skip
            assert merged["w"].dtype == jnp.float64
            np.testing.assert_allclose(merged["w"], np.broadcast_to(expected, (2, 2)), rtol=1e-13)
    # Fisher normalisation of valid Fishers of any scale (squares of 1e-20 underflowed).
    a, b = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}
    for size in (1e-20, 1e20):
        f = lambda v, size=size: {"fisher": {"w": jnp.asarray(v, jnp.float32) * size}}
        got = merge.fisher([a, b], [f([1.0, 2.0]), f([2.0, 1.0])], normalize=True, eps=1e-30)
        np.testing.assert_allclose(got["w"], [1 / 3, 2 / 3], rtol=1e-5)


def test_random_choices_refuse_what_is_not_a_key(key):
    """An int, None or a batch of keys failed inside JAX, naming no argument of rotjax's."""
    c = compiled(CONFIGS["bert-h3d4-l2"])
    params = c.init(key, 0.3)
    base, tuned = {"w": jnp.zeros(4)}, {"w": jnp.ones(4)}
    calls = (
        lambda k: merge.dare(base, [tuned], key=k),
        lambda k: sym.sample(c.spec, k),
        lambda k: merge.statistics(c.model, params, [], fisher="sampled", key=k),
        lambda k: match.Options(key=k) if k is not None else sym.sample(c.spec, k),
    )
    for bad in (0, None, jnp.zeros(3, jnp.uint32), jax.random.split(key, 2)):
        for call in calls:
            with pytest.raises(ValueError, match=r"key must be a jax\.random\.key"):
                call(bad)
    raw = jax.random.PRNGKey(0)  # raw key data: accepted, as JAX accepts it
    assert merge.dare(base, [tuned], key=raw, drop=0.5)["w"].shape == (4,)
    assert set(sym.sample(c.spec, raw)) == set(c.spec.groups)


def test_models_committed_to_different_devices_are_refused_by_param():
    """JAX's own error named an internal argument (``leaves[0][0]`` of a private program)."""
    devices = jax.devices()
    a = {"w": jax.device_put(jnp.ones(4), devices[0]), "b": jnp.zeros(2)}
    b = {"w": jax.device_put(jnp.ones(4), devices[1]), "b": jnp.zeros(2)}
    for name, merge_ in (
        ("model 1 on devices [1]", lambda ps: merge.average(ps)),
        ("params_list[0] on devices [1]", lambda ps: merge.task_arithmetic(ps[0], ps[1:])),
        ("params_list[0] on devices [1]", lambda ps: merge.ties(ps[0], ps[1:])),
    ):
        with pytest.raises(
            ValueError, match=rf"^w: .*committed to different devices .*{re.escape(name)}"
        ):
            merge_([a, b])
    # Uncommitted leaves go where the others are (the sharded test: B uncommitted).
    loose = {"w": jnp.full(4, 3.0), "b": jnp.zeros(2)}
    np.testing.assert_allclose(merge.average([a, loose])["w"], 2.0)
    # Alignment, OT fusion and activation moments too (JAX's error named _distances_jit,
    # _perm_costs, _cross_step's step).
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    params = c.init(jax.random.key(0), 0.3)
    on = lambda i: jax.device_put(params, devices[i])
    for name, call in (
        ("params on devices [1]", lambda: match.align(c.spec, on(0), on(1))),
        ("params_list[1] on devices [1]", lambda: match.align_many(c.spec, [on(0), on(1)])),
        ("params_b on devices [1]", lambda: merge.ot_fusion(c.spec, on(0), on(1), mode="wts")),
        (
            "params_b on devices [1]",
            lambda: merge.cross_statistics(
                c.model, on(0), on(1), batches_of(config, jax.random.key(1), 1)
            ),
        ),
    ):
        with pytest.raises(
            ValueError, match=rf"committed to different devices .*{re.escape(name)}"
        ):
            call()


def test_a_model_of_weight_zero_is_left_out(seed):
    """A model given λ = 0 contributes nothing, not 0 times its values: Inf or NaN in it
    (0 · Inf is NaN) leave the average, Fisher and RegMean merges of the others unchanged."""
    rng = np.random.default_rng(seed)
    x = lambda: {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    a, b = x(), x()
    bad = {"w": a["w"].at[0, 0].set(jnp.inf).at[1, 1].set(jnp.nan)}
    xs = rng.normal(size=(3, 8, 3))
    stats = [
        {"fisher": {"w": jnp.asarray(rng.uniform(0.1, 1, (3, 2)), jnp.float32)},
         "gram": {"w": jnp.asarray(xi.T @ xi / 8, jnp.float32)}}
        for xi in xs
    ]  # fmt: skip
    for method, args in (
        (merge.average, ()),
        (merge.fisher, (stats,)),
        (merge.regmean, (stats,)),
    ):
        want = method([a, b], *[s[:2] for s in args], weights=[1.0, 3.0])
        got = method([a, b, bad], *args, weights=[1.0, 3.0, 0.0])
        np.testing.assert_array_equal(got["w"], want["w"])  # the same program on the same inputs
        got = method([bad, a, b], *[[s[2], *s[:2]] for s in args], weights=[0, 1, 3])
        np.testing.assert_array_equal(got["w"], want["w"])
    # its statistics are not read either: a NaN Gram (it was refused), a NaN Fisher, also when
    # normalising by its norm
    nan_gram = {"gram": {"w": jnp.full((3, 3), jnp.nan)}}
    want = merge.regmean([a, b], stats[:2], weights=[1.0, 3.0])
    got = merge.regmean([a, b, bad], [*stats[:2], nan_gram], weights=[1, 3, 0])
    np.testing.assert_array_equal(got["w"], want["w"])
    nan = {"fisher": {"w": jnp.full((3, 2), jnp.nan)}, "gram": stats[2]["gram"]}
    for normalize in (False, True):
        want = merge.fisher([a, b], stats[:2], weights=[1.0, 3.0], normalize=normalize)
        got = merge.fisher([a, b, bad], [*stats[:2], nan], weights=[1, 3, 0], normalize=normalize)
        np.testing.assert_array_equal(got["w"], want["w"])
    # only one model of weight > 0 left: the merge is that model
    np.testing.assert_allclose(merge.average([a, bad], weights=[1, 0])["w"], a["w"], rtol=1e-7)
    # A weight too small for float32 (1e-50 of the largest) is 0 too: its NaN was multiplied
    # by float32's 0 and reached the merge
    for tiny in (1e-50, 1e-39):
        got = merge.average([a, bad], weights=[1, tiny])["w"]
        np.testing.assert_allclose(got, a["w"], rtol=1e-7, err_msg=str(tiny))
        got = merge.fisher([a, bad], [stats[0], nan], weights=[1, tiny])["w"]
        np.testing.assert_allclose(got, a["w"], rtol=1e-7, err_msg=str(tiny))
    # ... nor need they be there (they were refused as missing)
    want = merge.fisher([a, b], stats[:2], weights=[1.0, 3.0])["w"]
    got = merge.fisher([a, b, bad], [*stats[:2], {}], weights=[1, 3, 0])["w"]
    np.testing.assert_array_equal(got, want)
    want = merge.regmean([a, b], stats[:2], weights=[1.0, 3.0])["w"]
    got = merge.regmean([bad, a, b], [{}, *stats[:2]], weights=[0, 1, 3])["w"]
    np.testing.assert_array_equal(got, want)
    # The merge is in the first model's dtypes, of weight 0 too (it took the first kept one's)
    a16 = {"w": a["w"].astype(jnp.bfloat16)}
    for method, args in (
        (merge.average, ()),
        (merge.fisher, (stats[:2],)),
        (merge.regmean, (stats[:2],)),
    ):
        for w in ([1, 1], [0, 1], [1, 0]):
            assert method([a16, b], *args, weights=w)["w"].dtype == jnp.bfloat16, (method, w)
            assert method([b, a16], *args, weights=w)["w"].dtype == jnp.float32, (method, w)


def test_integer_leaves_are_kept_equal_or_refused(seed):
    """An integer or boolean leaf (a counter, a flag) has no mean: equal in every model, every
    merge keeps it exactly (2**30 + 1 came back as 2**30 through float32); different, it is
    refused by path (it was averaged and truncated)."""
    rng = np.random.default_rng(seed)
    x = lambda: {
        "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
        "step": jnp.asarray(2**30 + 1, jnp.int32),
        "on": jnp.asarray([True, False]),
    }
    a, b = x(), x()
    # (a Fisher for the integer leaves too: they were merged by it, through float32)
    ones = lambda x: jnp.ones(jnp.shape(x))
    f = {"fisher": jax.tree.map(ones, a)}
    for got in (
        merge.average([a, b]),
        merge.fisher([a, b], [f, f]),
        merge.regmean([a, b], [{"gram": {}}] * 2),
        merge.regmean([a, b], [{"gram": {}, **f}] * 2, rest="fisher"),
        merge.task_arithmetic(a, [a, b]),
        merge.ties(a, [a, b]),
        merge.dare(a, [a, b], key=jax.random.key(0)),
        merge.interpolate(a, b, 0.3),
    ):
        assert int(got["step"]) == 2**30 + 1 and got["step"].dtype == jnp.int32
        np.testing.assert_array_equal(got["on"], [True, False])
    c = {**b, "step": jnp.asarray(7, jnp.int32)}
    with pytest.raises(ValueError, match=r"integer or boolean params differ .*\['step'\]"):
        merge.average([a, c])
    # TIES' global trim counts the float entries alone: 90 integer zeros made its cut 0 (at
    # position ceil(0.8 · 99) = 80 of the 100 magnitudes), which kept every entry.
    w = jnp.arange(1.0, 11.0)
    base = {"w": jnp.zeros(10), "ids": jnp.zeros(90, jnp.int32)}
    got = merge.ties(base, [{**base, "w": w}], density=0.2)
    np.testing.assert_array_equal(got["w"], jnp.where(w >= 9.0, w, 0.0))


def test_ot_fusion_keeps_integer_leaves(key):
    """An integer leaf that a (hand-made) spec lists, with no action on it, comes through OT
    fusion as it is, at every weight (it was made float32: 2**30 + 1 came back as 2**30, and
    the average then refused A's int32 beside B's float32 copy as different)."""
    c = compiled(CONFIGS["vit-h3d4-l2"])
    spec = sym.Spec(
        c.spec.group_items, tuple(sorted((*c.spec.param_items, ("step", sym.ParamSpec(())))))
    )
    a, b = (
        {**to_dict(p), "step": jnp.asarray(2**30 + 1, jnp.int32)}
        for p in (c.init(key, 0.3), c.init(jax.random.fold_in(key, 1), 0.3))
    )
    for weight in (0.0, 0.5):
        fusion = merge.ot_fusion(spec, from_dict(a), from_dict(b), mode="wts", weight=weight)
        for got in (to_dict(fusion.params)["step"], to_dict(fusion.moved)["step"]):
            assert int(got) == 2**30 + 1 and got.dtype == jnp.int32


def test_trim_keeps_what_a_quantile_cut_keeps(seed):
    """TIES' trim finds its cut by bisection on the magnitudes' bit patterns, without sorting:
    it keeps exactly the entries that `np.quantile`'s cut keeps, ties and zeros included."""
    from rotjax.merge._task import _cuts, _keep

    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 100, 1001):
        sizes = [s for s in rng.multinomial(n, [0.3, 0.7]) if s]
        # Rounded values: many ties; a third of the entries zero.
        tau = [np.round(rng.standard_normal(s), 1) * (rng.random(s) > 1 / 3) for s in sizes]
        tau = [t.astype(np.float32) for t in tau]
        density = float(rng.uniform(0.05, 1.0))
        flat = np.abs(np.concatenate(tau))
        cut = np.quantile(flat, 1.0 - density)
        for trim, cuts in (("global", [cut] * len(tau)), ("tensor", None)):
            cuts = cuts or [np.quantile(np.abs(t), 1.0 - density) for t in tau]
            tau_ = [jnp.asarray(t) for t in tau]
            got = _keep(tau_, _cuts(tau_, density, trim))
            for t, c, g in zip(tau, cuts, got, strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.where(np.abs(t) >= c, t, 0.0))


# ---------------------------------------------------------------------------------------------
# Statistics against oracles.


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_grams_are_those_of_the_transformers_models_linear_layers(kind, seed, tmp_path):
    """An oracle outside rotjax for the capture: the Gram ``XᵀX / n`` of every ``nn.Linear``'s
    input in transformers' PyTorch model (forward hooks, float64; over the real tokens, one
    row per example for BERT's pooler and classifier, the last real token for a decoder's
    score) is `statistics`' Gram of that layer's kernel, with the same count: every dense
    layer seen once, padding left out (a review compared every family and the Fishers too,
    2026-12-07: within 6e-6)."""
    torch = pytest.importorskip("torch")
    import transformers

    from rotjax import hf
    from rotjax.hf import _mapping

    common = dict(hidden_size=16, num_hidden_layers=2, intermediate_size=24, num_labels=3)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=50, num_attention_heads=2, **common)
        model = transformers.BertForSequenceClassification(config)
    else:  # grouped-query attention with Q/K/V biases
        config = transformers.Qwen2Config(
            vocab_size=50, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **common
        )
        model = transformers.Qwen2ForSequenceClassification(config)
    torch.manual_seed(seed % 2**31)
    with torch.no_grad():  # (biases and norms are 0 and 1 at init)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path)
    ours, params = hf.load(tmp_path)
    rng = np.random.default_rng(seed)
    lengths = [np.array([7, 4, 2, 1]), np.array([3, 6])]  # right padding
    batches = []
    for n in lengths:
        mask = (np.arange(7) < n[:, None]).astype(np.int32)
        batches.append((rng.integers(1, 50, mask.shape).astype(np.int32) * mask, mask))
    got = merge.statistics(family(ours).Model(ours), params, batches, ("gram",))

    sums, model = {}, model.double().eval()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def hook(name):
        def add(module, args, out):
            x, mask = args[0].reshape(-1, args[0].shape[-1]), now["mask"]
            if name == "score":  # the last real token's row of each example
                x = args[0][torch.arange(len(mask)), mask.sum(-1) - 1]
            w = mask.reshape(-1) if len(x) == mask.numel() else torch.ones(len(x))
            g, count = sums.get(name, (0, 0))
            sums[name] = (g + (x * w[:, None].double()).T @ x, count + float(w.sum()))

        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in linear.items()]
    with torch.no_grad():
        for ids, mask in batches:
            now = {"mask": torch.from_numpy(mask)}
            model(input_ids=torch.from_numpy(ids), attention_mask=now["mask"])
    for h in handles:
        h.remove()
    arch = _mapping.ARCHITECTURES[type(model).__name__]
    names = {}
    for path, gram in got["gram"].items():
        name = _mapping.hf_name(arch, path, prefixed=True)[0].removesuffix(".weight")
        names[name] = path
        g, count = sums[name]
        assert float(got["tokens"][path]) == count, path
        assert rel_err(np.reshape(gram, g.shape), g.numpy() / count) <= TOL, path
    assert sorted(names) == sorted(linear)  # every dense layer, each once


def test_padded_tokens_change_no_gram(key):
    config = CONFIGS["bert-h5d2-l1-token"]
    c = compiled(config)
    params = c.init(key, 0.3)
    ids, mask = inputs(config, key, batch=3)
    other = jnp.where(mask > 0, ids, (ids + 3) % config.vocab_size)  # other tokens under padding
    s1 = merge.statistics(c.model, params, [(ids, mask)], kinds=("gram",))
    s2 = merge.statistics(c.model, params, [(other, mask)], kinds=("gram",))
    for p in s1["gram"]:
        np.testing.assert_allclose(s1["gram"][p], s2["gram"][p], rtol=1e-6, atol=1e-7, err_msg=p)
        assert float(s1["tokens"][p]) in (float(mask.sum()), 3.0)  # tokens, or one per example
    padded = merge.statistics(c.model, params, [(ids, mask)], kinds=("gram",), include_padding=True)
    q = "encoder/layer_0/attention/query/kernel"
    assert float(padded["tokens"][q]) == ids.size
    assert rel_err(padded["gram"][q], s1["gram"][q]) > 1e-3


def test_a_decoders_classifier_gram_has_a_row_per_example(key):
    """A LLaMA-style sequence classifier reads the last real token's state: its head's Gram
    is over those states, one per example (it was over every real token, which RegMean then
    fitted the head to, though the model never uses their logits). Compared by the suite's
    max-normalised error: entry by entry, an off-diagonal entry of 0.16 in a Gram of 5.2 was off
    by 1.7e-5 of itself (5e-7 of the Gram, ROTJAX_SEED=6101), from float32 states of two forward
    passes."""
    config = CONFIGS["llama-k2g2d6-l2-seq"]
    c = compiled(config)
    params = c.init(key, 0.3)
    ids, mask = inputs(config, key, batch=3)
    s = merge.statistics(c.model, params, [(ids, mask)], kinds=("gram",))
    assert float(s["tokens"]["score/kernel"]) == 3
    encoder = family(config).Model(dataclasses.replace(config, task=None))
    states = encoder.apply({"params": {k: v for k, v in params.items() if k != "score"}}, ids, mask)
    last = np.asarray(mask).sum(1) - 1  # padding at the end
    x = np.asarray(states, np.float64)[np.arange(3), last]
    assert rel_err(s["gram"]["score/kernel"], x.T @ x / 3) <= TOL  # a mean


def _oracle_fisher(model, params, x, labels, mask, variant):
    """Mean over examples of Σ_(t,c) p_tc (∇ log p_tc)² (exact: per token and class) or
    (∇ Σ_t log p_t(y_t))² (empirical: the example's log-likelihood gradient, squared), one
    gradient at a time in Python loops (each the gradient of ``Σ onehot ⊙ log p`` for one
    example, compiled once)."""
    logp = jax.jit(lambda p, xi: jax.nn.log_softmax(model.apply({"params": p}, *xi)[0]))
    grad = jax.jit(jax.grad(lambda p, xi, onehot: jnp.sum(logp(p, xi) * onehot)))
    add = jax.jit(lambda total, g, w: jax.tree.map(lambda t, g: t + w * g * g, total, g))
    total = jax.tree.map(np.zeros_like, params)
    n = x[0].shape[0]
    for i in range(n):
        xi = tuple(a[i : i + 1] for a in x)
        lp = np.asarray(logp(params, xi))
        positions = [()] if lp.ndim == 1 else [(t,) for t in range(lp.shape[0]) if mask[i, t]]
        if variant == "empirical":
            y = np.asarray(labels[i]).reshape(lp.shape[:-1])
            onehot = np.zeros(lp.shape, np.float32)
            for pos in positions:
                if y[pos] != IGNORE_LABEL:
                    onehot[(*pos, int(y[pos]))] = 1.0
            total = add(total, grad(params, xi, onehot), 1.0)
            continue
        for pos in positions:
            for cls in range(lp.shape[-1]):
                onehot = np.zeros(lp.shape, np.float32)
                onehot[(*pos, cls)] = 1.0
                total = add(total, grad(params, xi, onehot), float(np.exp(lp[(*pos, cls)])))
    return jax.tree.map(lambda t: np.asarray(t) / n, total)


def test_fisher_with_x64_enabled_in_the_models_dtype(key):
    """With ``jax_enable_x64``, every Fisher variant runs (a float32 cotangent met float64
    one-hot labels and the backward pass refused it) and a float32 model's Fisher is the one
    computed without x64; a float64 model's is float64, the same to float32's precision."""
    config = CONFIGS["vit-h1d8-l1-nobias"]
    c = compiled(config)
    params = c.init(key, 0.3)
    x = inputs(config, key, batch=2)
    batch = [{"pixel_values": x[0], "labels": jnp.asarray([0, 1])}]
    fisher = lambda p, v: merge.statistics(c.model, p, batch, ("fisher",), fisher=v, key=key)
    for variant in ("exact", "empirical", "sampled"):
        want = fisher(params, variant)["fisher"]
        with jax.enable_x64(True):
            same = fisher(params, variant)["fisher"]
            p64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
            wide = fisher(p64, variant)["fisher"]
        assert rel_err(same, want) <= TOL, variant
        assert {v.dtype for v in jax.tree.leaves(wide)} == {jnp.dtype(jnp.float64)}, variant
        if variant != "sampled":  # (float64 log-probabilities draw other labels)
            assert rel_err(wide, want) <= TOL, variant  # (float32's rounding: 7e-7 at most)


# Lookup tables (words, positions, token types, DeBERTa's relative positions read whole)
# get their Fisher from the looked-up rows' gradients: repeated ids in an example (token types,
# padding) test the sum over the positions reading a row; a tied LLaMA head reads its table by
# `attend` too, so the table's full gradient is used.
@pytest.mark.parametrize(
    ("name", "variant"),
    [
        *[
            (n, v)
            for n in ("vit-h1d8-l1-nobias", "bert-h5d2-l1-token", "deberta-v3-h3d5-l2-seq")
            for v in ("exact", "empirical")
        ],
        ("llama-k2g2d6-l2-seq", "exact"),
        ("llama-k2g2d6-l2-tied-lm", "empirical"),
    ],
)
def test_fisher_matches_per_example_gradient_loops(name, variant, key):
    if name == "llama-k2g2d6-l2-tied-lm":
        base = CONFIGS["llama-k2g2d6-l2-seq"]
        config = dataclasses.replace(base, task="causal_lm", tie_word_embeddings=True)
    else:
        config = CONFIGS[name]
    c = compiled(config)
    params = c.init(key, 0.3)
    x = inputs(config, key, batch=3)
    out_shape = jax.eval_shape(lambda: c.forward(params, x)).shape
    labels = jax.random.randint(jax.random.fold_in(key, 1), out_shape[:-1], 0, out_shape[-1])
    mask = x[1] if len(x) > 1 else None
    if mask is not None and labels.ndim == 2:  # per token: padding ignored
        labels = jnp.where(mask > 0, labels, IGNORE_LABEL)
    batch = (
        dict(zip(("input_ids", "attention_mask"), x, strict=True))
        if mask is not None
        else {"pixel_values": x[0]}
    )
    got = merge.statistics(
        c.model, params, [{**batch, "labels": labels}], ("fisher",), fisher=variant
    )
    assert float(got["examples"]) == 3
    if mask is not None:  # token tables take the row path (Flax's `setup` calls hid them all)
        found = {}
        one = tuple(v[:1] for v in x)
        jax.jit(lambda p, x: found.update(_lookup_tables(c.model, p, x)) or 0)(params, one)
        assert bool(found) != name.endswith("tied-lm"), found  # a tied table is read by attend
    want = _oracle_fisher(
        c.model,
        params,
        x,
        np.asarray(labels),
        np.asarray(mask) if mask is not None else None,
        variant,
    )
    assert rel_err(got["fisher"], to_dict(want)) <= 1e-5


def test_a_causal_lm_s_fisher_variant_must_be_named(key):
    """The default call (Grams and Fisher) on a causal LM: its exact Fisher, a backward pass
    per token and vocabulary entry, ran for a Llama-sized model for days; now refused, saying
    what to pass. Named, each variant runs; the Grams alone need none."""
    base = CONFIGS["llama-k2g2d6-l2-seq"]
    config = dataclasses.replace(base, task="causal_lm", tie_word_embeddings=True)
    c = compiled(config)
    params = c.init(key, 0.3)
    ids, mask = inputs(config, key, batch=2)
    batch = [{"input_ids": ids, "attention_mask": mask}]
    with pytest.raises(ValueError, match=r"per token and vocabulary entry .* fisher='sampled'"):
        merge.statistics(c.model, params, batch)
    assert "fisher" not in merge.statistics(c.model, params, batch, ("gram",))
    exact = merge.statistics(c.model, params, batch, ("fisher",), fisher="exact")
    sampled = merge.statistics(
        c.model, params, batch, ("fisher",), fisher="sampled", samples=2, key=key
    )
    assert float(exact["examples"]) == float(sampled["examples"]) == 2


def test_sampled_fisher_is_the_exact_one_in_expectation(key):
    config = CONFIGS["vit-h1d8-l1-nobias"]
    c = compiled(config)
    params = c.init(key, 0.3)
    batch = batches_of(config, key, n=1)
    exact = merge.statistics(c.model, params, batch, ("fisher",))["fisher"]
    # 400 samples' error is heavy-tailed over keys (2300 keys: 99% within 0.1, at most 0.3):
    # 800 samples within 0.15
    sampled = merge.statistics(
        c.model, params, batch, ("fisher",), fisher="sampled", samples=800, key=key
    )["fisher"]
    total = lambda f: float(sum(jnp.sum(v) for v in f.values()))
    assert abs(total(sampled) - total(exact)) <= 0.15 * total(exact)
    with pytest.raises(ValueError, match="needs a key"):
        merge.statistics(c.model, params, batch, ("fisher",), fisher="sampled")
    with pytest.raises(ValueError, match=r"no statistics kinds; choose from \['gram', 'fisher'\]"):
        merge.statistics(c.model, params, batch, ())  # was an empty dict
    with pytest.raises(ValueError, match=r"unknown statistics kinds \['grams'\]"):
        merge.statistics(c.model, params, batch, ("grams",))
    # one kind by name (it was split into letters: "unknown kinds ['e', 'f', ...]")
    assert rel_err(merge.statistics(c.model, params, batch, "fisher")["fisher"], exact) == 0
    with pytest.raises(ValueError, match=r"unknown statistics kinds \['grams'\]"):
        merge.statistics(c.model, params, batch, "grams")


@pytest.mark.parametrize(
    ("name", "scan"),
    [
        ("bert-h3d4-l2", False),
        ("bert-h3d4-l2", True),
        ("vit-h3d4-l2", False),
        ("vit-h3d4-l2", True),
        ("llama-k2g2d6-l2-seq", True),
        ("deberta-v2-h5d2-l1-token", False),
        ("deberta-v3-h3d5-l2-seq", True),
        ("roberta-h1d6-l2", False),  # one head: (D, 1, d) query kernels, one input axis
        ("bert-h3d1-l2", True),  # head_dim 1: (H, 1, D) output kernels, two input axes
    ],
)
def test_statistics_move_with_the_symmetry(name, scan, key):
    """Statistics are functions of the function: those of g·B are those of B moved by g (Grams
    under every group; Fishers under permutations and scales, where they are exact). Size-1
    axes leave the number of a kernel's input axes ambiguous from the Gram's size alone (a
    head_dim of 1 lost the heads' rotations, signs here)."""
    edge = {"bert-h3d1-l2": dataclasses.replace(CONFIGS["bert-h3d4-l2"], hidden_size=3)}
    config = scanned(edge.get(name) or CONFIGS[name], scan)
    c = compiled(config)
    b = c.init(key, 0.3)
    g = sym.sample(c.spec, jax.random.fold_in(key, 1))
    moved = c.apply(b, g)
    data = batches_of(config, key, n=2)
    s, sm = merge.statistics(c.model, b, data), merge.statistics(c.model, moved, data)
    t = merge.transform_statistics(c.spec, s, g)
    assert rel_err(t["gram"], sm["gram"]) <= TOL
    no_rot = {n: v for n, v in g.items() if c.spec.groups[n].kind != "orth"}
    s_perm = merge.statistics(c.model, c.apply(b, {**sym.identity(c.spec), **no_rot}), data)
    t_perm = merge.transform_statistics(c.spec, s, no_rot)
    assert rel_err(t_perm["fisher"], s_perm["fisher"]) <= TOL
    assert rel_err(s["gram"], sm["gram"]) > 1e-2  # the check above is not vacuous
    # Elements given as lists, as sym.apply takes them (the Fishers' squares raised TypeError)
    listed = merge.transform_statistics(
        c.spec, s, {n: np.asarray(v).tolist() for n, v in g.items()}
    )
    jax.tree.map(np.testing.assert_array_equal, listed, t)


def test_transform_statistics_refuses_statistics_that_do_not_fit_the_spec(key):
    """Statistics of another model (a path the spec lacks, another shape) are refused naming
    the path and the shapes (a bare StopIteration or KeyError before)."""
    c = compiled(CONFIGS["bert-h3d4-l2"])
    g = sym.sample(c.spec, key)
    params = dict(c.spec.params)
    path = next(p for p, ps in params.items() if p.endswith("kernel") and len(ps.shape) == 2)
    n = params[path].shape[0]
    bad = {"gram": {path: jnp.eye(n + 1)}}
    with pytest.raises(ValueError, match=rf"{path}: a Gram of shape \({n + 1}, {n + 1}\) does"):
        merge.transform_statistics(c.spec, bad, g)
    for kind in ("gram", "fisher"):
        with pytest.raises(ValueError, match=r"nope/kernel: a .* the spec does not have"):
            merge.transform_statistics(c.spec, {kind: {"nope/kernel": jnp.eye(2)}}, g)
    with pytest.raises(ValueError, match=rf"{path}: a Fisher of shape \(2, 2\) for a param"):
        merge.transform_statistics(c.spec, {"fisher": {path: jnp.eye(2)}}, g)


@pytest.mark.parametrize("name", ["bert-h3d4-l2", "vit-h3d4-l2"])
def test_bfloat16_models_get_float32_statistics_and_refit(name, key):
    """bfloat16 params: Grams and Fishers are summed in float32 (they were summed in bf16,
    whose 8-bit mantissa stops counting tokens past 256; the Fisher's scan and refit's eigh
    raised), close to those of the same values in float32: the model's own activations are
    rounded to bf16 (eps 2^-8), so Grams within 2e-2 (1.1e-2 at most over 2000 seeds) and
    exact Fishers, squares of gradients through every rounded layer, within 1e-1 (8.3e-2 at
    most over 1000); refit keeps bf16 leaves."""
    config = CONFIGS[name]
    c = compiled(config)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), c.init(key, 0.3))
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
    batches = batches_of(config, key)
    for fisher in ("exact", "sampled"):
        s16, s32 = (
            merge.statistics(c.model, p, batches, ("gram", "fisher"), fisher=fisher, key=key)
            for p in (p16, p32)
        )
        assert {x.dtype for x in jax.tree.leaves(s16)} == {jnp.dtype(jnp.float32)}
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(s16))
        assert rel_err(s16["gram"], s32["gram"]) <= 2e-2, fisher  # 1.1e-2 once in 2000 seeds
        # A sampled label flips where bf16 moves the probabilities across the draw (one flip
        # changes the classifier's whole Fisher: 0.87 seen), so values compare only when exact.
        if fisher == "exact":
            assert rel_err(s16["fisher"], s32["fisher"]) <= 1e-1  # 8.3e-2 at most over 1000
        np.testing.assert_array_equal(
            s16["tokens"]["classifier/kernel"], s32["tokens"]["classifier/kernel"]
        )
    refitted = merge.refit(c.model, p16, [p16, p16], batches)
    assert {x.dtype for x in jax.tree.leaves(refitted)} == {jnp.dtype(jnp.bfloat16)}
    assert rel_err(refitted, p16) <= 1e-2


def test_statistics_save_and_load(tmp_path, key):
    config = CONFIGS["vit-h1d8-l1-nobias"]
    c = compiled(config)
    s = merge.statistics(c.model, c.init(key, 0.3), batches_of(config, key, n=1))
    back = merge.load_statistics(merge.save_statistics(tmp_path / "stats.safetensors", s))
    assert rel_err(back, s) == 0 and set(back) == set(s)
    # Shapes too (counts of shape () came back (1,)), and a kind with nothing in it
    shape = lambda t: jax.tree.map(np.shape, t)
    assert shape(back) == shape(s) and np.shape(back["examples"]) == ()
    empty = merge.load_statistics(merge.save_statistics(tmp_path / "e.safetensors", {"gram": {}}))
    assert empty == {"gram": {}}
    # Written over: the new statistics replace the old ones whole, nothing left beside them
    merge.save_statistics(tmp_path / "stats.safetensors", {"gram": {}})
    assert merge.load_statistics(tmp_path / "stats.safetensors") == {"gram": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "stats.safetensors"]
    # Nested statistics (cross_statistics' are dicts per param) are refused before anything is
    # written: it was safetensors' "Unknown dtype object", its new directories left behind
    nested = {"gram": {"layer/kernel": {"count": np.ones(2)}}}
    with pytest.raises(TypeError, match=r"no arrays \(a nested dict\?\): \['gram/layer/kernel'\]"):
        merge.save_statistics(tmp_path / "new" / "deeper" / "s.safetensors", nested)
    assert not (tmp_path / "new").exists()


def test_statistics_skip_filler_examples_and_refuse_misshapen_labels(key):
    """A batch padded to its size by filler examples (mask all 0, labels ignored: what
    `rotjax.data.batches(pad=True)` adds) has the statistics of its real examples: the filler
    counted as an example and in the pooler's and classifier's Grams (one row per example), and
    in the prediction loss.
    Labels of another shape than the model's outputs are refused naming both (a token model's
    (B,) labels were broadcast to every token), and labels that are neither a class nor
    ignored; so is a Fisher of no example that counts, Grams of no real token, and a
    transform of a group the spec lacks (a bare KeyError). Empty batches are skipped."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    params = c.init(key, 0.3)
    ids, mask = inputs(config, key, batch=3)
    labels = jnp.asarray([0, 1, 2])
    real = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    padded = [
        {
            "input_ids": jnp.concatenate([ids, ids[:1]]),
            "attention_mask": jnp.concatenate([mask, jnp.zeros_like(mask[:1])]),
            "labels": jnp.concatenate([labels, jnp.asarray([IGNORE_LABEL])]),
        }
    ]
    for fisher in ("exact", "empirical"):
        want, got = (
            merge.statistics(c.model, params, b, ("gram", "fisher"), fisher=fisher)
            for b in (real, padded)
        )
        assert float(got["examples"]) == 3, fisher
        assert rel_err(got, want) <= TOL, fisher
    # So is the prediction loss: its mean over the 3 examples (the filler counted as a 4th)
    others = [c.init(jax.random.fold_in(key, i), 0.3) for i in (1, 2)]
    want, got = (merge.prediction_loss(c.model, others, b)(params) for b in (real, padded))
    assert got == pytest.approx(want, rel=TOL)
    # DeBERTa-v2's position projections read the 2S relative embeddings, the same in every
    # batch: in a batch of 2S examples (here 6) they were taken for examples, the filler's
    # zeroed in their Grams.
    v2 = CONFIGS["deberta-v2-h5d2-l1-token"]
    cv, ids, mask = compiled(v2), *inputs(v2, key, batch=5)
    assert 2 * v2.span == 6
    pad = [(jnp.concatenate([ids, ids[:1]]), jnp.concatenate([mask, jnp.zeros_like(mask[:1])]))]
    pv = cv.init(key, 0.3)
    want, got = (merge.statistics(cv.model, pv, b, ("gram",)) for b in ([(ids, mask)], pad))
    assert any("pos_key" in p for p in got["gram"]) and rel_err(got, want) <= TOL
    token = CONFIGS["bert-h5d2-l1-token"]
    ct = compiled(token)
    ids, mask = inputs(token, key, batch=2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": jnp.asarray([0, 1])}
    with pytest.raises(
        ValueError, match=rf"batch 0: labels of shape \(2,\), .* need \(2, {ids.shape[1]}\)"
    ):
        merge.statistics(ct.model, ct.init(key, 0.3), [batch], ("fisher",), fisher="empirical")
    none = [{**real[0], "labels": jnp.full(3, IGNORE_LABEL)}]
    with pytest.raises(ValueError, match=r"the Fisher of no example \(none has a label"):
        merge.statistics(c.model, params, none, ("fisher",), fisher="empirical")
    # A label that is no class and not the ignored one (-1, or the class count) would have
    # counted its example with a zero gradient: refused, naming the batch and the values
    for bad in (-1, config.num_labels):
        wrong = [real[0], {**real[0], "labels": labels.at[1].set(bad)}]
        msg = rf"batch 1: 1 label\(s\) outside the classes \[0, 3\) .* \[{bad}\]"
        with pytest.raises(ValueError, match=msg):
            merge.statistics(c.model, params, wrong, ("fisher",), fisher="empirical")
    # Float labels, as training and the command line refuse them (1.5 was counted with
    # one_hot(1.5) = 0; whole floats were taken)
    for lab in (labels.astype(jnp.float32).at[1].set(1.5), labels.astype(jnp.float32)):
        wrong = [real[0], {**real[0], "labels": lab}]
        with pytest.raises(ValueError, match=r"batch 1: labels must be integer class ids, got"):
            merge.statistics(c.model, params, wrong, ("fisher",), fisher="empirical")
    # An empty batch adds nothing (it broke the Fisher's trace); no real token at all is
    # refused for the Grams as for the Fisher
    empty = {k: v[:0] for k, v in real[0].items()}
    for fisher in ("exact", "empirical"):
        got = merge.statistics(c.model, params, [empty, *real, empty], fisher=fisher)
        want = merge.statistics(c.model, params, real, fisher=fisher)
        assert float(got["examples"]) == 3 and rel_err(got, want) <= TOL, fisher
        # Nested lists are arrays (labels failed in vmap, inputs on .shape); tuples likewise
        lists = [{k: np.asarray(v).tolist() for k, v in real[0].items()}]
        assert rel_err(merge.statistics(c.model, params, lists, fisher=fisher), want) == 0
    tup = [(real[0]["input_ids"].tolist(), real[0]["attention_mask"].tolist())]
    assert (
        rel_err(merge.statistics(c.model, params, tup), merge.statistics(c.model, params, real))
        == 0
    )
    with pytest.raises(ValueError, match=r"no batches \(or only empty ones\)"):
        merge.statistics(c.model, params, [empty], ("gram",))
    masked = [{**real[0], "attention_mask": jnp.zeros_like(real[0]["attention_mask"])}]
    with pytest.raises(ValueError, match=r"the Grams of no token \(every token is padding\)"):
        merge.statistics(c.model, params, masked, ("gram",))
    fishers = {"fisher": to_dict(params)}
    with pytest.raises(ValueError, match=r"not in the spec: \['nope'\]"):
        merge.transform_statistics(c.spec, fishers, {"nope": jnp.arange(3)})


# ---------------------------------------------------------------------------------------------
# Alignment before merging, OT, activation starts.


@pytest.mark.parametrize("name", ["bert-h3d4-l2", "vit-h3d4-l2", "qwen2-k1g4d4-l1"])
def test_average_after_alignment_returns_the_model(name, key):
    c = compiled(CONFIGS[name])
    a = c.init(key, 0.3)
    b = c.apply(a, sym.sample(c.spec, jax.random.fold_in(key, 1)))
    aligned = match.align(c.spec, a, b, solve=match.ALL).params
    assert rel_err(merge.average([a, aligned]), a) <= TOL
    assert rel_err(merge.average([a, b]), a) > 0.1


# The GQA model (2 key-value heads of 4 query heads each, scanned) has query heads to match
# inside each key-value head (they were left alone: 0.5 off); they are matched exactly under
# Sinkhorn too.
GQA = dataclasses.replace(
    CONFIGS["llama-k2g2d6-l2-seq"], hidden_size=16, num_attention_heads=8, scan_layers=True
)


@pytest.mark.parametrize("transport", ["exact", "sinkhorn"])
@pytest.mark.parametrize("mode", ["wts", "acts"])
@pytest.mark.parametrize("name", ["bert-h3d4-l2", "llama-gqa"])
def test_ot_fusion_recovers_a_planted_permutation(name, mode, transport, key):
    config = GQA if name == "llama-gqa" else CONFIGS[name]
    c = compiled(config)
    a = c.init(key, 0.3)
    # From weights, the GQA model's attention heads only are moved: its 16 stream units,
    # matched first from weights whose every layer group was scrambled, came out 2 swapped for
    # one seed in 8 (ROTJAX_SEED=16, the FFN units moved too) and mixed by Sinkhorn's maps.
    moved = lambda n: name != "llama-gqa" or mode == "acts" or "heads" in c.spec.groups[n].role
    g, one = sym.sample(c.spec, jax.random.fold_in(key, 1)), sym.identity(c.spec)
    perms = {
        n: g[n] if moved(n) else one[n] for n in g if c.spec.groups[n].kind in ("perm", "hperm")
    }
    assert any(c.spec.groups[n].kind == "hperm" for n in perms) == (name == "llama-gqa")
    b = c.apply(a, perms)
    cross = merge.cross_statistics(c.model, a, b, batches_of(config, key, n=4, batch=8))
    fused = merge.ot_fusion(
        c.spec,
        a,
        b,
        mode=mode,
        cross=cross if mode == "acts" else None,
        transport=transport,
        epsilon=0.01 if transport == "sinkhorn" else None,
    )
    inverse = sym.invert(c.spec, perms)
    assert set(fused.maps) == set(perms)
    # The maps move B as the fusion did (the GQA model's soft head maps were applied after its
    # query heads' permutations: 0.13 off under Sinkhorn)
    assert rel_err(merge.transport_params(c.spec, b, fused.maps), fused.moved) <= TOL
    for n, m in fused.maps.items():
        if c.spec.groups[n].kind == "hperm":
            np.testing.assert_array_equal(m, inverse[n], err_msg=n)
    if transport == "exact":
        for n, p in fused.maps.items():
            np.testing.assert_array_equal(p, inverse[n], err_msg=n)
        assert rel_err(fused.params, a) <= TOL
    else:  # a sharp soft map puts nearly all of each row's mass on the planted match
        for n, t in fused.maps.items():
            if c.spec.groups[n].kind == "perm":
                np.testing.assert_array_equal(jnp.argmax(t, -1), inverse[n], err_msg=n)
        assert rel_err(fused.params, a) <= 0.05
    if transport == "exact" and mode == "wts":
        # Cosines do not depend on the weights' scale: near 1e-24 their squares were 0 in
        # float32 (every map the identity), near 1e20 inf.
        for s in (1e-24, 1e20):
            sa, sb = (jax.tree.map(lambda x, s=s: x * s, t) for t in (a, b))
            maps = merge.ot_fusion(c.spec, sa, sb, mode="wts").maps
            for n, p in maps.items():
                np.testing.assert_array_equal(p, inverse[n], err_msg=f"{n} at scale {s}")


def test_transport_params_and_ot_fusion_refuse_bad_maps_and_non_finite_inputs(key):
    """Maps `transport_params` cannot apply are refused naming the group (unknown ones were
    ignored, a misshapen or rotation's map failed in an einsum); NaN weights or statistics are
    refused naming the param (they failed in the solver naming nothing, or under Sinkhorn as
    "did not converge: try a larger epsilon")."""
    c = compiled(CONFIGS["bert-h3d4-l2"])
    spec, a = c.spec, c.init(key, 0.3)
    ffn = spec.select(roles=["ffn"])[0]
    g = spec.groups[ffn]
    uniform = jnp.full((*g.shape, g.shape[-1]), 1.0 / g.shape[-1])
    rot = next(n for n, x in spec.groups.items() if x.kind == "orth")
    for maps, message in (
        ({"nope": jnp.eye(3)}, r"maps of groups that are not in the spec: \['nope'\]"),
        ({ffn: uniform[..., :3, :3]}, rf"maps\['{ffn}'\]: a soft map .* must be"),
        ({ffn: uniform.at[..., 0, 0].set(jnp.nan)}, rf"maps\['{ffn}'\]: NaN or Inf"),
        ({rot: sym.identity(spec)[rot]}, rf"maps\['{rot}'\]: a soft map .* 'orth' group"),
    ):
        with pytest.raises(ValueError, match=message):
            merge.transport_params(spec, a, maps)
    mixed = merge.transport_params(spec, a, {ffn: uniform})  # every unit B's mean unit
    kernel = next(p for p, act in spec.users[ffn] if act.axes[-1] == len(g.batch) + 1)
    np.testing.assert_allclose(
        to_dict(mixed)[kernel], jnp.broadcast_to(to_dict(a)[kernel].mean(-1, keepdims=True),
        to_dict(a)[kernel].shape), rtol=1e-5, atol=1e-6
    )  # fmt: skip
    path = sorted(to_dict(a))[3]
    bad = from_dict(
        {**to_dict(a), path: to_dict(a)[path].at[(0,) * to_dict(a)[path].ndim].set(jnp.nan)}
    )
    for transport in ("exact", "sinkhorn"):
        with pytest.raises(ValueError, match=rf"params_b: NaN or Inf in \['{path}'\]"):
            merge.ot_fusion(spec, a, bad, mode="wts", transport=transport)
    config = CONFIGS["bert-h3d4-l2"]
    cross = merge.cross_statistics(c.model, a, a, batches_of(config, key, n=1, batch=8))
    first = sorted(cross)[0]
    nan = {**cross, first: {**cross[first], "cov": cross[first]["cov"] * jnp.nan}}
    with pytest.raises(ValueError, match=rf"cross\['{first}'\]: NaN or Inf in \['cov'\]"):
        merge.ot_fusion(spec, a, a, mode="acts", cross=nan)


def test_ot_fusion_of_bfloat16_models_rounds_once_and_of_float64_ones_maps_in_float64(key):
    """Sinkhorn maps on bfloat16 models: B is moved in float32 through every stage and rounded
    once (it was rounded after each stage and between two maps on one leaf), so the fusion is
    the float32 fusion of the same weights, rounded: bit for bit. float64 models' maps are
    float64."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    p16 = [
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), c.init(jax.random.fold_in(key, i), 0.3))
        for i in range(2)
    ]
    p32 = [jax.tree.map(lambda x: x.astype(jnp.float32), p) for p in p16]
    got, want = (merge.ot_fusion(c.spec, *p, mode="wts", transport="sinkhorn") for p in (p16, p32))
    to16 = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
    for out, ref in ((got.params, want.params), (got.moved, want.moved)):
        assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}
        jax.tree.map(np.testing.assert_array_equal, out, to16(ref))
    # All of B (A's weight 0): still A's dtypes (it was B moved, in float32); a FrozenDict B
    # keeps its type through the soft maps (rebuilt as a dict, it failed to meet params_b).
    frozen = flax.core.freeze(p16[1])
    zero = merge.ot_fusion(c.spec, p16[0], frozen, mode="wts", transport="sinkhorn", weight=0.0)
    assert {x.dtype for x in jax.tree.leaves(zero.params)} == {jnp.dtype(jnp.bfloat16)}
    for path, x in to_dict(got.moved).items():
        np.testing.assert_array_equal(to_dict(zero.moved)[path], x, err_msg=path)
    assert isinstance(zero.moved, flax.core.FrozenDict)
    # float64 models (x64) get float64 maps from weights, as from activations (they were
    # float32: B mixed by rows that summed to 1 only to ~1e-7)
    with jax.enable_x64(True):
        p64 = [jax.tree.map(lambda x: x.astype(jnp.float64), p) for p in p32]
        maps = merge.ot_fusion(c.spec, *p64, mode="wts", transport="sinkhorn").maps
        for name, m in maps.items():
            assert m.dtype == jnp.float64, name
            np.testing.assert_allclose(np.sum(m, axis=-1), 1.0, rtol=0, atol=1e-12, err_msg=name)


def test_correlations_of_features_with_a_large_mean_match_float64(key):
    """Every LayerNorm shifted by 300: the dense layers after them read features of mean ~300
    and spread ~1, whose variance float32 loses as ``Σx²/n - x̄²`` (5% of it seen); the
    centred moments keep the correlations at float32 precision. Oracle: float64 correlations
    of the rows captured by a separate forward pass (the two programs may round 300 + x
    differently: the bound below)."""
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    is_shift = lambda kp: "layernorm" in jax.tree_util.keystr(kp) and "bias" in str(kp[-1])
    shift = lambda p: jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 300.0 if is_shift(kp) else x, p
    )
    a, b = shift(c.init(key, 0.3)), shift(c.init(jax.random.fold_in(key, 1), 0.3))
    data = batches_of(config, key, n=3, batch=8)
    # The first layer's query reads its layernorm_before's output of the patch and position
    # embeddings (later layers' inputs of these random models are nearly constant per feature).
    path = "encoder/layer_0/attention/query/kernel"
    cross = merge.cross_statistics(c.model, a, b, data)
    corr = merge.correlations(cross)[path]
    rows = lambda p: np.concatenate(
        [np.asarray(capture(c.model, p, x, lambda r, w: r)[1][path], np.float64) for x in data]
    )
    xa, xb = rows(a), rows(b)
    assert abs(xa.mean() - 300) < 5 and xa.std(0).max() < 10  # (some features nearly constant)
    oracle = np.corrcoef(xa.T, xb.T)[: xa.shape[1], xa.shape[1] :]
    # Rounding a row's entries differently by up to u (float32's spacing at their magnitude)
    # moves a correlation by at most u (1 + |r|) / σ: bounded per entry by each feature's spread
    # (a feature of spread 0.05 moved one by 1.1e-4, ROTJAX_SEED=667065364), twice for margin.
    u = float(np.spacing(np.float32(max(np.abs(xa).max(), np.abs(xb).max()))))
    bound = 4 * u * (1 / xa.std(0)[:, None] + 1 / xb.std(0)[None, :]) + 1e-5
    assert np.all(np.abs(corr - oracle) <= bound), np.max(np.abs(corr - oracle) / bound)
    # The raw sums' formula on the same statistics, what the centred moments avoid, is far off.
    s, n = cross[path], float(cross[path]["count"])
    naive = np.asarray(s["sq_a"]) / n - (np.asarray(s["sum_a"]) / n) ** 2
    assert np.max(np.abs(naive - xa.var(0)) / xa.var(0)) > 1e-3


def test_correlations_are_scale_free_and_zero_for_constant_features(key):
    """Pearson correlations do not depend on the features' scale: a LayerNorm's output scaled
    by 1e-7 (spread ~1e-7) correlates as before (an absolute floor on σ_a σ_b of 1e-12 made
    every such correlation 0, with itself too). A feature that never varies (a zero LayerNorm
    scale: every token its bias, mean 300) correlates 0 with everything."""
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    a = c.init(key, 0.3)
    data = batches_of(config, key, n=2, batch=8)
    path = "encoder/layer_0/attention/query/kernel"
    ln = "encoder/layer_0/layernorm_before/"

    def with_ln(scale, bias):
        flat = to_dict(a)
        flat[ln + "scale"], flat[ln + "bias"] = scale(flat[ln + "scale"]), bias(flat[ln + "bias"])
        return from_dict(flat)

    # A against the changed model, and the changed model against itself (both spreads tiny)
    corr = lambda p: [
        np.asarray(merge.correlations(merge.cross_statistics(c.model, x, p, data))[path])
        for x in (a, p)
    ]
    base = corr(a)[0]
    np.testing.assert_allclose(np.diag(base), 1.0, atol=1e-5)
    for got in corr(with_ln(lambda s: s * 1e-7, lambda b: b * 1e-7)):  # moments of features
        np.testing.assert_allclose(got, base, atol=1e-4)  # ~1e-7 keep fewer digits: 5.5e-6 seen
    for got in corr(with_ln(lambda s: s.at[0].set(0.0), lambda b: b.at[0].set(300.0))):
        assert np.all(got[:, 0] == 0.0) and np.all(np.isfinite(got))
        np.testing.assert_allclose(got[1:, 1:], base[1:, 1:], atol=TOL)


def test_activation_init_finds_a_planted_stream_permutation(key):
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    a = c.init(key, 0.3)
    g = sym.sample(c.spec, jax.random.fold_in(key, 1))
    planted = {n: v for n, v in g.items() if c.spec.groups[n].role in ("residual", "ffn")}
    b = c.apply(a, planted)
    b = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.fold_in(key, 2), x.shape), b)
    cross = merge.cross_statistics(c.model, a, b, batches_of(config, key, n=4, batch=8))
    init = merge.activation_init(c.spec, cross)
    inverse = sym.invert(c.spec, planted)
    np.testing.assert_array_equal(init["residual"], inverse["residual"])
    res = match.align(c.spec, a, b, solve=match.ALL, init=init)
    assert res.diagnostics.history[1][0] == "init"
    x = inputs(config, jax.random.fold_in(key, 3))
    assert rel_err(c.forward(res.params, x), c.forward(b, x)) <= TOL
    # A role alone as a string, as spec.select takes it (it was read letter by letter: no
    # group); unknown roles and misfit params refused by name (they gave the identity, or a
    # bare KeyError inside a jitted helper).
    ffn = merge.activation_init(c.spec, cross, roles="ffn")
    assert set(ffn) == set(c.spec.select(roles="ffn")) != set()
    for roles in (("fnn",), ("rotation",)):
        with pytest.raises(ValueError, match=rf"unknown role\(s\) \['{roles[0]}'\]"):
            merge.activation_init(c.spec, cross, roles=roles)
    stacked = compiled(scanned(config)).init(key, 0.3)
    with pytest.raises(ValueError, match=r"params\[1\] \(B\): params do not match the symmetry"):
        merge.activation_init(c.spec, cross, params=(a, stacked))
    with pytest.raises(ValueError, match="heads must be 'nuclear' or 'trace', got 'Nuclear'"):
        merge.group_scores(c.spec, merge.correlations(cross), ["residual"], heads="Nuclear")


def test_activation_stream_rotation_of_a_float64_model_is_float64(key):
    """With ``jax_enable_x64``, the stream rotation from activations is orthogonal and fixes
    the all-ones vector to float64's precision (the basis of 1's complement was float32:
    ~1e-7, a change of B's function of that size)."""
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    spec = family(config).symmetry_spec(config, stream_rotation=True)
    (stream,) = spec.select(roles="stream_rotation")
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), t)
        a, b = (to64(c.init(jax.random.fold_in(key, i), 0.3)) for i in range(2))
        cross = merge.cross_statistics(c.model, a, b, to64(batches_of(config, key, n=2, batch=8)))
        q = merge.activation_init(spec, cross)[stream]
        assert q.dtype == jnp.float64
        n = config.hidden_size
        np.testing.assert_allclose(q @ q.T, np.eye(n), rtol=0, atol=1e-13)
        np.testing.assert_allclose(q @ np.ones(n), np.ones(n), rtol=0, atol=1e-13)


ROTATIONS = ("qk_rotation", "vo_rotation")


@pytest.mark.parametrize("name,scan", [("vit-h3d4-l2", False), ("bert-h3d4-l2", True)])
def test_activation_init_recovers_planted_permutations_and_head_rotations(name, scan, key):
    config = scanned(CONFIGS[name]) if scan else CONFIGS[name]
    c = compiled(config)
    a = c.init(key, 0.3)
    g = sym.sample(c.spec, jax.random.fold_in(key, 1))
    roles = ("residual", "ffn", "heads", *ROTATIONS)
    planted = {n: v for n, v in g.items() if c.spec.groups[n].role in roles}
    b = c.apply(a, planted)
    cross = merge.cross_statistics(c.model, a, b, batches_of(config, key, n=4, batch=8))
    init = merge.activation_init(c.spec, cross, params=(a, b))
    inverse = sym.invert(c.spec, planted)
    assert set(init) == set(planted)
    for n in init:  # rotations: polar factors of float32 moments (error ~ 1e-7 x condition:
        np.testing.assert_allclose(init[n], inverse[n], atol=2e-5, err_msg=n)  # 2.3e-6 seen)
    # Without the params the head rotations stay open (their moments need the Q/K weights).
    without = merge.activation_init(c.spec, cross)
    assert not any(c.spec.groups[n].role in ROTATIONS for n in without)


@pytest.mark.parametrize("name", ["llama-k2g2d6-l2-seq", "qwen2-k1g4d4-l1"])
def test_activation_init_recovers_planted_query_heads(name, key):
    """Grouped-query attention: the key-value heads, and the query heads inside each (scored
    after B's heads are moved onto A's), with the stream and the FFN units."""
    config = CONFIGS[name]
    c = compiled(config)
    a = c.init(key, 0.3)
    g = sym.sample(c.spec, jax.random.fold_in(key, 1))
    roles = ("residual", "ffn", "heads", "query_heads")
    planted = {n: v for n, v in g.items() if c.spec.groups[n].role in roles}
    assert any(c.spec.groups[n].role == "query_heads" for n in planted)
    b = c.apply(a, planted)
    cross = merge.cross_statistics(c.model, a, b, batches_of(config, key, n=4, batch=8))
    init = merge.activation_init(c.spec, cross)
    inverse = sym.invert(c.spec, planted)
    assert set(init) == set(planted)
    for n in init:
        np.testing.assert_array_equal(init[n], inverse[n], err_msg=n)


def test_prediction_loss_is_the_cross_entropy_to_the_mean_prediction(key):
    config = CONFIGS["bert-h5d2-l1-token"]  # token-level: padded tokens must not count
    c = compiled(config)
    ps = [c.init(jax.random.fold_in(key, i), 0.3) for i in range(3)]
    data = batches_of(config, key, n=2, batch=4)
    num = den = 0.0
    for x in data:  # oracle in float64, token by token
        mean = np.mean([softmax(np.float64(c.forward(p, x)), -1) for p in ps[:2]], axis=0)
        log_q = log_softmax(np.float64(c.forward(ps[2], x)), -1)
        per, real = -(mean * log_q).sum(-1), np.asarray(x[1], np.float64)
        num, den = num + (per * real).sum(), den + real.sum()
    loss = merge.prediction_loss(c.model, ps[:2], data)
    assert loss(ps[2]) == pytest.approx(num / den, rel=TOL)
    # Targets beyond `memory` are recomputed at each call: the same loss, twice.
    tight = merge.prediction_loss(c.model, ps[:2], data, memory=0)
    assert tight(ps[2]) == tight(ps[2]) == loss(ps[2])
    # The budget counts the bytes kept, whatever the batches' sizes: a big batch's targets
    # and a small one's fit; the next small one's would not (a count of batches times the
    # last one's size kept it too).
    from rotjax.merge._loss import _prediction_loss

    uneven = [tuple(a[:4] for a in data[0]), *(tuple(a[:1] for a in x) for x in data * 2)]
    sizes = [_prediction_loss(c.model, ps[:2], [x], 2**30)[2](0).nbytes for x in uneven[:2]]
    target_of = _prediction_loss(c.model, ps[:2], uneven, sizes[0] + sizes[1])[2]
    kept = [target_of(i) is target_of(i) for i in range(len(uneven))]
    assert kept == [True, True, False, False, False], kept
    # Batches of padding alone: nothing to measure (the loss was 0, every candidate tied).
    padded = [(x[0], jnp.zeros_like(x[1]), *x[2:]) for x in data]
    with pytest.raises(ValueError, match=r"no real token in the batches \(every mask is 0\)"):
        merge.prediction_loss(c.model, ps[:2], padded)(ps[2])
    bare = CONFIGS["bert-encoder-pooler"]
    with pytest.raises(ValueError, match="classification head"):
        merge.prediction_loss(compiled(bare).model, ps[:2], data)
    # One class (a regression head): its log-softmax is constant, loss and Fisher all 0.
    one = compiled(dataclasses.replace(config, num_labels=1))
    p1 = one.init(key, 0.3)
    with pytest.raises(ValueError, match=r"classification head \(num_labels=1"):
        merge.prediction_loss(one.model, [p1, p1], data)
    with pytest.raises(ValueError, match=r"classification head \(num_labels=1"):
        merge.statistics(one.model, p1, data, ("fisher",))
    with pytest.raises(ValueError, match=r"steps > 0 needs .* \(num_labels=1"):
        merge.align_by_activations(one.model, one.spec, p1, p1, data, steps=2)


def test_align_by_activations_keeps_the_candidate_with_the_least_prediction_loss(key):
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    a, b = c.init(key, 0.3), c.init(jax.random.fold_in(key, 1), 0.3)  # unrelated models
    data = batches_of(config, key, n=2, batch=8)
    res, info = merge.align_by_activations(c.model, c.spec, a, b, data, max_sweeps=3)
    losses = info["losses"]
    assert 1 <= len(losses) <= 4
    loss = merge.prediction_loss(c.model, [a, b], data)
    # The data-free candidate: `align` from its own start.
    free_alignment = match.align(c.spec, a, b, solve=match.ALL)
    free = free_alignment.params
    assert loss(merge.average([a, free])) == pytest.approx(info["weights_loss"], rel=TOL)
    # Given that alignment, it is not redone: the same choice.
    given = merge.align_by_activations(
        c.model, c.spec, a, b, data, max_sweeps=3, weights_start=free_alignment
    )[1]
    assert given["weights_loss"] == pytest.approx(info["weights_loss"], rel=TOL)
    assert (given["start"], given["sweeps"]) == (info["start"], info["sweeps"])
    with pytest.raises(TypeError, match="weights_start must be a bool or an Alignment"):
        merge.align_by_activations(c.model, c.spec, a, b, data, weights_start=free)
    unaligned = loss(merge.average([a, b]))
    assert info["identity_loss"] == pytest.approx(unaligned, rel=TOL)
    best = min(*losses, info["weights_loss"], unaligned)
    assert loss(merge.average([a, res.params])) == pytest.approx(best, rel=TOL)
    if info["start"] == "activations":
        assert info["sweeps"] == int(np.argmin(losses)) and min(losses) <= info["weights_loss"]
    elif info["start"] == "weights":
        assert info["weights_loss"] < min(losses)
    else:  # B as it is: the identity, when no alignment predicts better
        assert info["start"] == "identity" and unaligned < min(*losses, info["weights_loss"])
        assert rel_err(res.params, b) == 0
    _, only = merge.align_by_activations(
        c.model, c.spec, a, b, data, max_sweeps=3, weights_start=False
    )
    assert only["losses"] == pytest.approx(losses, rel=TOL) and only["weights_loss"] is None
    if only["start"] != "identity":
        assert only["start"] == "activations" and only["sweeps"] == int(np.argmin(losses))
    x = inputs(config, jax.random.fold_in(key, 2))  # g·B: B moved by a symmetry element
    assert rel_err(c.forward(res.params, x), c.forward(b, x)) <= TOL
    assert rel_err(res.params, c.apply(b, res.transform)) <= TOL
    # The 0-sweep candidate is the activation start itself.
    start = merge.activation_init(
        c.spec, merge.cross_statistics(c.model, a, b, data), params=(a, b)
    )
    first = merge.prediction_loss(c.model, [a, b], data)(merge.average([a, c.apply(b, start)]))
    assert first == pytest.approx(losses[0], rel=TOL)


def test_align_by_activations_keeps_b_when_every_alignment_predicts_worse(key, monkeypatch):
    """B itself is a candidate: a start that moves a copy of A away from A (here a random
    symmetry element in place of the activation start) loses to no alignment at all."""
    import rotjax.merge._select as select

    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    a = c.init(key, 0.3)
    b = jax.tree.map(jnp.copy, a)
    bad = sym.sample(c.spec, jax.random.fold_in(key, 1))
    monkeypatch.setattr(select, "activation_init", lambda *args, **kwargs: bad)
    data = batches_of(config, key, n=2, batch=8)
    res, info = merge.align_by_activations(
        c.model, c.spec, a, b, data, max_sweeps=0, weights_start=False
    )
    # the cross entropy to A's own prediction: its entropy, and more for any other model
    assert info["identity_loss"] < info["losses"][0], info
    assert (info["start"], info["sweeps"]) == ("identity", 0)
    assert rel_err(res.params, b) == 0
    assert all(rel_err(v, sym.identity(c.spec)[n]) == 0 for n, v in res.transform.items())


def test_align_by_activations_breaks_prediction_ties_by_weight_distance(key):
    """A copy of A moved by a symmetry element, at small weights (a flat prediction loss):
    the exact alignment and the activation start it refines (no scales solved) predict alike
    to 1e-7 relative, and the start, offered first, was kept: its average 1e-2 from A. Near
    ties go to the candidate nearer A in weights: the exact one, whose average is A."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    a = c.init(key, 0.1)
    b = c.apply(a, sym.sample(c.spec, jax.random.fold_in(key, 1)))
    data = batches_of(config, jax.random.fold_in(key, 2))
    res, info = merge.align_by_activations(c.model, c.spec, a, b, data)
    assert rel_err(merge.average([a, res.params]), a) <= TOL, info
    assert info["start"] != "identity", info


@pytest.mark.parametrize(
    "losses, start",
    [
        ((np.nan, 0.5, 0.7), "weights"),
        ((np.nan, np.nan, 0.7), "identity"),
        ((0.2, np.nan, 0.7), "activations"),
    ],
)
def test_align_by_activations_ranks_a_nan_loss_below_every_number(key, monkeypatch, losses, start):
    """A candidate whose average predicts NaN (it overflowed) is never kept over one with a
    number (a NaN first candidate won every comparison before: ``x < nan`` is False)."""
    import rotjax.merge._select as select

    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    a, b = c.init(key, 0.3), c.init(jax.random.fold_in(key, 1), 0.3)
    # the candidates in the order they are scored: activation start, weight start, B itself
    calls = iter(losses)
    loss = lambda params: next(calls)
    monkeypatch.setattr(select, "_prediction_loss", lambda *args: (loss, None, None))
    data = batches_of(config, key, n=1, batch=4)
    res, info = merge.align_by_activations(c.model, c.spec, a, b, data, max_sweeps=0)
    assert info["start"] == start, info
    if start == "identity":
        assert rel_err(res.params, b) == 0


# ---------------------------------------------------------------------------------------------
# Refit: the dense layers in forward order, on the merged model's own inputs.


def test_capture_keeps_every_call_of_a_layer_called_twice(key):
    """A layer called twice in one pass: summed by default, each call kept in call order by a
    ``combine`` that concatenates (what refit reads)."""
    import flax.linen as nn

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3, name="shared")
            return dense(jnp.tanh(dense(x)))

    x = jax.random.normal(key, (4, 3))
    params = Twice().init(key, x)["params"]
    first = x
    second = jnp.tanh(x @ params["shared"]["kernel"] + params["shared"]["bias"][None])
    gram = lambda rows, w: rows.T @ (rows * w[:, None])
    _, summed = capture(Twice(), params, (x,), gram)
    want = first.T @ first + second.T @ second
    assert rel_err(summed["shared/kernel"], want) < TOL
    concat = lambda so_far, new: new if so_far is None else so_far + new
    _, calls = capture(Twice(), params, (x,), lambda r, w: ((r, w),), combine=concat)
    got = calls["shared/kernel"]
    assert sorted(got) == ["0/0", "0/1", "1/0", "1/1"]
    assert rel_err(got["0/0"], first) < TOL and rel_err(got["1/0"], second) < TOL
    np.testing.assert_array_equal(got["1/1"], np.ones(4))


def test_capture_reads_a_dense_general_over_a_list_of_axes(key):
    """``DenseGeneral(axis=[-2, -1])`` (Flax takes a list as well as a tuple) contracts two
    axes: its Gram is over the flattened pair (a list counted as one axis before)."""
    import flax.linen as nn

    from rotjax.merge._capture import dense_input_axes

    x = jax.random.normal(key, (5, 2, 3))
    for axis, n in ((-1, 1), ((-2, -1), 2), ([-2, -1], 2)):
        layer = nn.DenseGeneral(4, axis=axis)
        assert dense_input_axes(layer) == n, axis
    layer = nn.DenseGeneral(4, axis=[-2, -1])
    params = layer.init(key, x)["params"]
    _, got = capture(layer, params, (x,), lambda rows, w: rows.T @ (rows * w[:, None]))
    rows = x.reshape(5, 6)
    (gram,) = got.values()  # the root module's kernel
    assert rel_err(gram, rows.T @ rows) < TOL


def test_first_calls_traces_the_pass_only_up_to_the_wanted_layers(key):
    """`first_calls` gives `calls`' rows of the wanted layers, from a pass that stops before the
    next dense layer: only the layers up to them are in the traced program."""
    import flax.linen as nn

    from rotjax.merge._capture import calls, first_calls

    class Chain(nn.Module):
        @nn.compact
        def __call__(self, x):
            for name in "abc":
                x = jnp.tanh(nn.Dense(3, name=name)(x))
            return x

    x = jax.random.normal(key, (4, 3))
    params = Chain().init(key, x)["params"]
    every = calls(Chain(), params, (x,))
    mask = jnp.asarray([1, 0, 1, 1])
    for wanted in (["a/kernel"], ["b/kernel"], ["a/kernel", "b/kernel"], ["c/kernel"]):
        got = first_calls(Chain(), params, (x,), wanted)
        assert sorted(got) == wanted
        for k in wanted:
            ((rows, w),) = got[k]
            np.testing.assert_array_equal(rows, every[k][0][0])
            np.testing.assert_array_equal(w, np.ones(4))
        # the layers called: each wanted one, and the last of them is read before the exit
        jaxpr = jax.make_jaxpr(lambda p, w=wanted: first_calls(Chain(), p, (x,), w))(params)
        dots = sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)
        assert dots == "abc".index(max(wanted)[0]) + 1, (wanted, dots)
    ((rows, w),) = first_calls(Chain(), params, (x[None],), ["b/kernel"], mask=mask[None])[
        "b/kernel"
    ]
    np.testing.assert_array_equal(w, mask)
    with pytest.raises(ValueError, match="no call of"):
        first_calls(Chain(), params, (x,), ["d/kernel"])


def _dense_kernels(c, params, x):
    return set(capture(c.model, params, x, lambda rows, w: jnp.zeros(()))[1])


def _scrambled(c, params, x, key):
    """``params`` with every dense layer's kernel and bias replaced by noise; norms, embeddings
    and the patch convolution kept."""
    dense = {k.rsplit("/", 1)[0] for k in _dense_kernels(c, params, x)}
    flat = to_dict(params)
    out = {
        p: 0.3 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
        if p.rsplit("/", 1)[0] in dense
        else v
        for i, (p, v) in enumerate(sorted(flat.items()))
    }
    return jax.tree.unflatten(jax.tree.structure(params), [out[p] for p in sorted(flat)])


@pytest.mark.parametrize(
    "name, scan",
    [  # unscanned BERT left out (105 s of compiling): layouts agree by the test after this one
        ("bert-h3d4-l2", True),
        ("vit-h3d4-l2", True),
        ("llama-k2g2d6-l2-seq", False),
        ("deberta-v2-h5d2-l1-token", False),
    ],
)
def test_refit_recovers_a_model_from_scrambled_dense_layers(name, scan, key):
    # Refitting to [A, A] from A with every dense layer scrambled: each stage's inputs are A's
    # (the layers before it already refitted), so least squares returns A's layer up to
    # directions its inputs never take, and the function comes back. In float64: the normal
    # equations square the condition number of these random tiny models' layer inputs (up to
    # ~1e6 in some post-norm BERT Grams), so float32 Grams leave 1e-4 to 1e-2 (the float32
    # path is checked against the oracle below); float64 gives ~1e-8.
    config = scanned(CONFIGS[name], scan)
    c = compiled(config)
    with jax.enable_x64(True):
        wide = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), t)
        a = wide(c.init(key, 0.3))
        data = batches_of(config, key, n=3, batch=6)
        start = wide(_scrambled(c, a, data[0], jax.random.fold_in(key, 1)))
        x = inputs(config, jax.random.fold_in(key, 2))  # fresh inputs
        real = lambda y: y if y.ndim == 2 else y * (x[1][..., None] > 0)  # real tokens' logits
        forward = lambda p: real(c.model.apply({"params": p}, *x))
        assert rel_err(forward(start), forward(a)) > 0.1
        before = jax.tree.map(np.array, start)
        out = merge.refit(c.model, start, [a, a], data, ridge=0.0)
        assert rel_err(forward(out), forward(a)) <= 1e-6
        assert rel_err(start, before) == 0.0  # nothing mutated
        # From A itself nothing moves (DeBERTa-v3 too, whose relative embeddings reach the
        # shared query/key weights without a call of those layers: directions no call takes
        # keep A's).
        if name == "bert-h3d4-l2" and not scan:
            v3 = compiled(CONFIGS["deberta-v3-h3d5-l2-seq"])
            a3 = wide(v3.init(key, 0.3))
            same = merge.refit(v3.model, a3, [a3, a3], batches_of(v3.model.config, key, n=2))
            x3 = inputs(v3.model.config, jax.random.fold_in(key, 3))
            apply3 = lambda p: v3.model.apply({"params": p}, *x3)
            assert rel_err(apply3(same), apply3(a3)) <= 1e-6


def _oracle_refit(c, merged, ps, lam, data, ridge):
    """The refit of a ViT with 2 layers in float64: each stage's rows captured from the
    current model, the weighted mean target of the models' outputs, and `np.linalg.lstsq` on
    the ridge-augmented system ``[X̂; √(ρ tr(Ĝ)/n) I] W = [Ȳ; √(ρ tr(Ĝ)/n) W₀]`` (W₀ the
    layer before its refit)."""
    rows = lambda p: [
        {k: np.float64(v) for k, v in capture(c.model, p, x, lambda r, w: r)[1].items()}
        for x in data
    ]
    cur = {k: np.float64(v) for k, v in to_dict(merged).items()}
    models = [to_dict(p) for p in ps]
    theirs = [rows(p) for p in ps]
    stages = []
    for i in range(2):
        stages.append([f"encoder/layer_{i}/attention/{n}" for n in ("query", "key", "value")])
        stages += [
            [f"encoder/layer_{i}/{n}"] for n in ("attention/out", "ffn/intermediate", "ffn/output")
        ]
    stages.append(["classifier"])
    treedef = jax.tree.structure(merged)
    for stage in stages:
        now = rows(jax.tree.unflatten(treedef, [cur[k] for k in sorted(cur)]))
        for layer in stage:
            k = layer + "/kernel"
            ones = lambda r: np.concatenate([r, np.ones((len(r), 1))], 1)
            x_hat = ones(np.concatenate([b[k] for b in now]))
            n = x_hat.shape[1]
            y = sum(
                w
                * ones(np.concatenate([b[k] for b in t]))
                @ np.concatenate(
                    [
                        np.float64(m[k]).reshape(n - 1, -1),
                        np.float64(m[layer + "/bias"]).reshape(1, -1),
                    ]
                )
                for w, t, m in zip(lam / lam.sum(), theirs, models, strict=True)
            )
            reg = np.sqrt(ridge * np.trace(x_hat.T @ x_hat) / n)
            w0 = np.concatenate([cur[k].reshape(n - 1, -1), cur[layer + "/bias"].reshape(1, -1)])
            w = np.linalg.lstsq(np.vstack([x_hat, reg * np.eye(n)]), np.vstack([y, reg * w0]))[0]
            cur[k] = w[:-1].reshape(cur[k].shape)
            cur[layer + "/bias"] = w[-1].reshape(cur[layer + "/bias"].shape)
    return jax.tree.unflatten(treedef, [cur[k] for k in sorted(cur)])


def test_refit_matches_a_float64_lstsq_oracle(key):
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    ps = [c.init(jax.random.fold_in(key, i), 0.3) for i in range(2)]
    lam = np.array([1.0, 3.0])
    data = batches_of(config, key, n=2, batch=4)
    start = merge.average(ps)
    out = merge.refit(c.model, start, ps, data, weights=lam, ridge=1e-2)
    oracle = _oracle_refit(c, start, ps, lam, data, 1e-2)
    # a model of weight 0 is left out: NaN in it changes nothing
    nan = jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), ps[0])
    again = merge.refit(c.model, start, [ps[0], nan, ps[1]], data, weights=[1, 0, 3], ridge=1e-2)
    assert rel_err(again, out) == 0
    # float32 solves of Grams whose condition the ridge bounds near 1e3: ~1e3 x 2^-24 per
    # layer, compounded over the stages (1.3e-4 at most over 460 seeds, above 5e-5 in 1 of 10)
    assert rel_err(out, oracle) <= 3e-4
    assert rel_err(out, start) > 1e-2  # it did refit


def test_refit_counts_padded_tokens_only_when_asked(key):
    """By default refit fits the real tokens' rows only, so the ids at padded positions change
    nothing (1e-6: the padded keys' softmax weights are exactly 0, the rows the same; last bits
    of differently fused programs); with ``include_padding=True`` their rows count too (as in
    RegMean's original code), so they do; on a batch without padding the two agree."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    ps = [c.init(jax.random.fold_in(key, i), 0.3) for i in range(2)]
    ids, mask = inputs(config, key, batch=4)
    assert not mask.all()
    noise = jax.random.randint(jax.random.fold_in(key, 9), ids.shape, 1, config.vocab_size)
    other = jnp.where(mask > 0, ids, noise)
    start = merge.average(ps)
    fit = lambda x, m, pad: merge.refit(
        c.model, start, ps, [(x, m)], ridge=1e-2, include_padding=pad
    )
    assert rel_err(fit(other, mask, False), fit(ids, mask, False)) <= 1e-6
    assert rel_err(fit(other, mask, True), fit(ids, mask, True)) > 1e-3
    full = jnp.ones_like(mask)
    assert rel_err(fit(ids, full, True), fit(ids, full, False)) <= 1e-6


def test_refit_of_float64_models_is_float64(key):
    """With ``jax_enable_x64``, float64 models are refitted in float64 (their targets, weights
    and ridge were float32: 3e-8 from the oracle): the float64 oracle's result to 1e-9."""
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    lam = np.array([1.0, 3.0])
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), t)
        ps = [to64(c.init(jax.random.fold_in(key, i), 0.3)) for i in range(2)]
        data = to64(batches_of(config, key, n=2, batch=4))
        start = merge.average(ps)
        out = merge.refit(c.model, start, ps, data, weights=lam, ridge=1e-2)
        oracle = _oracle_refit(c, start, ps, lam, data, 1e-2)
    assert {v.dtype for v in jax.tree.leaves(out)} == {jnp.dtype(jnp.float64)}
    assert rel_err(out, oracle) <= 1e-9
    assert rel_err(out, start) > 1e-2  # it did refit


def test_refit_scanned_and_unscanned_agree_and_bad_inputs(key):
    config = CONFIGS["vit-h3d4-l2"]
    c, cs = compiled(config), compiled(scanned(config))
    ps = [c.init(jax.random.fold_in(key, i), 0.3) for i in range(2)]
    data = batches_of(config, key, n=2, batch=4)
    # A ridge that keeps these random layers' Grams well conditioned (at 1e-4 some reach
    # ~1e6, and the two layouts' float32 rounding differs by ~1e-3 after the solves; at 1e-2
    # up to 7e-5 over 12 seeds: the solves amplify last-bit differences of the layer inputs).
    out = merge.refit(c.model, merge.average(ps), ps, data, ridge=1e-2)
    stacked = [stack_layers(p) for p in ps]
    out_s = merge.refit(cs.model, merge.average(stacked), stacked, data, ridge=1e-2)
    assert rel_err(out_s, stack_layers(out)) <= 5e-4  # 1.5e-4 at most over 300 seeds
    # The models' layer inputs recomputed per stage (no memory to keep them): the same rows,
    # moments and solves; identical unscanned, and scanned up to the scan's differently fused
    # programs (last bits, amplified as above).
    for model, params, kept, tol in ((c.model, ps, out, 1e-6), (cs.model, stacked, out_s, 2e-4)):
        again = merge.refit(model, merge.average(params), params, data, ridge=1e-2, memory=0)
        assert rel_err(again, kept) <= tol
    # a numpy integer is a budget too (it was refused), as for prediction_loss
    again = merge.refit(c.model, merge.average(ps), ps, data, ridge=1e-2, memory=np.int64(0))
    assert rel_err(again, out) <= 1e-6
    with pytest.raises(ValueError, match="no batches"):
        merge.refit(c.model, ps[0], ps, [])
    for bad in (-1.0, True, 3e38):  # (True was taken as 1.0; 3e38 overflowed: NaN)
        with pytest.raises(ValueError, match=r"ridge must be a number in \[0, 1e8\]"):
            merge.refit(c.model, ps[0], ps, data, ridge=bad)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="memory must be an integer >= 0"):
            merge.refit(c.model, ps[0], ps, data, memory=bad)
    with pytest.raises(ValueError, match=r"params_list\[1\] has other params than merged"):
        merge.refit(c.model, ps[0], [ps[1], stacked[0]], data)
    with pytest.raises(ValueError, match=r"at least 1 model\(s\) besides merged, got 0"):
        merge.refit(c.model, ps[0], [], data)


def test_data_paths_skip_empty_batches_and_refuse_non_finite_ones(key):
    """Every function that reads batches skips an empty one, as `statistics` did (the others
    traced it, and a ViT cannot trace zero images: ZeroDivisionError), and refuses a batch
    with NaN or Inf, naming what it holds (refit kept the merge unchanged, its Gram's trace
    NaN read as "no rows"; the Grams and the activation start came back NaN or zero)."""
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    ps = [c.init(jax.random.fold_in(key, i), 0.3) for i in range(2)]
    (x,) = batches_of(config, key, n=1, batch=3)
    empty, mean = tuple(v[:0] for v in x), merge.average(ps)
    runs = {
        "statistics": lambda data: merge.statistics(c.model, ps[0], data, ("gram",)),
        "cross_statistics": lambda data: merge.cross_statistics(c.model, *ps, data),
        "prediction_loss": lambda data: merge.prediction_loss(c.model, ps, data)(mean),
        "refit": lambda data: merge.refit(c.model, mean, ps, data),
    }
    for name, run in runs.items():
        assert rel_err(run([empty, x, empty]), run([x])) <= 1e-6, name
    broken = (x[0].at[1, 0, 0, 0].set(jnp.nan),)  # (an index out of bounds would be dropped)
    for name, run in runs.items():
        if name == "prediction_loss":  # a loss: NaN says what it is
            assert np.isnan(run([x, broken]))
            continue
        with pytest.raises(ValueError, match=r"non-finite .*NaN or Inf.* the batches hold"):
            run([x, broken])
    with pytest.raises(
        ValueError, match=r"refit: non-finite moments .* of encoder/layer_0/attention/query/kernel:"
    ):
        merge.refit(c.model, mean, ps, [(x[0].at[0, 0, 0, 0].set(jnp.inf),)])


def test_capture_refuses_a_dense_general_over_leading_axes(key):
    """`capture` reads a layer's features from its input's trailing axes: a ``DenseGeneral``
    that contracts others (or has batch dims) got the Gram of the wrong axes (here (5, 5) for
    a (3, 4) kernel), and is refused, named."""
    import flax.linen as nn

    x = jax.random.normal(key, (2, 3, 5))
    for layer in (nn.DenseGeneral(4, axis=1), nn.DenseGeneral(4, axis=(-1, -2))):
        params = layer.init(key, x)["params"]
        with pytest.raises(
            ValueError, match=r"kernel: a DenseGeneral contracting axes .* \(2, 3, 5\)"
        ):
            capture(layer, params, (x,), lambda rows, w: rows.T @ rows)
    trailing = nn.DenseGeneral(4, axis=(1, 2))  # the same as (-2, -1)
    params = trailing.init(key, x)["params"]
    (gram,) = capture(trailing, params, (x,), lambda rows, w: rows.T @ rows)[1].values()
    assert gram.shape == (15, 15)


# ---------------------------------------------------------------------------------------------
# Sharding, the linear path.


def test_sharded_statistics_and_merges_match_one_device(key, monkeypatch):
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    a, b = c.init(key, 0.3), c.init(jax.random.fold_in(key, 1), 0.3)
    data = batches_of(config, key, n=2, batch=8)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    sharded_data = [tuple(jax.device_put(x, rows) for x in batch) for batch in data]
    one = merge.statistics(c.model, a, data)
    many = merge.statistics(c.model, a, sharded_data)
    assert rel_err(many["gram"], one["gram"]) <= 1e-6
    # Attention key biases left out: their true gradient is zero (they shift all scores of a
    # query alike), so their Fisher is rounding noise whose value depends on summation order.
    # The rest: squares of per-example gradients from differently partitioned programs, whose
    # last bits differ (up to 1.3e-6 over 300 seeds, 2e-7 typically).
    real = lambda f: {p: x for p, x in f.items() if not p.endswith("attention/key/bias")}
    assert rel_err(real(many["fisher"]), real(one["fisher"])) <= 5e-6
    # Params sharded along a model axis (the FFN width, 4 devices): merges keep the sharding.
    model_mesh = Mesh(np.asarray(jax.devices()[:4]), ("model",))
    kernel = NamedSharding(model_mesh, P(None, "model"))

    def shard(params):
        flat = to_dict(params)
        path = "encoder/layer_0/ffn/intermediate/kernel"
        return flat, path, {**flat, path: jax.device_put(flat[path], kernel)}

    from rotjax.tree import from_dict

    fa, path, sa = shard(a)
    fb, _, sb = shard(b)
    stats = [one, merge.statistics(c.model, b, data, ("gram",))]
    # Symmetry transforms (gathers and contractions, whose outputs XLA lays out as it likes)
    # put every leaf back on its input's sharding, so OT fusion keeps it too.
    t = sym.sample(c.spec, jax.random.fold_in(key, 2))
    computed = []  # sym.apply's program computes it in it (it was whole on every device)
    spy = lambda new, old: (
        computed.append((new.sharding, old.sharding)) or tree.placed_like(new, old)
    )
    monkeypatch.setattr(sym_transform, "placed_like", spy)
    moved = to_dict(sym.apply(c.spec, from_dict(sa), t))
    monkeypatch.undo()
    (out,) = [new for new, old in computed if old == kernel]
    assert out.is_equivalent_to(kernel, 2), out
    assert moved[path].sharding.is_equivalent_to(kernel, 2)
    assert rel_err(moved, to_dict(sym.apply(c.spec, from_dict(fa), t))) <= 1e-6
    ffn = [n for n in c.spec.select(roles=["ffn"]) if c.spec.groups[n].kind == "perm"]
    soft = {n: jnp.full(t[n].shape + t[n].shape[-1:], 1.0 / t[n].shape[-1]) for n in ffn}
    moved = to_dict(merge.transport_params(c.spec, from_dict(sa), soft))
    assert moved[path].sharding.is_equivalent_to(kernel, 2)
    rows_of_path = NamedSharding(model_mesh, P("model", None))
    fisher_by_rows = {**one["fisher"], path: jax.device_put(one["fisher"][path], rows_of_path)}
    by_rows = [{**s, "fisher": fisher_by_rows} for s in stats]
    for name, method in (
        ("average", lambda ps: merge.average(ps)),
        ("regmean", lambda ps: merge.regmean(ps, stats)),
        ("fisher", lambda ps: merge.fisher(ps, [one, one])),
        # Fishers laid out otherwise (computed on other shardings): the params' layout wins
        ("fisher, rows", lambda ps: merge.fisher(ps, by_rows)),
        ("regmean, rest=fisher", lambda ps: merge.regmean(ps, by_rows, rest="fisher")),
        ("ot-wts", lambda ps: merge.ot_fusion(c.spec, *ps, mode="wts").params),
        ("ties", lambda ps: merge.ties(ps[0], ps, density=0.3)),  # two programs: see _task
        ("dare-ties", lambda ps: merge.dare(ps[0], ps, key=key, drop=0.5, combine="ties")),
    ):
        want = to_dict(method([from_dict(fa), from_dict(fb)]))
        got = to_dict(method([from_dict(sa), from_dict(sb)]))
        assert got[path].sharding.is_equivalent_to(kernel, 2)
        if not name.startswith("regmean"):
            assert rel_err(got, want) <= 1e-6
            continue
        # RegMean solves a linear system per kernel; on a sharded kernel XLA rounds the
        # right-hand side's products in another order, and the solve amplifies that by the
        # condition number κ of Σ G̃ (30-3000 here: LayerNorm outputs nearly span a
        # hyperplane), so the two can differ by more than 1e-6 (ROTJAX_SEED=1715106828:
        # 1.5e-6, κ = 3e3). What must hold: every other kernel agrees, and the sharded solve
        # is as accurate as the one-device solve against a float64 oracle: within twice its
        # error (they round alike, in another order) or float32's forward-error bound κ·u.
        others = [p for p in want if p != path]
        assert rel_err([got[p] for p in others], [want[p] for p in others]) <= 1e-6
        g = [0.9 * np.asarray(s["gram"][path], np.float64) for s in stats]
        g = [x + np.diag(np.diag(x)) / 9 for x in g]  # G̃ = 0.9 G + 0.1 diag(G)
        oracle = np.linalg.solve(g[0] + g[1], g[0] @ fa[path] + g[1] @ fb[path])
        one_device, bound = rel_err(want[path], oracle), np.linalg.cond(g[0] + g[1]) * 2.0**-24
        assert one_device <= bound
        assert rel_err(got[path], oracle) <= max(2 * one_device, bound)
    # Refit keeps the sharding too. Its least squares amplify rounding in another order, as
    # RegMean's above, along input directions the data barely take: params up to 1.2e-4 apart
    # (ROTJAX_SEED=1429355037, ridge 1e-2), the refitted models' logits on the data 1.0e-5 on
    # 4 seeds but 1.1e-4 on ROTJAX_SEED=1449624377 (the same at the code of 7002b22); 1e-3
    # on the logits leaves room for that, and a real mismatch (a kernel laid out or reduced
    # wrongly) moves them by O(1).
    refit = lambda ps: merge.refit(c.model, merge.average(ps), ps, data, ridge=1e-2)
    got, want = refit([from_dict(sa), from_dict(sb)]), refit([from_dict(fa), from_dict(fb)])
    assert to_dict(got)[path].sharding.is_equivalent_to(kernel, 2)
    errs = [rel_err(c.forward(got, x), c.forward(want, x)) for x in data]
    assert max(errs) <= 1e-3, errs
    # Alignment too: the stream's update let XLA lay out the kernels it moved as it liked
    # (every leaf sharded on its last axis where 3 devices divide it, else replicated: the
    # replicated query, key and value kernels came back sharded on the stream axis)
    mesh3 = Mesh(np.asarray(jax.devices()[:3]), ("model",))
    split = lambda x: P(*[None] * (x.ndim - 1), "model") if x.shape[-1:] == (12,) else P()
    place = lambda f: {p: jax.device_put(x, NamedSharding(mesh3, split(x))) for p, x in f.items()}
    pa, pb = place(fa), place(fb)
    got = to_dict(match.align(c.spec, from_dict(pa), from_dict(pb), solve="residual").params)
    moved = [p for p, x in pb.items() if not got[p].sharding.is_equivalent_to(x.sharding, x.ndim)]
    assert not moved, moved


def test_curve_and_barrier(key):
    a = {"w": jnp.zeros(3)}
    b = {"w": jnp.ones(3)}
    evaluate = lambda p: {
        "loss": float(jnp.sum(p["w"] * (1 - p["w"]))),
        "accuracy": 1.0 - float(jnp.mean(p["w"] * (1 - p["w"]))),
    }
    cv = merge.curve(evaluate, a, b, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(cv.metrics["loss"], [0.0, 0.75, 0.0])
    assert cv.barrier == pytest.approx({"loss": 0.75, "accuracy": 0.25})
    # Which metrics are scores: the loss's rise is no barrier of a score, the accuracy's dip
    # none of a loss; one name given as a string is that name ("accuracy" in "val_accuracy"
    # took the substring: the loss of a metric named "accuracy" was read as a score)
    for scores, want in (((), (0.75, 0.0)), (("loss", "accuracy"), (0.0, 0.25))):
        cv = merge.curve(evaluate, a, b, [0.0, 0.5, 1.0], higher_is_better=scores)
        assert cv.barrier == pytest.approx(dict(zip(("loss", "accuracy"), want, strict=True))), (
            scores
        )
    cv = merge.curve(evaluate, a, b, [0.0, 0.5, 1.0], higher_is_better="val_accuracy")
    assert cv.barrier == pytest.approx({"loss": 0.75, "accuracy": 0.0})
    # Lambdas that are not a path from 0 to 1 (beyond 1 it measured a gap to the line's
    # extrapolation: 8 here; none at all was an IndexError)
    for lambdas, values in (([0.2, 1.0], [1.0, 2.0]), ([0, 2, 1], [0, 10, 1]), ([], [])):
        with pytest.raises(ValueError, match="from λ = 0 to λ = 1 and within"):
            merge.barrier(lambdas, values)
    # Known metrics are used as given; only the other points are evaluated.
    seen = []
    counted = lambda p: seen.append(float(p["w"][0])) or evaluate(p)
    lambdas = [0.0, 0.25, 0.5, 1.0]
    known = {0.0: evaluate(a), 1: evaluate(b), 0.5: evaluate(merge.average([a, b]))}
    got = merge.curve(counted, a, b, lambdas, known=known)
    assert seen == [0.25]
    want = merge.curve(evaluate, a, b, lambdas)
    for k, v in want.metrics.items():
        np.testing.assert_array_equal(got.metrics[k], v)
    assert got.barrier == want.barrier
    with pytest.raises(ValueError, match=r"known metrics at λ = 0.75, which is not among"):
        merge.curve(evaluate, a, b, lambdas, known={0.75: evaluate(a)})
    # A known λ is a grid point up to rounding (linspace's 0.30000000000000004 was refused for
    # 0.3), and the barrier does not depend on the order of the lambdas (none came back for a
    # path from 1 to 0).
    grid = np.linspace(0.0, 1.0, 11)
    seen.clear()
    got = merge.curve(counted, a, b, grid, known={0.3: evaluate(merge.interpolate(a, b, 0.3))})
    assert len(seen) == 10 and 0.3 not in seen
    seen.clear()  # a float32 λ, 0.30000001192: refused by a tolerance of 1e-9
    merge.curve(
        counted, a, b, grid, known={np.float32(0.3): evaluate(merge.interpolate(a, b, 0.3))}
    )
    assert len(seen) == 10
    far = [0.0, 1.0, 20.3]  # float32's rounding of an extrapolated λ grows with it: 7.6e-7
    assert merge.curve(
        evaluate, a, b, far, known={np.float32(20.3): {"loss": 1.0, "accuracy": 1.0}}
    )
    back = merge.curve(evaluate, a, b, grid[::-1])
    np.testing.assert_array_equal(back.metrics["loss"], got.metrics["loss"][::-1])
    assert back.barrier == pytest.approx(got.barrier, abs=1e-12) and back.barrier
    assert merge.curve(evaluate, a, b, [0.0, 0.5]).barrier == {}  # not a path to B
    with pytest.raises(ValueError, match="lambdas must be a non-empty 1-D sequence of finite"):
        merge.curve(evaluate, a, b, [0.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="the metrics differ along the path"):
        merge.curve(evaluate, a, b, lambdas, known={0.0: {"loss": 0.0}})


def test_functions_driven_from_python_refuse_traced_params_by_name(key):
    """Alignment, statistics, refits, prediction losses and OT fusion loop over batches or
    solve on the host, so they cannot run under a JAX transformation: traced params are
    refused by name, saying so (JAX's ConcretizationTypeError about `float` came from deep
    inside). The merges themselves run under jit (other tests)."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    a = c.init(key, 0.3)
    batches = batches_of(config, key, n=1)
    calls = [
        ("anchor_params", lambda b: match.align(c.spec, b, a)),
        ("params_list[0]", lambda b: match.align_many(c.spec, [b, a])),
        ("params", lambda b: merge.statistics(c.model, b, batches)),
        ("params_a", lambda b: merge.ot_fusion(c.spec, b, a, mode="wts")),
        ("params_list[1]", lambda b: merge.prediction_loss(c.model, [a, b], batches)(a)),
        ("params", lambda b: merge.prediction_loss(c.model, [a, a], batches)(b)),
        ("merged", lambda b: merge.refit(c.model, b, [a, a], batches)),
        ("params_list[1]", lambda b: merge.refit(c.model, a, [a, b], batches)),
        ("params", lambda b: merge.align_by_activations(c.model, c.spec, a, b, batches)),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=rf"^{re.escape(name)} is traced \(under jax.jit"):
            jax.jit(call)(a)
    loss = merge.prediction_loss(c.model, [a, a], batches)
    with pytest.raises(TypeError, match=r"^params is traced"):  # the loss it returns
        jax.grad(loss)(a)
    # What runs under a jit still does: moments of two models, and a spec's permutation
    # scores (one jitted einsum: the check, once in a shared helper, refused them).
    moments = jax.jit(lambda b: merge.cross_statistics(c.model, a, b, batches))(a)
    assert rel_err(moments, merge.cross_statistics(c.model, a, a, batches)) <= 1e-6
    scores = jax.jit(lambda b: match.permutation_scores(c.spec, a, b, ["residual"]))(a)
    eager = match.permutation_scores(c.spec, a, a, ["residual"])
    assert rel_err(scores, eager) <= 1e-6


def test_interpolate_is_the_weighted_sum_in_one_program(key):
    """``(1 - λ) A + λ B`` leaf by leaf in A's dtypes; λ is traced, so every point reuses one
    program. float32 arithmetic of the same two products and sum: equal to the last bit, also
    far outside [0, 1] (`average`'s program with weights 1 - λ and λ divides by their sum,
    which float32 rounds off 1 beyond 2^24); at λ = 1/2 the average of the two to the last
    bit (halves summed, or the sum halved: exact scalings)."""
    ka, kb = jax.random.split(key)
    a = {"w": jax.random.normal(ka, (3, 4)), "b": {"h": jnp.ones(2, jnp.bfloat16)}}
    b = {"w": jax.random.normal(kb, (3, 4)), "b": {"h": jnp.zeros(2, jnp.bfloat16)}}
    from rotjax.merge import _curve

    mid, avg = merge.interpolate(a, b, 0.5), merge.average([a, b])
    jax.tree.map(np.testing.assert_array_equal, mid, avg)
    programs = _curve._mix._cache_size()
    for lam in (0.0, 0.3, 1.0, -5e-4, 2.0**25 + 2):
        got = merge.interpolate(a, b, lam)
        np.testing.assert_array_equal(got["w"], (1 - np.float32(lam)) * a["w"] + lam * b["w"])
        assert got["b"]["h"].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(got["b"]["h"]), 1 - lam, rtol=1e-2)
    assert _curve._mix._cache_size() - programs <= 1  # the points: one program
    with pytest.raises(ValueError, match=r"has other params than"):
        merge.interpolate(a, {"w": b["w"]}, 0.5)
    # λ NaN made every param NaN; λ of shape (1,) turned a scalar leaf into shape (1,)
    for lam in (np.nan, np.inf, np.array([0.5]), 0.5j):
        with pytest.raises(ValueError, match="lam must be a finite real scalar"):
            merge.interpolate(a, b, lam)
    traced = jax.jit(lambda t: merge.interpolate(a, b, t)["w"])(0.3)  # a traced λ is taken
    np.testing.assert_allclose(traced, merge.interpolate(a, b, 0.3)["w"], rtol=1e-6)


def test_merge_coefficients_may_be_traced_learned_and_swept(key):
    """`average`'s weights and the task-vector merges' scale may be traced: under `jax.jit` the
    same merge as with numbers (one program for every value), `jax.grad` the exact derivative,
    `jax.vmap` a merge per row. Merges that check their weights on the host refuse traced
    ones by a TypeError naming what takes them (it was JAX's TracerArrayConversionError).
    Tolerances: float32 sums of unit entries in another order (numbers are normalised to sum
    1 in float64 first, traced weights divided by their sum in float32): a few ulp of the
    largest, so 1e-6 of it (1.7e-8 seen), 1e-5 for the derivatives' differences of sums."""
    ks = jax.random.split(key, 3)
    base, a, b = ({"w": jax.random.normal(k, (3, 4)), "n": jnp.arange(2)} for k in ks)
    w = jnp.array([0.3, 0.9])
    step = jax.jit(lambda w: merge.average([a, b], w))
    assert rel_err(step(w)["w"], merge.average([a, b], [0.3, 0.9])["w"]) <= 1e-6
    np.testing.assert_array_equal(step(w)["n"], a["n"])  # integer leaves kept
    programs = step._cache_size()
    step(jnp.array([2.0, 0.5]))
    assert step._cache_size() == programs  # a new λ, the same program
    # d/dw_j Σ (Σ_i w_i θ_i / Σ_i w_i) = (Σ θ_j - Σ θ) / Σ_i w_i, θ the merge (float64 here);
    # a difference of float32 sums: within 1e-5 of the sums' entries' magnitudes
    grad = jax.grad(lambda w: jnp.sum(merge.average([a, b], w)["w"]))(w)
    xs, lam = [np.asarray(x["w"], np.float64) for x in (a, b)], np.asarray(w, np.float64)
    total = np.sum(lam[0] * xs[0] + lam[1] * xs[1]) / lam.sum()
    want = [(np.sum(x) - total) / lam.sum() for x in xs]
    np.testing.assert_allclose(grad, want, atol=1e-5 * sum(np.abs(x).sum() for x in xs))
    rows = jnp.array([[1.0, 0.0], [0.25, 0.75]])
    swept = jax.vmap(lambda w: merge.average([a, b], w)["w"])(rows)
    for row, got in zip(rows, swept, strict=True):
        assert rel_err(got, merge.average([a, b], list(map(float, row)))["w"]) <= 1e-6
    with pytest.raises(ValueError, match=r"weights must be 2 numbers, got shape \(3,\)"):
        jax.jit(lambda w: merge.average([a, b], w))(jnp.ones(3))
    # λ of task arithmetic: d/dλ Σ (θ_base + λ Σ_i τ_i) = Σ_i Σ τ_i
    taus = [np.asarray(x["w"], np.float64) - np.asarray(base["w"], np.float64) for x in (a, b)]
    got = jax.grad(lambda s: jnp.sum(merge.task_arithmetic(base, [a, b], scale=s)["w"]))(0.5)
    np.testing.assert_allclose(got, sum(map(np.sum, taus)), atol=1e-5 * np.abs(taus).sum())
    for how in (merge.task_arithmetic, merge.ties):
        jitted = jax.jit(lambda s, how=how: how(base, [a, b], scale=s)["w"])(0.7)
        assert rel_err(jitted, how(base, [a, b], scale=0.7)["w"]) <= 1e-6
    stats = [{"fisher": jax.tree.map(jnp.ones_like, a)}] * 2
    with pytest.raises(TypeError, match=r"only merge\.average takes traced weights"):
        jax.jit(lambda w: merge.fisher([a, b], stats, weights=w))(w)
    # Other options are Python numbers, refused by name when traced (a TracerBoolConversionError
    # came from their range checks; under grad RegMean's α passed them, its derivative NaN
    # on rank-deficient Grams)
    grams = [{"gram": {"w": jnp.eye(3)}}] * 2
    options = {
        "alpha": lambda v: merge.regmean([a, b], grams, alpha=v),
        "ridge": lambda v: merge.regmean([a, b], grams, ridge=v),
        "eps": lambda v: merge.fisher([a, b], stats, eps=v),
        "density": lambda v: merge.ties(base, [a, b], density=v),
        "drop": lambda v: merge.dare(base, [a, b], key=key, drop=v),
    }
    for name, call in options.items():
        for transform in (jax.jit, jax.grad):
            with pytest.raises(TypeError, match=rf"^{name} is traced"):
                transform(lambda v, call=call: jnp.sum(call(v)["w"]))(0.5)


def test_batches_given_in_the_wrong_layout_are_named(key):
    """One batch where the batches go, or a batch without the model's inputs, says so: a
    dict gave AttributeError 'str' has no 'shape', a tuple a misleading shape error, a
    misspelled name a bare KeyError."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    params = c.init(key, 0.3)
    ids, mask = inputs(config, key, batch=2)
    for one, got in (
        ({"input_ids": ids, "attention_mask": mask}, "a str"),
        ((ids, mask), "one array"),
    ):
        with pytest.raises(TypeError, match=rf"a batch is {got}.*wrap it in a list"):
            merge.statistics(c.model, params, one, kinds="gram")
    with pytest.raises(
        ValueError, match=r"a batch lacks 'input_ids' \(it has \['attention_mask', 'input_id'\]\)"
    ):
        merge.statistics(c.model, params, [{"input_id": ids, "attention_mask": mask}])
    assert merge.statistics(c.model, params, [(ids, mask)], kinds="gram")["gram"]


def test_dict_batches_keep_every_input_in_its_place(key):
    """A batch without an attention mask: its token types must not slide into the mask."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    params = c.init(key, 0.3)
    ids, _ = inputs(config, key, batch=4)
    types = jnp.zeros_like(ids).at[:, 3:].set(1)
    named = merge.statistics(c.model, params, [{"input_ids": ids, "token_type_ids": types}])
    positional = merge.statistics(c.model, params, [(ids, None, types)])
    assert rel_err(named, positional) == 0
    assert float(named["tokens"]["encoder/layer_0/attention/query/kernel"]) == ids.size


# ---------------------------------------------------------------------------------------------
# Your own model: a config class naming its Family runs every function that runs a model.


@dataclasses.dataclass(frozen=True)
class _OwnConfig:
    vocab: int = 20
    hidden: int = 8
    heads: int = 2
    ffn: int = 12
    num_labels: int = 3


class _Own(flax.linen.Module):
    """A pre-LN block in plain Linen, its own names: embedding, attention, MLP, a head."""

    config: _OwnConfig

    @flax.linen.compact
    def __call__(self, ids):
        c, nn = self.config, flax.linen
        x = nn.Embed(c.vocab, c.hidden, name="tok")(ids)
        h = nn.LayerNorm(name="ln")(x)
        q, k, v = (nn.DenseGeneral((c.heads, c.hidden // c.heads), name=n)(h) for n in "qkv")
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        x = x + nn.DenseGeneral(c.hidden, axis=(-2, -1), name="o")(
            jnp.einsum("bhqk,bkhd->bqhd", a, v)
        )
        x = x + nn.Dense(c.hidden, name="down")(nn.gelu(nn.Dense(c.ffn, name="up")(x)))
        return nn.Dense(c.num_labels, name="head")(x.mean(1))


def _own_spec(c):
    return sym.Spec.combine(
        sym.permutation("stream", c.hidden),
        sym.embedding("tok", c.vocab, c.hidden, "stream"),
        sym.layer_norm("ln", c.hidden, "stream"),
        sym.attention(
            "", hidden_size=c.hidden, num_heads=c.heads, head_dim=c.hidden // c.heads,
            stream="stream", names=("q", "k", "v", "o"),
        ),
        sym.mlp(
            "", hidden_size=c.hidden, intermediate_size=c.ffn, stream="stream",
            names=("up", "down"),
        ),
        sym.dense("head", c.hidden, c.num_labels, in_group="stream"),
    )  # fmt: skip


_OwnConfig.rotjax_family = Family(
    name="own",
    Config=_OwnConfig,
    Model=_Own,
    symmetry_spec=_own_spec,
    example_inputs=lambda c, batch_size=1: (jnp.zeros((batch_size, 4), jnp.int32),),
    batch_inputs=lambda batch: (batch["input_ids"],),
    token_mask=lambda inputs: None,
    input_names=("input_ids",),
    model_types=(),
    pre_norm=False,  # (may be given, as before it followed from stream_spec)
)


def test_own_model_runs_statistics_regmean_and_refit(key):
    """A model of no registered family, whose config names its Family: aligned, a moved copy
    merges back into it by RegMean on its statistics and by refit (it failed in Flax, "no
    attribute config"); a module without a config, or naming no family, is refused so."""
    c = _OwnConfig()
    model, spec = _Own(c), _own_spec(c)
    ids = jax.random.randint(key, (6, 5), 0, c.vocab)
    a = model.init(key, ids)["params"]
    out = lambda p: model.apply({"params": p}, ids)
    moved = sym.apply(spec, a, sym.sample(spec, jax.random.fold_in(key, 1)))
    aligned = match.align(spec, a, moved, solve=match.ALL).params
    batches = [(ids,), {"input_ids": ids}]
    stats = [merge.statistics(model, p, batches) for p in (a, aligned)]
    assert len(stats[0]["gram"]) == 7  # q, k, v, o, up, down, head
    assert rel_err(out(merge.regmean([a, aligned], stats)), out(a)) <= 1e-5
    # refit from a start whose dense layers are off: their outputs fitted, A's function back
    start = {**a, "up": {**a["up"], "kernel": 0.5 * a["up"]["kernel"]}, "head": a["o"]}
    start["head"] = {"kernel": -a["head"]["kernel"], "bias": a["head"]["bias"]}
    assert rel_err(out(start), out(a)) > 0.5
    # (1e-2: the ridge's pull towards the start, fitted on 30 tokens; 2e-3 was seen)
    assert rel_err(out(merge.refit(model, start, [a, aligned], batches)), out(a)) <= 1e-2
    with pytest.raises(TypeError, match="_Bare has no config: functions that run a model"):
        merge.statistics(_Bare(), a, batches)
    with pytest.raises(TypeError, match=r"not a rotjax model config: dict .*rotjax_family"):
        merge.refit(_Own({}), a, [a], batches)
    sub = dataclasses.make_dataclass("Sub", [], bases=(_OwnConfig,), frozen=True)
    with pytest.raises(TypeError, match=r"Sub.rotjax_family is not the Family of Sub \(its Co"):
        merge.statistics(_Own(sub()), a, batches)  # (it said to name one, as its parent did)


class _Bare(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, ids):
        return ids


def test_bad_inputs_are_named(key):
    """Mistakes found by a review, each refused naming what is wrong (they were Flax's scope
    errors, a bare KeyError 'count', a misspelled kind returned untransformed, "'float' object
    is not iterable", numpy's isfinite error, NaN scales)."""
    config = CONFIGS["bert-h3d4-l2"]
    c = compiled(config)
    a = c.init(key, 0.3)
    x = inputs(config, key, batch=2)
    path = "encoder/layer_0/ffn/intermediate/kernel"
    bad = from_dict({**to_dict(a), path: jnp.zeros((12, 21))})
    shape = rf"params: params do not match .*\n  wrong shape: +{path}  params \(12, 21\)"
    with pytest.raises(ValueError, match=shape):
        merge.statistics(c.model, bad, [x])
    with pytest.raises(ValueError, match=rf"params_b: params do not match .*\n.*{path}"):
        merge.cross_statistics(c.model, a, bad, [x])
    with pytest.raises(ValueError, match=rf"params_list\[1\]: params do not match .*\n.*{path}"):
        merge.prediction_loss(c.model, [a, bad], [x])
    cross = {"residual": {"count": jnp.ones(())}}
    with pytest.raises(
        ValueError, match=r"residual: not cross_statistics' moments \(lacks \['cov'"
    ):
        merge.ot_fusion(c.spec, a, a, mode="acts", cross=cross)
    with pytest.raises(ValueError, match=r"unknown statistics \['grams'\]: kinds are"):
        merge.transform_statistics(c.spec, {"grams": {}}, sym.identity(c.spec))
    with pytest.raises(TypeError, match=r"evaluate must return a mapping of metric names"):
        merge.curve(lambda p: 1.0, a, a, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"lam must be a finite real scalar, got '0\.5'"):
        merge.interpolate(a, a, "0.5")
    for std in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="log_scale_std must be a finite number >= 0"):
            sym.sample(c.spec, key, log_scale_std=std)
    # A later model's complex or integer leaf: it was averaged into the first's dtype (the
    # imaginary part dropped), or decided the result's, by the models' order
    flat = to_dict(a)
    for odd in (flat[path].astype(jnp.complex64), flat[path].astype(jnp.int32)):
        other = from_dict({**flat, path: odd})
        with pytest.raises(ValueError, match=rf"differ in kind .*\n  {path}: model 0 floating"):
            merge.average([a, other])
    with pytest.raises(TypeError, match=r"params_list must be a list or tuple .* a generator"):
        match.align_many(c.spec, (p for p in [a, a]))
