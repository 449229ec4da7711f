"""LLaMA-style decoders (Llama, Mistral, Qwen2) in Flax Linen, with their symmetry spec.

Follows Hugging Face's `LlamaForCausalLM` / `LlamaForSequenceClassification` (and the Mistral
and Qwen2 classes of the same shape): pre-norm blocks with RMSNorm, grouped-query attention
with rotary position embeddings (RoPE, in transformers' ``rotate_half`` layout: index i pairs
with i + d/2), a SwiGLU MLP ``down(silu(gate(x)) * up(x))``, tied or untied embeddings.

Attention kernels keep the key-value head axis and the query group axis apart, so grouped
attention's symmetries act on whole axes (``K`` key-value heads, ``G`` query heads each)::

    embed_tokens/embedding (V, D)
    decoder/layer_i/input_layernorm/scale (D,)      post_attention_layernorm/scale (D,)
    layer_i/attention/query/kernel (D, K, G, d)     bias (K, G, d)   (Qwen2; attention_bias)
    layer_i/attention/{key,value}/kernel (D, K, d)  bias (K, d)
    layer_i/attention/out/kernel (K, G, d, D)       bias (D,)        (attention_bias)
    layer_i/mlp/{gate,up}/kernel (D, F)   mlp/down/kernel (F, D)     biases with mlp_bias
    norm/scale (D,)   lm_head/kernel (D, V) (untied)   score/kernel (D, labels) (classification)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rotjax import symmetry as sym
from rotjax.models import _layers
from rotjax.models._family import Family
from rotjax.symmetry import Action

TASKS = (None, "causal_lm", "sequence_classification")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters, named as in Hugging Face's `LlamaConfig` (Mistral, Qwen2 alike)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (floored)
    # (both resolved on construction, so a loaded config equals the one it was saved from)
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: longer inputs are refused (not implemented)
    # Qwen2 with a sliding window: the layers from this index on use it (kept for saving)
    max_window_layers: int | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    model_type: str = "llama"  # "llama", "mistral" or "qwen2" (Qwen2: biased Q/K/V)
    num_labels: int = 2
    # rotjax-specific:
    task: str | None = "causal_lm"  # one of TASKS; None = bare decoder (hidden states)
    scan_layers: bool = False

    def __post_init__(self):
        _layers.check_fields(self)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.model_type == "qwen2" and self.sliding_window and self.max_window_layers is None:
            object.__setattr__(self, "max_window_layers", 28)  # Qwen2Config's default
        if self.head_dim is None:  # transformers floors (LlamaConfig refuses a remainder, below)
            if self.hidden_size < self.num_attention_heads:
                raise ValueError(  # transformers fails on the 0 too
                    f"hidden_size={self.hidden_size} is smaller than num_attention_heads="
                    f"{self.num_attention_heads}: head_dim would be 0"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.model_type not in FAMILY_TYPES:
            raise ValueError(f"model_type must be one of {FAMILY_TYPES}, got {self.model_type!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}"
            )
        if self.model_type == "llama" and self.hidden_size % self.num_attention_heads:
            raise ValueError(  # as LlamaConfig's validation (before the floored width's checks)
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_size % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_size}")
        for name in _NO_SUCH_BIAS.get(self.model_type, ()):
            if getattr(self, name):  # transformers' class has no such parameters
                raise ValueError(f"{self.model_type} has no {name}; got {name}=True")
        if self.attention_dropout:
            raise ValueError(
                f"attention_dropout={self.attention_dropout} is not implemented (use 0.0)"
            )
        _layers.activation(self.hidden_act)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def groups(self) -> int:
        """Query heads per key-value head."""
        return self.num_attention_heads // self.kv_heads

    @property
    def head_size(self) -> int:
        return self.head_dim

    @property
    def window(self) -> int | None:
        """The sliding window of the layers that use one, or None if none does (a Qwen2
        window starts at layer ``max_window_layers``, which may be past the last)."""
        if self.model_type == "qwen2" and (self.max_window_layers or 0) >= self.num_hidden_layers:
            return None
        return self.sliding_window

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def out_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Config:
        """From a ``config.json`` dict (transformers 5 keeps ``rope_theta`` in
        ``rope_parameters``; a Qwen2 config has no ``head_dim``; a Mistral ``head_dim`` of 0
        means ``hidden_size // num_attention_heads``, as `MistralAttention` reads it; a
        Mistral's ``attention_bias`` and ``mlp_bias``, a Qwen2's ``mlp_bias``, are ignored as
        transformers' classes ignore them: their layers have no such biases)."""
        d = dict(d)
        for name in _NO_SUCH_BIAS.get(d.get("model_type"), ()):  # (such checkpoints, which
            d.pop(name, None)  # transformers loads, were refused)
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if d.get("model_type") == "qwen2" and d.get("use_sliding_window"):
            d.setdefault("max_window_layers", 28)  # Qwen2Config's defaults
            d.setdefault("sliding_window", 4096)
            _check_layer_types(d)
        else:
            d.pop("max_window_layers", None)  # no window: which layers would use it is moot
        if d.get("model_type") == "qwen2" and not d.get("use_sliding_window"):
            d["sliding_window"] = None
        if d.get("model_type", "llama") == "llama":
            d.pop("sliding_window", None)  # LlamaConfig has none; LlamaAttention never slides
        if d.get("model_type") == "mistral":
            d.setdefault("sliding_window", 4096)  # MistralConfig's default
            if type(d.get("head_dim")) is int and d["head_dim"] == 0:
                d["head_dim"] = None  # MistralConfig keeps the 0; its attention derives the width
        if d.get("model_type") in _KV_HEADS:  # absent: the type's default (null: one per head)
            d.setdefault("num_key_value_heads", _KV_HEADS[d["model_type"]])
        return _layers.config_from_hf_dict(cls, d, **overrides)


FAMILY_TYPES = ("llama", "mistral", "qwen2")
# Bias options a type's transformers class does not read (its layers are built without them)
_NO_SUCH_BIAS = {"mistral": ("attention_bias", "mlp_bias"), "qwen2": ("mlp_bias",)}
_KV_HEADS = {"mistral": 8, "qwen2": 32}  # MistralConfig's and Qwen2Config's defaults


def _check_layer_types(d: Mapping[str, Any]) -> None:
    """A Qwen2 ``config.json``'s ``layer_types`` (written by transformers 5, which reads the
    window from it) must be what ``max_window_layers`` says, from which the model takes it."""
    given = d.get("layer_types")
    if given is None:
        return
    n, first = d.get("num_hidden_layers", len(given)), d["max_window_layers"]
    want = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if list(given) != want:
        raise ValueError(
            f"layer_types={list(given)} is not what max_window_layers={first} gives ({want}): "
            "only a sliding window from one layer on is implemented"
        )


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of ``x (batch, tokens, ..., d)`` at ``positions (batch, tokens)``, as
    transformers: ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = [-x2, x1]`` and
    frequencies ``theta^(-2i/d)`` repeated for both halves."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = jnp.einsum("bt,i->bti", positions.astype(jnp.float32), inv)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    shape = emb.shape[:2] + (1,) * (x.ndim - 3) + (d,)
    cos, sin = jnp.cos(emb).reshape(shape), jnp.sin(emb).reshape(shape)
    half = jnp.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return (x * cos + half * sin).astype(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE: query head (k, g) attends with key-value
    head k."""

    config: Config

    @nn.compact
    def __call__(self, x, mask, positions):
        c = self.config
        K, G, d = c.kv_heads, c.groups, c.head_size
        init = nn.initializers.normal(c.initializer_range)
        dense = functools.partial(nn.DenseGeneral, axis=-1, kernel_init=init)
        q = dense((K, G, d), use_bias=c.qkv_bias, name="query")(x)  # (b, t, K, G, d)
        k = dense((K, d), use_bias=c.qkv_bias, name="key")(x)  # (b, t, K, d)
        v = dense((K, d), use_bias=c.qkv_bias, name="value")(x)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(d).astype(q.dtype)
        t = x.shape[1]
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
        if mask is not None:
            allowed = allowed & (mask[:, None, None, None, :] > 0)
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        return nn.DenseGeneral(
            x.shape[-1], axis=(-3, -2, -1), use_bias=c.out_bias, kernel_init=init, name="out"
        )(ctx)


class MLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``; gate and up share the hidden units."""

    config: Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = functools.partial(
            nn.Dense, use_bias=c.mlp_bias, kernel_init=nn.initializers.normal(c.initializer_range)
        )
        h = _layers.activation(c.hidden_act)(dense(c.intermediate_size, name="gate")(x))
        h = h * dense(c.intermediate_size, name="up")(x)
        return dense(x.shape[-1], name="down")(h)


class Block(nn.Module):
    """Pre-norm: ``x = x + Attn(RMSNorm(x)); x = x + MLP(RMSNorm(x))``."""

    config: Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, inputs):
        c = self.config
        mask, positions = inputs
        norm = functools.partial(nn.RMSNorm, epsilon=c.rms_norm_eps)
        x = x + Attention(c, name="attention")(norm(name="input_layernorm")(x), mask, positions)
        return x + MLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))


