"""Hugging Face interop: parity with transformers' PyTorch models, round trips, errors.

Tolerances: 1e-5 relative max error for tiny random models: both sides run float32 (JAX
matmuls at "highest" precision, torch eager attention) and differ only by the order of float32
sums, ~1e-7 per op, over two layers. 1e-4 for all-MiniLM-L6-v2: six 384-wide layers with real
weights (outliers in LayerNorm inputs amplify rounding).
"""

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import rel_err
from helpers import CONFIGS, DEBERTA_CONFIGS, logits, scanned

import rotjax.hf
import rotjax.models
from rotjax import symmetry as sym
from rotjax.data import minilm_dir
from rotjax.hf._files import stored_dtypes
from rotjax.models import deberta, family, llama, vit
from rotjax.tree import flatten, to_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
MINILM_TOL = 1e-4

# name -> rotjax config (the tiny configs of `helpers`, as base models and other heads too).
# Head widths other than 64, odd head counts and a single head; every supported architecture.
CASES = {
    "bert-seq-h3d4": CONFIGS["bert-h3d4-l2"],
    "bert-token-h5d2": CONFIGS["bert-h5d2-l1-token"],
    "bert-base-pooler": CONFIGS["bert-encoder-pooler"],
    "bert-base-nopooler": dataclasses.replace(
        CONFIGS["bert-encoder-pooler"], add_pooling_layer=False
    ),
    "roberta-seq-h1d6": CONFIGS["roberta-h1d6-l2"],
    "roberta-token-h1d6": dataclasses.replace(
        CONFIGS["roberta-h1d6-l2"], task="token_classification"
    ),
    "vit-cls-h3d4": CONFIGS["vit-h3d4-l2"],
    "vit-base-h1d8-nobias": dataclasses.replace(CONFIGS["vit-h1d8-l1-nobias"], task=None),
    # Llama-style decoders: GQA with 2 and 4 query heads per key-value head and without
    # grouping, head_dim other than hidden/heads, Qwen2 biases, tied embeddings, Mistral.
    "llama-seq-k2g2d6": CONFIGS["llama-k2g2d6-l2-seq"],
    "qwen2-lm-k1g4": CONFIGS["qwen2-k1g4d4-l1"],
    # a window of 4 tokens from layer 1 on, past the last layer: 7-token inputs run, unslid
    "qwen2-lm-window-unused": dataclasses.replace(
        CONFIGS["qwen2-k1g4d4-l1"], sliding_window=4, max_window_layers=1
    ),
    "llama-lm-h3-tied-bias": llama.Config(
        vocab_size=40,
        hidden_size=12,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=3,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "mistral-base-k2g2": llama.Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        model_type="mistral",
        task=None,
    ),
    # DeBERTa-v2/v3: shared and separate position projections, both heads, a base model with
    # c2p only (and relative distances clipped at 2), none with absolute positions.
    "deberta-seq-v3-h3d5": CONFIGS["deberta-v3-h3d5-l2-seq"],
    "deberta-token-v2-h5d2": CONFIGS["deberta-v2-h5d2-l1-token"],
    "deberta-base-c2p-h3d4": deberta.Config(
        vocab_size=40,
        hidden_size=12,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=16,
        max_position_embeddings=16,
        relative_attention=True,
        max_relative_positions=2,
        pos_att_type=("c2p",),
        position_biased_input=False,
        task=None,
    ),
}

SCANNED = (
    "bert-seq-h3d4",
    "vit-cls-h3d4",
    "llama-seq-k2g2d6",
    "deberta-seq-v3-h3d5",
)  # also run with scanned layers

AUTO = {
    None: "AutoModel",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "image_classification": "AutoModelForImageClassification",
    "causal_lm": "AutoModelForCausalLM",
}


def ctor_kwargs(name):
    """What `from_pretrained` / the model class needs beyond the config."""
    config = CASES[name]
    if config.task or getattr(config, "has_pooler", True):
        return {}
    return {"add_pooling_layer": False}


def torch_model(name, seed):
    """A transformers model of case ``name``, with random parameters (`randomize`)."""
    config = rotjax.hf.transformers_config(CASES[name])
    config._attn_implementation = "eager"
    model = getattr(transformers, config.architectures[0])(config, **ctor_kwargs(name))
    return randomize(model.eval(), seed)


