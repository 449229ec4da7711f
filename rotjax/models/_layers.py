"""Building blocks shared by the BERT and ViT encoders.

Attention keeps an explicit head axis, as in the Flax examples: the query/key/value kernels are
`(hidden, heads, head_dim)` with biases `(heads, head_dim)`, and the output kernel is
`(heads, head_dim, hidden)`. This is the layout on which the per-head symmetries of
`rotjax.symmetry` act without any reshaping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Hugging Face names (transformers.activations.ACT2FN) -> JAX functions.
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


class Encoded(NamedTuple):
    """Output of a bare encoder (``task=None``)."""

    last_hidden_state: jax.Array  # (batch, tokens, hidden)
    pooler_output: jax.Array | None  # (batch, hidden) when the config has a pooler


def config_from_hf_dict(cls, d: dict[str, Any], **overrides: Any):
    """Build a config dataclass from a Hugging Face `config.json` dict (unknown keys ignored,
    but options that change the function and that rotjax's models lack are refused)."""
    unsupported(d)
    _check_labels(d.get("id2label"))
    d = {  # a ViT's square sizes may be written as pairs (transformers reads either)
        k: v[0] if k in _SIDES and isinstance(v, list | tuple) and len(v) == 2 else v
        for k, v in d.items()
    }
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    if "num_labels" not in d and "id2label" in d:
        kwargs["num_labels"] = len(d["id2label"])
    return cls(**{**kwargs, **overrides})


_SIDES = ("image_size", "patch_size")  # a ViT's, an int or (height, width)


def unsupported(d: dict[str, Any]) -> None:
    """Refuse a `config.json`'s options that rotjax's models do not implement (their models
    would be silently wrong): relative position embeddings of BERT, a decoder BERT, a ViT
    pooler other than tanh over the hidden size or non-square images or patches, RoPE
    scaling."""
    problems = []
    if d.get("position_embedding_type", "absolute") not in (None, "absolute"):
        problems.append(f"position_embedding_type={d['position_embedding_type']!r}")
    for flag in ("is_decoder", "add_cross_attention"):
        if d.get(flag):
            problems.append(f"{flag}=True")
    if d.get("pooler_act", "tanh") != "tanh":
        problems.append(f"pooler_act={d['pooler_act']!r}")
    size, hidden = d.get("pooler_output_size"), d.get("hidden_size")
    if size is not None and isinstance(hidden, int) and size != hidden:  # (else: check_fields)
        problems.append(f"pooler_output_size={size} != hidden_size")
    for name in _SIDES:
        if isinstance(v := d.get(name), list | tuple) and (len(v) != 2 or v[0] != v[1]):
            problems.append(f"{name}={list(v)} (it takes square images and patches)")
    for rope in (d.get("rope_parameters") or {}, d.get("rope_scaling") or {}):
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in (None, "default"):
            problems.append(f"rope scaling {kind!r}")
    if problems:
        name = d.get("model_type", "this")
        raise ValueError(f"{name} config not supported by rotjax: {', '.join(problems)}")


def class_ids(id2label: Any) -> list[int] | None:
    """The keys of an ``id2label`` mapping as sorted integers (``"0"`` or ``0``), or None if
    it is no mapping or a key is no integer (label names given as keys: ``label2id``)."""
    if not isinstance(id2label, Mapping):
        return None
    with contextlib.suppress(ValueError, TypeError):
        return sorted(int(k) for k in id2label)
    return None


def _check_labels(id2label: Any) -> None:
    """A `config.json`'s ``id2label`` must name the classes ``0..n-1`` (as transformers and
    `rotjax.hf.save` read its keys: integers), so that a checkpoint with other keys fails as
    it is read, not when its merge or alignment is saved."""
    if id2label is None:
        return
    ids = class_ids(id2label)
    if ids is None or ids != list(range(len(ids))):
        got = sorted(map(str, id2label))[:6] if isinstance(id2label, dict) else id2label
        raise ValueError(
            f"config field id2label must have the keys 0..n-1 (class ids), got {got!r}"
        )


_TYPES = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


def check_fields(config: Any, *, may_be_zero: tuple[str, ...] = ()) -> None:
    """Check every field of a config dataclass against its annotation (``int``, ``float``,
    ``str``, ``bool``, optionally ``| None``) and every ``*_size`` / ``num_*`` int for >= 1
    (>= 0 for the fields in ``may_be_zero``, where 0 means "absent": DeBERTa's
    ``type_vocab_size``).

    Raises:
      ValueError: naming the field, the expected type and the value found (a config.json with
        ``"hidden_size": "32"`` or ``null`` fails here, not in a traceback deep inside).
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        checks = [_TYPES[k] for k in kinds if k in _TYPES]
        if checks and not any(ok(value) for ok, _ in checks):
            want = " or ".join(what for _, what in checks) + (" or null" if "None" in kinds else "")
            raise ValueError(
                f"config field {f.name} must be {want}, got {value!r} ({type(value).__name__})"
            )
        sized = f.name.endswith("_size") or f.name.startswith("num_")
        least = 0 if f.name in may_be_zero else 1
        if sized and kinds == ["int"] and value < least:
            raise ValueError(f"config field {f.name} must be >= {least}, got {value}")


# Variance in two passes, E[(x - mean)^2], as PyTorch computes it: flax's default E[x^2] -
# mean^2 loses float32's digits when a feature's mean is large against its spread (a stream
# offset of 300 moved a tiny BERT's logits by 17% of their size).
LayerNorm = functools.partial(nn.LayerNorm, use_fast_variance=False)


def check_tokens(
    input_ids, room: int | None, what: str, *, sizes: dict[str, int] | None = None, **same_shape
) -> None:
    """Token inputs against the config, at trace time, with a clear message (not a broadcast
    error deep inside): ``input_ids`` is (batch, tokens) with at most ``room`` tokens (``what``
    says which config field sets it; None: no limit), and each array of ``same_shape`` that is
    given has its shape. ``sizes`` (input name -> table size, 0 for a table the model lacks):
    concrete inputs (outside `jax.jit`) must index their tables, as transformers demands (a
    gather would wrap a negative id and give NaN past the end)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {input_ids.shape}")
    if room is not None and input_ids.shape[1] > room:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens; this model takes at most {room} ({what})"
        )
    for name, x in same_shape.items():
        if x is not None and x.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {x.shape}, input_ids {input_ids.shape}")
    check_ids({"input_ids": input_ids, **same_shape}, sizes or {})