class Model(nn.Module):
    """``__call__(input_ids, attention_mask=None)``: next-token logits ``(batch, tokens,
    vocab)`` (``causal_lm``), logits ``(batch, labels)`` at each row's last real token
    (``sequence_classification``: the rightmost token that is not ``pad_token_id``, as
    transformers; without a pad token, the attention mask's last 1, where transformers takes the
    last position), or the final hidden states (``task=None``). Positions count from 0 (right
    padding). Inputs longer than ``sliding_window`` are refused if a layer slides (sliding
    attention is not implemented; shorter ones are exact, whichever layers would slide)."""

    config: Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, deterministic: bool = True):
        c = self.config
        _layers.check_tokens(
            input_ids,
            c.window,
            f"sliding_window={c.sliding_window}: longer inputs are not implemented",
            sizes=_layers.token_tables(c),
            attention_mask=attention_mask,
        )
        t = input_ids.shape[1]
        init = nn.initializers.normal(c.initializer_range)
        embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="embed_tokens")
        x = embed(input_ids)
        positions = jnp.broadcast_to(jnp.arange(t), input_ids.shape)
        x = _layers.Encoder(Block, c, deterministic, name="decoder")(x, (attention_mask, positions))
        x = nn.RMSNorm(epsilon=c.rms_norm_eps, name="norm")(x)
        if c.task is None:
            return x
        if c.task == "causal_lm":
            if c.tie_word_embeddings:
                return embed.attend(x)
            return nn.Dense(c.vocab_size, use_bias=False, kernel_init=init, name="lm_head")(x)
        # The last real token's state, then the head (transformers scores every token and
        # keeps that one's: the same logits; here the head, and its Gram, sees one row each).
        if c.pad_token_id is not None:
            real = (input_ids != c.pad_token_id).astype(jnp.int32)
        elif attention_mask is not None:
            real = attention_mask.astype(jnp.int32)
        else:
            real = jnp.ones_like(input_ids)
        last = jnp.argmax(jnp.arange(t)[None] * real, axis=-1)
        pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return nn.Dense(c.num_labels, use_bias=False, kernel_init=init, name="score")(pooled)