def randomize(model, seed):
    """``model`` with every parameter random (norm weights ``1 + noise``, biases nonzero), so no
    wrongly mapped tensor can hide behind init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.add_(1.0)
    return model


def make_inputs(config, rng, batch=3):
    """rotjax inputs: padded token ids (a masked tail in two rows) with random token types, or
    NHWC images."""
    if family(config).name == "vit":
        s, c = config.image_size, config.num_channels
        return (rng.standard_normal((batch, s, s, c), dtype=np.float32),)
    pad = config.pad_token_id or 0
    seq = min(7, config.max_position_embeddings - pad - 2)
    ids = rng.integers(pad + 1, config.vocab_size, (batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[-1, seq - 3 :] = 0
    mask[0, seq - 1 :] = 0
    ids = np.where(mask > 0, ids, pad).astype(np.int32)
    if family(config).name == "llama" or not config.type_vocab_size:
        return ids, mask
    types = rng.integers(0, config.type_vocab_size, (batch, seq), dtype=np.int32)
    return ids, mask, types


def torch_forward(model, x):
    """The torch model's output as one flat array, as `helpers.logits` gives rotjax's."""
    if len(x) == 1:
        kwargs = dict(
            pixel_values=torch.from_numpy(np.ascontiguousarray(x[0].transpose(0, 3, 1, 2)))
        )
    else:
        names = ("input_ids", "attention_mask", "token_type_ids")
        kwargs = {n: torch.from_numpy(v).long() for n, v in zip(names, x, strict=False)}
    with torch.no_grad():
        out = model(**kwargs)
    if getattr(out, "logits", None) is not None:
        return out.logits.numpy()
    parts = [out.last_hidden_state.numpy().reshape(-1)]
    if getattr(out, "pooler_output", None) is not None:
        parts.append(out.pooler_output.numpy().reshape(-1))
    return np.concatenate(parts)


def rotjax_forward(config, params, x):
    model = family(config).Model(config)
    return np.asarray(logits(model, params, x))  # jitted once per config (helpers.compiled)


def random_params(config, seed):
    """Random params of ``Model(config)``'s structure, as jax arrays; no XLA compile (the shapes
    come from `jax.eval_shape`, the values from numpy)."""
    shapes = family(config).param_shapes(config)
    rng = np.random.default_rng(seed)
    return jax.device_put(
        jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)
    )


def assert_trees_equal(a, b):
    pa, la, _ = flatten(a)
    pb, lb, _ = flatten(b)
    assert pa == pb
    for path, x, y in zip(pa, la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype == np.float32, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_transformers(name, seed, tmp_path):
    """Loaded from the in-memory model (unscanned) and from its save_pretrained directory
    (scanned): the same params, and rotjax logits equal torch logits on padded inputs."""
    model = torch_model(name, seed)
    config, params = rotjax.hf.load(model)
    assert config == CASES[name]
    x = make_inputs(config, np.random.default_rng(seed))
    expected = torch_forward(model, x)
    assert rel_err(rotjax_forward(config, params, x), expected) <= TOL

    model.save_pretrained(tmp_path)
    config_s, params_s = rotjax.hf.load(tmp_path, scan_layers=True)
    assert config_s == dataclasses.replace(config, scan_layers=True)
    assert_trees_equal(rotjax.models.unstack_layers(params_s), params)
    if name in SCANNED:  # the others would only add XLA compiles for identical params
        assert rel_err(rotjax_forward(config_s, params_s, x), expected) <= TOL


@pytest.mark.parametrize(
    "arch, image_size, patch_size",
    [("ViTForImageClassification", 30, 4), ("ViTModel", 23, 6)],
)
def test_vit_image_size_not_a_multiple_of_patch_size_matches_transformers(
    arch, image_size, patch_size, seed, tmp_path
):
    """transformers' strided Conv2d keeps ``(image_size // patch_size)²`` patches and drops the
    last ``image_size % patch_size`` rows and columns; rotjax loads, runs and saves such a
    checkpoint alike (30/4: 7x7 patches, 2 pixels cropped; 23/6: 3x3, 5 cropped, a patch
    short of one more)."""
    hf = transformers.ViTConfig(
        hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=24,
        image_size=image_size, patch_size=patch_size, num_labels=5,
    )  # fmt: skip
    hf._attn_implementation = "eager"
    model = randomize(getattr(transformers, arch)(hf).eval(), seed)
    model.save_pretrained(tmp_path / "hf")
    config, params = rotjax.hf.load(tmp_path / "hf")
    n = image_size // patch_size
    assert config.image_size == image_size and config.num_patches == n * n
    x = make_inputs(config, np.random.default_rng(seed))
    expected = torch_forward(model, x)
    ours = rotjax_forward(config, params, x)
    assert rel_err(ours, expected) <= TOL
    cropped = x[0].copy()
    cropped[:, n * patch_size :] = cropped[:, :, n * patch_size :] = 100.0
    np.testing.assert_array_equal(rotjax_forward(config, params, (cropped,)), ours)
    again = rotjax.hf.load(rotjax.hf.save(tmp_path / "again", config, params))
    assert again[0] == config
    assert_trees_equal(again[1], params)
    small = patch_size - 1  # no patch at all: torch's Conv2d fails too
    with pytest.raises(
        ValueError, match=f"image_size={small} is smaller than patch_size={patch_size}"
    ):
        dataclasses.replace(config, image_size=small)


@pytest.mark.parametrize(
    "arch, hidden, heads, kv_heads, written",
    [
        ("MistralForCausalLM", 20, 3, 3, None),
        ("MistralForCausalLM", 26, 4, 2, None),
        ("MistralForCausalLM", 26, 4, 2, 0),
        ("Qwen2ForCausalLM", 34, 4, 1, None),
    ],
)
def test_absent_head_dim_is_floored_as_transformers(
    arch, hidden, heads, kv_heads, written, seed, tmp_path
):
    """A ``config.json`` without ``head_dim`` (``written`` None), or a Mistral one with
    ``"head_dim": 0`` (which `MistralConfig` keeps and `MistralAttention` reads as "derive
    it"), whose heads do not divide ``hidden_size``: Mistral and Qwen2 take ``hidden_size //
    num_attention_heads`` (6, 6, 6, 8 here), as transformers (LlamaConfig refuses it, and so
    does rotjax: see the test above)."""
    cls = getattr(transformers, arch)
    hf = cls.config_class(
        vocab_size=40, hidden_size=hidden, intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    )  # fmt: skip
    hf._attn_implementation = "eager"
    model = randomize(cls(hf).eval(), seed)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(path.read_text()).items() if k != "head_dim"}
    path.write_text(json.dumps(d if written is None else {**d, "head_dim": written}))
    if written is not None:  # transformers itself builds the same model from it
        again = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert again.model.layers[0].self_attn.head_dim == hidden // heads
    config, params = rotjax.hf.load(tmp_path)
    assert config.head_dim == hidden // heads == model.model.layers[0].self_attn.head_dim
    x = make_inputs(config, np.random.default_rng(seed))
    assert rel_err(rotjax_forward(config, params, x), torch_forward(model, x)) <= TOL


@pytest.mark.parametrize("name", ["bert-seq-h3d4", "vit-cls-h3d4", "deberta-seq-v3-h3d5"])
def test_layer_norms_of_a_stream_with_a_large_mean_match_float64(name, seed):
    """Every feature offset by 300 (the embeddings' or patch projection's bias): LayerNorm's
    variance in two passes, as torch's, keeps the logits near torch's float64 ones.

    float32 rounds 300 + x by up to 1.8e-5, ~1e-4 of these rows' spread, and the random layers
    amplify it erratically: one draw's logits were up to 8.6e-4 from float64 (DeBERTa, 1000
    draws; torch's own float32 up to 6e-4, and 1.4e-3 from ours). So the bound is on the median of
    8 draws: with two passes the single draws' medians are 1.1e-5 (ViT) to 7.7e-5 (DeBERTa), and
    medians of 8 resampled from the 1000 DeBERTa draws stayed below 3.4e-4 in 200000 tries. Flax's
    default E[x²] - mean² gives medians of 1.5e-3 (ViT) to 0.1 (DeBERTa), over 150 draws each."""
    errors = []
    for draw in range(seed, seed + 8):
        model = torch_model(name, draw)
        with torch.no_grad():
            for m in model.modules():
                if type(m).__name__.endswith("Embeddings"):
                    if hasattr(m, "word_embeddings"):
                        m.word_embeddings.weight.add_(300.0)
                    else:
                        m.patch_embeddings.projection.bias.add_(300.0)
                    break
        config, params = rotjax.hf.load(model)
        x = make_inputs(config, np.random.default_rng(draw))
        ours = rotjax_forward(config, params, x)
        if len(x) == 1:  # pixel values in float64 for the float64 reference
            x = tuple(np.float64(v) for v in x)
        errors.append(rel_err(ours, torch_forward(model.double(), x)))
    assert np.median(errors) <= 5e-4, errors


@pytest.mark.parametrize(
    "name",
    [
        "bert-seq-h3d4",
        "bert-base-nopooler",
        "roberta-seq-h1d6",
        "vit-cls-h3d4",
        "llama-seq-k2g2d6",
        "llama-lm-h3-tied-bias",
        "qwen2-lm-k1g4",
        "deberta-seq-v3-h3d5",
        "deberta-token-v2-h5d2",
        "deberta-base-c2p-h3d4",
    ],
)
def test_round_trip(name, seed, tmp_path):
    """import -> export -> import is bitwise; the export loads into transformers with no
    missing or unexpected keys and gives the same logits."""
    model = torch_model(name, seed)
    config, params = rotjax.hf.load(model, scan_layers=name in SCANNED)
    out = rotjax.hf.save(
        tmp_path / "export",
        config,
        params,
        id2label={i: f"class-{i}" for i in range(config.num_labels)},
    )
    config2, params2 = rotjax.hf.load(out, scan_layers=name in SCANNED)
    assert config2 == config
    assert_trees_equal(params2, params)

    auto = getattr(transformers, AUTO[config.task])
    reloaded, info = auto.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager", **ctor_kwargs(name)
    )
    assert type(reloaded).__name__ == model.config.architectures[0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    saved = json.loads((out / "config.json").read_text())
    if hasattr(config, "rope_theta"):  # for transformers 4 (top level) and 5 (the dict)
        assert saved["rope_theta"] == saved["rope_parameters"]["rope_theta"] == config.rope_theta
        assert reloaded.config.rope_parameters["rope_theta"] == config.rope_theta
    if config.task is not None:
        assert reloaded.config.id2label[1] == "class-1"
    # A model from from_pretrained (transformers >= 5 may rename its tensors in memory).
    assert_trees_equal(rotjax.hf.load(reloaded, scan_layers=name in SCANNED)[1], params)
    x = make_inputs(config, np.random.default_rng(seed))
    assert rel_err(torch_forward(reloaded.eval(), x), rotjax_forward(config, params, x)) <= TOL


def test_save_random_rotjax_params(seed, tmp_path):
    """rotjax -> transformers for params rotjax made (not imported), scanned."""
    config = scanned(CASES["bert-seq-h3d4"])
    params = random_params(config, seed)
    before = jax.tree.map(np.array, params)
    out = rotjax.hf.save(tmp_path, config, params)
    assert_trees_equal(params, before)  # inputs untouched
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info
    x = make_inputs(config, np.random.default_rng(0))
    assert rel_err(torch_forward(model.eval(), x), rotjax_forward(config, params, x)) <= TOL


def test_minilm_matches_transformers(tmp_path):
    """Real all-MiniLM-L6-v2 weights (no prefix, with a position_ids buffer): hidden states and
    pooler output equal transformers' on real sentences of different lengths, padded."""
    directory = minilm_dir()
    config, params = rotjax.hf.load(directory)
    assert (config.task, config.add_pooling_layer, config.head_dim) == (None, True, 32)
    sentences = [
        "A man is playing a guitar.",
        "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
        "Hello!",
        "Permutation and rotation symmetries let us align transformers before merging them.",
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    x = tuple(batch[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert (x[1] == 0).any()  # padded
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    assert rel_err(rotjax_forward(config, params, x), torch_forward(model, x)) <= MINILM_TOL

    # Export with the tokenizer, and back: bitwise; tokenizer files copied.
    out = rotjax.hf.save(tmp_path / "minilm", config, params, tokenizer_from=directory)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).read_bytes() == (directory / f).read_bytes()
    config2, params2 = rotjax.hf.load(out)
    assert config2 == config
    assert_trees_equal(params2, params)


# ------------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def checkpoint(tmp_path, seed):
    """A saved BertForSequenceClassification directory and its tensors."""
    model = torch_model("bert-seq-h3d4", seed)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt"
    return path, safetensors.numpy.load_file(path / "model.safetensors")


def rewrite(path, tensors):
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "id2label", [{"a": "x", "b": "y", "c": "z"}, {"0": "x", "5": "y"}, {"1": "x"}]
)
def test_error_id2label_not_class_ids(checkpoint, id2label):
    """``id2label``'s keys are the class ids ``0..n-1`` (transformers and `hf.save` read them
    with ``int``): other keys were accepted on loading and failed when the merge was saved."""
    path, _ = checkpoint
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "id2label": id2label}))
    with pytest.raises(ValueError, match=r"id2label must have the keys 0\.\.n-1"):
        rotjax.hf.load(path)


