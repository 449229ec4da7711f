"""Tiny model configs and random inputs shared by the tests."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rotjax import symmetry as sym
from rotjax.models import bert, deberta, family, llama, vit
from rotjax.tree import flatten

# (name, config) pairs: head_dim other than 64 everywhere, odd head counts, 1 head, 1 layer.
BERT_CONFIGS = {
    "bert-h3d4-l2": bert.Config(
        vocab_size=50,
        hidden_size=12,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=20,
        max_position_embeddings=16,
        num_labels=3,
    ),
    "bert-h5d2-l1-token": bert.Config(
        vocab_size=40,
        hidden_size=10,
        num_hidden_layers=1,
        num_attention_heads=5,
        intermediate_size=14,
        max_position_embeddings=12,
        num_labels=4,
        task="token_classification",
        hidden_act="gelu_new",
    ),
    "roberta-h1d6-l2": bert.Config(
        vocab_size=40,
        hidden_size=6,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=9,
        max_position_embeddings=16,
        type_vocab_size=1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
        model_type="roberta",
        num_labels=2,
    ),
    "bert-encoder-pooler": bert.Config(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=12,
        task=None,
        add_pooling_layer=True,
    ),
}

VIT_CONFIGS = {
    "vit-h3d4-l2": vit.Config(
        hidden_size=12,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
        num_channels=3,
        num_labels=5,
    ),
    "vit-h1d8-l1-nobias": vit.Config(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=12,
        image_size=6,
        patch_size=3,
        num_channels=1,
        num_labels=3,
        qkv_bias=False,
    ),
}

# Grouped-query attention with 2 query heads per key-value head and head_dim 6 (not
# hidden/heads), Qwen2's biases with 4 per head, padding; causal LM and classification heads.
LLAMA_CONFIGS = {
    "llama-k2g2d6-l2-seq": llama.Config(
        vocab_size=50,
        hidden_size=12,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        max_position_embeddings=16,
        task="sequence_classification",
        num_labels=3,
        pad_token_id=0,
    ),
    "qwen2-k1g4d4-l1": llama.Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=16,
        rope_theta=500.0,
        model_type="qwen2",
    ),
}

# DeBERTa with c2p and p2c on both: v3-style (shared Q/K projections of the LayerNorm'd
# relative embeddings, log buckets reached by 7 tokens, no absolute positions, sequence head)
# and v2-style (separate pos_key/pos_query projections, absolute positions and token types,
# distances clipped at max_relative_positions, token head); odd head counts, head_dim 5 and 2.
DEBERTA_CONFIGS = {
    "deberta-v3-h3d5-l2-seq": deberta.Config(
        vocab_size=40,
        hidden_size=15,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=20,
        max_position_embeddings=16,
        relative_attention=True,
        position_buckets=4,
        max_relative_positions=16,
        pos_att_type=("p2c", "c2p"),
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        pooler_hidden_act="tanh",
        num_labels=3,
    ),
    "deberta-v2-h5d2-l1-token": deberta.Config(
        vocab_size=30,
        hidden_size=10,
        num_hidden_layers=1,
        num_attention_heads=5,
        intermediate_size=14,
        max_position_embeddings=12,
        type_vocab_size=2,
        relative_attention=True,
        max_relative_positions=3,
        pos_att_type=("c2p", "p2c"),
        share_att_key=False,
        num_labels=4,
        task="token_classification",
    ),
}

CONFIGS = {**BERT_CONFIGS, **VIT_CONFIGS, **LLAMA_CONFIGS, **DEBERTA_CONFIGS}


def scanned(config, scan=True):
    return dataclasses.replace(config, scan_layers=scan)


def inputs(config, key, batch=3):
    """Random model inputs; token batches include padding (a masked tail) in one row."""
    if family(config).name == "vit":
        shape = (batch, config.image_size, config.image_size, config.num_channels)
        return (jax.random.normal(key, shape),)
    seq = min(7, config.max_position_embeddings - 2)
    pad = config.pad_token_id or 0
    ids = jax.random.randint(key, (batch, seq), pad + 1, config.vocab_size)
    mask = jnp.ones((batch, seq), jnp.int32).at[-1, seq - 2 :].set(0)
    ids = jnp.where(mask > 0, ids, pad)
    return ids, mask


def init(config, key, scale=0.3):
    """Params with every leaf (LayerNorm scales and biases included) randomly perturbed, so that
    logits are O(1) and no symmetry is hidden by zero biases or unit scales."""
    return compiled(config).model, compiled(config).init(key, scale)


class Compiled:
    """A config's model, spec and jitted functions, compiled once per test process (XLA's CPU
    compiler takes ~70 ms a program here, so eager tiny ops would dominate the test time)."""

    def __init__(self, config):
        self.model = family(config).Model(config)
        self.spec = family(config).symmetry_spec(config)
        self.init = jax.jit(functools.partial(_random_params, config), static_argnums=1)
        self.apply = jax.jit(functools.partial(sym.apply, self.spec))
        self.forward = jax.jit(lambda p, x: self.model.apply({"params": p}, *x))


@functools.cache
def compiled(config):
    return Compiled(config)


def _random_params(config, key, scale):
    """Params of the model's shapes drawn from one normal vector: one small program to compile
    (`model.init` would compile a PRNG kernel per parameter). LayerNorm scales are ``1 + noise``."""
    paths, leaves, treedef = flatten(family(config).param_shapes(config))
    sizes = [x.size for x in leaves]
    flat = scale * jax.random.normal(key, (sum(sizes),))
    out, start = [], 0
    for path, x, n in zip(paths, leaves, sizes, strict=True):
        leaf = flat[start : start + n].reshape(x.shape)
        out.append(leaf + 1.0 if path.endswith("/scale") else leaf)
        start += n
    return jax.tree.unflatten(treedef, out)


def logits(model, params, x, transform=None):
    """The model's output as one array. Bare encoders output hidden states, which live in the
    permuted basis: ``transform`` (the one that made ``params``) maps them back to the original
    basis, since ``h'[..., i] = h[..., π[i]]``; their pooler output is the model's, unmoved."""
    out = compiled(model.config).forward(params, x)
    if isinstance(out, jax.Array):
        return out
    t = transform or {}

    def back(h, group):
        return h if group not in t else jnp.take(h, jnp.argsort(t[group]), axis=-1)

    parts = [back(out.last_hidden_state, "residual").reshape(-1)]
    if out.pooler_output is not None:
        parts.append(out.pooler_output.reshape(-1))
    return jnp.concatenate(parts)


def refuses_before_any_work(main, argv, message, tmp_path, capsys, monkeypatch):
    """``main(argv)`` (an experiment's) exits with argparse's code 2 and ``message`` on stderr,
    writing nothing (its default output directories are relative: it runs in ``tmp_path``);
    ``"FILE"`` in ``argv`` names a file there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    try:
        main(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2, err
        assert message in err, err
    else:
        raise AssertionError(f"{argv} was accepted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written