def symmetry_spec(config: Config, *, stream_rotation: bool = False) -> sym.Spec:
    """The symmetry spec of `Model(config)`'s params.

    Groups: ``residual`` (the stream), and per layer: ``heads`` (the key-value heads, each with
    its query group), ``qk_rotation`` (per key-value head k, a rotation R[k] that commutes with
    RoPE: one SO(2) angle per frequency, on the pair (i, i + d/2) (`sym.Group.pairs`);
    ``Q[:, k, g] R[k]`` for every query head g of the group and ``K[:, k] R[k]``, biases too; a
    full O(d) here would change the function, tested), ``vo_rotation`` (an O(d) per key-value
    head: ``V[:, k] R[k]``, and ``R[k]ᵀ O[k, g]`` for every query head g of its group),
    ``qk_scale`` (``Q[:, k, g]·a[k]``, ``K[:, k]/a[k]``), ``vo_scale``, and ``units``
    (SwiGLU's hidden units: gate and up together, down's input; no scale, SiLU is not
    homogeneous), and with G > 1 ``query_heads`` (per key-value head k, a permutation σ[k] of
    its G query heads, which share its K and V: ``Q[:, k, g] ← Q[:, k, σ[k, g]]`` and
    ``O[k, g] ← O[k, σ[k, g]]``, biases too; it commutes with the rotations and scales, which
    are shared by the group). Not here: per-frequency Q/K scales (a symmetry too). With
    ``stream_rotation``: the group ``stream``, all of O(D) on the residual stream, a symmetry
    of the canonical form (RMSNorm scales folded into the readers; no centring).
    """
    c = config
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    K, G, d = c.kv_heads, c.groups, c.head_size
    res = "residual"
    frags = [
        sym.permutation(res, D),
        sym.embedding("embed_tokens", V, D, res),
        sym.param("norm/scale", (D,), Action(res, (0,))),
    ]
    for prefix, batch, layer in _layers.layer_prefixes(
        "decoder", c.num_hidden_layers, c.scan_layers
    ):
        b = len(batch)
        at = f"{prefix}/attention"
        names = ("heads", "query_heads", "qk_rotation", "vo_rotation", "qk_scale", "vo_scale")
        heads, qh, qr, vo, qs, vs = (f"{at}/{r}" for r in names)
        pairs = sym.Group("orth", K, d, batch, heads, "qk_rotation", layer, pairs=True)
        # The query heads of a group: with G = 1 there is nothing to permute.
        within = lambda head_axis, qh=qh: [Action(qh, (head_axis, head_axis + 1))] * (G > 1)
        if G > 1:
            frags.append(
                sym.group(qh, sym.Group("hperm", K, G, batch, heads, "query_heads", layer))
            )
        frags += [
            sym.permutation(heads, K, batch=batch, role="heads", layer=layer),
            sym.group(qr, pairs),
            sym.group(vo, sym.Group("orth", K, d, batch, heads, "vo_rotation", layer)),
            sym.group(qs, sym.Group("scale", K, None, batch, heads, "qk_scale", layer)),
            sym.group(vs, sym.Group("scale", K, None, batch, heads, "vo_scale", layer)),
            sym.param(f"{prefix}/input_layernorm/scale", (*batch, D), Action(res, (b,))),
            sym.param(f"{prefix}/post_attention_layernorm/scale", (*batch, D), Action(res, (b,))),
            sym.param(
                f"{at}/query/kernel",
                (*batch, D, K, G, d),
                Action(res, (b,)),
                Action(heads, (b + 1,)),
                *within(b + 1),
                Action(qr, (b + 1, b + 3)),
                Action(qs, (b + 1,), 1),
            ),
            sym.param(
                f"{at}/key/kernel",
                (*batch, D, K, d),
                Action(res, (b,)),
                Action(heads, (b + 1,)),
                Action(qr, (b + 1, b + 2)),
                Action(qs, (b + 1,), -1),
            ),
            sym.param(
                f"{at}/value/kernel",
                (*batch, D, K, d),
                Action(res, (b,)),
                Action(heads, (b + 1,)),
                Action(vo, (b + 1, b + 2)),
                Action(vs, (b + 1,), 1),
            ),
            sym.param(
                f"{at}/out/kernel",
                (*batch, K, G, d, D),
                Action(heads, (b,)),
                *within(b),
                Action(vo, (b, b + 2)),
                Action(vs, (b,), -1),
                Action(res, (b + 3,)),
            ),
        ]
        if c.qkv_bias:
            frags += [
                sym.param(
                    f"{at}/query/bias",
                    (*batch, K, G, d),
                    Action(heads, (b,)),
                    *within(b),
                    Action(qr, (b, b + 2)),
                    Action(qs, (b,), 1),
                ),
                sym.param(
                    f"{at}/key/bias",
                    (*batch, K, d),
                    Action(heads, (b,)),
                    Action(qr, (b, b + 1)),
                    Action(qs, (b,), -1),
                ),
                sym.param(
                    f"{at}/value/bias",
                    (*batch, K, d),
                    Action(heads, (b,)),
                    Action(vo, (b, b + 1)),
                    Action(vs, (b,), 1),
                ),
            ]
        if c.out_bias:
            frags.append(sym.param(f"{at}/out/bias", (*batch, D), Action(res, (b,))))
        units = f"{prefix}/mlp/units"
        frags += [
            sym.permutation(units, F, batch=batch, role="ffn", layer=layer),
            *(
                sym.dense(
                    f"{prefix}/mlp/{n}",
                    D,
                    F,
                    in_group=res,
                    out_group=units,
                    batch=batch,
                    use_bias=c.mlp_bias,
                )
                for n in ("gate", "up")
            ),
            sym.dense(
                f"{prefix}/mlp/down",
                F,
                D,
                in_group=units,
                out_group=res,
                batch=batch,
                use_bias=c.mlp_bias,
            ),
        ]
    if c.task == "causal_lm" and not c.tie_word_embeddings:
        frags.append(sym.dense("lm_head", D, V, in_group=res, use_bias=False))
    elif c.task == "sequence_classification":
        frags.append(sym.dense("score", D, c.num_labels, in_group=res, use_bias=False))
    spec = sym.Spec.combine(*frags)
    if not stream_rotation:
        return spec
    # stream_spec raises for configs without a canonical form.
    return sym.with_stream_rotation(spec, stream_spec(config), res, STREAM)