def test_error_unknown_architecture(checkpoint, seed):
    path, _ = checkpoint
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["BertForQuestionAnswering"]})
    )
    with pytest.raises(ValueError, match=r"unsupported architectures.*BertForQuestionAnswering"):
        rotjax.hf.load(path)
    (path / "config.json").write_text(
        json.dumps({**cfg, "position_embedding_type": "relative_key", "is_decoder": True})
    )
    with pytest.raises(ValueError, match="position_embedding_type='relative_key', is_decoder"):
        rotjax.hf.load(path)
    del cfg["architectures"]
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        rotjax.hf.load(path)
    qa = transformers.BertForQuestionAnswering(
        rotjax.hf.transformers_config(CASES["bert-seq-h3d4"])
    )
    with pytest.raises(ValueError, match="BertForQuestionAnswering"):
        rotjax.hf.load(qa)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        rotjax.hf.load(42)


def test_error_tensors(checkpoint):
    path, tensors = checkpoint
    name = "bert.encoder.layer.1.attention.self.key.weight"
    rewrite(path, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(
        ValueError,
        match=r"missing: +bert\.encoder\.layer\.1\.attention\.self\.key\.weight  \(12, 12\)",
    ):
        rotjax.hf.load(path)

    extra = "bert.encoder.layer.0.attention.self.rotary.weight"
    rewrite(path, {**tensors, extra: np.zeros((2, 3), np.float32)})
    with pytest.raises(
        ValueError,
        match=r"unexpected: bert\.encoder\.layer\.0\.attention\.self\.rotary\.weight  \(2, 3\)",
    ):
        rotjax.hf.load(path)

    bad = "classifier.weight"
    rewrite(path, {**tensors, bad: np.zeros((12, 3), np.float32)})
    with pytest.raises(
        ValueError, match=r"wrong shape: classifier\.weight  \(12, 3\), expected \(3, 12\)"
    ):
        rotjax.hf.load(path)

    # A base-model prefix and a bare name for the same tensor.
    rewrite(
        path, {**tensors, "embeddings.LayerNorm.bias": tensors["bert.embeddings.LayerNorm.bias"]}
    )
    with pytest.raises(ValueError, match="same parameter"):
        rotjax.hf.load(path)


def test_float64_values_float32_cannot_hold_are_refused_not_made_inf(checkpoint, seed, tmp_path):
    """float32, which rotjax computes in and writes, holds magnitudes up to 3.4e38: a float64
    checkpoint's (file or in-memory model) or params' 1e300 became Inf, with at most numpy's
    overflow warning. Now each is refused, named. A value that rounds to float32's largest
    is no overflow; NaN stored in a checkpoint loads as it is (the command line refuses it)."""
    path, tensors = checkpoint
    tensors = {k: v.astype(np.float64) for k, v in tensors.items()}
    name = "bert.encoder.layer.1.output.dense.weight"
    biggest = np.finfo(np.float32).max
    tensors[name].flat[:2] = (-biggest * (1 + 2**-26), np.nan)  # a quarter ulp beyond: rounds
    rewrite(path, tensors)
    config, params = rotjax.hf.load(path)
    (kernel,) = [x for x in to_dict(params).values() if (np.asarray(x) == -biggest).any()]
    assert (np.asarray(kernel) == -biggest).sum() == 1 and np.isnan(kernel).sum() == 1
    tensors[name].flat[2] = 1e300
    rewrite(path, tensors)
    with pytest.raises(
        ValueError, match=rf"beyond float32's range[^\n]*\n  {name}  float64, \|x\| up to 1e\+300$"
    ):
        rotjax.hf.load(path)
    model = torch_model("bert-seq-h3d4", seed).double()
    with torch.no_grad():
        model.classifier.bias[1] = -1e39
    with pytest.raises(ValueError, match=r"\n  classifier\.bias  float64, \|x\| up to 1e\+39$"):
        rotjax.hf.load(model)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    params["classifier"]["kernel"][0, 0] = 1e300
    with pytest.raises(
        ValueError, match=r"written in[^\n]*\n  classifier/kernel  \|x\| up to 1e\+300$"
    ):
        rotjax.hf.save(tmp_path / "out", config, params)
    assert not (tmp_path / "out").exists()


def test_a_tied_head_that_differs_from_the_embedding_is_refused(seed):
    """An in-memory model's state dict holds ``lm_head.weight`` beside the embedding it is
    tied to; one that differs in value (untied after construction) is refused as such."""
    model = torch_model("llama-lm-h3-tied-bias", seed)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)
    with pytest.raises(ValueError, match=r"differs from embed_tokens\.weight \(values differ, "):
        rotjax.hf.load(model)


