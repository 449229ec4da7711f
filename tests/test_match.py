"""Matching: planted recovery, oracles (scipy), monotone coordinate descent, bad inputs.

Tolerances: planted recovery is exact up to float32 rounding of one rotation and one rescale
per head (relative error ~1e-7; we allow 1e-5, as for function preservation). Oracle objective
values are compared at 1e-4 relative: float32 SVD / assignment sums against float64 scipy.
"""

import contextlib
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
from conftest import rel_err
from helpers import CONFIGS, DEBERTA_CONFIGS, LLAMA_CONFIGS, compiled, inputs, logits, scanned

from rotjax import match
from rotjax import symmetry as sym
from rotjax.match import _solvers
from rotjax.models import bert
from rotjax.tree import from_dict, to_dict

TOL = 1e-5
SOLVES = {
    "rotation": ("rotation",),
    "rotation+scale": ("rotation", "scale"),
    "scale": ("scale",),
    "ffn": ("ffn",),
    "heads": ("heads", "rotation", "scale"),
    "residual": ("residual",),
    "all": match.ALL,
}
TINY = {
    **CONFIGS,
    # head_dim 1, 1 layer
    "bert-h3d1-l1": bert.Config(
        vocab_size=20,
        hidden_size=3,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=5,
        max_position_embeddings=8,
        num_labels=2,
    ),
}


def planted(name, scan, solve, key, noise=0.0):
    config = scanned(TINY[name], scan)
    c = compiled(config)
    k1, k2, k3 = jax.random.split(key, 3)
    a = c.init(k1, 0.3)
    roles = {r for s in solve for r in match.BLOCKS[s]}
    full = sym.sample(c.spec, k2)
    g = {n: full[n] for n in c.spec.select(roles=roles)}
    b = c.apply(a, g)
    if noise:
        leaves, treedef = jax.tree.flatten(b)
        ks = jax.random.split(k3, len(leaves))
        noisy = [
            x + noise * jax.random.normal(k, x.shape) for k, x in zip(ks, leaves, strict=False)
        ]
        b = jax.tree.unflatten(treedef, noisy)
    return config, c, a, b, g


@pytest.mark.parametrize("solve", list(SOLVES))
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", ["bert-h3d4-l2", "vit-h3d4-l2", "deberta-v3-h3d5-l2-seq"])
def test_planted_recovery(name, scan, solve, key):
    config, c, a, b, g = planted(name, scan, SOLVES[solve], key)
    res = match.align(c.spec, a, b, solve=SOLVES[solve], key=jax.random.fold_in(key, 9))
    assert rel_err(res.params, a) <= TOL
    ginv = sym.invert(c.spec, g)
    for n in g:
        if c.spec.groups[n].kind == "perm":
            np.testing.assert_array_equal(res.transform[n], ginv[n], err_msg=n)
    x = inputs(config, jax.random.fold_in(key, 3))
    assert rel_err(logits(c.model, res.params, x), logits(c.model, b, x)) <= TOL
    d = res.diagnostics
    assert d.touched_after <= 1e-8 * d.touched_before
    assert rel_err(res.params, c.apply(b, res.transform)) <= 1e-6
    # Distances over all params: the untouched ones are equal in A and B (planted, no noise).
    assert d.distance_before == pytest.approx(d.touched_before, rel=1e-6)
    assert d.distance_after == pytest.approx(sum(after for _, after in d.params.values()))


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_planted_recovery_rope_decoders(name, scan, key):
    """Grouped-query attention, RoPE pair rotations, SwiGLU: every block recovers its planted
    element (key-value head permutations exactly)."""
    config, c, a, b, g = planted(name, scan, match.ALL, key)
    res = match.align(c.spec, a, b, solve=match.ALL, key=jax.random.fold_in(key, 9))
    assert rel_err(res.params, a) <= TOL
    sym.check_elements(c.spec, res.transform)
    ginv = sym.invert(c.spec, g)
    for n in c.spec.select(roles=["heads", "query_heads", "ffn"]):
        np.testing.assert_array_equal(res.transform[n], ginv[n], err_msg=n)
    x = inputs(config, jax.random.fold_in(key, 3))
    assert rel_err(logits(c.model, res.params, x), logits(c.model, b, x)) <= TOL


@pytest.mark.parametrize("solve", ["query_heads", "attention"])
@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_planted_query_heads_are_recovered(name, solve, key):
    """B = A with its query heads permuted inside each key-value group, alone or with the key-
    value heads, rotations and scales (no residual: the query heads and the attention block are
    swept by coordinate descent on their own): the permutations come back exactly."""
    solve = {"query_heads": (), "attention": ("heads", "rotation", "scale")}[solve]
    solve = ("query_heads", *solve)
    config, c, a, _, g = planted(name, name.startswith("llama"), solve, key)
    names = c.spec.select(roles=["query_heads"])
    assert names
    for n in names:  # a random order may be the identity: roll those, so that every one moves
        ident = sym.identity_element(c.spec.groups[n])
        same = jnp.all(g[n] == ident, axis=-1, keepdims=True)
        g[n] = jnp.where(same, jnp.roll(g[n], 1, axis=-1), g[n])
    b = c.apply(a, g)
    res = match.align(c.spec, a, b, solve=solve)
    assert rel_err(res.params, a) <= TOL
    ginv = sym.invert(c.spec, g)
    for n in c.spec.select(roles=["heads", "query_heads"]):
        np.testing.assert_array_equal(res.transform[n], ginv[n], err_msg=n)
    x = inputs(config, jax.random.fold_in(key, 3))
    assert rel_err(logits(c.model, res.params, x), logits(c.model, b, x)) <= TOL


