"""Residual-stream rotations of pre-norm models (ViT, LLaMA): the canonical form, the rotation
group, its planted recovery by `align` and from activations.

Tolerance 1e-5 relative, as for every symmetry (float32 at matmul precision "highest"), except
the tiny LLaMA under a rotation of its whole stream (LLAMA_TOL = 3e-5): its forward pass amplifies
the rotated params' float32 rounding further (over 240 random draws, median 9e-7, 99th percentile
3.2e-6, largest 6.9e-6; the same model's heads refactored by `merge.circuits` reached 1.1e-5).
"""

import dataclasses
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers import CONFIGS, compiled, inputs, scanned

from rotjax import match, merge
from rotjax import symmetry as sym
from rotjax.models import bert, deberta, family, llama, vit
from rotjax.tree import from_dict, to_dict

TOL = 1e-5
LLAMA_TOL = 3e-5


def canonical_vit(name, scan, key):
    config = scanned(CONFIGS[name], scan)
    c = compiled(config)
    params = c.init(key, 0.3)
    if not config.qkv_bias:
        return config, c, params, None
    return config, c, params, sym.canonicalize(vit.stream_spec(config), params)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", ["vit-h3d4-l2", "vit-h1d8-l1-nobias"])
def test_canonical_form_preserves_the_function(name, scan, key):
    config, c, params, canon = canonical_vit(name, scan, key)
    if name.endswith("nobias"):  # β of layernorm_before cannot fold into bias-free Q/K/V...
        with pytest.raises(ValueError, match="has no bias to fold it into"):
            sym.canonicalize(vit.stream_spec(config), params)
        return
    x = inputs(config, jax.random.fold_in(key, 1))
    assert rel_err(c.forward(canon, x), c.forward(params, x)) <= TOL
    stream = vit.stream_spec(config)
    assert sym.is_canonical(stream, canon) and not sym.is_canonical(stream, params)
    assert rel_err(sym.canonicalize(stream, canon), canon) <= 1e-6  # idempotent
    # Norms an ulp or two off (a Fisher merge of canonical models): canonical, as sym.apply
    # and match.align take them (is_canonical asked for exact ones); 1e-3 off is not
    norm = f"{stream.norms[0].path}/scale"
    for factor, want in ((1 + 2.0**-22, True), (1 - 2.0**-23, True), (1 - 1e-3, False)):
        flat = to_dict(canon)
        moved = from_dict({**flat, norm: flat[norm] * jnp.float32(factor)})
        assert sym.is_canonical(stream, moved) == want, factor
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # centred, then rounded
    assert sym.is_canonical(stream, sym.canonicalize(stream, half))
    assert not sym.is_canonical(stream, half)
    # read while a jit traces, the params closed over (its writers' check failed there)
    for p, want in ((canon, True), (params, False), (sym.canonicalize(stream, half), True)):
        assert jax.jit(lambda p=p: jnp.asarray(sym.is_canonical(stream, p)))() == want
    frozen = sym.canonicalize(stream, flax.core.freeze(params))  # the caller's containers kept
    assert isinstance(frozen, flax.core.FrozenDict) and rel_err(frozen.unfreeze(), canon) == 0


def test_canonicalize_names_what_does_not_fit(key):
    """Params the stream spec does not fit, or another spec: refused naming the path and
    shapes (a bare KeyError, JAX's broadcasting error, an AttributeError)."""
    from rotjax.tree import from_dict, to_dict

    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    flat, stream = to_dict(c.init(key, 0.3)), family(config).stream_spec(config)
    path = "encoder/layer_0/layernorm_after/scale"
    with pytest.raises(ValueError, match=rf"params lack what the stream spec names: \['{path}'"):
        sym.canonicalize(stream, from_dict({p: x for p, x in flat.items() if p != path}))
    with pytest.raises(ValueError, match=rf"{path}: shape \(5,\), where the stream is 12 wide"):
        sym.canonicalize(stream, from_dict({**flat, path: jnp.ones(5)}))
    with pytest.raises(TypeError, match="stream must be a StreamSpec"):
        sym.canonicalize(c.spec, from_dict(flat))


