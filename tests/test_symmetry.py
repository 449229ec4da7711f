"""The symmetry core: function preservation on real forward passes, group laws, validation.

Tolerance: relative max error 1e-5. Every model runs in float32 with matmuls at "highest"
precision (conftest), where a transformed model differs from the original only by float32
rounding of reordered sums, about 1e-7 relative per op; 1e-5 leaves room for a few layers.
"""

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers import (
    CONFIGS,
    DEBERTA_CONFIGS,
    LLAMA_CONFIGS,
    compiled,
    init,
    inputs,
    logits,
    scanned,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from rotjax import match, merge
from rotjax import symmetry as sym
from rotjax.models import family, stack_layers, unstack_layers
from rotjax.tree import to_dict

TOL = 1e-5
CASES = [(name, scan) for name in CONFIGS for scan in (False, True)]
IDS = [f"{n}-{'scan' if s else 'loop'}" for n, s in CASES]


def setup(name, scan, key):
    config = scanned(CONFIGS[name], scan)
    k1, k2 = jax.random.split(key)
    model, params = init(config, k1)
    return config, family(config).symmetry_spec(config), model, params, inputs(config, k2)


@pytest.mark.parametrize(("name", "scan"), CASES, ids=IDS)
def test_random_elements_preserve_function(name, scan, key):
    """Every group at once, then each role's groups alone (the others at identity)."""
    config, spec, model, params, x = setup(name, scan, key)
    apply = compiled(config).apply  # one compile: every transform below is complete
    sym.validate(spec, params)
    full = sym.sample(spec, jax.random.fold_in(key, 1))
    before = logits(model, params, x)
    moved = apply(params, full)
    assert rel_err(logits(model, moved, x, full), before) <= TOL
    # The transform really moved the params (so the check above is not vacuous).
    assert rel_err(moved, params) > 0.1

    for role in sym.ROLES:
        names = spec.select(roles=[role])
        if role == "stream_rotation":  # only in canonical specs: tests/test_stream.py
            assert not names
            continue
        if role == "query_heads":  # only grouped-query attention with G > 1 query heads
            assert bool(names) == (getattr(config, "groups", 1) > 1), name
            if not names:
                continue
        assert names, f"no {role} group in {name}"
        ident = sym.identity(spec)
        t = {**ident, **{g: full[g] for g in names}}
        moved = apply(params, t)
        assert rel_err(logits(model, moved, x, t), before) <= TOL, role
        # The params moved, unless the element is (near) the identity: one head has nothing to
        # swap, and a single head's random scale may lie close to 1 (seed 157323983: the params
        # moved by 4e-7, relative), so a change is only required of elements 1% away from it.
        far = max(float(np.max(np.abs(np.asarray(t[g]) - np.asarray(ident[g])))) for g in names)
        if far > 1e-2:
            assert rel_err(moved, params) > 1e-6, role


def test_a_bare_encoders_pooler_output_is_fixed(key):
    """A bare encoder's pooler output is the model's output, not hidden units: no group moves
    it (the paper's alignment of two bare BERTs permuted it, as FFN units)."""
    bare_vit = dataclasses.replace(CONFIGS["vit-h3d4-l2"], task=None, add_pooling_layer=True)
    for config in (CONFIGS["bert-encoder-pooler"], bare_vit):
        model, params = init(config, key)
        x = inputs(config, jax.random.fold_in(key, 1))
        spec = family(config).symmetry_spec(config)
        t = sym.sample(spec, jax.random.fold_in(key, 2))
        got = compiled(config).forward(compiled(config).apply(params, t), x).pooler_output
        want = compiled(config).forward(params, x).pooler_output
        assert rel_err(got, want) <= TOL, type(config).__module__


@pytest.mark.parametrize("name", ["bert-h3d4-l2", "vit-h3d4-l2"])
def test_wrong_transform_changes_logits(name, key):
    """Sanity: the tests above can fail. Rotating Q but not K, or permuting the stream in all
    but one LayerNorm, changes the function: by more than 1e-3, 100x the symmetries' tolerance
    (a random element's change can be small: as low as 4.4e-2 over 80 draws)."""
    config, spec, model, params, x = setup(name, False, key)
    t = sym.sample(spec, jax.random.fold_in(key, 1))
    before = logits(model, params, x)

    rot = {g: t[g] for g in spec.select(roles=["qk_rotation"])}
    moved = sym.apply(spec, params, rot)
    moved["encoder"]["layer_0"]["attention"]["key"] = params["encoder"]["layer_0"]["attention"][
        "key"
    ]
    assert rel_err(logits(model, moved, x), before) > 1e-3

    stream = {"residual": t["residual"]}
    moved = sym.apply(spec, params, stream)
    ln = "attention_norm" if name.startswith("bert") else "layernorm_after"
    moved["encoder"]["layer_0"][ln] = params["encoder"]["layer_0"][ln]
    assert rel_err(logits(model, moved, x, stream), before) > 1e-3


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_rope_needs_pair_rotations(name, key):
    """Negative control for RoPE models: the same Haar O(d) on Q and K of every key-value head
    (a symmetry without RoPE) changes the logits; the pair rotations keep them (above)."""
    config, spec, model, params, x = setup(name, False, key)
    full = sym.Spec(
        tuple((n, dataclasses.replace(g, pairs=False)) for n, g in spec.group_items),
        spec.param_items,
    )
    names = full.select(roles=["qk_rotation"])
    t = {n: v for n, v in sym.sample(full, jax.random.fold_in(key, 1)).items() if n in names}
    with pytest.raises(ValueError, match="rotation of each pair"):
        sym.check_elements(spec, t)
    before = logits(model, params, x)
    assert rel_err(logits(model, sym.apply(full, params, t), x), before) > 1e-2


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_query_heads_move_with_their_output_slices(name, key):
    """Negative control for grouped-query attention: the query heads of a group permuted in the
    query kernel but not in the output kernel change the logits (together they do not); with
    one query head per key-value head there is no such group."""
    config, spec, model, params, x = setup(name, False, key)
    names = spec.select(roles=["query_heads"])
    t = {n: jnp.roll(sym.identity_element(spec.groups[n]), 1, axis=-1) for n in names}
    moved = sym.apply(spec, params, t)
    before = logits(model, params, x)
    assert rel_err(logits(model, moved, x), before) <= TOL
    attention = lambda p: p["decoder"]["layer_0"]["attention"]
    attention(moved)["out"] = attention(params)["out"]
    assert rel_err(logits(model, moved, x), before) > 1e-2
    mha = dataclasses.replace(config, num_key_value_heads=config.num_attention_heads)
    assert family(mha).symmetry_spec(mha).select(roles=["query_heads"]) == ()


@pytest.mark.parametrize("name", list(DEBERTA_CONFIGS))
def test_deberta_position_terms_are_read_in_the_stream_and_qk_bases(name, key):
    """Negative controls for DeBERTa's disentangled attention (the declared groups keep the
    function: `test_random_elements_preserve_function`, qk_scale included, since c2p pairs
    ``q·a`` with ``pk/a`` and p2c ``k/a`` with ``pq·a``). Leaving the relative embeddings and
    their LayerNorm out of a stream permutation changes the logits (the query/key kernels read
    them in the stream's basis); so does leaving the separate position projections
    (``share_att_key=False``) out of a Q/K rotation or a Q/K scale. Each by more than 1e-3, 100x
    the symmetries' tolerance: a random stream permutation changed the one-layer v2 model's
    logits by as little as 1.6e-2 over 400 draws (1% of draws below 2.2e-2)."""
    config, spec, model, params, x = setup(name, False, key)
    t = sym.sample(spec, jax.random.fold_in(key, 1))
    before = logits(model, params, x)

    stream = {"residual": t["residual"]}
    moved = sym.apply(spec, params, stream)
    for kept in ("rel_embeddings", "LayerNorm"):
        if kept in params["encoder"]:
            moved["encoder"][kept] = params["encoder"][kept]
    assert rel_err(logits(model, moved, x, stream), before) > 1e-3

    if config.share_att_key:
        assert "pos_key" not in params["encoder"]["layer_0"]["attention"]
        return
    for role in ("qk_rotation", "qk_scale"):
        g = {n: t[n] for n in spec.select(roles=[role])}
        if role == "qk_scale":  # a clear scale: a random one can be close to 1 for every head
            g = {n: jnp.full_like(x, 2.0) for n, x in g.items()}
        moved = sym.apply(spec, params, g)
        for layer in moved["encoder"]:
            if layer.startswith("layer_"):
                for proj in ("pos_key", "pos_query"):
                    moved["encoder"][layer]["attention"][proj] = params["encoder"][layer][
                        "attention"
                    ][proj]
        assert rel_err(logits(model, moved, x), before) > 1e-3, role  # (tolerance: 1e-5)


@pytest.mark.parametrize(
    ("name", "scan"),
    [
        ("bert-h3d4-l2", False),
        ("bert-h3d4-l2", True),
        ("llama-k2g2d6-l2-seq", True),
        ("qwen2-k1g4d4-l1", False),
        ("deberta-v2-h5d2-l1-token", True),
    ],
)
def test_group_laws(name, scan, key):
    config, spec, _, params, _ = setup(name, scan, key)
    k1, k2 = jax.random.split(key)
    g, h = sym.sample(spec, k1), sym.sample(spec, k2)
    # Products and inverses stay in the group (pair rotations stay pair rotations).
    sym.check_elements(spec, sym.compose(spec, g, sym.invert(spec, h)))

    # identity changes nothing, bitwise.
    same = sym.apply(spec, params, sym.identity(spec))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), same, params)

    # g then g⁻¹ is the identity (up to float32 rounding of two rotations).
    back = sym.apply(spec, sym.apply(spec, params, g), sym.invert(spec, g))
    assert rel_err(back, params) <= TOL
    ginv_g = sym.compose(spec, g, sym.invert(spec, g))
    for name, el in sym.identity(spec).items():
        np.testing.assert_allclose(ginv_g[name], el, atol=1e-5, err_msg=name)

    # compose agrees with applying twice.
    twice = sym.apply(spec, sym.apply(spec, params, g), h)
    once = sym.apply(spec, params, sym.compose(spec, g, h))
    assert rel_err(once, twice) <= TOL

    # Associativity, and the inverse of a product.
    k3 = jax.random.fold_in(key, 3)
    f = sym.sample(spec, k3)
    left = sym.compose(spec, sym.compose(spec, f, g), h)
    right = sym.compose(spec, f, sym.compose(spec, g, h))
    inv_fg = sym.invert(spec, sym.compose(spec, f, g))
    ginv_finv = sym.compose(spec, sym.invert(spec, g), sym.invert(spec, f))
    for name in spec.groups:
        np.testing.assert_allclose(left[name], right[name], atol=1e-5, err_msg=name)
        # (float32 products of three elements: up to 9.5e-7 over 30 seeds and 4 configs)
        np.testing.assert_allclose(inv_fg[name], ginv_finv[name], atol=1e-5, err_msg=name)