def test_error_files(checkpoint, tmp_path):
    path, tensors = checkpoint
    with pytest.raises(FileNotFoundError, match="nowhere"):
        rotjax.hf.load(tmp_path / "nowhere")

    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        rotjax.hf.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        rotjax.hf.load(path)

    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        rotjax.hf.load(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        rotjax.hf.load(path)


def test_pytorch_bin_and_legacy_names(checkpoint, seed, tmp_path):
    """Alternative spellings of one checkpoint load the same params: pytorch_model.bin with
    old-style names (LayerNorm gamma/beta) and a position_ids buffer; bfloat16 safetensors
    (upcast); a base model saved with the ``bert.`` prefix."""
    path, tensors = checkpoint
    config, params = rotjax.hf.load(path)

    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): torch.from_numpy(v)
        for k, v in tensors.items()
    }
    legacy["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    (path / "model.safetensors").unlink()
    torch.save(legacy, path / "pytorch_model.bin")
    config2, params2 = rotjax.hf.load(path)
    assert config2 == config
    assert_trees_equal(params2, params)
    # The stored dtypes, which the loaded float32 arrays no longer say (the CLI's notes)
    assert stored_dtypes(path) == {"float32"}
    torch.save({k: v.to(torch.bfloat16) for k, v in legacy.items()}, path / "pytorch_model.bin")
    assert stored_dtypes(path) == {"bfloat16"}  # (the int64 position_ids are not floating)
    half = {k: v.to(torch.float16) for k, v in legacy.items()}  # torch's legacy format: no mmap
    torch.save(half, path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert stored_dtypes(path) == {"float16"}

    (path / "pytorch_model.bin").unlink()
    rewrite(path, {k: v.astype(jnp.bfloat16) for k, v in tensors.items()})
    to_bf16 = lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32)
    assert_trees_equal(rotjax.hf.load(path)[1], jax.tree.map(to_bf16, params))
    assert stored_dtypes(path) == {"bfloat16"}
    rewrite(path, {**tensors, next(iter(tensors)): next(iter(tensors.values())).astype(np.float16)})
    assert stored_dtypes(path) == {"float16", "float32"}
    # Buffers loading drops (an old LLaMA's float32 inv_freq, position ids) are not weights
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    rewrite(path, {**half, "bert.embeddings.position_ids": np.zeros(3, np.float32)})
    assert stored_dtypes(path) == {"float16"}

    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not a readable"):
        rotjax.hf.load(path)
    # A state dict with a non-tensor entry (an AttributeError, a traceback in the CLI)
    torch.save({**legacy, "meta": {"step": 3}}, path / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"not a state dict of tensors: it also holds 'meta': dict"
    ):
        rotjax.hf.load(path)

    base = torch_model("bert-base-pooler", seed)
    base.save_pretrained(tmp_path / "base")
    base_tensors = safetensors.numpy.load_file(tmp_path / "base" / "model.safetensors")
    rewrite(tmp_path / "base", {f"bert.{k}": v for k, v in base_tensors.items()})
    assert_trees_equal(rotjax.hf.load(tmp_path / "base")[1], rotjax.hf.load(base)[1])


def test_sharded_checkpoints_load_like_one_file(checkpoint):
    """Sharded safetensors and sharded pytorch_model.bin (each with its index's weight_map)
    load the same params as the single file; a shard missing, or a tensor the index maps to a
    shard that lacks it, is an error naming the file."""
    path, tensors = checkpoint
    config, params = rotjax.hf.load(path)
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"-00001-of-00002": names[::2], "-00002-of-00002": names[1::2]}
    for stem, ext, save in (
        ("model", "safetensors", lambda t, f: safetensors.numpy.save_file(t, f)),
        ("pytorch_model", "bin", lambda t, f: torch.save(
            {k: torch.from_numpy(v) for k, v in t.items()}, f)),
    ):  # fmt: skip
        weight_map = {}
        for suffix, part in halves.items():
            shard = f"{stem}{suffix}.{ext}"
            save({k: tensors[k] for k in part}, path / shard)
            weight_map |= dict.fromkeys(part, shard)
        index = path / f"{stem}.{ext}.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config2, params2 = rotjax.hf.load(path)
        assert config2 == config
        assert_trees_equal(params2, params)
        assert stored_dtypes(path) == {"float32"}
        # A stale copy of a tensor in the later shard (an older save's) is not read: the
        # index says where each tensor is (the last shard read won).
        first, second = (f"{stem}{suffix}.{ext}" for suffix in halves)
        stale = {k: tensors[k] for k in halves["-00002-of-00002"]} | {names[0]: -tensors[names[0]]}
        save(stale, path / second)
        assert_trees_equal(rotjax.hf.load(path)[1], params)
        stale[names[0]] = stale[names[0]].astype(np.float16)  # (not read: not a stored dtype)
        save(stale, path / second)
        assert stored_dtypes(path) == {"float32"}
        save({k: tensors[k] for k in halves["-00002-of-00002"]}, path / second)
        lost = f"{stem}-00002-of-00002.{ext}"
        index.write_text(json.dumps({"metadata": {}}))  # no map: no weights said (load says)
        assert stored_dtypes(path) == set()
        index.write_text(json.dumps({"weight_map": {**weight_map, "extra.weight": lost}}))
        with pytest.raises(ValueError, match=r"lack them, e\.g\. 'extra\.weight'"):
            rotjax.hf.load(path)
        (path / lost).unlink()
        with pytest.raises(FileNotFoundError, match=re.escape(lost)):
            rotjax.hf.load(path)
        for f in path.glob(f"{stem}*"):
            f.unlink()


# A one-layer ViT of 4-pixel images: the checkpoint writer's tests.
TINY_VIT = vit.Config(
    hidden_size=4,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=6,
    image_size=4,
    patch_size=2,
    num_channels=1,
    num_labels=2,
)


def test_save_syncs_before_and_after_the_rename(seed, tmp_path, monkeypatch):
    """Whole-or-nothing through a power loss too: each written file and directory reaches the
    disk before the rename publishes them, and the rename (the parent's entry) before save
    returns."""
    config = TINY_VIT
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("sync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    rotjax.hf.save(tmp_path / "out", config, random_params(config, seed), extra_files={"a": "1"})
    monkeypatch.undo()
    (i,) = [i for i, e in enumerate(events) if e == ("rename", "out")]
    synced_first = {name for kind, name in events[:i] if kind == "sync"}
    assert {"config.json", "model.safetensors", "a"} <= synced_first
    assert any(name.startswith(".out.tmp-") for name in synced_first)  # its directory entries
    assert events[i + 1 :] == [("sync", tmp_path.name)]


def test_write_whole_is_whole_or_nothing_and_synced(tmp_path, monkeypatch):
    """The training logs', dataset caches' and reports' writer: an error leaves the old file
    and nothing beside it; the new file reaches the disk before the rename, the rename before
    the return; permissions as a plain open gives them (mkstemp gave 0600)."""
    from rotjax._atomic import write_whole

    path = tmp_path / "f.json"
    write_whole(path, "old\n")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_whole(path, broken)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    events = []
    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    write_whole(path, lambda f: f.write(b"new"))
    monkeypatch.undo()
    tmp, replace, parent = events
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".f.json.")
    assert (replace, parent) == ("replace", str(tmp_path)) and path.read_bytes() == b"new"
    (tmp_path / "plain").write_text("x")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    # Through a symbolic link (a shared statistics file): its target is replaced, the link kept
    (tmp_path / "shared").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "shared" / "f.json")  # dangling: created
    for text in ("first", "second"):
        write_whole(link, text)
        assert link.is_symlink() and (tmp_path / "shared" / "f.json").read_text() == text
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["f.json"]
    # A link in a loop, or into a missing folder, is replaced by the file (RuntimeError:
    # "Symlink loop" from Path.resolve; FileNotFoundError)
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("missing/f.json")
    for name in ("loop", "dangling"):
        write_whole(tmp_path / name, "x")
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).read_text() == "x"