def test_query_orders_move_with_their_key_value_heads(key):
    """The attention block carries each of B's key-value heads' query-head order along when it
    permutes the heads: started from those orders attached to B's own heads (key-value heads at
    the identity, swapped in the planted element), solving the heads, rotations and scales
    alone recovers the planted element exactly."""
    solve = ("heads", "query_heads", "rotation", "scale")
    config, c, a, _, g = planted("llama-k2g2d6-l2-seq", True, solve, key)
    (h,), (q,) = c.spec.select(roles=["heads"]), c.spec.select(roles=["query_heads"])
    g[h] = jnp.roll(sym.identity_element(c.spec.groups[h]), 1, axis=-1)  # K = 2: a swap
    b = c.apply(a, g)
    ginv = sym.invert(c.spec, g)
    # At position j, the order of B's head j (the inverse's orders follow its head permutation).
    start = jnp.take_along_axis(ginv[q], jnp.argsort(ginv[h], axis=-1)[..., None], axis=-2)
    res = match.align(c.spec, a, b, solve=solve[:1] + solve[2:], init={q: start})
    for n in (h, q):
        np.testing.assert_array_equal(res.transform[n], ginv[n], err_msg=n)
    assert rel_err(res.params, a) <= TOL


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_query_head_assignment_matches_brute_force(name, key):
    """The query-head block on two unrelated models, every other group fixed at a random
    element (``init``): its objective equals the least over all (G!)^(layers x K) choices of
    the per-group permutations, evaluated with `sym.apply` (compared as objective values; the
    optimum need not be unique)."""
    config = scanned(TINY[name], name.startswith("llama"))
    c = compiled(config)
    a, b = c.init(jax.random.fold_in(key, 1), 0.3), c.init(jax.random.fold_in(key, 2), 0.3)
    names = c.spec.select(roles=["query_heads"])
    full = sym.sample(c.spec, jax.random.fold_in(key, 3))
    init = {n: x for n, x in full.items() if n not in names}
    res = match.align(c.spec, a, b, solve="query_heads", init=init)
    assert res.diagnostics.history[-1][0] == "query_heads"

    def objective(t):
        moved = c.apply(b, {**init, **t})
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(moved), strict=True)
        return sum(float(jnp.sum((x - y) ** 2)) for x, y in pairs)

    # Every head of every layer (and group) takes one of the G! orders, independently.
    slots = [(n, idx) for n in names for idx in np.ndindex(c.spec.groups[n].shape[:-1])]
    G = c.spec.groups[names[0]].dim
    best = np.inf
    for choice in itertools.product(itertools.permutations(range(G)), repeat=len(slots)):
        t = {n: np.zeros(c.spec.groups[n].shape, np.int32) for n in names}
        for (n, idx), sigma in zip(slots, choice, strict=True):
            t[n][idx] = sigma
        best = min(best, objective(t))
    got = objective({n: res.transform[n] for n in names})
    assert got == pytest.approx(best, rel=1e-5)
    assert res.diagnostics.distance_after == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", list(DEBERTA_CONFIGS))
def test_planted_recovery_deberta(name, scan, key):
    """Disentangled attention (shared or separate position projections, relative embeddings
    in the stream's basis): every block recovers its planted element, permutations exactly."""
    config, c, a, b, g = planted(name, scan, match.ALL, key)
    res = match.align(c.spec, a, b, solve=match.ALL, key=jax.random.fold_in(key, 9))
    assert rel_err(res.params, a) <= TOL
    sym.check_elements(c.spec, res.transform)
    ginv = sym.invert(c.spec, g)
    for n in c.spec.select(roles=["residual", "heads", "ffn"]):
        np.testing.assert_array_equal(res.transform[n], ginv[n], err_msg=n)
    x = inputs(config, jax.random.fold_in(key, 3))
    assert rel_err(logits(c.model, res.params, x), logits(c.model, b, x)) <= TOL


@pytest.mark.parametrize("name", ["bert-h3d1-l1", "bert-h5d2-l1-token", "roberta-h1d6-l2"])
def test_planted_recovery_odd_shapes(name, key):
    _, c, a, b, _ = planted(name, True, match.ALL, key)
    res = match.align(c.spec, a, b, solve=match.ALL)
    assert rel_err(res.params, a) <= TOL


def test_planted_recovery_with_stacked_and_per_layer_groups_mixed(key):
    # A per-layer block of layer 2 whose groups sort before a stacked block of 3 layers: the
    # stacked block's layers must still come back in their order.
    dims = dict(hidden_size=4, num_heads=2, head_dim=3, stream=None)
    spec = sym.Spec.combine(
        sym.attention("a", layer=2, **dims), sym.attention("b", batch=(3,), **dims)
    )
    a = {}
    for i, (path, p) in enumerate(spec.param_items):
        prefix, *rest = path.split("/")
        a.setdefault(prefix, {}).setdefault(rest[0], {})[rest[1]] = jax.random.normal(
            jax.random.fold_in(key, i), p.shape
        )
    g = sym.sample(spec, jax.random.fold_in(key, 99))
    solve = ("rotation", "scale")
    solved = spec.select(roles={r for s in solve for r in match.BLOCKS[s]})
    b = sym.apply(spec, a, {n: g[n] for n in solved})
    res = match.align(spec, a, b, solve=solve)
    assert rel_err(res.params, a) <= TOL
    assert res.diagnostics.touched_after <= 1e-8 * res.diagnostics.touched_before


@pytest.mark.parametrize("solve", ["rotation+scale", "all"])
def test_noisy_copy_gets_closer_and_descent_is_monotone(solve, key):
    config, c, a, b, _ = planted("bert-h3d4-l2", False, SOLVES[solve], key, noise=0.05)
    res = match.align(c.spec, a, b, solve=SOLVES[solve], key=key)
    d = res.diagnostics
    assert d.touched_after < 0.5 * d.touched_before
    objectives = [v for _, v in d.history]
    assert all(y <= x * (1 + 1e-6) for x, y in itertools.pairwise(objectives)), d.history
    # The noise lands on every param: the distance over all of them stays above the touched
    # part's, by exactly the untouched params' (constant) distance.
    untouched = sum(before for p, (before, after) in d.params.items() if before == after)
    assert d.distance_after == pytest.approx(d.touched_after + untouched, rel=1e-5)
    # Every solved block moved its groups' params closer, except the stream permutation (which
    # trades its own params' distance for the other groups').
    solved_roles = {r for s in SOLVES[solve] for r in match.BLOCKS[s]}
    checked = [g for g in d.groups if c.spec.groups[g].role in solved_roles - {"residual"}]
    assert checked
    for group in checked:
        before, after = d.groups[group]
        assert after <= before * (1 + 1e-6) + 1e-6, group
    x = inputs(config, key)
    assert rel_err(logits(c.model, res.params, x), logits(c.model, b, x)) <= TOL