def test_sampled_elements_are_group_elements(key):
    config = scanned(CONFIGS["bert-h3d4-l2"])
    spec = family(config).symmetry_spec(config)
    t = sym.sample(spec, key)
    for name, g in spec.groups.items():
        el = np.asarray(t[name])
        assert el.shape == g.shape
        if g.kind == "perm":
            assert el.dtype == np.int32
            np.testing.assert_array_equal(
                np.sort(el, axis=-1), np.broadcast_to(np.arange(g.size), g.shape)
            )
        elif g.kind == "orth":
            eye = np.broadcast_to(np.eye(g.dim), g.shape)
            np.testing.assert_allclose(el @ np.swapaxes(el, -1, -2), eye, atol=1e-5)
        else:
            assert (el > 0).all()


def test_sampled_elements_cover_their_groups(key):
    """Haar on O(d) draws reflections as often as rotations, and uniform permutations are
    rarely the identity: over 64 draws both determinant signs appear in every orthogonal group
    and every permutation group moves (each fails with probability below 2^-60 for a group of
    at least 2 elements). The function-preservation tests draw their elements here: a sampler
    without reflections, or of identities, would leave them untried."""
    config = scanned(CONFIGS["bert-h3d4-l2"])
    spec = family(config).symmetry_spec(config)
    draws = jax.vmap(lambda k: sym.sample(spec, k))(jax.random.split(key, 64))
    kinds = set()
    for name, g in spec.groups.items():
        el = np.asarray(draws[name])
        kinds.add(g.kind)
        if g.kind in ("orth", "rot"):  # (pair rotations, of rotary heads, are all det +1)
            d = el.shape[-1]
            signs = np.sign(np.linalg.det(el.reshape(-1, d, d).astype(np.float64)))
            assert set(signs.tolist()) == {-1.0, 1.0}, name
        elif g.kind in ("perm", "hperm"):
            assert (el != np.arange(el.shape[-1])).any(), name
    assert {"orth", "perm"} <= kinds


