"""Vision Transformer (pre-LN) image classifier in Flax Linen, with its symmetry spec.

Follows Hugging Face's `ViTForImageClassification` so checkpoints convert one to one; inputs are
NHWC float32 ``pixel_values``. Params (``layer_i`` becomes ``layers`` with ``scan_layers``)::

    embeddings/cls_token (1, 1, D)   embeddings/position_embeddings (1, 1 + patches, D)
    embeddings/patch_embeddings/{kernel (p, p, C, D), bias (D,)}
    encoder/layer_i/layernorm_before, attention/{query,key,value,out}, layernorm_after,
    encoder/layer_i/ffn/{intermediate,output}
    layernorm/{scale,bias} (D,)      classifier/{kernel (D, labels), bias}
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.models import _layers
from rotjax.models._family import Family
from rotjax.symmetry import Action
from rotjax.tree import traced

Encoded = _layers.Encoded


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters, named as in Hugging Face's `ViTConfig`."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_labels: int = 2
    # rotjax-specific:
    task: str | None = "image_classification"  # None = bare encoder (as ViTModel)
    add_pooling_layer: bool = False  # only for task=None: ViTModel's tanh pooler
    scan_layers: bool = False

    def __post_init__(self):
        _layers.check_fields(self)
        if self.task not in (None, "image_classification"):
            raise ValueError(f"task must be None or 'image_classification', got {self.task!r}")
        if self.image_size < self.patch_size:  # no patch: transformers' Conv2d fails too
            raise ValueError(
                f"image_size={self.image_size} is smaller than patch_size={self.patch_size}"
            )
        _layers.head_dim(self.hidden_size, self.num_attention_heads)
        _layers.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return _layers.head_dim(self.hidden_size, self.num_attention_heads)

    @property
    def num_patches(self) -> int:
        """``(image_size // patch_size)²``: as transformers' strided Conv2d, the last
        ``image_size % patch_size`` rows and columns (bottom, right) fall in no patch."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_pooler(self) -> bool:
        return self.task is None and self.add_pooling_layer

    @property
    def model_type(self) -> str:
        """The Hugging Face ``model_type``."""
        return "vit"

    from_hf_dict = classmethod(_layers.config_from_hf_dict)


class Block(nn.Module):
    """Pre-LN block: ``x = x + Attn(LN(x)); x = x + FFN(LN(x))``."""

    config: Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: None) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        norm = functools.partial(_layers.LayerNorm, epsilon=c.layer_norm_eps)
        h = _layers.SelfAttention(
            c.num_attention_heads,
            c.head_dim,
            dropout_rate=c.attention_probs_dropout_prob,
            qkv_bias=c.qkv_bias,
            kernel_init=init,
            deterministic=self.deterministic,
            name="attention",
        )(norm(name="layernorm_before")(x), mask)
        x = x + nn.Dropout(c.hidden_dropout_prob)(h, deterministic=self.deterministic)
        h = _layers.FeedForward(
            c.intermediate_size,
            c.hidden_act,
            dropout_rate=c.hidden_dropout_prob,
            kernel_init=init,
            deterministic=self.deterministic,
            name="ffn",
        )(norm(name="layernorm_after")(x))
        return x + h


class Model(nn.Module):
    """``__call__(pixel_values NHWC, *, deterministic=True)`` -> logits ``(batch, num_labels)``
    (or `Encoded` for ``task=None``). Dropout only with ``deterministic=False``."""

    config: Config

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, deterministic: bool = True) -> Any:
        c = self.config
        want = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            # (Hugging Face's pixel_values, and `rotjax merge --data`'s, are channels first)
            first = pixel_values.ndim == 4 and tuple(pixel_values.shape[1:]) == want[2:] + want[:2]
            hint = ": channels first? x.transpose(0, 2, 3, 1)" if first else ""
            raise ValueError(
                f"pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}) for this "
                f"ViT (image_size={c.image_size}, num_channels={c.num_channels}), got shape "
                f"{tuple(pixel_values.shape)}{hint}"
            )
        if not jnp.issubdtype(pixel_values.dtype, jnp.floating):  # (raw pixels went in as such)
            raise ValueError(
                f"pixel_values of dtype {pixel_values.dtype}: give normalised floats "
                "(rotjax.models.vit.image_pixels turns raw images into them)"
            )
        init = nn.initializers.normal(c.initializer_range)
        x = Embeddings(c, name="embeddings")(pixel_values)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        x = _layers.Encoder(Block, c, deterministic, name="encoder")(x, None)
        x = _layers.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm")(x)
        if c.task is None:
            pooled = None
            if c.has_pooler:
                pooled = nn.tanh(nn.Dense(c.hidden_size, kernel_init=init, name="pooler")(x[:, 0]))
            return Encoded(x, pooled)
        return nn.Dense(c.num_labels, kernel_init=init, name="classifier")(x[:, 0])