@pytest.mark.parametrize("name", ["vit-h3d4-l2", "llama-k2g2d6-l2-seq"])
def test_canonical_form_of_float64_models_is_float64(name, key):
    """With ``jax_enable_x64``, a float64 model is canonicalised in float64 (it was rounded to
    float32: the logits kept to ~1e-7 only, and a second pass moved the weights again)."""
    config = CONFIGS[name]
    c = compiled(config)
    stream = family(config).stream_spec(config)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), t)
        params = to64(c.init(key, 0.3))
        canon = sym.canonicalize(stream, params)
        x = inputs(config, jax.random.fold_in(key, 1))
        x = tuple(to64(v) if jnp.issubdtype(v.dtype, jnp.floating) else v for v in x)
        assert rel_err(c.forward(canon, x), c.forward(params, x)) <= 1e-12
        assert rel_err(sym.canonicalize(stream, canon), canon) <= 1e-14  # idempotent
    assert {v.dtype for v in jax.tree.leaves(canon)} == {jnp.dtype(jnp.float64)}


def test_canonical_bias_free_model_with_zero_shift(key):
    config = CONFIGS["vit-h1d8-l1-nobias"]
    c = compiled(config)
    params = c.init(key, 0.3)
    params["encoder"]["layer_0"]["layernorm_before"]["bias"] = jnp.zeros(config.hidden_size)
    canon = sym.canonicalize(vit.stream_spec(config), params)
    x = inputs(config, key)
    assert rel_err(c.forward(canon, x), c.forward(params, x)) <= TOL


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_stream_rotations_preserve_the_canonical_function(scan, key):
    config, c, params, canon = canonical_vit("vit-h3d4-l2", scan, key)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    x = inputs(config, jax.random.fold_in(key, 1))
    before = c.forward(params, x)
    g = sym.sample(spec, jax.random.fold_in(key, 2))
    q = np.asarray(g[vit.STREAM], np.float64)
    np.testing.assert_allclose(q @ np.ones(len(q)), 1.0, atol=1e-5)
    np.testing.assert_allclose(q @ q.T, np.eye(len(q)), atol=1e-5)
    alone = sym.apply(spec, canon, {vit.STREAM: g[vit.STREAM]})
    assert rel_err(c.forward(alone, x), before) <= TOL
    assert rel_err(alone, canon) > 0.1  # not vacuous
    # Folding the norms is what the rotation needs, not centring the writers (Q keeps each
    # token's mean): a stream with a mean, a writer's bias moved along 1, rotates as well.
    shifted = to_dict(canon)
    writer = next(p for p in shifted if p.endswith("ffn/output/bias"))
    shifted = from_dict({**shifted, writer: shifted[writer] + 0.7})
    assert rel_err(c.forward(shifted, x), before) <= TOL
    moved = sym.apply(spec, shifted, {vit.STREAM: g[vit.STREAM]})
    assert rel_err(c.forward(moved, x), before) <= TOL
    everything = sym.apply(spec, canon, g)
    assert rel_err(c.forward(everything, x), before) <= TOL
    # Negative controls: a rotation that moves the all-ones vector, or a rotation of a model
    # not in canonical form, changes the logits. The latter is refused where the params are
    # known, naming a norm (it changed the function silently), and unchecked under a jit.
    free = jax.random.orthogonal(jax.random.fold_in(key, 3), config.hidden_size)
    assert rel_err(c.forward(sym.apply(spec, canon, {vit.STREAM: free}), x), before) > 1e-2
    with pytest.raises(ValueError, match=r"canonical forms only .*norm.* is not [01]$"):
        sym.apply(spec, params, {vit.STREAM: g[vit.STREAM]})
    traced = jax.jit(lambda p: sym.apply(spec, p, {vit.STREAM: g[vit.STREAM]}))(params)
    assert rel_err(c.forward(traced, x), before) > 1e-2
    identity = sym.identity(spec)  # the identity moves nothing: any model takes it
    assert rel_err(sym.apply(spec, params, identity), params) == 0