def test_apply_under_jit_and_vmap(key):
    config, spec, model, params, x = setup("vit-h3d4-l2", True, key)
    keys = jax.random.split(key, 4)
    ts = jax.vmap(lambda k: sym.sample(spec, k))(keys)
    eager = sym.apply(spec, params, jax.tree.map(lambda a: a[1], ts))
    jitted = jax.jit(sym.apply, static_argnums=0)(spec, params, jax.tree.map(lambda a: a[1], ts))
    batched = jax.vmap(sym.apply, in_axes=(None, None, 0))(spec, params, ts)
    assert rel_err(jitted, eager) <= 1e-6
    assert rel_err(jax.tree.map(lambda a: a[1], batched), eager) <= 1e-6


def test_inputs_are_not_mutated_and_dtypes_kept(key):
    config, spec, model, params, x = setup("bert-h3d4-l2", False, key)
    as_numpy = jax.tree.map(np.array, params)
    copy = jax.tree.map(np.copy, as_numpy)
    t = sym.sample(spec, key)
    t_copy = jax.tree.map(np.copy, t)
    out = sym.apply(spec, as_numpy, t)
    jax.tree.map(np.testing.assert_array_equal, as_numpy, copy)
    jax.tree.map(np.testing.assert_array_equal, t, t_copy)
    assert out is not as_numpy

    half = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    out = sym.apply(spec, half, t)
    assert {leaf.dtype for leaf in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}
    # computed in float32 and rounded once (after each group, the rotated and rescaled
    # kernels' errors were a third larger, 26-28% of their entries other)
    wide = sym.apply(spec, jax.tree.map(lambda a: a.astype(jnp.float32), half), t)
    once = jax.tree.map(lambda a: a.astype(jnp.bfloat16), wide)
    jax.tree.map(np.testing.assert_array_equal, to_dict(out), to_dict(once))