class Embeddings(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        p = c.patch_size
        x = nn.Conv(  # VALID windows from the top left: a remainder is cropped, as torch
            c.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=init,
            name="patch_embeddings",
        )(pixel_values)
        x = x.reshape(x.shape[0], -1, c.hidden_size)  # row-major patches, as torch's flatten(2)
        cls = self.param("cls_token", init, (1, 1, c.hidden_size))
        pos = self.param("position_embeddings", init, (1, c.num_patches + 1, c.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.hidden_size)), x], axis=1)
        return x + pos


def symmetry_spec(config: Config, *, stream_rotation: bool = False) -> sym.Spec:
    """The symmetry spec of `Model(config)`'s params (groups as in `rotjax.models.bert`).

    With ``stream_rotation``, also the group ``stream`` (kind ``rot``, role
    ``stream_rotation``): an orthogonal Q with ``Q 1 = 1`` on the residual stream, acting
    wherever the stream permutation acts. It is a symmetry of params in canonical form only
    (`rotjax.symmetry.canonicalize` with `stream_spec`): there every norm is γ = 1, β = 0, so
    ``LN(x Q) = LN(x) Q`` (Q keeps each token's mean, ``1ᵀ Q = 1ᵀ``, and the norm of its
    deviations).
    """
    c = config
    D, p = c.hidden_size, c.patch_size
    res = "residual"
    frags = [
        sym.permutation(res, D),
        sym.param("embeddings/cls_token", (1, 1, D), Action(res, (2,))),
        sym.param("embeddings/position_embeddings", (1, c.num_patches + 1, D), Action(res, (2,))),
        sym.param(
            "embeddings/patch_embeddings/kernel", (p, p, c.num_channels, D), Action(res, (3,))
        ),
        sym.param("embeddings/patch_embeddings/bias", (D,), Action(res, (0,))),
        sym.layer_norm("layernorm", D, res),
    ]
    for prefix, batch, layer in _layers.layer_prefixes(
        "encoder", c.num_hidden_layers, c.scan_layers
    ):
        frags += [
            sym.layer_norm(f"{prefix}/layernorm_before", D, res, batch=batch),
            sym.attention(
                f"{prefix}/attention",
                hidden_size=D,
                num_heads=c.num_attention_heads,
                head_dim=c.head_dim,
                stream=res,
                batch=batch,
                layer=layer,
                qkv_bias=c.qkv_bias,
            ),
            sym.layer_norm(f"{prefix}/layernorm_after", D, res, batch=batch),
            sym.mlp(
                f"{prefix}/ffn",
                hidden_size=D,
                intermediate_size=c.intermediate_size,
                stream=res,
                batch=batch,
                layer=layer,
            ),
        ]
    if c.task is not None:
        frags.append(sym.dense("classifier", D, c.num_labels, in_group=res))
    elif c.has_pooler:  # the bare model's: its output is the model's, fixed
        frags.append(sym.dense("pooler", D, D, in_group=res))
    spec = sym.Spec.combine(*frags)
    if not stream_rotation:
        return spec
    # stream_spec raises for configs without a canonical form.
    return sym.with_stream_rotation(spec, stream_spec(config), res, STREAM)


STREAM = "stream"
"""The name of the stream rotation group in ``symmetry_spec(config, stream_rotation=True)``."""