@pytest.mark.parametrize("residual_init", ["independent", "identity"])
def test_independent_models_monotone_descent(residual_init, key):
    c = compiled(CONFIGS["vit-h3d4-l2"])
    a, b = c.init(key, 0.3), c.init(jax.random.fold_in(key, 1), 0.3)
    res = match.align(c.spec, a, b, solve=match.ALL, residual_init=residual_init, key=key)
    # The 'independent' start (the stream permutation from the terms no other group touches)
    # is a start, not a descent step: it may raise J over the identity (by 0.24% on
    # ROTJAX_SEED=393997706). From the start on, J never increases.
    history = res.diagnostics.history
    if history[1][0] == "residual_init":
        history = history[1:]
    objectives = [v for _, v in history]
    assert all(y <= x * (1 + 1e-6) for x, y in itertools.pairwise(objectives))
    assert res.diagnostics.distance_after < res.diagnostics.distance_before
    x = inputs(c.model.config, key)
    assert rel_err(logits(c.model, res.params, x), logits(c.model, b, x)) <= TOL


def test_residual_init_escapes_the_identity_fixed_point(key):
    """With the per-layer groups fitted first, the identity is a fixed point of the stream
    update; the 'independent' start finds the planted stream permutation, the identity start
    keeps it only if the descent alone can escape."""
    _, c, a, b, g = planted("vit-h3d4-l2", False, match.ALL, key)
    res = match.align(c.spec, a, b, solve=match.ALL, residual_init="independent")
    np.testing.assert_array_equal(res.transform["residual"], jnp.argsort(g["residual"]))
    assert res.diagnostics.history[1][0] == "residual_init"


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_layer_subset(scan, key):
    _, c, a, b, _ = planted("bert-h3d4-l2", scan, match.PAPER, key)
    res = match.align(c.spec, a, b, layers=[1])
    ident = sym.identity(c.spec)
    for n in c.spec.select(roles=["qk_rotation", "ffn"]):
        if not n.startswith("encoder/"):  # the pooler is no layer's: always solved
            continue
        t, i = np.asarray(res.transform[n]), np.asarray(ident[n])
        if scan:
            np.testing.assert_array_equal(t[0], i[0])
            assert not np.allclose(t[1], i[1])
        elif c.spec.groups[n].layer == 0:
            np.testing.assert_array_equal(t, i)
        else:
            assert not np.allclose(t, i)
    layer1 = "encoder/layers" if scan else "encoder/layer_1"
    path = f"{layer1}/attention/query/kernel"
    got = np.asarray(res.params["encoder"][layer1.split("/")[1]]["attention"]["query"]["kernel"])
    want = np.asarray(a["encoder"][layer1.split("/")[1]]["attention"]["query"]["kernel"])
    assert rel_err(got[1] if scan else got, want[1] if scan else want) <= TOL, path


@contextlib.contextmanager
def compiles():
    """The names of the functions XLA compiles inside the block (JAX's public monitoring
    events; a hit in the on-disk cache still counts: it is a miss of the in-memory one)."""
    names = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_optax_solver_and_no_recompilation(key):
    _, c, a, b, g = planted("bert-h3d4-l2", True, ("ffn", "heads", "rotation"), key)
    res = match.align(c.spec, a, b, solve=("ffn", "heads", "rotation"), solver="optax")
    assert rel_err(res.params, a) <= TOL
    b2 = jax.tree.map(lambda x: x * 1.01, b)
    with compiles() as first:  # the listener sees compilations
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(5))
    assert first
    with compiles() as names:
        res2 = match.align(c.spec, a, b2, solve=("ffn", "heads", "rotation"), solver="optax")
        jax.block_until_ready(res2.params)
    assert names == [], names


def test_align_many_picks_the_central_model(key):
    c = compiled(CONFIGS["vit-h3d4-l2"])
    base = c.init(key, 0.3)
    noisy = [
        jax.tree.map(
            lambda x, i=i, eps=eps: (
                x + eps * jax.random.normal(jax.random.fold_in(key, i), x.shape)
            ),
            base,
        )
        for i, eps in enumerate([0.3, 0.01, 0.2])
    ]
    anchor, results = match.align_many(c.spec, noisy)
    assert anchor == 1  # the least noisy model is the closest to the average
    for size in (1e25, 1e-25):  # squared distances overflow (underflow) float32 unscaled
        scaled = [jax.tree.map(lambda x, s=size: x * s, t) for t in noisy]
        assert match.align_many(c.spec, scaled, max_sweeps=1)[0] == 1, size
    assert results[1].diagnostics.distance_before == 0.0
    # The paper code's measure, a sum of unsquared distances per param: deviations from the
    # mean of 3, 2, 1 (one param) and 0, 2.1, 2.1 (another) sum to 3, 4.1, 3.1 (model 0 is
    # nearest), their squares to 9, 8.41, 5.41 (model 2 was taken).
    flat = to_dict(base)
    (p1, x1), (p2, x2) = [(p, flat[p]) for p in sorted(flat) if flat[p].size > 1][:2]
    unit = lambda x, k: (u := jax.random.normal(k, x.shape)) / jnp.linalg.norm(u)
    u1, u2 = unit(x1, jax.random.fold_in(key, 7)), unit(x2, jax.random.fold_in(key, 8))
    devs = [(3.0, 0.0), (-2.0, 2.1), (-1.0, -2.1)]
    far = [from_dict({**flat, p1: x1 + d1 * u1, p2: x2 + d2 * u2}) for d1, d2 in devs]
    assert match.align_many(c.spec, far, solve="rotation", max_sweeps=1)[0] == 0
    # A start (init) moves the others, never the anchor (it moved the anchor away from itself).
    start = sym.sample(c.spec, jax.random.fold_in(key, 5))
    _, started = match.align_many(c.spec, noisy, anchor=1, init=start, max_sweeps=1)
    assert rel_err(started[1].params, noisy[1]) == 0.0
    # An index as align takes its integer options (numpy's, a 0-d array: they were refused),
    # returned as the int promised
    for anchor in (np.int64(1), np.array(1), jnp.asarray(1)):
        got = match.align_many(c.spec, noisy, anchor=anchor, max_sweeps=1)[0]
        assert got == 1 and type(got) is int
    with pytest.raises(ValueError, match=r"anchor must be an integer index or None"):
        match.align_many(c.spec, noisy, anchor=np.array([1]))

    # Scrambled copies of one model all come back onto the chosen anchor.
    copies = [c.apply(base, sym.sample(c.spec, jax.random.fold_in(key, 10 + i))) for i in range(3)]
    anchor, results = match.align_many(c.spec, copies, anchor=2, solve=match.ALL)
    assert anchor == 2
    for r in results:
        assert rel_err(r.params, copies[2]) <= TOL


