"""The model registry, input checks, the two params layouts and pretrained initialisation."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers import CONFIGS, compiled, inputs

import rotjax.hf
import rotjax.models
from rotjax import symmetry as sym
from rotjax.models import bert, deberta, family, vit
from rotjax.tree import flatten, from_dict, to_dict


@pytest.mark.parametrize("name", list(CONFIGS))
def test_family_record_describes_its_model(name, key):
    config = CONFIGS[name]
    f = family(config)
    assert f.Config is type(config) and config.model_type in f.model_types
    assert family(dataclasses.replace(config, scan_layers=True)) is f
    params = f.init(config, key)
    sym.validate(f.symmetry_spec(config), params)  # example inputs, init and spec agree
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), f.param_shapes(config))
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    x = f.example_inputs(config, batch_size=2)
    assert len(x) <= len(f.input_names)
    out = f.Model(config).apply({"params": params}, *x)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(out))
    # batch_inputs maps named arrays (Hugging Face names) onto the same positional arguments.
    named = f.batch_inputs(dict(zip(f.input_names, x, strict=False)))
    again = f.Model(config).apply({"params": params}, *named)
    jax.tree.map(np.testing.assert_array_equal, again, out)
    assert rotjax.models.family_of_model_type(config.model_type) is f
    assert f.pre_norm == (f.name in ("vit", "llama"))
    # pre_norm follows from stream_spec; given otherwise, refused (two fields to keep in step)
    with pytest.raises(ValueError, match=rf"Family '{f.name}': pre_norm={not f.pre_norm} but"):
        dataclasses.replace(f, pre_norm=not f.pre_norm)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"conv_kernel_size": 3}, "conv_kernel_size=3 is not supported"),
        ({"embedding_size": 8}, "embedding_size=8 is not supported"),
        ({"pooler_hidden_size": 8}, "pooler_hidden_size=8 is not supported"),
        ({"attention_head_size": 3}, "attention_head_size=3 is not supported"),
        ({"pos_att_type": ["p2p", "c2p"]}, r"pos_att_type=\['p2p', 'c2p'\] is not supported"),
        ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd='batch_norm' is not supported"),
        ({"norm_rel_ebd": "layer_norm"}, "with relative_attention=False is not supported"),
        ({"relative_attention": True, "position_buckets": 1}, "position_buckets=1 is not"),
        (
            {"relative_attention": True, "position_buckets": 8, "max_relative_positions": 5},
            "position_buckets=8 with max_relative_positions=5 gives log buckets of zero width",
        ),
        ({"pooler_hidden_act": "mish"}, "pooler_hidden_act='mish' is not supported"),
        ({"hidden_size": 14}, "hidden_size=14 is not a multiple"),
        ({"type_vocab_size": -1}, "type_vocab_size must be >= 0"),
    ],
)
def test_deberta_options_rotjax_lacks_are_refused(changes, message):
    base = dict(vocab_size=40, hidden_size=12, num_attention_heads=3, intermediate_size=8)
    with pytest.raises(ValueError, match=message):
        deberta.Config(**{**base, **changes})


def test_deberta_bucket_fields_without_relative_attention_are_accepted():
    base = dict(vocab_size=40, hidden_size=12, num_attention_heads=3, intermediate_size=8)
    for buckets in (1, 8):  # transformers reads neither field without relative attention
        config = deberta.Config(**base, position_buckets=buckets, max_relative_positions=5)
        assert (config.position_buckets, config.max_relative_positions) == (buckets, 5)
        assert not config.relative_attention


def test_configs_without_pad_token_id_take_transformers_defaults():
    """A config.json without ``pad_token_id`` means transformers' default for its type: 1 for
    RoBERTa (which also numbers positions from it), 0 for BERT; RoBERTa read as 0 computed
    other position ids (4e-1 off transformers' logits)."""
    import transformers

    base = dict(vocab_size=40, hidden_size=12, num_attention_heads=3, intermediate_size=8)
    for model_type, hf in [
        ("roberta", transformers.RobertaConfig),
        ("bert", transformers.BertConfig),
    ]:
        config = bert.Config.from_hf_dict({**base, "model_type": model_type})
        assert config.pad_token_id == hf().pad_token_id, model_type
    given = bert.Config.from_hf_dict({**base, "model_type": "roberta", "pad_token_id": 3})
    assert given.pad_token_id == 3
    # transformers allows null; BERT never reads it, RoBERTa numbers positions from it.
    null = bert.Config.from_hf_dict({**base, "pad_token_id": None})
    assert null.pad_token_id is None and bert.example_inputs(null)[0].shape == (1, 8)
    with pytest.raises(ValueError, match="RoBERTa config needs pad_token_id"):
        bert.Config.from_hf_dict({**base, "model_type": "roberta", "pad_token_id": None})


def test_deberta_config_reads_transformers_forms():
    """pos_att_type as transformers takes it (a list, "p2c|c2p", null) becomes one tuple in
    c2p, p2c order; sizes left out resolve to hidden_size's."""
    base = dict(vocab_size=40, hidden_size=12, num_attention_heads=3, intermediate_size=8)
    for given, want in [
        (["p2c", "c2p"], ("c2p", "p2c")),
        ("p2c|c2p", ("c2p", "p2c")),
        ("C2P", ("c2p",)),
        (None, ()),
    ]:
        config = deberta.Config.from_hf_dict({**base, "pos_att_type": given})
        assert config.pos_att_type == want
        assert config.scale_factor == 1 + len(want)
    c = deberta.Config(**base)
    assert (c.embedding_size, c.pooler_hidden_size, c.attention_head_size) == (12, 12, 4)
    assert deberta.Config(**base, relative_attention=True, position_buckets=8).span == 8
    assert deberta.Config(**base, relative_attention=True, max_position_embeddings=20).span == 20


def test_deberta_log_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    mdl = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    # Odd bucket counts, a max_relative below the buckets' middle, mid = 1 (buckets 2 and 3).
    cases = [(4, 16, 9), (256, 512, 300), (8, 12, 40), (7, 20, 30), (16, 5, 30), (2, 9, 12)]
    for buckets, max_rel, tokens in [*cases, (3, 6, 12)]:
        config = deberta.Config(
            vocab_size=4,
            hidden_size=4,
            num_attention_heads=1,
            intermediate_size=4,
            relative_attention=True,
            position_buckets=buckets,
            max_relative_positions=max_rel,
        )
        x = torch.zeros(1, tokens, 1)
        theirs = mdl.build_relative_position(x, x, bucket_size=buckets, max_position=max_rel)
        ours = deberta.relative_positions(config, tokens)
        np.testing.assert_array_equal(ours, theirs[0].numpy())


def test_unknown_configs_are_refused():
    with pytest.raises(TypeError, match=r"not a rotjax model config: dict \(known: bert.Config"):
        family({"hidden_size": 8})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        rotjax.models.family_of_model_type("gpt2")


def test_vit_raw_images_are_normalised_like_the_image_processor():
    images = np.array([[[[0], [255]], [[51], [102]]]], np.uint8)
    (pixels,) = vit.FAMILY.batch_inputs({"images": images})
    np.testing.assert_allclose(pixels[..., 0], [[[-1.0, 1.0], [-0.6, -0.2]]], atol=1e-6)
    np.testing.assert_allclose(vit.image_pixels(images / 255.0), pixels, atol=1e-6)
    # Other integer images have no known range (uint16 from data.concat of uint8 and uint16
    # images; int64 from a list of ints): refused, not read as [0, 1] floats (255x).
    for dtype in (np.uint16, np.int32, np.int64):
        with pytest.raises(ValueError, match=f"images of dtype {np.dtype(dtype)}: give uint8"):
            vit.FAMILY.batch_inputs({"images": images.astype(dtype)})
    # Float images outside [0, 1] (the usual "cast to float32 first": 0..255 became pixels up
    # to 509, silently) are refused where known; traced ones are not checked.
    for bad in (images.astype(np.float32), images / 255.0 - 0.5):
        with pytest.raises(
            ValueError, match=r"images are floats in \[.*\]: give floats in \[0, 1\]"
        ):
            vit.image_pixels(bad)
    traced = jax.jit(vit.image_pixels)(images.astype(np.float32))  # unknown: unchecked,
    np.testing.assert_allclose(traced, (images - 0.5) / 0.5)  # 0..255 taken as [0, 1] floats
    with pytest.raises(ValueError, match="images hold NaN or Inf"):  # (not "in [nan, nan]")
        vit.image_pixels(np.where(images == 0, np.nan, images / 255.0))
    # A batch without the model's inputs names both it could read.
    with pytest.raises(KeyError, match="pixel_values or images"):
        vit.FAMILY.batch_inputs({"image": images})


def test_models_check_their_inputs(key):
    v = CONFIGS["vit-h3d4-l2"]  # 8x8x3 images
    c = compiled(v)
    params = c.init(key, 0.3)
    raw = jnp.zeros((1, 8, 8, 3), jnp.uint8)  # raw pixels went into the patch embedding
    with pytest.raises(ValueError, match="pixel_values of dtype uint8: give normalised floats"):
        c.model.apply({"params": params}, raw)
    with pytest.raises(ValueError, match=r"NHWC \(batch, 8, 8, 3\).*got shape \(2, 6, 6, 3\)"):
        c.model.apply({"params": params}, jnp.zeros((2, 6, 6, 3)))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 8\): channels first\?"):
        c.model.apply({"params": params}, jnp.zeros((2, 3, 8, 8)))  # Hugging Face's layout
    b = CONFIGS["bert-h3d4-l2"]  # 16 positions
    c = compiled(b)
    params = c.init(key, 0.3)
    ids = jnp.ones((2, 17), jnp.int32)
    with pytest.raises(ValueError, match="17 tokens; this model takes at most 16"):
        c.model.apply({"params": params}, ids)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), input_ids \(2, 4\)"):
        c.model.apply({"params": params}, ids[:, :4], jnp.ones((2, 3), jnp.int32))
    # Ids outside their tables (a gather would wrap -1 and give NaN past the end), as
    # transformers refuses them; RoBERTa's single token type takes no pair ids.
    bad = [
        (-1, None, "input_ids holds ids -1..1"),
        (b.vocab_size, None, f"ids 1..{b.vocab_size}; the model"),
    ]
    bad.append((1, 2, f"token_type_ids holds ids 0..2; the model's table has {b.type_vocab_size}"))
    for top, kind, message in bad:
        wrong = ids[:, :4].at[0, 0].set(top if kind is None else 1)
        types = None if kind is None else jnp.zeros_like(wrong).at[1, 1].set(kind)
        with pytest.raises(ValueError, match=re.escape(message)):
            c.model.apply({"params": params}, wrong, None, types)
    r = CONFIGS["roberta-h1d6-l2"]
    c = compiled(r)
    types = jnp.zeros((1, 4), jnp.int32).at[0, 2:].set(1)
    message = "token_type_ids holds ids 0..1; the model's table has 1 rows"
    with pytest.raises(ValueError, match=re.escape(message)):
        c.model.apply({"params": c.init(key, 0.3)}, jnp.full((1, 4), 3, jnp.int32), None, types)