def test_integer_params_are_permuted_exactly_and_never_rotated(key):
    """Rotated or rescaled in floating point and cast back, integer leaves would be rounded:
    refused by name, by `apply` and, before any work, by `align`; permutations move them
    exactly."""
    config, spec, model, params, _ = setup("bert-h3d4-l2", False, key)
    ints = jax.tree.map(lambda a: jnp.round(10 * a).astype(jnp.int32), params)
    t = sym.sample(spec, key)
    perms = {n: e for n, e in t.items() if spec.groups[n].kind == "perm"}
    moved = sym.apply(spec, ints, perms)
    assert {leaf.dtype for leaf in jax.tree.leaves(moved)} == {jnp.dtype(jnp.int32)}
    inverse = {n: e for n, e in sym.invert(spec, perms).items() if n in perms}
    back = sym.apply(spec, moved, inverse)
    jax.tree.map(np.testing.assert_array_equal, back, ints)
    q = "encoder/layer_0/attention/query/kernel"
    with pytest.raises(ValueError, match="integer or boolean params under a rotation") as e:
        sym.apply(spec, ints, t)
    assert f"\n  {q}: int32 (12, 3, 4)" in str(e.value)
    with pytest.raises(ValueError, match="anchor_params: integer or boolean params") as e:
        match.align(spec, ints, ints)
    assert f"\n  {q}: int32 (12, 3, 4)" in str(e.value)
    # Float leaves beside an integer one that only a permutation moves: accepted.
    mixed = jax.tree.map(lambda a: a, params)
    mixed["encoder"]["layer_0"]["ffn"]["output"]["bias"] = ints["encoder"]["layer_0"]["ffn"][
        "output"
    ]["bias"]
    sym.apply(spec, mixed, t)
    # align returns the integer leaf exactly as apply moves it, also where it rescales the
    # weights (beyond 2^20) or the integers pass float32's 2^24: it returned them truncated
    # from the rescaled float32 copy the solve reads (all 0).
    bias = lambda tree: tree["encoder"]["layer_0"]["ffn"]["output"]
    for size, step in ((1e7, 1), (1.0, 10**7)):
        a = jax.tree.map(lambda x, size=size: x * size, mixed)
        b = sym.apply(spec, a, {"residual": jax.random.permutation(key, 12)})
        for tree in (a, b):
            bias(tree)["bias"] = jnp.arange(12, dtype=jnp.int32) * step + 1
        res = match.align(spec, a, b, solve=("residual",))
        got = bias(res.params)["bias"]
        assert got.dtype == jnp.int32 and (got != 0).all()
        np.testing.assert_array_equal(got, bias(sym.apply(spec, b, res.transform))["bias"])