def test_the_residual_start_is_kept_only_where_it_lowers_the_objective(key):
    """B with A's layers and other params where only the stream permutation acts (embeddings,
    norms, output biases, the classifier): the start from those terms alone was kept without
    an init, and the descent from it ended with a distance 3-4x the identity's."""
    c = compiled(CONFIGS["bert-h3d4-l2"])
    spec, a = c.spec, c.init(key, 0.3)
    (res,) = [n for n, g in spec.groups.items() if g.role == "residual"]
    others = {p for n in spec.groups if n != res for p, _ in spec.users[n]}
    only = {p for p, _ in spec.users[res]} - others
    fresh = to_dict(c.init(jax.random.fold_in(key, 1), 0.3))
    b = from_dict({p: fresh[p] if p in only else x for p, x in to_dict(a).items()})
    r = match.align(spec, a, b, solve=match.ALL)
    d = r.diagnostics
    assert d.distance_after <= d.distance_before * (1 + 1e-6), d.history
    assert all(y <= x * (1 + 1e-6) for (_, x), (_, y) in itertools.pairwise(d.history))


def test_bad_inputs_raise_before_any_work(key):
    c = compiled(CONFIGS["bert-h3d4-l2"])
    a = c.init(key, 0.3)
    other = compiled(dataclasses.replace(CONFIGS["bert-h3d4-l2"], num_attention_heads=4))
    with pytest.raises(ValueError, match=r"(?s)^params: params do not match.*attention/key/bias"):
        match.align(c.spec, a, other.init(key, 0.3))
    nan = jax.tree.map(lambda x: x, a)
    nan["classifier"]["bias"] = nan["classifier"]["bias"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"(?s)non-finite.*params: classifier/bias \(3,\)"):
        match.align(c.spec, a, nan)
    inf = jax.tree.map(lambda x: x, a)
    inf["pooler"]["bias"] = inf["pooler"]["bias"].at[1].set(-jnp.inf)
    with pytest.raises(ValueError, match=r"(?s)non-finite.*anchor_params: pooler/bias"):
        match.align(c.spec, inf, a)
    # Weight-matching scores alone are checked the same way: a misspelled group in the
    # transform was dropped, a group that is no permutation gave a meaningless matrix
    scores = functools.partial(match.permutation_scores, c.spec)
    ffn = "encoder/layer_0/ffn/units"
    assert scores(a, a, [ffn])[ffn].shape == c.spec.groups[ffn].shape * 2
    with pytest.raises(ValueError, match=r"(?s)^params: params do not match"):
        scores(a, other.init(key, 0.3), [ffn])
    with pytest.raises(ValueError, match=r"not permutation groups of the spec: \['nope'\]"):
        scores(a, a, ["nope"])
    qk = next(n for n, g in c.spec.groups.items() if g.kind not in ("perm", "hperm"))
    with pytest.raises(ValueError, match="not permutation groups"):
        scores(a, a, [qk])
    with pytest.raises(ValueError, match="not in the spec: \\['encoder/layer_0/mlp/unit'\\]"):
        scores(a, a, [ffn], {"encoder/layer_0/mlp/unit": jnp.arange(3)})
    # align_many's anchor is an index (1.0 failed later; True was taken as model 1)
    for anchor in (1.0, True, "1"):
        with pytest.raises(ValueError, match="anchor must be an integer index or None"):
            match.align_many(c.spec, [a, a], anchor=anchor)
    # Finite values whose sum overflows (the screen's false alarm) are not an error.
    big = jax.tree.map(lambda x: x, a)
    big["classifier"]["bias"] = jnp.full_like(big["classifier"]["bias"], 3e38)
    assert match.align(c.spec, big, big).diagnostics.distance_after < 1e-6
    half = jax.tree.map(lambda x: x, a)
    half["pooler"]["kernel"] = half["pooler"]["kernel"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="pooler/kernel: anchor_params float32 vs params bfloat16"):
        match.align(c.spec, a, half)
    with pytest.raises(ValueError, match=r"unknown blocks \['all'\]; .* match\.ALL"):
        match.align(c.spec, a, a, solve="all")
    # A post-norm BERT has no stream rotation: solving only it would solve nothing. A block
    # among others that the spec lacks is skipped (ALL names every block).
    with pytest.raises(ValueError, match=r"solve=\['stream'\]: the spec has no groups"):
        match.align(c.spec, a, a, solve="stream")
    d = match.align(c.spec, a, a, solve=("stream", "ffn")).diagnostics
    assert d.distance_after < 1e-6 and d.skipped == ("stream",)
    with pytest.raises(TypeError, match=r"unknown options \['solv'\]"):
        match.align_many(c.spec, [a, a], solv=("rotation",))
    with pytest.raises(ValueError, match=r"(?s)non-finite.*params_list\[1\]: classifier/bias"):
        match.align_many(c.spec, [a, nan])