@pytest.mark.parametrize("name", ["deberta-v3-h3d5-l2-seq", "llama-k2g2d6-l2-seq"])
def test_token_models_check_their_inputs(name, key):
    config = CONFIGS[name]
    params = compiled(config).init(key, 0.3)
    if name.startswith("llama"):  # Mistral's sliding window: longer inputs are refused
        config = dataclasses.replace(config, sliding_window=4)
        # its params' shapes, traced on example inputs that fit the window (8 tokens raised)
        assert jax.tree.structure(family(config).param_shapes(config)) == jax.tree.structure(params)
    c = compiled(config)
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, tokens\), got shape \(5,\)"):
        c.model.apply({"params": params}, ids[0])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), input_ids \(2, 4\)"):
        c.model.apply({"params": params}, ids[:, :4], jnp.ones((2, 3), jnp.int32))
    if name.startswith("llama"):
        with pytest.raises(ValueError, match="5 tokens; this model takes at most 4"):
            c.model.apply({"params": params}, ids)


def test_roberta_takes_padding_past_its_positions_when_it_can_see_it(key):
    """RoBERTa numbers real tokens only: a batch padded wider than its position table runs
    (as in transformers) when the ids are concrete; traced, only the width is known."""
    config = CONFIGS["roberta-h1d6-l2"]  # 16 positions, pad 1: at most 14 tokens
    c = compiled(config)
    params = c.init(key, 0.3)
    ids = jax.random.randint(key, (2, 14), 2, config.vocab_size)
    padded = jnp.concatenate([ids, jnp.ones((2, 2), ids.dtype)], axis=1)  # 16 wide
    mask = (padded != 1).astype(jnp.int32)
    run = lambda x, m: c.model.apply({"params": params}, x, m)
    assert rel_err(run(padded, mask), run(ids, mask[:, :14])) <= 1e-6
    with pytest.raises(ValueError, match="16 tokens; this model takes at most 14"):
        jax.jit(run)(padded, mask)
    longer = padded.at[0, 14].set(5)  # 15 real tokens: position 16 is past the table
    with pytest.raises(ValueError, match="16 tokens; this model takes at most 14"):
        run(longer, mask)