def _rename(tree, path, new=None):
    tree = jax.tree.map(lambda a: a, tree)  # fresh dicts
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
        node = node[p]
    value = node.pop(leaf)
    if new is not None:
        node[new] = value
    return tree


@pytest.mark.parametrize("scan", [False, True])
def test_validate_names_the_offending_path(scan, key):
    config, spec, model, params, _ = setup("bert-h3d4-l2", scan, key)
    layer = "encoder/layers" if scan else "encoder/layer_1"
    q = f"{layer}/attention/query/kernel"

    with pytest.raises(ValueError, match=f"only in the params: {layer}/attention/query/weight"):
        sym.validate(spec, _rename(params, q, "weight"))
    with pytest.raises(ValueError, match=f"only in the spec: +{q}"):
        sym.validate(spec, _rename(params, q))
    extra = jax.tree.map(lambda a: a, params)
    extra["encoder"]["extra"] = jnp.zeros(3)
    with pytest.raises(ValueError, match="only in the params: encoder/extra"):
        sym.validate(spec, extra)

    # A model with 4 heads of width 3 instead of 3 heads of width 4.
    other = dataclasses.replace(config, num_attention_heads=4)
    _, wrong = init(other, key)
    with pytest.raises(ValueError, match=r"wrong shape: +encoder/\S+/attention/key/bias"):
        sym.validate(spec, wrong)
    with pytest.raises(ValueError, match="do not match the symmetry spec"):
        sym.apply(spec, wrong, sym.identity(spec))
    # The usual mistakes are said (the message listed every path twice, with no hint): the
    # variables dict for its params, and a scanned model's params for an unscanned one's.
    with pytest.raises(ValueError, match=r"hint: every param sits one level down, under 'params'"):
        sym.validate(spec, {"params": params})
    other_layout = (unstack_layers if scan else stack_layers)(params)
    held = "per-layer" if scan else "stacked"
    with pytest.raises(ValueError, match=rf"hint: the params hold {held} layers"):
        sym.validate(spec, other_layout)
    for unrelated in ({}, {"embeddings": params["embeddings"]}):  # not a layout: no hint
        with pytest.raises(ValueError) as e:
            sym.validate(spec, unrelated)
        assert "hint" not in str(e.value)
    with pytest.raises(ValueError) as e:  # a plain mismatch has no hint
        sym.validate(spec, extra)
    assert "hint" not in str(e.value)