def test_bfloat16_is_solved_in_float32_and_returned_in_bfloat16(key):
    _, c, a, b, _ = planted("bert-h3d4-l2", False, match.PAPER, key)
    a16, b16 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), t) for t in (a, b))
    res = match.align(c.spec, a16, b16)
    assert {x.dtype for x in jax.tree.leaves(res.params)} == {jnp.dtype(jnp.bfloat16)}
    # bfloat16 keeps 8 bits of mantissa: the planted copy comes back to ~1e-2.
    assert rel_err(res.params, a16) < 3e-2
    assert res.diagnostics.distance_after < 1e-3 * res.diagnostics.distance_before
    # what its transform does to B, rounded once as align rounds it (not after each group)
    again = to_dict(sym.apply(c.spec, b16, res.transform))
    jax.tree.map(np.testing.assert_array_equal, to_dict(res.params), again)


# ---------------------------------------------------------------------------------------------
# Solvers against oracles.


@pytest.mark.parametrize("d", [1, 2, 7, 64])
def test_procrustes_matches_scipy(d, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(3, 50, d)), rng.normal(size=(3, 50, d))
    m = np.einsum("nri,nrk->nik", b, a)
    r, nuc = jax.jit(match.procrustes)(jnp.asarray(m, jnp.float32))
    for i in range(3):
        oracle, _ = scipy.linalg.orthogonal_procrustes(b[i], a[i])
        want = np.linalg.norm(a[i] - b[i] @ oracle)
        got = np.linalg.norm(a[i] - b[i] @ np.asarray(r[i], np.float64))
        assert abs(got - want) <= 1e-4 * want
        np.testing.assert_allclose(nuc[i], np.trace(oracle.T @ m[i]), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(r[i]) @ np.asarray(r[i]).T, np.eye(d), atol=1e-5)
    rv, _ = jax.vmap(match.procrustes)(jnp.asarray(m[None], jnp.float32))
    np.testing.assert_allclose(rv[0], r, atol=1e-6)