STREAM = "stream"
"""The name of the stream rotation group in ``symmetry_spec(config, stream_rotation=True)``."""


def stream_spec(config: Config) -> sym.StreamSpec:
    """The residual stream of `Model(config)` as data (for `rotjax.symmetry.canonicalize`):
    RMSNorms and their readers (Q/K/V; gate and up; the LM head or the score), and the writers
    (the embedding, each attention output and MLP down projection). No centring: RMSNorm
    commutes with every orthogonal Q once its scale is folded.

    Raises:
      ValueError: tied embeddings (the final norm's scale would have to fold into the input
        embedding too) or a bare decoder (its output is the final norm's).
    """
    c = config
    if c.task is None or (c.task == "causal_lm" and c.tie_word_embeddings):
        why = "a bare decoder outputs its final norm" if c.task is None else "tied embeddings"
        raise ValueError(f"no canonical form: {why} (the final RMSNorm cannot be folded)")
    head = "lm_head" if c.task == "causal_lm" else "score"
    norms = [sym.Norm("norm", (head,))]
    writers = [("embed_tokens/embedding", 1)]
    for prefix, batch, _ in _layers.layer_prefixes("decoder", c.num_hidden_layers, c.scan_layers):
        b = len(batch)
        norms += [
            sym.Norm(
                f"{prefix}/input_layernorm",
                tuple(f"{prefix}/attention/{n}" for n in ("query", "key", "value")),
                b,
            ),
            sym.Norm(
                f"{prefix}/post_attention_layernorm", (f"{prefix}/mlp/gate", f"{prefix}/mlp/up"), b
            ),
        ]
        writers += [(f"{prefix}/attention/out/kernel", b + 3), (f"{prefix}/mlp/down/kernel", b + 1)]
        if c.out_bias:
            writers.append((f"{prefix}/attention/out/bias", b))
        if c.mlp_bias:
            writers.append((f"{prefix}/mlp/down/bias", b))
    return sym.StreamSpec(c.hidden_size, tuple(norms), tuple(writers), centred=False)


def example_inputs(config: Config, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(input_ids, attention_mask)`` of ``batch_size`` rows of 8 real tokens (fewer if the
    model's ``sliding_window`` takes fewer)."""
    n = min(8, config.window or 8)
    ids = jnp.ones((batch_size, n), jnp.int32) % config.vocab_size
    return ids, jnp.ones((batch_size, n), jnp.int32)


def batch_inputs(batch: Mapping[str, Any]) -> tuple[Any, ...]:
    return batch["input_ids"], batch.get("attention_mask")


FAMILY = Family(
    name="llama",
    Config=Config,
    Model=Model,
    symmetry_spec=symmetry_spec,
    example_inputs=example_inputs,
    batch_inputs=batch_inputs,
    token_mask=_layers.token_mask,
    input_names=("input_ids", "attention_mask"),
    model_types=FAMILY_TYPES,
    stream_spec=stream_spec,
    training_fields=("initializer_range", "attention_dropout", "scan_layers"),
)
"""Llama, Mistral, Qwen2: pre-norm with RMSNorm, so the stream admits all of O(D)."""