def stream_spec(config: Config) -> sym.StreamSpec:
    """The residual stream of `Model(config)` as data: its LayerNorms and their readers (each
    block's two norms: Q/K/V, the FFN's first layer; the final norm: the classifier), and its
    writers (patch embedding, CLS token, positions, each block's attention output and FFN
    output), for `rotjax.symmetry.canonicalize`.

    Raises:
      ValueError: a bare encoder (``task=None``), whose output is the final norm's output
        itself: its γ and β cannot be folded into a reader.
    """
    c = config
    if c.task is None:
        raise ValueError(
            "a bare ViT encoder (task=None) outputs its final LayerNorm: no canonical form"
        )
    norms = [sym.Norm("layernorm", ("classifier",))]
    writers = [
        ("embeddings/patch_embeddings/kernel", 3),
        ("embeddings/patch_embeddings/bias", 0),
        ("embeddings/cls_token", 2),
        ("embeddings/position_embeddings", 2),
    ]
    for prefix, batch, _ in _layers.layer_prefixes("encoder", c.num_hidden_layers, c.scan_layers):
        b = len(batch)
        qkv = tuple(f"{prefix}/attention/{n}" for n in ("query", "key", "value"))
        norms += [
            sym.Norm(f"{prefix}/layernorm_before", qkv, b),
            sym.Norm(f"{prefix}/layernorm_after", (f"{prefix}/ffn/intermediate",), b),
        ]
        writers += [
            (f"{prefix}/attention/out/kernel", b + 2),
            (f"{prefix}/attention/out/bias", b),
            (f"{prefix}/ffn/output/kernel", b + 1),
            (f"{prefix}/ffn/output/bias", b),
        ]
    return sym.StreamSpec(c.hidden_size, tuple(norms), tuple(writers), centred=True)


def image_pixels(images: Any, *, mean: float = 0.5, std: float = 0.5) -> jax.Array:
    """``uint8`` images in ``[0, 255]`` (or floats in ``[0, 1]``) -> ``(x - mean) / std`` float32
    with ``x`` in ``[0, 1]``: the normalisation of Hugging Face's ViT image processor.

    Raises:
      ValueError: integer images of another dtype, whose range is not known (uint16 may
        hold 0..255 or 0..65535; read as ``[0, 1]`` floats they were scaled 255x, silently),
        and float images outside ``[0, 1]`` where their values are known (not traced): floats
        in ``[0, 255]`` became pixels up to 509, silently.
    """
    dtype = np.dtype(getattr(images, "dtype", None) or np.asarray(images).dtype)
    if np.issubdtype(dtype, np.integer) and dtype != np.uint8:
        raise ValueError(
            f"images of dtype {dtype}: give uint8 images in [0, 255] or floats in [0, 1] "
            "(the range of other integers is not known)"
        )
    x = jnp.asarray(images)  # (once: numpy images are copied to the device here)
    if np.issubdtype(dtype, np.floating) and not traced(x):  # (read on its device)
        low, high = (float(f(x)) for f in (jnp.min, jnp.max)) if x.size else (0.0, 0.0)
        if not np.isfinite(low + high):
            raise ValueError("images hold NaN or Inf")
        if not 0 <= low <= high <= 1:
            raise ValueError(
                f"images are floats in [{low:g}, {high:g}]: give floats in [0, 1] (np.clip "
                "those a resize took slightly beyond) or uint8 in [0, 255]"
            )
    scaled = x.astype(jnp.float32)
    if x.dtype == jnp.uint8:
        scaled = scaled / 255.0
    return (scaled - mean) / std


def example_inputs(config: Config, batch_size: int = 1) -> tuple[jax.Array]:
    """``(pixel_values,)``: ``batch_size`` zero images of the config's size."""
    c = config
    return (jnp.zeros((batch_size, c.image_size, c.image_size, c.num_channels), jnp.float32),)


def batch_inputs(batch: Mapping[str, Any]) -> tuple[Any]:
    """``(pixel_values,)`` from a batch holding ``pixel_values`` (NHWC, normalised) or raw
    ``images`` (NHWC ``uint8`` or ``[0, 1]`` floats, normalised by `image_pixels`)."""
    if "pixel_values" in batch:
        return (batch["pixel_values"],)
    if "images" not in batch:
        raise KeyError("pixel_values or images")
    return (image_pixels(batch["images"]),)


FAMILY = Family(
    name="vit",
    Config=Config,
    Model=Model,
    symmetry_spec=symmetry_spec,
    example_inputs=example_inputs,
    batch_inputs=batch_inputs,
    token_mask=lambda inputs: None,  # every patch token is real
    input_names=("pixel_values",),
    model_types=("vit",),
    stream_spec=stream_spec,
    training_fields=(
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "initializer_range",
        "scan_layers",
    ),
    inert=(r"(^|/)attention/key/bias$",),
)
"""ViT: pre-LN blocks and a final LayerNorm, so every read of the stream goes through a norm."""