def test_bad_transform_is_rejected(key):
    config, spec, model, params, _ = setup("vit-h3d4-l2", False, key)
    with pytest.raises(ValueError, match="not in the spec: \\['nope'\\]"):
        sym.apply(spec, params, {"nope": jnp.zeros(3)})
    name = "encoder/layer_0/attention/qk_rotation"
    with pytest.raises(ValueError, match=f"transform\\['{name}'\\] has shape \\(3, 4, 5\\)"):
        sym.apply(spec, params, {name: jnp.zeros((3, 4, 5))})
    # A float permutation (e.g. an argsort cast to float) names its group; so does align's init.
    for name in ("encoder/layer_0/ffn/units", "encoder/layer_0/attention/heads"):
        perm = sym.identity(spec)[name].astype(jnp.float32)
        with pytest.raises(ValueError, match=f"'{name}'\\] has dtype float32: a permutation"):
            sym.apply(spec, params, {name: perm})
        with pytest.raises(ValueError, match=f"'{name}'\\] has dtype float32: a permutation"):
            match.align(spec, params, params, init={name: perm})
    # A complex rotation or scale (unitary, say) was cast to the params' real dtype, silently.
    for group in spec.select(roles=["qk_rotation", "vo_scale"], layers=0):
        el = {group: sym.identity(spec)[group].astype(jnp.complex64) * 1j}
        message = f"'{group}'\\] has dtype complex64: the .* real"
        with pytest.raises(ValueError, match=message):
            sym.apply(spec, params, el)
        with pytest.raises(ValueError, match=message):
            sym.compose(spec, el, {})
        with pytest.raises(ValueError, match=message):
            sym.invert(spec, el)
    # NaN or Inf in a rotation or scale, or a scale of 0 (W_O / a): every param it acts on
    # came out NaN or Inf, silently. Refused where the values are known, as below.
    for group in spec.select(roles=["qk_rotation", "vo_scale"], layers=0):
        one = np.array(sym.identity(spec)[group])
        for bad, what in ((np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (0.0, "a scale of 0")):
            if what.startswith("a scale") and one.ndim > 1:
                continue  # (a rotation may hold zeros)
            el = one.copy()
            el.flat[0] = bad
            with pytest.raises(ValueError, match=rf"\['{group}'\] holds {what}"):
                sym.apply(spec, params, {group: el})
            with pytest.raises(ValueError, match=rf"\['{group}'\] holds {what}"):
                match.align(spec, params, params, init={group: el})
    # Integer elements that are no permutation: jnp.take filled an index out of range with
    # NaN, and a repeated index copied a unit, silently. Refused wherever the values are known
    # (apply, compose, invert, align's init); under jit they cannot be read.
    t = sym.sample(spec, key)
    for name, g in spec.groups.items():
        if g.kind not in ("perm", "hperm"):
            continue
        el = np.array(t[name])
        out_of_range, repeated = el.copy(), el.copy()
        out_of_range[..., 0] = g.shape[-1]
        repeated[..., 0] = el[..., 1]
        for bad in (out_of_range, repeated):
            with pytest.raises(ValueError, match=rf"\['{name}'\] is not a permutation of 0..n-1"):
                sym.apply(spec, params, {name: bad})
            with pytest.raises(ValueError, match=rf"\['{name}'\] is not a permutation"):
                sym.compose(spec, t, {name: bad})
            with pytest.raises(ValueError, match=rf"\['{name}'\] is not a permutation"):
                sym.invert(spec, {name: bad})
            with pytest.raises(ValueError, match=rf"\['{name}'\] is not a permutation"):
                match.align(spec, params, params, init={name: bad})
            traced = jax.jit(sym.apply, static_argnums=0)(spec, params, {name: bad})
            assert not rel_err(traced, params) <= 0  # unchecked under jit: NaN, or a copy
    # Not a transform, or not a spec: named (a bare TypeError or AttributeError inside).
    with pytest.raises(TypeError, match=r"a transform is a mapping .* got NoneType"):
        sym.apply(spec, params, None)
    for call in (
        lambda: sym.apply(params, params, {}),
        lambda: sym.validate(params, params),
        lambda: match.align(params, params, params),
        # (an AttributeError, or JAX's "Non-hashable static arguments", until 2026-12-07)
        lambda: sym.sample(params, jax.random.key(0)),
        lambda: sym.identity(params),
        lambda: merge.activation_init(params, {}),
        lambda: merge.group_scores(params, {}, ()),
    ):
        with pytest.raises(TypeError, match=r"spec must be a rotjax\.symmetry\.Spec .* got dict"):
            call()


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        sym.Spec.combine(sym.param("w", (3, 4), sym.Action("nope", (0,))))
    with pytest.raises(ValueError, match=r"'w' .*do not fit group 'p'"):
        sym.Spec.combine(sym.permutation("p", 5), sym.param("w", (3, 4), sym.Action("p", (0,))))
    with pytest.raises(ValueError, match="power -1 is not allowed"):
        sym.Spec.combine(
            sym.permutation("p", 3), sym.param("w", (3, 4), sym.Action("p", (0,), power=-1))
        )
    # Per-head rotations over a head permutation that permutes another axis of the kernel
    # (`compose` would move the rotations with heads they do not act on).
    heads = sym.permutation("h", 3, role="heads")
    rot = sym.group("r", sym.Group("orth", 3, dim=2, over="h", role="qk_rotation"))
    w = lambda *acts: sym.param("w", (3, 3, 2), *acts)
    ok = sym.Spec.combine(heads, rot, w(sym.Action("h", (1,)), sym.Action("r", (1, 2))))
    assert set(ok.groups) == {"h", "r"}
    with pytest.raises(ValueError, match=r"'w' .*'r' acts on axis 1, which its over='h' does not"):
        sym.Spec.combine(heads, rot, w(sym.Action("h", (0,)), sym.Action("r", (1, 2))))
    with pytest.raises(ValueError, match=r"over='h' does not permute here \(it permutes no axis"):
        sym.Spec.combine(heads, rot, w(sym.Action("r", (1, 2))))
    # A per-head group that a head permutation moves must say so (over=None: compose and
    # invert would keep each head's element in place while the heads move).
    free = sym.group("r", sym.Group("orth", 3, dim=2, role="qk_rotation"))
    with pytest.raises(ValueError, match=r"'r' acts on axis 1, which permutation 'h' permutes too"):
        sym.Spec.combine(heads, free, w(sym.Action("h", (1,)), sym.Action("r", (1, 2))))
    assert set(sym.Spec.combine(heads, free, w(sym.Action("r", (1, 2)))).groups) == {"h", "r"}
    # with_stream_rotation names its problems (a taken name was a TypeError from sorting).
    vit = family(CONFIGS["vit-h3d4-l2"])
    spec, stream = (
        vit.symmetry_spec(CONFIGS["vit-h3d4-l2"]),
        vit.stream_spec(CONFIGS["vit-h3d4-l2"]),
    )
    (res,) = spec.select(roles="residual")
    with pytest.raises(ValueError, match=f"already has a group '{res}'"):
        sym.with_stream_rotation(spec, stream, res, res)
    with pytest.raises(ValueError, match="has no group 'nope'"):
        sym.with_stream_rotation(spec, stream, "nope", "stream")
    # select: an unknown role (a typo, or an align block) selected nothing, silently; one
    # numpy layer as one int layer (it was iterated: a TypeError).
    for role in ("head", "rotation"):
        with pytest.raises(ValueError, match=rf"unknown role\(s\) \['{role}'\]; expected"):
            spec.select(roles=role)
    assert spec.select(roles="ffn", layers=np.int64(1)) == spec.select(roles="ffn", layers=1)
    assert len(spec.select(roles="ffn", layers=1)) == 1


def test_transform_elements_may_be_lists(key):
    """`check_transform` reads a list element as an array; apply, compose and invert (and
    align's init, permutation_scores' transform) failed on one inside their jitted programs
    (a list is no pytree leaf)."""
    config, spec, model, params, _ = setup("bert-h3d4-l2", False, key)
    perm = jax.random.permutation(key, 12)
    as_list = {"residual": [int(i) for i in perm]}
    moved = sym.apply(spec, params, as_list)
    jax.tree.map(np.testing.assert_array_equal, moved, sym.apply(spec, params, {"residual": perm}))
    back = sym.compose(spec, as_list, sym.invert(spec, as_list))
    np.testing.assert_array_equal(back["residual"], np.arange(12))
    # So do align's init and permutation_scores' transform (a TypeError inside their jit)
    undo = {"residual": [int(i) for i in jnp.argsort(perm)]}
    aligned = match.align(spec, params, moved, solve=("ffn",), init=undo)
    assert rel_err(aligned.params, params) <= 1e-7
    units = spec.select(roles=["ffn"])[:1]
    got = match.permutation_scores(spec, params, moved, units, undo)
    want = match.permutation_scores(spec, params, moved, units, {"residual": np.argsort(perm)})
    jax.tree.map(np.testing.assert_array_equal, got, want)


class NNXAttention(nnx.Module):
    """A user's own NNX model: attention + MLP + LayerNorm with flax.nnx building blocks."""

    def __init__(self, d, heads, hidden, *, rngs):
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        x = self.norm(x + self.attn(x))
        return x + self.down(nnx.relu(self.up(x)))


def test_nnx_state_round_trip(key):
    d, heads, hidden = 12, 3, 10
    model = NNXAttention(d, heads, hidden, rngs=nnx.Rngs(0))
    # A user's spec from the same fragment builders; nnx names its attention output "out".
    spec = sym.Spec.combine(
        sym.permutation("stream", d),
        sym.attention("attn", hidden_size=d, num_heads=heads, head_dim=d // heads, stream="stream"),
        sym.layer_norm("norm", d, "stream"),
        sym.mlp("", hidden_size=d, intermediate_size=hidden, stream="stream", names=("up", "down")),
    )
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    pure = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(key, a.shape), pure)
    nnx.replace_by_pure_dict(state, pure)
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 5, d))
    before = nnx.merge(graphdef, state)(x)

    t = sym.sample(spec, jax.random.fold_in(key, 2))
    moved = sym.apply(spec, pure, t)
    state2 = nnx.split(model)[1]
    nnx.replace_by_pure_dict(state2, moved)
    # Input and output live in the stream's basis, which the transform permutes:
    # x'[..., i] = x[..., π[i]] in, out'[..., i] = out[..., π[i]] out.
    after = nnx.merge(graphdef, state2)(jnp.take(x, t["stream"], axis=-1))
    assert rel_err(after, jnp.take(before, t["stream"], axis=-1)) <= TOL
    back = sym.apply(spec, moved, sym.invert(spec, t))
    assert rel_err(back, pure) <= TOL