def test_save_errors_leave_nothing(seed, tmp_path, monkeypatch):
    config = TINY_VIT
    params = random_params(config, seed)
    target = tmp_path / "out"

    wrong = dataclasses.replace(config, intermediate_size=7)
    with pytest.raises(
        ValueError, match=r"encoder/layer_0/ffn/intermediate/kernel .*\(4, 6\) vs spec \(4, 7\)"
    ):
        rotjax.hf.save(target, wrong, params)
    with pytest.raises(FileNotFoundError, match="tokenizer_from"):
        rotjax.hf.save(target, config, params, tokenizer_from=tmp_path / "missing")
    with pytest.raises(ValueError, match="id2label"):
        rotjax.hf.save(target, config, params, id2label={0: "a"})
    # label2id given for id2label: int('neg') said only "invalid literal for int()"
    label2id = {f"class-{i}": i for i in range(config.num_labels)}
    got = re.escape(repr(sorted(label2id)))
    with pytest.raises(ValueError, match=rf"id2label must name labels 0\.\..* got the keys {got}"):
        rotjax.hf.save(target, config, params, id2label=label2id)
    source = tmp_path / "source"  # the same in a source's config.json (which load refuses)
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"id2label": {"a": "x", "b": "y"}}))
    with pytest.raises(ValueError, match=r"id2label must name labels .* got the keys \['a', 'b'\]"):
        rotjax.hf.save(target, config, params, source=source)
    (source / "config.json").unlink()
    source.rmdir()
    for name in ("../escaped.json", "sub/x.json", "config.json", "model.safetensors"):
        with pytest.raises(ValueError, match=f"extra_files: '{re.escape(name)}' is not a plain"):
            rotjax.hf.save(target, config, params, extra_files={name: "{}"})

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "preprocessor_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\['preprocessor_config.json'\] would replace files"):
        rotjax.hf.save(
            target,
            config,
            params,
            tokenizer_from=tmp_path / "tok",
            extra_files={"preprocessor_config.json": "{}", "notes.txt": ""},
        )
    assert not target.exists()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("shutil.copyfile", fail)
    with pytest.raises(OSError, match="disk full"):
        rotjax.hf.save(target, config, params, tokenizer_from=tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no half-written directory
    monkeypatch.undo()

    # A SentencePiece tokenizer (DeBERTa-v3's spm.model, LLaMA's tokenizer.model) travels too.
    for name in ("spm.model", "tokenizer.model", "chat_template.jinja"):
        (tmp_path / "tok" / name).write_bytes(b"\x00sp")
    rotjax.hf.save(target, config, params, tokenizer_from=tmp_path / "tok")
    for name in ("preprocessor_config.json", "spm.model", "tokenizer.model", "chat_template.jinja"):
        assert (target / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rotjax.hf.save(target, config, params)
    rotjax.hf.save(target, config, params, overwrite=True)
    written = ["config.json", "model.safetensors"]
    assert sorted(p.name for p in target.iterdir()) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tok"]
    # Overwriting through a symbolic link replaces the link, not what it points to (rmtree
    # refused the link after the new directory was in place).
    (tmp_path / "link").symlink_to(target)
    # Without overwrite, a link is refused (it was replaced when dangling or to an empty one).
    (tmp_path / "empty").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to-empty").symlink_to(tmp_path / "empty")
    for link in ("dangling", "to-empty"):
        with pytest.raises(FileExistsError, match="is a symbolic link; name the directory"):
            rotjax.hf.save(tmp_path / link, config, params)
        assert (tmp_path / link).is_symlink()
    assert not any((tmp_path / "empty").iterdir()) and not (tmp_path / "nowhere").exists()
    # The working directory (".", empty) or a parent of it: refused (an OSError, EBUSY, from
    # a rename onto it, its temporary directory made inside it)
    monkeypatch.chdir(tmp_path / "empty")
    for where in (".", "./", "..", str(tmp_path)):
        with pytest.raises(ValueError, match="is the working directory or holds it"):
            rotjax.hf.save(where, config, params, overwrite=True)
    monkeypatch.undo()
    assert not any((tmp_path / "empty").iterdir())
    for name in ("dangling", "to-empty", "empty"):
        (tmp_path / name).unlink() if name != "empty" else (tmp_path / name).rmdir()
    rotjax.hf.save(tmp_path / "link", config, params, overwrite=True)
    assert (tmp_path / "link").is_dir() and not (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in target.iterdir()) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out", "tok"]
    # An empty directory filled by someone else while the weights were written: kept, the new
    # checkpoint not moved in (it was swapped out and deleted before).
    (tmp_path / "late").mkdir()
    import safetensors.numpy

    save_file = safetensors.numpy.save_file

    def fill_then_save(*args, **kwargs):
        (tmp_path / "late" / "theirs.txt").write_text("mine")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", fill_then_save)
    with pytest.raises(FileExistsError, match="written meanwhile"):
        rotjax.hf.save(tmp_path / "late", config, params)
    assert [p.name for p in (tmp_path / "late").iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "link", "out", "tok"]


def test_vit_image_processor_reproduces_image_pixels(seed, tmp_path):
    """`hf.vit_image_processor` written with a ViT makes transformers' image processor feed
    it what `vit.image_pixels` fed it in training (a stock processor resizes to 224 with
    three channels' statistics), with the default and with other statistics."""
    config = CONFIGS["vit-h3d4-l2"]
    from transformers import AutoImageProcessor

    shape = (3, config.image_size, config.image_size, config.num_channels)
    images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    for i, stats in enumerate(({}, {"mean": 0.286, "std": 0.353})):
        processor = {"preprocessor_config.json": rotjax.hf.vit_image_processor(config, **stats)}
        params = random_params(config, seed)
        rotjax.hf.save(tmp_path / f"m{i}", config, params, extra_files=processor)
        processor = AutoImageProcessor.from_pretrained(tmp_path / f"m{i}", use_fast=False)
        got = processor(list(images), return_tensors="np", input_data_format="channels_last")
        want = np.asarray(vit.image_pixels(images, **stats)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got["pixel_values"], want, rtol=0, atol=1e-6)


def test_load_for_task_keeps_the_encoder_and_adds_a_head(seed, tmp_path):
    encoder = CASES["bert-base-pooler"]
    params = random_params(encoder, seed)
    rotjax.hf.save(tmp_path / "enc", encoder, params)
    config, tuned = rotjax.hf.load_for_task(
        tmp_path / "enc", task="token_classification", num_labels=5, key=jax.random.key(seed)
    )
    assert config.task == "token_classification" and config.num_labels == 5
    assert config.hidden_size == encoder.hidden_size and not config.has_pooler
    old, new = to_dict(params), to_dict(tuned)
    assert sorted(set(new) - set(old)) == ["classifier/bias", "classifier/kernel"]
    for path in set(new) & set(old):
        np.testing.assert_array_equal(new[path], old[path], err_msg=path)
    sym.validate(family(config).symmetry_spec(config), tuned)
    # scan_layers as for load: the same params, stacked (the same key: the same head)
    stacked_config, stacked = rotjax.hf.load_for_task(
        tmp_path / "enc",
        task="token_classification",
        num_labels=5,
        key=jax.random.key(seed),
        scan_layers=True,
    )
    assert stacked_config == dataclasses.replace(config, scan_layers=True)
    assert_trees_equal(rotjax.models.unstack_layers(stacked), tuned)
    # A fine-tune's head for another number of classes is drawn anew (it raised: "pretrained
    # shape (5,), model (3,)"); the same number keeps it.
    rotjax.hf.save(tmp_path / "tuned", config, tuned)
    for n in (3, 5):
        again, retuned = rotjax.hf.load_for_task(
            tmp_path / "tuned", task="token_classification", num_labels=n, key=jax.random.key(1)
        )
        got = to_dict(retuned)
        assert got["classifier/kernel"].shape == (encoder.hidden_size, n) and again.num_labels == n
        assert (n == 5) == np.array_equal(got["classifier/kernel"], new["classifier/kernel"])
        np.testing.assert_array_equal(
            got["encoder/layer_0/attention/key/kernel"], new["encoder/layer_0/attention/key/kernel"]
        )
    # Another task's head of the same shape (BERT's sequence and token heads are both
    # "classifier") is not kept: it read the pooler, the new one reads every token.
    other, moved = rotjax.hf.load_for_task(
        tmp_path / "tuned", task="sequence_classification", num_labels=5, key=jax.random.key(1)
    )
    assert other.task == "sequence_classification"
    got = to_dict(moved)
    assert got["classifier/kernel"].shape == new["classifier/kernel"].shape
    assert not np.array_equal(got["classifier/kernel"], new["classifier/kernel"])
    np.testing.assert_array_equal(got["classifier/bias"], 0.0)


def test_a_sources_problem_type_is_kept_for_its_own_head_only(seed, tmp_path):
    # A regression fine-tune (one output, problem_type "regression") given a 3-class head: its
    # problem_type would make transformers' loss the mean squared error of class ids
    one = dataclasses.replace(CASES["bert-seq-h3d4"], num_labels=1)
    rotjax.hf.save(tmp_path / "reg", one, random_params(one, seed))
    written = json.loads((tmp_path / "reg" / "config.json").read_text())
    (tmp_path / "reg" / "config.json").write_text(
        json.dumps({**written, "problem_type": "regression"})
    )
    config, params = rotjax.hf.load(tmp_path / "reg")  # its own head: kept
    rotjax.hf.save(tmp_path / "same", config, params, source=tmp_path / "reg")
    same = json.loads((tmp_path / "same" / "config.json").read_text())
    assert same["problem_type"] == "regression"
    config, params = rotjax.hf.load_for_task(
        tmp_path / "reg", task="sequence_classification", num_labels=3, key=jax.random.key(seed)
    )
    rotjax.hf.save(tmp_path / "three", config, params, source=tmp_path / "reg")
    three = json.loads((tmp_path / "three" / "config.json").read_text())
    assert "problem_type" not in three and len(three["id2label"]) == 3
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "three")
    ids = torch.tensor([[2, 3, 4]])
    loss = model(input_ids=ids, labels=torch.tensor([1])).loss  # cross-entropy, as trained
    want = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([1]))
    torch.testing.assert_close(loss, want)
    # another architecture with as many labels (a token head): not its problem_type either
    config, params = rotjax.hf.load_for_task(
        tmp_path / "reg", task="token_classification", num_labels=1, key=jax.random.key(seed)
    )
    rotjax.hf.save(tmp_path / "token", config, params, source=tmp_path / "reg")
    assert "problem_type" not in json.loads((tmp_path / "token" / "config.json").read_text())


def test_masked_lm_checkpoints_load_their_encoder(seed, tmp_path):
    """bert-base-uncased names BertForMaskedLM: its encoder is what people fine-tune and merge."""
    encoder = CASES["bert-base-nopooler"]
    config = rotjax.hf.transformers_config(encoder)
    config.architectures = ["BertForMaskedLM"]
    torch.manual_seed(seed)
    mlm = transformers.BertForMaskedLM(config).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    with pytest.warns(rotjax.hf.DroppedHeadWarning, match=r"BertForMaskedLM: .*cls\.predictions"):
        loaded, params = rotjax.hf.load(tmp_path / "mlm")
    assert loaded.task is None and not loaded.has_pooler
    x = make_inputs(loaded, np.random.default_rng(seed))
    with torch.no_grad():
        hidden = mlm.bert(
            input_ids=torch.from_numpy(x[0]).long(),
            attention_mask=torch.from_numpy(x[1]).long(),
            token_type_ids=torch.from_numpy(x[2]).long(),
        ).last_hidden_state.numpy()
    assert rel_err(rotjax_forward(loaded, params, x), hidden.reshape(-1)) <= TOL