def test_stream_rotation_group_laws(key):
    config, c, params, canon = canonical_vit("vit-h3d4-l2", False, key)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    g, h = (sym.sample(spec, jax.random.fold_in(key, i)) for i in (1, 2))
    moved = sym.apply(spec, canon, g)
    assert rel_err(sym.apply(spec, moved, sym.invert(spec, g)), canon) <= TOL
    assert (
        rel_err(sym.apply(spec, canon, sym.compose(spec, g, h)), sym.apply(spec, moved, h)) <= TOL
    )
    ident = sym.compose(spec, g, sym.invert(spec, g))
    np.testing.assert_allclose(ident[vit.STREAM], np.eye(config.hidden_size), atol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_rmsnorm_decoders_rotate_by_all_of_o_d(scan, key):
    """LLaMA-style (RMSNorm, no centring): the canonical form folds the norm scales into their
    readers; then every orthogonal Q of the stream (no Q 1 = 1 needed) keeps the function, and
    `align` recovers a planted element that includes one."""
    config = scanned(CONFIGS["llama-k2g2d6-l2-seq"], scan)
    c = compiled(config)
    params = c.init(key, 0.3)
    stream = llama.stream_spec(config)
    canon = sym.canonicalize(stream, params)
    x = inputs(config, jax.random.fold_in(key, 1))
    before = c.forward(params, x)
    assert rel_err(c.forward(canon, x), before) <= TOL
    assert sym.is_canonical(stream, canon) and not sym.is_canonical(stream, params)
    spec = llama.symmetry_spec(config, stream_rotation=True)
    assert not spec.groups[llama.STREAM].keeps_ones
    g = sym.sample(spec, jax.random.fold_in(key, 2))
    assert rel_err(c.forward(sym.apply(spec, canon, g), x), before) <= LLAMA_TOL
    # Negative control: the same rotation of the model before folding its norm scales
    # (refused where the params are known, unchecked when traced).
    rot = {llama.STREAM: g[llama.STREAM]}
    with pytest.raises(ValueError, match=r"input_layernorm/scale .* is not 1"):
        sym.apply(spec, params, rot)
    moved = jax.jit(lambda p: sym.apply(spec, p, rot))(params)
    assert rel_err(c.forward(moved, x), before) > 1e-2
    b = sym.apply(spec, canon, g)
    res = match.align(spec, canon, b, solve=match.ALL, key=key)
    assert rel_err(res.params, canon) <= TOL
    tied = dataclasses.replace(config, task="causal_lm", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied embeddings"):
        llama.symmetry_spec(tied, stream_rotation=True)


def test_post_norm_and_bare_encoders_have_no_stream_rotation():
    with pytest.raises(ValueError, match="post-norm"):
        bert.symmetry_spec(CONFIGS["bert-h3d4-l2"], stream_rotation=True)
    with pytest.raises(ValueError, match="post-norm"):
        deberta.symmetry_spec(CONFIGS["deberta-v3-h3d5-l2-seq"], stream_rotation=True)
    encoder = dataclasses.replace(CONFIGS["vit-h3d4-l2"], task=None)
    with pytest.raises(ValueError, match="outputs its final LayerNorm"):
        vit.symmetry_spec(encoder, stream_rotation=True)


def test_prepare_gives_the_stream_rotation_where_the_family_has_it(key):
    """`match.prepare` is what the command line aligns with: a pre-norm model's spec with the
    stream rotation and the models in canonical form (the same functions); a post-norm model's,
    or one without a canonical form, the plain spec, the params as given and a note. `align`
    names the blocks of ``solve`` its spec has no group for (ALL on the plain ViT spec
    silently left the stream where it was)."""
    config, c, params, canon = canonical_vit("vit-h3d4-l2", False, key)
    other = c.init(jax.random.fold_in(key, 1), 0.3)
    prep = match.prepare(config, [params, other])
    assert any(g.role == "stream_rotation" for g in prep.spec.groups.values())
    assert prep.notes == [
        "models in canonical form (norms folded, stream centred) to rotate the stream"
    ]
    stream = vit.stream_spec(config)
    x = inputs(config, key)
    for p, q in zip(prep.params, (params, other), strict=True):
        assert sym.is_canonical(stream, p) and rel_err(c.forward(p, x), c.forward(q, x)) <= TOL
    assert not sym.is_canonical(stream, params)  # (not changed)
    res = match.align(prep.spec, *prep.params, solve=match.ALL, key=key)
    assert res.diagnostics.skipped == ("query_heads",)  # (a ViT has no grouped-query heads)
    assert "stream" in {stage for stage, _ in res.diagnostics.history}
    assert rel_err(c.forward(res.params, x), c.forward(other, x)) <= TOL
    plain = match.align(vit.symmetry_spec(config), params, other, solve=match.ALL, key=key)
    assert plain.diagnostics.skipped == ("query_heads", "stream")
    assert res.diagnostics.distance_after < plain.diagnostics.distance_after
    assert match.prepare(config, [params], stream=False) == (
        vit.symmetry_spec(config),
        [params],
        [],
    )
    bert_config = CONFIGS["bert-h3d4-l2"]
    b = compiled(bert_config).init(key, 0.3)
    spec, got, notes = match.prepare(bert_config, [b])
    assert spec == bert.symmetry_spec(bert_config) and got[0] is b
    assert notes == ["no stream rotation: bert is post-norm (its norms sit on the stream)"]
    nobias = CONFIGS["vit-h1d8-l1-nobias"]  # β of its first norm cannot fold: no canonical form
    nb = compiled(nobias).init(key, 0.3)
    spec, got, notes = match.prepare(nobias, [nb])
    assert spec == vit.symmetry_spec(nobias) and got[0] is nb
    assert len(notes) == 1 and notes[0].startswith("no stream rotation: ") and "no bias" in notes[0]
    assert match.align(spec, nb, nb, solve=match.PAPER).diagnostics.skipped == ()
    bare = dataclasses.replace(config, task=None)  # its spec says it has no canonical form
    spec, got, notes = match.prepare(bare, [params])
    assert spec == vit.symmetry_spec(bare) and got[0] is params
    why = "a bare ViT encoder (task=None) outputs its final LayerNorm: no canonical form"
    assert notes == [f"no stream rotation: {why}"]


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_align_recovers_a_planted_element_with_a_stream_rotation(scan, key):
    config, c, _, canon = canonical_vit("vit-h3d4-l2", scan, key)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    b = sym.apply(spec, canon, sym.sample(spec, jax.random.fold_in(key, 1)))
    res = match.align(spec, canon, b, solve=match.ALL, key=key)
    assert rel_err(res.params, canon) <= TOL
    x = inputs(config, key)
    assert rel_err(c.forward(res.params, x), c.forward(b, x)) <= TOL
    # With noise: the objective never increases after the start (sweeps of exact block steps).
    noisy = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(key, v.shape), b)
    # A model off its canonical form (noisy norms) is refused: the rotation would change it.
    with pytest.raises(ValueError, match=r"params: the stream rotation is a symmetry of canon"):
        match.align(spec, canon, noisy, solve=match.ALL, key=key)
    with pytest.raises(ValueError, match=r"params_list\[1\]: the stream rotation"):
        match.align_many(spec, [canon, noisy], solve=match.ALL, anchor=0)
    assert match.align(spec, noisy, canon, solve=match.ALL).params  # any anchor: B moves
    g = {vit.STREAM: sym.sample(spec, key)[vit.STREAM]}  # a stream rotation given as init
    with pytest.raises(ValueError, match="canonicalize"):
        match.align(spec, canon, noisy, solve=(), init=g)
    assert match.align(spec, canon, noisy, solve=("ffn",)).params  # no rotation: accepted
    ident = sym.identity(spec)  # a complete start whose stream rotation is the identity too
    assert match.align(spec, canon, noisy, solve=("ffn",), init=ident).params
    ulp = to_dict(b)  # a norm one ulp off 1 (a merge of canonical models): accepted
    path = next(p for p in ulp if p.endswith("layernorm_after/scale"))
    ulp[path] = jnp.nextafter(ulp[path], 2.0)
    assert match.align(spec, canon, from_dict(ulp), solve=match.ALL, key=key).params
    # bfloat16: 4 of its ulps (0.03) let a norm at 0.97 through; a merge of canonical
    # bfloat16 models, computed in float32, rounds back to exactly 1
    bf16 = lambda tree: jax.tree.map(lambda v: v.astype(jnp.bfloat16), to_dict(tree))
    half = bf16(b)
    half[path] = half[path].at[0].set(0.97)
    with pytest.raises(ValueError, match=rf"params: .* {path} \(\d+(, \d+)?,?\) is not 1"):
        match.align(spec, from_dict(bf16(canon)), from_dict(half), solve=match.ALL, key=key)
    noisy = sym.canonicalize(vit.stream_spec(config), noisy)
    res = match.align(spec, canon, noisy, solve=match.ALL, key=key)
    values = [v for stage, v in res.diagnostics.history if stage not in ("identity",)]
    assert all(y <= x * (1 + 1e-6) for x, y in itertools.pairwise(values)), res.diagnostics.history
    assert "stream" in {stage for stage, _ in res.diagnostics.history}


def test_activation_init_recovers_a_planted_stream_rotation(key):
    config, c, _, canon = canonical_vit("vit-h3d4-l2", False, key)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    g = {vit.STREAM: sym.sample(spec, jax.random.fold_in(key, 1))[vit.STREAM]}
    b = sym.apply(spec, canon, g)
    data = [inputs(config, jax.random.fold_in(key, i), batch=8) for i in range(4)]
    init = merge.activation_init(spec, merge.cross_statistics(c.model, canon, b, data))
    # B's stream is A's rotated: the Procrustes of the stream reads (after whatever stream
    # permutation the correlations suggested) undoes it, and every other group stays put.
    assert rel_err(sym.apply(spec, b, init), canon) <= TOL  # (3.8e-7 at most over 12 seeds)


def test_canonical_checkpoint_is_a_standard_vit(key, tmp_path):
    """γ = 1, β = 0 and centred writers are just weights: transformers' PyTorch ViT loads the
    canonical checkpoint and computes the original model's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rotjax import hf

    config, c, params, canon = canonical_vit("vit-h3d4-l2", False, key)
    hf.save(tmp_path / "canon", config, canon)
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "canon").eval()
    (x,) = inputs(config, jax.random.fold_in(key, 1))
    with torch.no_grad():
        pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
        logits = model(pixel_values=pixels).logits.numpy()
    assert rel_err(logits, c.forward(params, (x,))) <= TOL


def test_statistics_under_a_stream_rotation(key):
    """Grams move exactly with the stream rotation; a diagonal Fisher becomes the diagonal of
    the rotated diagonal, Σ_i F_i Q_ij², on every stream axis."""
    config, c, _, canon = canonical_vit("vit-h3d4-l2", False, key)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    q = {vit.STREAM: sym.sample(spec, jax.random.fold_in(key, 1))[vit.STREAM]}
    data = [inputs(config, jax.random.fold_in(key, i), batch=4) for i in range(2)]
    stats = merge.statistics(c.model, canon, data)
    moved = merge.transform_statistics(spec, stats, q)
    direct = merge.statistics(c.model, sym.apply(spec, canon, q), data, ("gram",))
    assert rel_err(moved["gram"], direct["gram"]) <= TOL  # (1.1e-6 at most over 12 seeds)
    f, f2 = np.asarray(stats["fisher"]["classifier/kernel"]), moved["fisher"]["classifier/kernel"]
    want = np.einsum("ic,ij->jc", f, np.asarray(q[vit.STREAM]) ** 2)
    np.testing.assert_allclose(f2, want, rtol=TOL, atol=1e-9)


def test_a_started_stream_rotation_keeps_the_descent_monotone(key):
    """With a stream rotation in the start, the stream permutation is not re-solved (its
    assignment would see B rotated after it; the rotation, solved, holds every permutation),
    and J never increases. Asked to solve the permutation under a fixed rotation, `align`
    refuses (it returned the permutation unsolved, silently)."""
    config, c, _, canon = canonical_vit("vit-h3d4-l2", False, key)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    b = sym.apply(spec, canon, sym.sample(spec, jax.random.fold_in(key, 1)))
    q = {vit.STREAM: sym.sample(spec, jax.random.fold_in(key, 2))[vit.STREAM]}
    res = match.align(spec, canon, b, solve=("ffn", "residual", "stream"), init=q)
    values = [v for stage, v in res.diagnostics.history if stage != "identity"]
    assert all(y <= x * (1 + 1e-6) for x, y in itertools.pairwise(values)), res.diagnostics.history
    assert "residual" not in {stage for stage, _ in res.diagnostics.history}
    with pytest.raises(ValueError, match=r"solve has 'residual' but init fixes the stream rot"):
        match.align(spec, canon, b, solve=("rotation", "scale", "ffn", "residual"), init=q)
    listed = {vit.STREAM: np.asarray(q[vit.STREAM]).tolist()}  # nested lists: an array too
    with pytest.raises(ValueError, match=r"solve has 'residual' but init fixes the stream rot"):
        match.align(spec, canon, b, solve=("rotation", "scale", "ffn", "residual"), init=listed)
    bad = {vit.STREAM: q[vit.STREAM] * 1.1}
    with pytest.raises(ValueError, match=r"transform\['stream'\] is not orthogonal"):
        match.align(spec, canon, b, init=bad)
    free = {vit.STREAM: jax.random.orthogonal(key, config.hidden_size)}
    with pytest.raises(ValueError, match="orthogonal with Q 1 = 1"):
        match.align(spec, canon, b, init=free)
    # A complete transform as the start (its stream rotation the identity, as `align`'s and
    # the straight-through descent's steps pass them) leaves the stream permutation solved:
    # its stage runs, J never rising. (Not always to the planted element: from the identity
    # rather than `residual_init`'s start the descent can stop elsewhere; 1 seed in about 40
    # did, as for a planted permutation of the stream alone.)
    t = sym.sample(spec, jax.random.fold_in(key, 3)) | {vit.STREAM: sym.identity(spec)[vit.STREAM]}
    b = sym.apply(spec, canon, t)
    no_stream = tuple(n for n in match.ALL if n != "stream")
    res = match.align(spec, canon, b, solve=no_stream, init=sym.identity(spec), key=key)
    assert "residual" in {stage for stage, _ in res.diagnostics.history}
    values = [v for stage, v in res.diagnostics.history if stage != "identity"]
    assert all(y <= x * (1 + 1e-6) for x, y in itertools.pairwise(values)), res.diagnostics.history


def test_align_by_activations_starts_only_the_groups_it_solves(key, monkeypatch):
    """On a stream spec, `align_by_activations` without ``"stream"`` in ``solve`` starts no
    stream rotation (its start held one, which `align` then refused after the forward
    passes: with the residual unsolved, or for a B off its canonical form), and a B that
    `align` would refuse is refused before any forward pass."""
    config, c, _, canon = canonical_vit("vit-h3d4-l2", False, key)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    b = sym.canonicalize(vit.stream_spec(config), c.init(jax.random.fold_in(key, 1), 0.3))
    data = [inputs(config, jax.random.fold_in(key, i), batch=8) for i in range(2)]
    x = inputs(config, jax.random.fold_in(key, 9))
    no_stream = tuple(n for n in match.ALL if n != "stream")
    noisy = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(key, v.shape), b)
    for solve, moved in ((no_stream, b), (("ffn",), noisy)):
        res, _ = merge.align_by_activations(c.model, spec, canon, moved, data, solve=solve)
        assert rel_err(res.transform[vit.STREAM], sym.identity(spec)[vit.STREAM]) == 0, solve
        assert rel_err(c.forward(res.params, x), c.forward(moved, x)) <= TOL
    import rotjax.merge._select as select

    def never(*args, **kwargs):
        raise AssertionError("a forward pass before the check")

    monkeypatch.setattr(select, "cross_statistics", never)
    with pytest.raises(ValueError, match=r"params: the stream rotation is a symmetry of canon"):
        merge.align_by_activations(c.model, spec, canon, noisy, data)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", ["vit-h3d4-l2", "llama-k2g2d6-l2-seq"])
def test_the_stream_spec_names_every_param_on_the_stream(name, scan):
    """Every param the stream permutation acts on is a norm's, a reader's kernel or a writer
    (which the canonical form centres): a writer missing from the stream spec would leave the
    stream uncentred while every rotation test still passed."""
    config = scanned(CONFIGS[name], scan)
    fam = family(config)
    stream, spec = fam.stream_spec(config), fam.symmetry_spec(config, stream_rotation=True)
    (stream_group,) = (g for g in spec.groups.values() if g.role == "stream_rotation")
    over = stream_group.over
    on_stream = {path for path, _ in spec.users[over]}
    norms = {f"{n.path}/{leaf}" for n in stream.norms for leaf in ("scale", "bias")}
    readers = {f"{r}/kernel" for n in stream.norms for r in n.readers}
    writers = {path for path, _ in stream.writers}
    assert on_stream == (norms & set(spec.params)) | readers | writers
    assert not writers & readers and writers


def test_float64_models_are_rotated_by_float64_orthogonal_matrices(key):
    """With ``jax_enable_x64``: a sampled stream rotation and `align`'s solved rotations are
    orthogonal (and keep 1) to float64 rounding, so an aligned float64 model computes B's
    function to 1e-12 (the rotations, built or solved in float32, kept it to ~1e-7)."""
    config = CONFIGS["vit-h3d4-l2"]
    c = compiled(config)
    stream = vit.stream_spec(config)
    spec = vit.symmetry_spec(config, stream_rotation=True)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), t)
        a = sym.canonicalize(stream, to64(c.init(key, 0.3)))
        b = sym.canonicalize(stream, to64(c.init(jax.random.fold_in(key, 1), 0.3)))
        q = sym.sample(spec, jax.random.fold_in(key, 2))[vit.STREAM]
        assert q.dtype == jnp.float64
        np.testing.assert_allclose(q @ q.T, np.eye(q.shape[0]), atol=1e-13)
        np.testing.assert_allclose(q @ np.ones(q.shape[0]), 1.0, atol=1e-13)
        res = match.align(spec, a, b, solve=match.ALL, key=key)
        x = inputs(config, jax.random.fold_in(key, 3))
        x = tuple(to64(v) if jnp.issubdtype(v.dtype, jnp.floating) else v for v in x)
        assert rel_err(c.forward(res.params, x), c.forward(b, x)) <= 1e-12
        assert sym.is_canonical(stream, res.params, atol=1e-12)
        paper = match.align(spec, a, b, solve=match.PAPER)  # the stream not solved: untouched
        np.testing.assert_array_equal(paper.transform[vit.STREAM], np.eye(q.shape[0]))