@pytest.mark.parametrize("d", [2, 6, 64])
def test_pair_procrustes_matches_a_dense_angle_search(d, seed):
    """Over the pair rotations (one angle per pair (i, i + d/2)), the solver's maximum of
    tr(Rᵀ M) equals a dense search over each pair's angle (tr is a sum over pairs), and its R is
    such a rotation. Tolerance: the 2^16-point grid misses the optimum by ≤ (π/2^16)²/2 of it."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(4, d, d))
    m[0, [0, d // 2], :] = 0.0  # a pair with no signal: the identity
    r, best = jax.jit(match.pair_procrustes)(jnp.asarray(m, jnp.float32))
    h = d // 2
    theta = np.linspace(0, 2 * np.pi, 2**16, endpoint=False)
    u = np.diagonal(m[:, :h, :h], axis1=1, axis2=2) + np.diagonal(m[:, h:, h:], axis1=1, axis2=2)
    v = np.diagonal(m[:, :h, h:], axis1=1, axis2=2) - np.diagonal(m[:, h:, :h], axis1=1, axis2=2)
    oracle = (u[..., None] * np.cos(theta) + v[..., None] * np.sin(theta)).max(-1).sum(-1)
    np.testing.assert_allclose(best, oracle, rtol=1e-5)
    np.testing.assert_allclose(
        np.einsum("nik,nik->n", np.asarray(r, np.float64), m), best, rtol=1e-5
    )
    spec = sym.Spec.combine(sym.group("g", sym.Group("orth", 4, d, pairs=True)))
    sym.check_elements(spec, {"g": r[None].reshape(4, d, d)})
    np.testing.assert_array_equal(np.asarray(r[0])[[0, h]][:, [0, h]], np.eye(2))


def test_solvers_refuse_matrices_they_do_not_solve():
    """A 3 x 3 matrix got a 4 x 4 "pair rotation" back, others a broadcasting error."""
    for solve, shape, what in (
        (match.pair_procrustes, (3, 3), "even-sized square"),
        (match.pair_procrustes, (2, 4), "even-sized square"),
        (match.polar, (3, 4), "square"),
        (match.procrustes, (2, 3, 4), "square"),
        (match.assign, (3,), "square"),
    ):
        with pytest.raises(
            ValueError, match=rf"must be {what} matrices .* got shape \({shape[0]},"
        ):
            solve(np.zeros(shape, np.float32))


@pytest.mark.parametrize("d", [1, 3, 64])
def test_polar_newton_schulz_and_svd_fallback_match_scipy(d, seed):
    rng = np.random.default_rng(seed)
    u, v = (np.linalg.qr(rng.normal(size=(6, d, d)))[0] for _ in range(2))
    s = np.sort(rng.uniform(0.1, 1.0, size=(6, d)))[:, ::-1] * rng.uniform(0.1, 10, (6, 1))
    s[3, -1] = s[3, 0] * 1e-5  # κ = 1e5, beyond Newton-Schulz's reach: the SVD path (d > 1)
    s[4, :] = 0.0  # M = 0: every orthogonal R is optimal
    s[5, d // 2 :] = 0.0  # rank-deficient (for d > 1)
    m = np.einsum("nij,nj,nkj->nik", u, s, v)
    want = np.stack([scipy.linalg.polar(x)[0] for x in m])
    x, ok = jax.jit(_solvers._newton_schulz, static_argnums=1)(jnp.asarray(m, jnp.float32), 12)
    assert np.asarray(ok)[:3].all()  # well conditioned (κ <= 100): matmuls alone suffice
    np.testing.assert_allclose(np.asarray(x)[:3], want[:3], atol=1e-5)
    assert not np.asarray(ok)[4] and (d == 1 or not np.asarray(ok)[3])
    r = np.asarray(jax.jit(match.polar)(jnp.asarray(m, jnp.float32)), np.float64)
    np.testing.assert_allclose(
        r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(d), r.shape), atol=1e-5
    )
    np.testing.assert_allclose(r[:4], want[:4], atol=1e-5)
    # Every R is optimal where M is singular: the objective tr(Rᵀ M) equals the nuclear norm.
    np.testing.assert_allclose(np.einsum("nik,nik->n", r, m), s.sum(-1), rtol=1e-5, atol=1e-6)
    rv = jax.vmap(match.polar)(jnp.asarray(m, jnp.float32))  # batched cond/while under vmap
    np.testing.assert_allclose(rv, r, atol=1e-5)
    # Fewer Newton-Schulz steps leave more matrices to the SVD, never a worse answer
    for steps in (0, 2):
        few = np.asarray(match.polar(jnp.asarray(m[:4], jnp.float32), max_steps=steps))
        np.testing.assert_allclose(few, want[:4], atol=1e-5)
    # float64 (x64): orthogonal and scipy's to float64 rounding (it stopped at float32's, 1e-8)
    with jax.enable_x64(True):
        r64 = np.asarray(jax.jit(match.polar)(jnp.asarray(m[:3], jnp.float64)))
    assert r64.dtype == np.float64
    np.testing.assert_allclose(
        r64 @ np.swapaxes(r64, -1, -2), np.broadcast_to(np.eye(d), r64.shape), atol=1e-13
    )
    np.testing.assert_allclose(r64, want[:3], atol=1e-12)


def test_polar_takes_the_svd_only_for_the_matrices_that_need_it(seed):
    rng = np.random.default_rng(seed)
    polar = jax.jit(match.polar)
    for k in (1, 10, 11, 40):  # SVD batches of 10, 10, 40 and 40 of the 40 matrices
        m = rng.normal(size=(40, 8, 8)) + 6 * np.eye(8)  # well conditioned: Newton-Schulz
        bad = rng.choice(40, size=k, replace=False)
        m[bad, :, 4:] = 0.0  # rank 4: Newton-Schulz cannot orthogonalise these
        r = np.asarray(polar(jnp.asarray(m, jnp.float32)), np.float64)
        np.testing.assert_allclose(
            r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(8), r.shape), atol=1e-5
        )
        for i in np.setdiff1d(np.arange(40), bad):
            np.testing.assert_allclose(r[i], scipy.linalg.polar(m[i])[0], atol=1e-5)
        nuclear = np.linalg.svd(m, compute_uv=False).sum(-1)  # optimal where M is singular too
        np.testing.assert_allclose(np.einsum("nik,nik->n", r, m), nuclear, rtol=1e-5)
    # Batches of every shape: one matrix, fewer than two pieces' worth, odd, several axes.
    for shape in [(8, 8), (3, 8, 8), (5, 8, 8), (2, 5, 8, 8)]:
        m = rng.normal(size=shape) + 6 * np.eye(8)
        r = np.asarray(polar(jnp.asarray(m, jnp.float32)))
        want = np.stack([scipy.linalg.polar(x)[0] for x in m.reshape(-1, 8, 8)])
        np.testing.assert_allclose(r.reshape(-1, 8, 8), want, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 40])
@pytest.mark.parametrize("solver", match.SOLVERS)
def test_assignment_matches_scipy(n, solver, seed):
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(3, n, n)).astype(np.float32)
    if n == 5:  # a jax bfloat16 stack (the scipy path converts each matrix in its worker)
        score = np.asarray(jnp.asarray(score, jnp.bfloat16).astype(jnp.float32))
        perm = np.asarray(match.assign(jnp.asarray(score, jnp.bfloat16), solver=solver))
    else:
        perm = np.asarray(match.assign(score, solver=solver))
    assert perm.shape == (3, n) and perm.dtype == np.int32
    for i in range(3):
        np.testing.assert_array_equal(np.sort(perm[i]), np.arange(n))
        rows, cols = scipy.optimize.linear_sum_assignment(score[i], maximize=True)
        want = score[i][rows, cols].sum()
        assert abs(score[i][np.arange(n), perm[i]].sum() - want) <= 1e-4 * max(abs(want), 1)


def test_assignment_refuses_rectangular_and_says_which_solver_traces():
    """A rectangular score was solved as a partial assignment ([1 0 3 2] of 5 columns),
    silently; under jit the host solver raised JAX's TracerArrayConversionError."""
    with pytest.raises(ValueError, match=r"square matrices \(\.\.\., n, n\), got shape \(4, 5\)"):
        match.assign(np.zeros((4, 5)))
    with pytest.raises(TypeError, match="solver='optax' traces"):
        jax.jit(match.assign)(jnp.eye(3))
    perm = jax.jit(lambda m: match.assign(m, solver="optax"))(jnp.eye(3)[::-1])
    np.testing.assert_array_equal(perm, [2, 1, 0])