def test_stack_unstack_layers(seed):
    config = bert.Config(
        vocab_size=20,
        hidden_size=4,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=6,
        max_position_embeddings=8,
    )
    rng = np.random.default_rng(seed)
    # numpy leaves: numpy out, nothing compiled.
    params = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), family(config).param_shapes(config)
    )
    stacked = rotjax.models.stack_layers(params)
    sym.validate(bert.symmetry_spec(dataclasses.replace(config, scan_layers=True)), stacked)
    kernel = stacked["encoder"]["layers"]["ffn"]["output"]["kernel"]
    assert isinstance(kernel, np.ndarray)
    layer_2 = params["encoder"]["layer_2"]
    np.testing.assert_array_equal(kernel[2], layer_2["ffn"]["output"]["kernel"])
    back = rotjax.models.unstack_layers(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # Under jit (one program for the whole tree).
    jitted = jax.jit(rotjax.models.stack_layers)(params)
    assert isinstance(jitted["encoder"]["layers"]["ffn"]["output"]["kernel"], jax.Array)
    jax.tree.map(np.testing.assert_array_equal, jitted, stacked)
    # The README's names under rotjax.hf are the same functions.
    assert rotjax.hf.stack_layers is rotjax.models.stack_layers
    assert rotjax.hf.unstack_layers is rotjax.models.unstack_layers

    broken = {"encoder": {"layer_0": params["encoder"]["layer_0"], "layer_2": layer_2}}
    with pytest.raises(ValueError, match=r"not 0\.\.L-1"):
        rotjax.models.stack_layers(broken)
    # Two keys of one index: refused (the last stood for both, the other kept beside layers)
    twice = {"encoder": {"layer_0": layer_2, "layer_1": layer_2, "layer_01": layer_2}}
    with pytest.raises(ValueError, match=r"encoder/: \['layer_01', 'layer_1'\] name the same"):
        rotjax.models.stack_layers(twice)


def test_with_pretrained_keeps_the_encoder_and_draws_a_head(key):
    small = CONFIGS["bert-h3d4-l2"]
    encoder = dataclasses.replace(small, task=None)
    pretrained = compiled(encoder).init(key, 0.3)
    shapes = family(small).param_shapes(small)
    params = rotjax.models.with_pretrained(shapes, pretrained, jax.random.fold_in(key, 1), std=0.5)
    flat, old = to_dict(params), to_dict(pretrained)
    for path, x in old.items():
        np.testing.assert_array_equal(flat[path], x, err_msg=path)
    new = sorted(set(flat) - set(old))
    assert new == ["classifier/bias", "classifier/kernel", "pooler/bias", "pooler/kernel"]
    assert np.all(np.asarray(flat["classifier/bias"]) == 0)
    assert 0.2 < float(jnp.std(flat["pooler/kernel"])) < 1.0
    with pytest.raises(ValueError, match="pretrained params not in the model"):
        rotjax.models.with_pretrained(shapes, {**old, "extra/kernel": jnp.zeros(2)}, key)
    wrong = {**old, "encoder/layer_0/ffn/output/bias": jnp.zeros(5)}
    with pytest.raises(ValueError, match=r"layer_0/ffn/output/bias: pretrained shape \(5,\)"):
        rotjax.models.with_pretrained(shapes, from_dict(wrong), key)


def test_tree_paths_round_trip(key):
    params = compiled(CONFIGS["vit-h3d4-l2"]).init(key, 0.3)
    flat = to_dict(params)
    assert "encoder/layer_1/attention/query/kernel" in flat
    assert flatten(from_dict(flat))[0] == flatten(params)[0]
    with pytest.raises(ValueError, match="a/b is both a leaf and a subtree"):
        from_dict({"a/b": 1, "a/b/c": 2})
    # ... also when the leaf is a dict: the second path was written into the caller's dict
    mine = {"x": 1}
    with pytest.raises(ValueError, match="a/b is both a leaf and a subtree"):
        from_dict({"a/b": mine, "a/b/c": 2})
    assert mine == {"x": 1}
    # Two leaves of one path (a key holding "/"): refused (the second overwrote the first)
    with pytest.raises(ValueError, match=r"leaves share the paths \['a/b'\]"):
        to_dict({"a/b": 1, "a": {"b": 2}})


@pytest.mark.parametrize("name", ["bert-h3d4-l2", "llama-k2g2d6-l2-seq"])
def test_a_forward_pass_closing_over_its_ids_jits(name, key):
    """The README's ``out = lambda p: model.apply({"params": p}, ids, mask)`` under `jax.jit`
    and `jax.grad`: the id check reads the concrete ids (its np.min was jax's, a tracer under
    jit: a ConcretizationTypeError)."""
    config = CONFIGS[name]
    c = compiled(config)
    params, x = c.init(key, 0.3), inputs(config, key)
    out = lambda p: c.model.apply({"params": p}, *x)
    assert rel_err(jax.jit(out)(params), out(params)) <= 1e-6
    loss = lambda p: jnp.sum(out(p) ** 2)
    assert rel_err(jax.jit(jax.grad(loss))(params), jax.grad(loss)(params)) <= 1e-5