TOKEN_TABLES = (("input_ids", "vocab_size"), ("token_type_ids", "type_vocab_size"))
"""Token inputs and the config fields that size the embedding tables they index."""


def text_inputs(batch: Mapping[str, Any]) -> tuple[Any, ...]:
    """``(input_ids, attention_mask, token_type_ids or None)`` from a batch of named arrays:
    the positional inputs of the encoders (BERT, RoBERTa, DeBERTa)."""
    return batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")


def token_mask(inputs: tuple[Any, ...]) -> Any:
    """The attention mask of a text model's positional inputs ``(input_ids, attention_mask,
    ...)``, if given."""
    return inputs[1] if len(inputs) > 1 else None


def token_tables(config: Any) -> dict[str, int]:
    """``{input name: rows of the table it indexes}`` of a config (those it has fields for)."""
    return {name: getattr(config, f) for name, f in TOKEN_TABLES if hasattr(config, f)}


def check_ids(arrays: Mapping[str, Any], sizes: Mapping[str, int], where: str = "") -> None:
    """ValueError unless each concrete array of ``arrays`` named in ``sizes`` indexes its
    table (a gather under `jax.jit` cannot raise: a negative id wraps to the last row, one past
    the end gives NaN); tracers, tables of size 0 and absent arrays are skipped."""
    for name, size in sizes.items():
        x = arrays.get(name)
        if x is None or not size or isinstance(x, jax.core.Tracer) or not np.size(x):
            continue
        x = np.asarray(x)  # (np.min of a jax array is jax's: under jit, a tracer even for
        low, high = int(np.min(x)), int(np.max(x))  # concrete ids a forward pass closes over)
        if low < 0 or high >= size:
            raise ValueError(
                f"{where}{name} holds ids {low}..{high}; the model's table has {size} rows"
            )


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        known = sorted(ACTIVATIONS)
        raise ValueError(f"hidden_act={name!r} is not supported; known: {known}") from None