def test_best_scale_matches_dense_search_and_quartic_roots(seed):
    rng = np.random.default_rng(seed)
    c1, c2 = rng.uniform(0.01, 5, size=(2, 200))
    b1, b2 = rng.normal(size=(2, 200)) * 3
    got = np.asarray(jax.jit(match.best_scale)(c1, b1, b2, c2), np.float64)
    f = lambda a: match.scale_objective(a, c1, b1, b2, c2)
    grid = np.exp(np.linspace(np.log(1e-4), np.log(1e4), 400_001))[:, None]
    dense = np.min(np.asarray(match.scale_objective(grid, c1, b1, b2, c2)), axis=0)
    assert (np.asarray(f(got)) <= dense + 1e-4 * np.abs(dense) + 1e-6).all()
    for i in range(20):  # the least-objective positive real root of the quartic
        roots = np.roots([c1[i], -b1[i], 0.0, b2[i], -c2[i]])
        real = roots[(np.abs(roots.imag) < 1e-9) & (roots.real > 0)].real
        fi = lambda a, i=i: match.scale_objective(a, c1[i], b1[i], b2[i], c2[i])
        best = real[np.argmin([fi(r) for r in real])]
        np.testing.assert_allclose(got[i], best, rtol=1e-4)
    # vmap over a leading axis gives the same answer; nothing to fit keeps a = 1.
    stacked = (jnp.asarray(x, jnp.float32).reshape(2, 100) for x in (c1, b1, b2, c2))
    v = jax.vmap(match.best_scale)(*stacked)
    np.testing.assert_allclose(np.asarray(v).reshape(-1), got, rtol=1e-5)
    assert float(match.best_scale(0.0, 0.0, 0.0, 0.0)) == 1.0
    # Planted scales far from 1 (A_+ = a B_+, A_- = B_- / a): found, not clipped to [1e-6,
    # 1e6] as before (a scale step could then raise the objective above its start).
    for a in (1e-9, 1e-7, 1e-3, 1.0, 1e3, 1e7, 1e9):
        n_plus, n_minus = rng.uniform(0.5, 2.0, size=2)
        got = float(match.best_scale(n_plus, a * n_plus, n_minus / a, n_minus))
        assert got == pytest.approx(a, rel=1e-5), a
    # Two minima in one grid cell: q = (a - 1)(a - 2)(a - 3)(a + 11/6) has minima at 1 (f =
    # -24.67) and 3 (-24.22); a 2-point grid brackets both, its bisection finds 3. The scale
    # in place, when better, is kept; a worse one is not.
    quartic = (1.0, 25 / 6, 85 / 6, 11.0)  # c1, b1, b2, c2
    assert float(match.best_scale(*quartic, grid=2)) == pytest.approx(3.0, rel=1e-5)
    assert float(match.best_scale(*quartic, grid=2, current=1.0)) == 1.0
    assert float(match.best_scale(*quartic, grid=2, current=3.5)) == pytest.approx(3.0, rel=1e-5)
    assert float(match.best_scale(*quartic, current=3.0)) == pytest.approx(1.0, rel=1e-5)
    # Planted scales within sqrt(eps) of the scale in place: found to float32's rounding (f's
    # own values tie there, and kept the scale in place for 17% of these, up to 3e-4 off).
    a = 1 + rng.uniform(-3e-4, 3e-4, 2000)
    n_plus, n_minus = rng.uniform(0.5, 2.0, (2, 2000)) * rng.uniform(1, 100, 2000)
    near = (jnp.asarray(x, jnp.float32) for x in (n_plus, a * n_plus, n_minus / a, n_minus))
    np.testing.assert_allclose(match.best_scale(*near, current=1.0), a, rtol=1e-6)


def test_options_fail_before_any_work(key):
    c = compiled(CONFIGS["bert-h3d4-l2"])  # 2 layers
    a = c.init(key, 0.3)
    qk = c.spec.select(roles=["qk_rotation"])[0]
    bad = {
        "solver": (dict(solve=("rotation",), solver="hungarian"), "solver must be one of"),
        "layer 5": (dict(layers=[5]), r"layers=\[5\]: \[5\] out of range \(the model has layers"),
        "negative": (dict(layers=[-1, 0]), r"\[-1\] out of range"),
        "not ints": (dict(layers=["a"]), "layers must be integers"),
        "sweeps": (dict(max_sweeps=-3), "max_sweeps must be None or an int >= 1"),
        "tol": (dict(tol=float("nan")), "tol must be finite"),
        "tol str": (dict(tol="x"), "tol must be finite"),
        "init": (dict(init={"nope": jnp.zeros(3)}), r"init: .*not in the spec: \['nope'\]"),
        "init element": (dict(init={qk: 2 * sym.identity(c.spec)[qk]}), rf"init: .*{qk}.*orth"),
        "key": (dict(key=0), "key must be a jax.random.key"),  # raised after a whole sweep
    }
    for options, message in bad.values():
        with pytest.raises(ValueError, match=message):
            match.align(c.spec, a, a, **options)
        with pytest.raises(ValueError, match=message):
            match.align_many(c.spec, [a, a], **options)
    # Work never started: the params were never even checked (here they do not fit).
    with pytest.raises(ValueError, match="solver"):
        match.align(c.spec, {"not": "params"}, a, solver="lapjv")
    # No layer and only per-layer groups (stacked or not) solve nothing: B came back unmoved.
    b = sym.apply(c.spec, a, sym.sample(c.spec, key))
    st = compiled(scanned(CONFIGS["bert-h3d4-l2"]))
    for spec, x in ((c.spec, a), (st.spec, st.init(key, 0.3))):
        with pytest.raises(ValueError, match=r"layers=\[\] with solve=\['rotation'\] solves no"):
            match.align(spec, x, x, solve="rotation", layers=[])
    init = {n: x for n, x in sym.sample(c.spec, key).items() if n in c.spec.select(layers=0)}
    moved = match.align(c.spec, a, b, solve="rotation", layers=[], init=init)  # init alone
    assert rel_err(moved.params, sym.apply(c.spec, b, init)) <= TOL
    stream = match.align(c.spec, a, b, solve=("residual",), layers=[])  # a global group: solved
    assert not np.array_equal(stream.transform["residual"], sym.identity(c.spec)["residual"])