@pytest.mark.parametrize(
    "name", ["llama-seq-k2g2d6", "mistral-base-k2g2", "vit-cls-h3d4", "vit-base-h1d8-nobias"]
)
def test_a_config_without_architectures_takes_its_head_from_the_tensors(name, seed, tmp_path):
    """A hand-written ``config.json`` with ``model_type`` only: a decoder's ``score`` tensor
    makes it the sequence classifier, an ``lm_head`` the causal LM, a ViT's ``classifier``
    the image classifier (each head's tensors were refused as unexpected by the base model),
    none the base model."""
    config = CASES[name]
    if name.startswith("mistral"):  # an untied causal LM: its lm_head is written
        config = dataclasses.replace(config, task="causal_lm", tie_word_embeddings=False)
    params = family(config).init(config, jax.random.key(seed))
    rotjax.hf.save(tmp_path / "ckpt", config, params)
    hf_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del hf_config["architectures"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf_config))
    loaded, again = rotjax.hf.load(tmp_path / "ckpt")
    assert loaded.task == config.task and loaded == config
    assert_trees_equal(again, params)
    if name.startswith("llama"):  # a head the guess does not fit (a token classifier's
        # score.bias): the refusal says the class was guessed (it read as if named)
        weights = tmp_path / "ckpt" / "model.safetensors"
        tensors = safetensors.numpy.load_file(weights)
        safetensors.numpy.save_file({**tensors, "score.bias": np.ones(2, np.float32)}, weights)
        with pytest.raises(
            ValueError,
            match=r"(?s)unexpected: score\.bias.*names no "
            r"'architectures': LlamaForSequenceClassification is a guess",
        ):
            rotjax.hf.load(tmp_path / "ckpt")


@pytest.mark.parametrize("legacy", [True, False])
def test_deberta_masked_lm_checkpoints_load_their_encoder(legacy, seed, tmp_path):
    """DeBERTa-v2/v3 pretraining checkpoints (DebertaV2ForMaskedLM, legacy ``cls.`` or new
    ``lm_predictions.`` head): the encoder, the head dropped with a warning."""
    encoder = dataclasses.replace(CASES["deberta-seq-v3-h3d5"], task=None)
    config = rotjax.hf.transformers_config(encoder)
    config.architectures, config.legacy = ["DebertaV2ForMaskedLM"], legacy
    torch.manual_seed(seed)
    mlm = transformers.DebertaV2ForMaskedLM(config).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    head = r"cls\.predictions" if legacy else r"lm_predictions\.lm_head"
    with pytest.warns(rotjax.hf.DroppedHeadWarning, match=f"DebertaV2ForMaskedLM: .*{head}"):
        loaded, params = rotjax.hf.load(tmp_path / "mlm")
    assert loaded == encoder
    # microsoft/deberta-v3-base's config.json names no architecture: the head still tells.
    hf_config = json.loads((tmp_path / "mlm" / "config.json").read_text())
    del hf_config["architectures"]
    (tmp_path / "mlm" / "config.json").write_text(json.dumps(hf_config))
    # ... and its weights hold a position table that position_biased_input=False never reads.
    weights = tmp_path / "mlm" / "model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    table = np.ones((encoder.max_position_embeddings, encoder.hidden_size), np.float32)
    tensors["deberta.embeddings.position_embeddings.weight"] = table
    safetensors.numpy.save_file(tensors, weights)
    with pytest.warns(rotjax.hf.DroppedHeadWarning, match="DebertaV2ForMaskedLM"):
        again = rotjax.hf.load(tmp_path / "mlm")
    assert again[0] == encoder
    assert_trees_equal(again[1], params)
    x = make_inputs(loaded, np.random.default_rng(seed))
    with torch.no_grad():
        hidden = mlm.deberta(
            input_ids=torch.from_numpy(x[0]).long(), attention_mask=torch.from_numpy(x[1]).long()
        ).last_hidden_state.numpy()
    assert rel_err(rotjax_forward(loaded, params, x), hidden.reshape(-1)) <= TOL


@pytest.mark.parametrize("given", [["p2c", "c2p"], "P2C|c2p"])
def test_a_sources_pos_att_type_is_kept_as_written(given, seed, tmp_path):
    """rotjax orders DeBERTa's attention terms (c2p, p2c): saved with a source, the source's
    own list (or legacy string) was rewritten in that order."""
    config = DEBERTA_CONFIGS["deberta-v3-h3d5-l2-seq"]
    rotjax.hf.save(tmp_path / "src", config, random_params(config, seed))
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, "pos_att_type": given}))
    loaded, params = rotjax.hf.load(tmp_path / "src")
    assert loaded.pos_att_type == ("c2p", "p2c")
    rotjax.hf.save(tmp_path / "out", loaded, params, source=tmp_path / "src")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pos_att_type"] == given
    assert rotjax.hf.load(tmp_path / "out")[0] == loaded
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").pos_att_type == [
        "p2c",
        "c2p",
    ]


def test_deberta_checkpoint_options_rotjax_lacks_are_refused(seed, tmp_path):
    """A config.json with an option rotjax does not implement fails on load, naming it."""
    config = CASES["deberta-token-v2-h5d2"]
    rotjax.hf.save(tmp_path / "m", config, random_params(config, seed))
    hf_config = json.loads((tmp_path / "m" / "config.json").read_text())
    for changes, message in [
        ({"conv_kernel_size": 3, "conv_act": "gelu"}, "conv_kernel_size=3 is not supported"),
        ({"embedding_size": 8}, "embedding_size=8 is not supported"),
        ({"pos_att_type": "p2c|p2p"}, "pos_att_type='p2c|p2p' is not supported"),
    ]:
        (tmp_path / "m" / "config.json").write_text(json.dumps({**hf_config, **changes}))
        with pytest.raises(ValueError, match=message):
            rotjax.hf.load(tmp_path / "m")