def head_dim(hidden_size: int, num_attention_heads: int) -> int:
    """The per-head width of BERT-like configs, as Hugging Face derives it (a remainder is
    refused; LLaMA-style configs floor it, as transformers' Mistral and Qwen2 do)."""
    if num_attention_heads < 1 or hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size={hidden_size} is not a multiple of "
            f"num_attention_heads={num_attention_heads}"
        )
    return hidden_size // num_attention_heads


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with an explicit head axis.

    For head h, with ``q_h = x Wq[:, h] + bq[h]`` (likewise k, v):
    ``softmax(q_h k_hᵀ / sqrt(d)) v_h``; heads are summed through ``Wo[h]`` ``(d, hidden)``
    plus ``bo``.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    qkv_bias: bool = True  # the output projection always has a bias
    kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        features = (self.num_heads, self.head_dim)
        proj = functools.partial(
            nn.DenseGeneral, features=features, axis=-1, kernel_init=self.kernel_init
        )
        q = proj(use_bias=self.qkv_bias, name="query")(x)
        k = proj(use_bias=self.qkv_bias, name="key")(x)
        v = proj(use_bias=self.qkv_bias, name="value")(x)
        dropout = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)
        ctx = attend(q, k, v, mask, dropout)
        return nn.DenseGeneral(
            x.shape[-1], axis=(-2, -1), kernel_init=self.kernel_init, name="out"
        )(ctx)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    dropout: Callable[[jax.Array], jax.Array] = lambda probs: probs,
) -> jax.Array:
    """``softmax(q kᵀ / sqrt(d)) v`` per head, on ``(batch, tokens, heads, d)`` arrays;
    ``mask`` ``(batch, keys)``, 1 = attend; ``dropout`` acts on the probabilities."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    if mask is not None:
        # Masked keys get the most negative finite value, as in transformers, so a fully
        # masked row stays finite.
        scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1))
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class FeedForward(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``; the hidden units are what FFN permutations permute."""

    intermediate_size: int
    hidden_act: str = "gelu"
    dropout_rate: float = 0.0
    kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, kernel_init=self.kernel_init, name="intermediate")(x)
        h = activation(self.hidden_act)(h)
        h = nn.Dense(x.shape[-1], kernel_init=self.kernel_init, name="output")(h)
        return nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)


def stack(block: type[nn.Module], num_layers: int, scan: bool, **kwargs: Any) -> Callable:
    """Return ``f(x, mask) -> x`` applying ``num_layers`` blocks.

    With ``scan=True`` the blocks are one `nn.scan` named ``layers`` whose params carry a
    leading layer axis; otherwise they are ``layer_0 ... layer_{L-1}``.
    """
    if scan:

        class _Scanned(block):  # (carry, mask) -> (carry, None), the nn.scan calling convention
            def __call__(self, x, mask):
                return super().__call__(x, mask), None

        _Scanned.__name__ = block.__name__
        scanned = nn.scan(
            _Scanned,
            # "stats": what rotjax.merge sows from inside the layers, stacked per layer.
            variable_axes={"params": 0, "stats": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=num_layers,
        )(name="layers", **kwargs)
        return lambda x, mask: scanned(x, mask)[0]

    layers = [block(name=f"layer_{i}", **kwargs) for i in range(num_layers)]

    def run(x, mask):
        for layer in layers:
            x = layer(x, mask)
        return x

    return run


class Encoder(nn.Module):
    """``num_layers`` blocks ``block(config=config)`` in sequence (one `nn.scan` if
    ``config.scan_layers``)."""

    block: type[nn.Module]
    config: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c = self.config
        run = stack(
            self.block,
            c.num_hidden_layers,
            c.scan_layers,
            config=c,
            deterministic=self.deterministic,
        )
        return run(x, mask)


def layer_prefixes(
    root: str, num_layers: int, scan: bool
) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(param prefix, batch shape, layer index) of each block, as `stack` names them."""
    if scan:
        return [(f"{root}/layers", (num_layers,), None)]
    return [(f"{root}/layer_{i}", (), i) for i in range(num_layers)]