def test_fragment_builders_check_what_they_hold():
    """A fragment is checked when built (its own groups and axes), not only when combined."""
    with pytest.raises(ValueError, match=r"param 'w' \(shape \(3, 4\)\): axes \(2,\) of group"):
        sym.param("w", (3, 4), sym.Action("p", (2,)))
    with pytest.raises(ValueError, match="power 2 is not allowed"):
        sym.param("w", (3, 4), sym.Action("p", (0,), power=2))
    # A spec built whole from builders is also checked as a whole by `Spec.combine`.
    with pytest.raises(ValueError, match="unknown group 'stream'"):
        sym.Spec.combine(sym.dense("d", 3, 4, in_group="stream"))


@settings(max_examples=6, deadline=None)
@given(
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    layers=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_laws_on_random_attention_shapes(heads, head_dim, layers, seed):
    """apply(g) then apply(g⁻¹) is the identity and compose(g, h) acts as g then h, for any
    head count, head width and stacking (property test over shapes)."""
    d = heads * head_dim + 1
    spec = sym.Spec.combine(
        sym.permutation("stream", d),
        sym.attention(
            "att", hidden_size=d, num_heads=heads, head_dim=head_dim, stream="stream", batch=layers
        ),
    )
    key = jax.random.key(seed)
    params = {}
    for i, (path, p) in enumerate(spec.param_items):
        prefix, name, leaf = path.split("/")
        params.setdefault(prefix, {}).setdefault(name, {})[leaf] = jax.random.normal(
            jax.random.fold_in(key, i), p.shape
        )
    g, h = (
        sym.sample(spec, jax.random.fold_in(key, 100)),
        sym.sample(spec, jax.random.fold_in(key, 101)),
    )
    moved = sym.apply(spec, params, g)
    assert rel_err(sym.apply(spec, moved, sym.invert(spec, g)), params) <= TOL
    twice = sym.apply(spec, moved, h)
    assert rel_err(sym.apply(spec, params, sym.compose(spec, g, h)), twice) <= TOL


def test_element_tolerance_and_stacked_embeddings(key):
    """Two public options nothing else exercises: `check_elements`' ``atol`` (a rotation 1e-3
    off orthogonal is refused at the default 1e-4 and taken at 1e-2; scales must be positive
    at any tolerance), and `embedding`'s ``batch`` (a stack of tables, each permuted on its
    feature axis, the last)."""
    spec = sym.Spec.combine(
        sym.group("r", sym.Group("orth", 1, 5)), sym.group("s", sym.Group("scale", 3))
    )
    r = jax.random.orthogonal(key, 5)[None] * (1 + 1e-3)
    with pytest.raises(ValueError, match=r"transform\['r'\] is not orthogonal"):
        sym.check_elements(spec, {"r": r})
    sym.check_elements(spec, {"r": r}, atol=1e-2)
    with pytest.raises(ValueError, match=r"transform\['s'\] is not finite and positive"):
        sym.check_elements(spec, {"s": jnp.array([1.0, -1.0, 2.0])}, atol=10.0)
    with pytest.raises(ValueError, match=r"transform\['s'\] holds a scale of 0"):
        sym.check_elements(spec, {"s": jnp.array([1.0, 0.0, 2.0])}, atol=10.0)
    stacked = sym.Spec.combine(sym.permutation("g", 4), sym.embedding("e", 3, 4, "g", batch=(2,)))
    x = jax.random.normal(key, (2, 3, 4))
    perm = jnp.array([2, 0, 3, 1])
    moved = sym.apply(stacked, {"e": {"embedding": x}}, {"g": perm})
    np.testing.assert_array_equal(moved["e"]["embedding"], x[..., perm])
    with pytest.raises(ValueError, match=r"e/embedding  params \(3, 4\) vs spec \(2, 3, 4\)"):
        sym.validate(stacked, {"e": {"embedding": x[0]}})