def test_solve_accepts_one_name_and_strips_spaces(key):
    _, c, a, b, _ = planted("bert-h3d4-l2", False, ("rotation",), key)
    one = match.align(c.spec, a, b, solve="rotation")
    spaced = match.align(c.spec, a, b, solve=[" rotation "])
    assert rel_err(one.params, a) <= TOL and rel_err(spaced.params, a) <= TOL
    assert match.Options(solve=" ffn").solve == ("ffn",)
    assert match.Options(max_sweeps=np.int64(3)).max_sweeps == 3  # numpy ints are ints
    assert match.Options(layers=np.int64(1)).layers == (1,)
    # JAX scalars as numpy's (they were refused, tol as "not finite"); bools are no ints.
    assert match.Options(max_sweeps=jnp.int32(3)).max_sweeps == 3
    assert match.Options(layers=jnp.array([0, 1])).layers == (0, 1)
    assert match.Options(layers=jnp.int32(1)).layers == (1,)
    assert match.Options(tol=jnp.float32(0.5)).tol == 0.5
    for bad in (dict(max_sweeps=True), dict(layers=[True]), dict(tol=jnp.array([0.1]))):
        with pytest.raises(ValueError, match="must be"):
            match.Options(**bad)
    # One role (layer) as a string (int) is that role, not its letters.
    assert c.spec.select(roles="ffn") == c.spec.select(roles=["ffn"]) != ()
    assert c.spec.select(roles="ffn", layers=1) == c.spec.select(roles=["ffn"], layers=[1])


@pytest.mark.parametrize("size", [1e300, 1e-300])
def test_float64_weights_beyond_float32s_range_are_solved(size, key):
    """With ``jax_enable_x64``, float64 weights near 1e300 (1e-300) became inf (0) when cast to
    float32 for the solve (a NaN result, or B's weights zeroed): they are divided by a power of
    two in float64 first. The result is the transform applied to B's float64 weights (it was
    the float32 copy's, every moved weight rounded to float32)."""
    _, c, a, b, _ = planted("bert-h3d4-l2", False, match.ALL, key)
    with jax.enable_x64(True):
        big = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) * size, t)
        res = match.align(c.spec, big(a), big(b), solve=match.ALL)
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(res.params))
        assert {x.dtype for x in jax.tree.leaves(res.params)} == {jnp.dtype(jnp.float64)}
        unit = lambda t: jax.tree.map(lambda x: x / size, t)  # (rel_err floors max|b| at 1e-30)
        assert rel_err(unit(res.params), unit(big(a))) <= TOL
        moved = sym.apply(c.spec, big(b), res.transform)
        for x, y in zip(jax.tree.leaves(res.params), jax.tree.leaves(moved), strict=True):
            np.testing.assert_array_equal(x, y)


def test_align_compiles_once_per_shape_whatever_the_weights(key):
    """Whether the residual start is kept (a scrambled pair) or not (B = A + noise) changed
    the structure of every jitted stage's transform: a pair of the same shapes compiled 7
    programs again (5.6 s on a MiniLM-size model)."""
    from rotjax.match import _attention, _objective, _permutations, _stream

    config = dataclasses.replace(CONFIGS["bert-h3d4-l2"], intermediate_size=13)  # its own shapes
    c = compiled(config)
    a = c.init(key, 0.3)
    scrambled = sym.apply(c.spec, a, sym.sample(c.spec, jax.random.fold_in(key, 1)))
    noise = lambda x, i: x + 1e-3 * jax.random.normal(jax.random.fold_in(key, i), x.shape)
    near = jax.tree.unflatten(
        jax.tree.structure(a), [noise(x, i) for i, x in enumerate(jax.tree.leaves(a))]
    )
    jitted = [
        f
        for m in (_attention, _objective, _permutations, _stream)
        for f in vars(m).values()
        if hasattr(f, "_cache_size")
    ]
    assert len(jitted) >= 5  # (jax's private cache count: none found would test nothing)
    programs = lambda: sum(f._cache_size() for f in jitted)
    kept = match.align(c.spec, a, scrambled, solve=match.ALL)
    assert kept.diagnostics.history[1][0] == "residual_init"  # the start kept: a new structure
    before = programs()
    dropped = match.align(c.spec, a, near, solve=match.ALL)
    assert dropped.diagnostics.history[1][0] != "residual_init"  # ... and not kept
    assert programs() == before


def test_tiny_weights_descend_as_far_as_unscaled_ones(key):
    """Weights scaled by a power of two align as the unscaled ones do, sweep for sweep: the
    stopping test floored J at 1e-30 in the original units, so weights of 2^-70 (J ~ 1e-40)
    stopped after one sweep, their transform 1.8e-2 from the unscaled alignment's."""
    _, c, a, b, _ = planted("bert-h3d4-l2", False, match.ALL, key, noise=0.05)
    runs = []
    for size in (1.0, 2.0**-70):
        small = lambda t, size=size: jax.tree.map(lambda x: x * size, t)
        runs.append(match.align(c.spec, small(a), small(b), solve=match.ALL, key=key))
    one, tiny = runs
    assert one.diagnostics.sweeps > 1  # (a descent to follow)
    assert tiny.diagnostics.sweeps == one.diagnostics.sweeps
    assert rel_err(tiny.transform, one.transform) <= 1e-6


@pytest.mark.parametrize("size", [1e25, 3e37, "2^126.5", 1e-21, 1e-30])
def test_huge_and_tiny_finite_weights_are_solved(size, key):
    """Squares of 1e25 overflow float32 and squares of 1e-21 fall below its normal range
    (flushed to zero on CPU: align solved zero matrices): both models are solved scaled by a
    power of two (exact), and the distances reported in the original units. "2^126.5": the
    largest weight is 2^126.5 (dividing by 2^127 would multiply by a subnormal, flushed to
    zero)."""
    _, c, a, b, _ = planted("bert-h3d4-l2", False, match.ALL, key)
    if size == "2^126.5":
        top = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves((a, b)))
        size = 2.0**126.5 / top
    big = lambda t: jax.tree.map(lambda x: x * size, t)
    res = match.align(c.spec, big(a), big(b), solve=match.ALL)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(res.params))
    assert rel_err(res.params, big(a)) <= TOL
    d = res.diagnostics
    assert np.isfinite(d.distance_before) and d.distance_after <= 1e-8 * d.distance_before