def test_saved_minilm_is_still_a_sentence_transformer(tmp_path):
    """Keeping the source's files (modules.json, pooling, normalise) keeps it usable as a
    SentenceTransformer: unit-norm embeddings, the same as the original's."""
    st = pytest.importorskip("sentence_transformers")
    config, params = rotjax.hf.load(minilm_dir())
    out = rotjax.hf.save(tmp_path / "minilm", config, params, source=minilm_dir())
    sentences = ["A man is playing a guitar.", "Rotations leave attention unchanged."]
    original = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences)
    saved = st.SentenceTransformer(str(out), device="cpu").encode(sentences)
    np.testing.assert_allclose(np.linalg.norm(saved, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(saved, original, atol=1e-5)


def test_sentence_transformers_modules_keep_their_weights(seed, tmp_path):
    """A 2_Dense module's own weights are copied with its folder (it was left out: the saved
    directory named a module it could not load); weights outside the modules are not."""
    config = CASES["bert-base-nopooler"]
    params = random_params(config, seed)
    src = tmp_path / "src"
    rotjax.hf.save(src, config, params)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "Transformer"}]
    modules += [{"idx": 1, "name": "1", "path": "2_Dense", "type": "Dense"}]
    (src / "modules.json").write_text(json.dumps(modules))
    for folder, name in (("2_Dense", "model.safetensors"), ("onnx", "model.onnx")):
        (src / folder).mkdir()
        (src / folder / name).write_bytes(b"weights of " + folder.encode())
    (src / "2_Dense" / "config.json").write_text("{}")
    assert rotjax.hf.module_weights(src) == [Path("2_Dense/model.safetensors")]
    out = rotjax.hf.save(tmp_path / "out", config, params, source=src)
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == b"weights of 2_Dense"
    assert (out / "2_Dense" / "config.json").is_file() and not (out / "onnx").exists()
    (src / "modules.json").write_text(json.dumps([{"path": "/etc"}, {"path": "../x"}]))
    assert rotjax.hf.module_weights(src) == []  # nothing outside the checkpoint
    # Nor the model's own weights: the checkpoint itself, or a legacy encoder folder (its
    # unaligned weights were copied beside the aligned ones).
    (src / "0_Transformer").mkdir()
    (src / "0_Transformer" / "model.safetensors").write_bytes(b"the encoder")
    own = [
        {"path": "."},
        {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
    ]
    (src / "modules.json").write_text(json.dumps(own))
    assert rotjax.hf.module_weights(src) == []


def test_a_sources_folders_linked_from_elsewhere_are_copied(seed, tmp_path):
    """A checkpoint assembled from shared parts: a folder that is a symbolic link (a tokenizer,
    a module with weights of its own) is copied like one of its own (`Path.rglob` did not
    enter it: its files were missing from the saved model, silently); a link to a folder
    holding it (a cycle) is not followed."""
    config = CASES["bert-base-nopooler"]
    params = random_params(config, seed)
    src, shared = tmp_path / "src", tmp_path / "shared"
    rotjax.hf.save(src, config, params)
    (shared / "tok").mkdir(parents=True)
    (shared / "tok" / "tokenizer_config.json").write_text("{}")
    (shared / "dense").mkdir()
    (shared / "dense" / "model.safetensors").write_bytes(b"dense weights")
    (src / "tokenizer").symlink_to(shared / "tok")
    (src / "2_Dense").symlink_to(shared / "dense")
    (src / "again").symlink_to(src)  # a cycle
    (shared / "tok" / "to_dense").symlink_to(shared / "dense")  # a cycle of two links: it
    (shared / "dense" / "to_tok").symlink_to(shared / "tok")  # copied vocab.txt 41 times
    (src / "modules.json").write_text(json.dumps([{"path": "2_Dense", "type": "Dense"}]))
    assert rotjax.hf.module_weights(src) == [Path("2_Dense/model.safetensors")]
    out = rotjax.hf.save(tmp_path / "out", config, params, source=src)
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert copied == [
        "2_Dense",
        "2_Dense/model.safetensors",
        "2_Dense/to_tok",
        "2_Dense/to_tok/tokenizer_config.json",
        "config.json",
        "model.safetensors",
        "modules.json",
        "tokenizer",  # (tokenizer/to_dense holds weights only, not the module's: not copied)
        "tokenizer/tokenizer_config.json",
    ], copied
    assert not any(p.is_symlink() for p in out.rglob("*"))  # copies, not links
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == b"dense weights"
    # A folder that cannot be read (denied by a patched os.scandir, which os.walk lists
    # folders with: the tests run as root) is not copied, with a warning (it was left out of
    # the saved model, silently); a hidden one, never copied, with none.
    (src / ".cache" / "locks").mkdir(parents=True)
    scandir = os.scandir
    denying = lambda *names: (
        lambda d: (
            _raise(PermissionError(13, "Permission denied", os.fspath(d)))
            if Path(d).name in names
            else scandir(d)
        )
    )
    with pytest.MonkeyPatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.setattr(os, "scandir", denying("tokenizer", "locks"))
        out = rotjax.hf.save(tmp_path / "denied", config, params, source=src)
    shown = [str(w.message) for w in caught if w.category is rotjax.hf.NotCopiedWarning]
    assert len(shown) == 1 and re.search(
        r"tokenizer cannot be read \(Permission denied\)", shown[0]
    )
    assert not (out / "tokenizer").exists() and (out / "2_Dense" / "model.safetensors").exists()
    # ... a module's folder too (module_weights walked it with no such leave: PermissionError)
    with pytest.MonkeyPatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.setattr(os, "scandir", denying("2_Dense"))
        out = rotjax.hf.save(tmp_path / "no-module", config, params, source=src)
    shown = [str(w.message) for w in caught if w.category is rotjax.hf.NotCopiedWarning]
    assert any("2_Dense cannot be read" in m for m in shown) and not (out / "2_Dense").exists()


def _raise(e):
    raise e


def test_a_trainer_output_as_source_copies_no_other_checkpoint(seed, tmp_path):
    """A Trainer's output directory as ``source``: its ``checkpoint-*`` folders (a config of
    their own, weights never copied) and training logs are not copied (they were, leaving
    weightless checkpoints and another run's logs beside the saved model); its tokenizer is."""
    config = CASES["bert-base-nopooler"]
    params = random_params(config, seed)
    src = tmp_path / "src"
    rotjax.hf.save(src, config, params)
    (src / "tokenizer.json").write_text("{}")
    (src / "trainer_state.json").write_text("{}")
    (src / "checkpoint-500").mkdir()
    for name in ("config.json", "trainer_state.json", "tokenizer.json", "model.safetensors"):
        (src / "checkpoint-500" / name).write_text("{}")
    (src / "runs" / "Dec05").mkdir(parents=True)
    (src / "runs" / "Dec05" / "events.out.tfevents.1.host").write_bytes(b"log")
    out = rotjax.hf.save(tmp_path / "out", config, params, source=src)
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert copied == ["config.json", "model.safetensors", "tokenizer.json"], copied


@pytest.mark.parametrize("name", ["roberta-seq-h1d6", "vit-cls-h3d4"])
def test_an_unused_pooler_is_dropped_with_a_warning(name, seed, tmp_path):
    """Old RoBERTa/ViT classification checkpoints carry a pooler their head never reads:
    transformers skips it, rotjax refused the checkpoint ("unexpected")."""
    config = CASES[name]
    params = random_params(config, seed)
    rotjax.hf.save(tmp_path / "m", config, params)
    tensors = safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")
    prefix = config.model_type  # the base model's attribute: roberta., vit.
    d = config.hidden_size
    tensors[f"{prefix}.pooler.dense.weight"] = np.ones((d, d), np.float32)
    tensors[f"{prefix}.pooler.dense.bias"] = np.ones(d, np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.warns(rotjax.hf.DroppedHeadWarning, match=r"reads no pooler; .*pooler\.dense"):
        loaded, again = rotjax.hf.load(tmp_path / "m")
    assert loaded == config
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_qwen2_keeps_which_layers_use_its_sliding_window(tmp_path):
    """A Qwen2 checkpoint with a sliding window in its last layers only: loaded and saved, the
    layout stays (save wrote transformers' default max_window_layers, 28: every layer full)."""
    import transformers

    hf = transformers.Qwen2Config(
        vocab_size=40, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
        max_window_layers=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(hf).save_pretrained(tmp_path / "q")
    config, params = rotjax.hf.load(tmp_path / "q")
    assert (config.sliding_window, config.max_window_layers) == (8, 1)
    rotjax.hf.save(tmp_path / "again", config, params)
    again = transformers.AutoConfig.from_pretrained(tmp_path / "again")
    assert again.layer_types == hf.layer_types == ["full_attention", "sliding_attention"]
    # a source of another depth: its layer_types (transformers 5 writes them) were kept, and
    # transformers refused the checkpoint (num_hidden_layers 2, 1 layer type)
    transformers.Qwen2Config(
        **{**hf.to_dict(), "num_hidden_layers": 1, "layer_types": None}
    ).save_pretrained(tmp_path / "one")
    rotjax.hf.save(tmp_path / "deeper", config, params, source=tmp_path / "one")
    deeper = transformers.AutoConfig.from_pretrained(tmp_path / "deeper")
    assert deeper.layer_types == hf.layer_types
    plain = transformers.Qwen2Config(
        vocab_size=40, hidden_size=8, num_attention_heads=2, num_key_value_heads=1
    )
    assert llama.Config.from_hf_dict(plain.to_dict()).max_window_layers is None  # no window


@pytest.mark.parametrize(
    "kind, flags",
    [("mistral", ("attention_bias", "mlp_bias")), ("qwen2", ("mlp_bias", "attention_bias"))],
)
def test_bias_options_transformers_ignores_are_ignored_on_load(kind, flags, tmp_path):
    """transformers builds Mistral's projections and both types' MLPs without biases whatever
    the config says (and saves the flags as given): such checkpoints load, computing what
    transformers computes (they were refused, naming the flag). Built directly, a rotjax
    config with such a flag is still refused (test above)."""
    import transformers

    cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[kind]
    hf = cls(
        vocab_size=40, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, **dict.fromkeys(flags, True),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager")
    model.save_pretrained(tmp_path / "m")
    assert all(json.loads((tmp_path / "m" / "config.json").read_text())[f] for f in flags)
    config, params = rotjax.hf.load(tmp_path / "m")
    assert not config.mlp_bias and not config.out_bias
    ids = np.random.default_rng(0).integers(0, 40, (2, 5))
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).logits.numpy()
    got = rotjax_forward(config, params, (jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)))
    assert rel_err(got, want) <= 1e-5  # (float32 at matmul precision "highest")
    # Saved from that source, the flags stay as it wrote them (they were written back false),
    # and saved without one, none is written: the type has no such option.
    rotjax.hf.save(tmp_path / "again", config, params, source=tmp_path / "m")
    rotjax.hf.save(tmp_path / "fresh", config, params)
    again, fresh = (
        json.loads((tmp_path / d / "config.json").read_text()) for d in ("again", "fresh")
    )
    assert all(again[f] is True for f in flags)
    assert not set(flags) & set(fresh)


def test_load_for_task_gives_a_decoder_a_head(seed, tmp_path):
    base = CASES["mistral-base-k2g2"]
    rotjax.hf.save(tmp_path / "base", base, random_params(base, seed))
    config, params = rotjax.hf.load_for_task(
        tmp_path / "base", task="sequence_classification", num_labels=3, key=jax.random.key(seed)
    )
    assert (config.task, config.num_labels, config.sliding_window) == (
        "sequence_classification",
        3,
        64,
    )
    assert to_dict(params)["score/kernel"].shape == (base.hidden_size, 3)


def test_llama_checkpoint_options_rotjax_lacks_are_refused_and_buffers_dropped(seed, tmp_path):
    config = CASES["llama-lm-h3-tied-bias"]
    params = random_params(config, seed)
    rotjax.hf.save(tmp_path / "m", config, params)
    hf_config = json.loads((tmp_path / "m" / "config.json").read_text())
    tensors = safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")
    # Old checkpoints keep a RoPE buffer in every layer: not a parameter, dropped on load.
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "m" / "model.safetensors")
    _, again = rotjax.hf.load(tmp_path / "m")
    jax.tree.map(np.testing.assert_array_equal, again, params)
    for scaling in ({"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}):
        bad = dict(hf_config, rope_scaling=scaling)
        (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
        kind = scaling.get("rope_type", scaling.get("type"))
        with pytest.raises(ValueError, match=f"not supported by rotjax: rope scaling '{kind}'"):
            rotjax.hf.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(hf_config, rope_scaling=None)))
    rotjax.hf.load(tmp_path / "m")  # an explicit "no scaling" is fine
    # A config built from the dict alone refuses them too (it dropped them: Llama 3.1's RoPE
    # unscaled, a decoder BERT bidirectional).
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    with pytest.raises(ValueError, match="llama config not supported by rotjax: rope scaling"):
        llama.Config.from_hf_dict(dict(hf_config, rope_scaling=llama3))
    bert_json = {"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="bert config not supported by rotjax: is_decoder=True"):
        rotjax.models.bert.Config.from_hf_dict({**bert_json, "is_decoder": True})
    # A ViT's sizes as (height, width) pairs, as transformers takes them: square ones are its
    # int (they were refused as "must be an int"), others named as what rotjax lacks.
    vit_json = {"model_type": "vit", "hidden_size": 8, "num_attention_heads": 2, "patch_size": 4}
    square = rotjax.models.vit.Config.from_hf_dict({**vit_json, "image_size": [12, 12]})
    assert square.image_size == 12
    for name, size in (("image_size", [12, 8]), ("patch_size", (4, 2))):
        with pytest.raises(ValueError, match=rf"vit config not supported by rotjax: {name}=\["):
            rotjax.models.vit.Config.from_hf_dict({**vit_json, name: size})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "mistral", "mlp_bias": True}, "mistral has no mlp_bias"),
        ({"model_type": "mistral", "attention_bias": True}, "mistral has no attention_bias"),
        ({"model_type": "qwen2", "mlp_bias": True}, "qwen2 has no mlp_bias"),
        ({"hidden_size": 14, "head_dim": 4}, "hidden_size=14 is not a multiple of"),
        # head_dim absent: floored as transformers (test_absent_head_dim_is_floored_...), but
        # LlamaConfig refuses a remainder, and RoPE an odd or empty head
        ({"hidden_size": 44}, "hidden_size=44 is not a multiple of num_attention_heads=3"),
        ({"hidden_size": 40}, "hidden_size=40 is not a multiple of"),  # (not: odd width 13)
        ({"model_type": "mistral", "hidden_size": 40}, "RoPE needs an even head_dim, got 13"),
        ({"model_type": "qwen2", "hidden_size": 2}, "hidden_size=2 is smaller than num_att"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not implemented"),
    ],
)
def test_llama_configs_transformers_cannot_build_are_refused(changes, message):
    base = dict(vocab_size=40, hidden_size=12, num_attention_heads=3, intermediate_size=8)
    base["num_key_value_heads"] = 3  # Mistral's and Qwen2's defaults are not divisors of 3
    with pytest.raises(ValueError, match=message):
        llama.Config(**{**base, **changes})
    assert llama.Config.from_hf_dict({**base, "model_type": "mistral"}).sliding_window == 4096
    # A "llamafied" Mistral's config.json keeps its sliding_window, which Llama never reads.
    llamafied = {**base, "model_type": "llama", "sliding_window": 4}
    assert llama.Config.from_hf_dict(llamafied).sliding_window is None
    # Qwen2 with the window on: transformers' default width when the key is absent, and a
    # layer_types list that says other layers slide than max_window_layers is refused.
    qwen2 = {**base, "model_type": "qwen2", "num_hidden_layers": 2, "use_sliding_window": True}
    cfg = llama.Config.from_hf_dict({**qwen2, "max_window_layers": 1})
    assert (cfg.sliding_window, cfg.max_window_layers) == (4096, 1)
    # Built directly with a window and no max_window_layers: transformers' 28 (None made
    # every layer slide here, and none after a save and a reload)
    direct = llama.Config(**base, model_type="qwen2", sliding_window=4, num_hidden_layers=2)
    assert (direct.max_window_layers, direct.window) == (28, None)
    types = ["full_attention", "sliding_attention"]
    assert llama.Config.from_hf_dict({**qwen2, "max_window_layers": 1, "layer_types": types})
    with pytest.raises(ValueError, match=r"layer_types=.* is not what max_window_layers=0 gives"):
        llama.Config.from_hf_dict({**qwen2, "max_window_layers": 0, "layer_types": types})


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_absent_num_key_value_heads_takes_the_types_default(kind):
    """A ``config.json`` without ``num_key_value_heads``: as many as transformers' config class
    of that type builds (Llama one per query head, Mistral 8, Qwen2 32; null: one per head)."""
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[kind]
    for heads in (32, 64):
        d = {"model_type": kind, "hidden_size": 2048, "num_attention_heads": heads}
        want = getattr(transformers, cls)(**d).num_key_value_heads
        assert llama.Config.from_hf_dict(d).num_key_value_heads == want, heads
        null = {**d, "num_key_value_heads": None}
        assert llama.Config.from_hf_dict(null).num_key_value_heads == heads


def test_a_config_named_by_its_architecture_alone_gets_its_types_defaults():
    """A ``config.json`` with ``architectures`` but no ``model_type``: the architecture's type
    sets the defaults that differ by type (RoBERTa numbered positions from BERT's pad id 0,
    shifting every one; Qwen2 kept a sliding window that a later save switched on)."""
    from rotjax.hf import _load, _mapping

    base = dict(vocab_size=40, hidden_size=12, num_attention_heads=3, intermediate_size=8)
    base["num_key_value_heads"] = 3  # Qwen2's default, 32, does not divide 3
    roberta = _mapping.ARCHITECTURES["RobertaForSequenceClassification"]
    cfg = _load._rotjax_config(roberta, {**base, "num_labels": 2}, has_pooler=True)
    assert (cfg.pad_token_id, cfg.model_type) == (1, "roberta")
    qwen2 = _mapping.ARCHITECTURES["Qwen2ForCausalLM"]
    cfg = _load._rotjax_config(qwen2, {**base, "sliding_window": 4}, has_pooler=False)
    assert cfg.sliding_window is None
