"""BERT / RoBERTa encoders in Flax Linen, with their symmetry spec.

The architecture follows Hugging Face's `BertModel` / `RobertaModel` (post-LN blocks) so that
checkpoints convert one to one; the config uses Hugging Face field names, so a `config.json`
maps onto `Config` field by field (`Config.from_hf_dict`).

Params (unscanned; with ``scan_layers=True`` the ``layer_i`` level becomes ``layers`` and every
leaf below it gains a leading layer axis)::

    embeddings/{word,position,token_type}_embeddings/embedding   (vocab|positions|types, D)
    embeddings/LayerNorm/{scale,bias}                             (D,)
    encoder/layer_i/attention/{query,key,value}/kernel            (D, H, d)   bias (H, d)
    encoder/layer_i/attention/out/kernel                          (H, d, D)   bias (D,)
    encoder/layer_i/attention_norm/{scale,bias}                   (D,)
    encoder/layer_i/ffn/intermediate/kernel                       (D, F)      bias (F,)
    encoder/layer_i/ffn/output/kernel                             (F, D)      bias (D,)
    encoder/layer_i/output_norm/{scale,bias}                      (D,)
    pooler/{kernel,bias}            BERT sequence classification (or task=None with a pooler)
    classifier/{kernel,bias}        BERT heads; RoBERTa sequence head: classifier/{dense,out_proj}
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

TASKS = (None, "sequence_classification", "token_classification")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters, named as in Hugging Face's `BertConfig` / `RobertaConfig`."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0  # BERT does not read it (may be null); RoBERTa's positions do
    model_type: str = "bert"  # "bert" or "roberta" (position ids and classification head)
    num_labels: int = 2
    classifier_dropout: float | None = None
    # rotjax-specific:
    task: str | None = "sequence_classification"  # one of TASKS; None = bare encoder
    add_pooling_layer: bool = False  # only for task=None: keep BERT's pooler (as BertModel)
    scan_layers: bool = False  # stack the layers with nn.scan (leading layer axis)

    def __post_init__(self):
        _layers.check_fields(self)
        if self.model_type not in ("bert", "roberta"):
            raise ValueError(f"model_type must be 'bert' or 'roberta', got {self.model_type!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.model_type == "roberta" and self.pad_token_id is None:
            raise ValueError("a RoBERTa config needs pad_token_id: it numbers the positions")
        _layers.head_dim(self.hidden_size, self.num_attention_heads)
        _layers.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return _layers.head_dim(self.hidden_size, self.num_attention_heads)

    @property
    def has_pooler(self) -> bool:
        if self.task is None:
            return self.add_pooling_layer
        return self.task == "sequence_classification" and self.model_type == "bert"

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Config:
        """Field by field from a `config.json` dict, with transformers' defaults where they differ
        by model type: a RoBERTa config without ``pad_token_id`` pads (and numbers positions
        from) 1, as `transformers.RobertaConfig` does, not BERT's 0."""
        if d.get("model_type") == "roberta" and "pad_token_id" not in d:
            d = {**d, "pad_token_id": 1}
        return _layers.config_from_hf_dict(cls, dict(d), **overrides)


Encoded = _layers.Encoded


class Block(nn.Module):
    """Post-LN transformer block: ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``."""

    config: Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        norm = functools.partial(_layers.LayerNorm, epsilon=c.layer_norm_eps)
        drop = nn.Dropout(c.hidden_dropout_prob, deterministic=self.deterministic)
        h = _layers.SelfAttention(
            c.num_attention_heads,
            c.head_dim,
            dropout_rate=c.attention_probs_dropout_prob,
            kernel_init=init,
            deterministic=self.deterministic,
            name="attention",
        )(x, mask)
        x = norm(name="attention_norm")(x + drop(h))
        h = _layers.FeedForward(
            c.intermediate_size,
            c.hidden_act,
            dropout_rate=c.hidden_dropout_prob,
            kernel_init=init,
            deterministic=self.deterministic,
            name="ffn",
        )(x)
        return norm(name="output_norm")(x + h)


def _padded_past(input_ids: Any, pad: int, room: int) -> bool:
    """Whether concrete ``input_ids`` are wider than ``room`` by padding only: every row has
    at most ``room`` real tokens (RoBERTa numbers only those). Traced, only the width is
    known; the rows are read only when the width is too large."""
    if isinstance(input_ids, jax.core.Tracer) or np.ndim(input_ids) != 2:
        return False
    if input_ids.shape[1] <= room:
        return False
    return int(np.max(np.sum(np.asarray(input_ids) != pad, axis=1), initial=0)) <= room


class Model(nn.Module):
    """BERT/RoBERTa encoder with an optional classification head (``config.task``).

    ``__call__(input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True)``
    returns logits ``(batch, num_labels)`` for sequence classification, ``(batch, tokens,
    num_labels)`` for token classification, and `Encoded` for ``task=None``. Inference mode
    (no dropout) is the default; pass ``deterministic=False`` and a ``"dropout"`` rng to train.
    """

    config: Config

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ):
        c = self.config
        room = c.max_position_embeddings - (c.pad_token_id + 1 if c.model_type == "roberta" else 0)
        if c.model_type == "roberta" and _padded_past(input_ids, c.pad_token_id, room):
            room = None  # (positions count real tokens: padding past the table is read as pad)
        _layers.check_tokens(
            input_ids,
            room,
            f"max_position_embeddings={c.max_position_embeddings}",
            sizes=_layers.token_tables(c),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        )
        init = nn.initializers.normal(c.initializer_range)
        if c.model_type == "roberta":
            # RoBERTa numbers real tokens from pad_token_id + 1 and gives pads pad_token_id.
            real = (input_ids != c.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(real, axis=1) * real + c.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(c, name="embeddings")(input_ids, position_ids, token_type_ids)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        x = _layers.Encoder(Block, c, deterministic, name="encoder")(x, attention_mask)

        pooled = None
        if c.has_pooler:
            pooled = nn.tanh(nn.Dense(c.hidden_size, kernel_init=init, name="pooler")(x[:, 0]))
        if c.task is None:
            return Encoded(x, pooled)

        drop = nn.Dropout(
            c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        )
        if c.task == "token_classification":
            x = drop(x, deterministic=deterministic)
            return nn.Dense(c.num_labels, kernel_init=init, name="classifier")(x)
        if c.model_type == "bert":
            pooled = drop(pooled, deterministic=deterministic)
            return nn.Dense(c.num_labels, kernel_init=init, name="classifier")(pooled)
        return RobertaHead(c, deterministic=deterministic, name="classifier")(x[:, 0])


class Embeddings(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, input_ids, position_ids, token_type_ids):
        c = self.config
        embed = functools.partial(
            nn.Embed,
            features=c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        x = (
            embed(c.vocab_size, name="word_embeddings")(input_ids)
            + embed(c.max_position_embeddings, name="position_embeddings")(position_ids)
            + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        )
        return _layers.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


class RobertaHead(nn.Module):
    """RoBERTa's sequence head: ``out_proj(dropout(tanh(dense(dropout(x_<s>)))))``."""

    config: Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        x = nn.Dropout(rate)(x, deterministic=self.deterministic)
        x = nn.tanh(nn.Dense(c.hidden_size, kernel_init=init, name="dense")(x))
        x = nn.Dropout(rate)(x, deterministic=self.deterministic)
        return nn.Dense(c.num_labels, kernel_init=init, name="out_proj")(x)


def symmetry_spec(config: Config, *, stream_rotation: bool = False) -> sym.Spec:
    """The symmetry spec of `Model(config)`'s params.

    Groups: ``residual`` (the stream, shared by every embedding, LayerNorm and projection in
    or out of it), per layer the attention groups of `rotjax.symmetry.attention` and the FFN
    hidden permutation, and ``pooler`` / ``classifier/dense`` (the tanh hidden units of the
    sequence heads; a bare encoder's pooler output is the model's, so it has no group). See
    `rotjax.symmetry` for how each group acts.
    """
    if stream_rotation:
        raise ValueError(
            "BERT/RoBERTa are post-norm: the LayerNorm sits on the residual stream itself and "
            "commutes with permutations only, so the stream admits no rotation"
        )
    c = config
    D, L = c.hidden_size, c.num_hidden_layers
    frags = [
        sym.permutation("residual", D),
        sym.embedding("embeddings/word_embeddings", c.vocab_size, D, "residual"),
        sym.embedding("embeddings/position_embeddings", c.max_position_embeddings, D, "residual"),
        sym.embedding("embeddings/token_type_embeddings", c.type_vocab_size, D, "residual"),
        sym.layer_norm("embeddings/LayerNorm", D, "residual"),
    ]
    for prefix, batch, layer in _layers.layer_prefixes("encoder", L, c.scan_layers):
        frags += [
            sym.attention(
                f"{prefix}/attention",
                hidden_size=D,
                num_heads=c.num_attention_heads,
                head_dim=c.head_dim,
                stream="residual",
                batch=batch,
                layer=layer,
            ),
            sym.layer_norm(f"{prefix}/attention_norm", D, "residual", batch=batch),
            sym.mlp(
                f"{prefix}/ffn",
                hidden_size=D,
                intermediate_size=c.intermediate_size,
                stream="residual",
                batch=batch,
                layer=layer,
            ),
            sym.layer_norm(f"{prefix}/output_norm", D, "residual", batch=batch),
        ]
    if c.has_pooler and c.task is None:  # its output is the model's: fixed
        frags.append(sym.dense("pooler", D, D, in_group="residual"))
    elif c.has_pooler:  # hidden units, read by the classifier (or by nothing)
        frags += [
            sym.permutation("pooler", D, role="ffn"),
            sym.dense("pooler", D, D, in_group="residual", out_group="pooler"),
        ]
    if c.task == "token_classification":
        frags.append(sym.dense("classifier", D, c.num_labels, in_group="residual"))
    elif c.task == "sequence_classification" and c.model_type == "bert":
        frags.append(sym.dense("classifier", D, c.num_labels, in_group="pooler"))
    elif c.task == "sequence_classification":
        frags += [
            sym.permutation("classifier/dense", D, role="ffn"),
            sym.dense("classifier/dense", D, D, in_group="residual", out_group="classifier/dense"),
            sym.dense("classifier/out_proj", D, c.num_labels, in_group="classifier/dense"),
        ]
    return sym.Spec.combine(*frags)


def example_inputs(config: Config, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(input_ids, attention_mask)`` of ``batch_size`` rows of up to 8 real tokens."""
    c = config
    # RoBERTa numbers positions from pad_token_id + 1: keep them inside the table.
    room = c.max_position_embeddings - (c.pad_token_id + 1 if c.model_type == "roberta" else 0)
    tokens = max(1, min(8, room))
    ids = jnp.full((batch_size, tokens), ((c.pad_token_id or 0) + 1) % c.vocab_size, jnp.int32)
    return ids, jnp.ones((batch_size, tokens), jnp.int32)


batch_inputs = _layers.text_inputs  # (shared with DeBERTa)
token_mask = _layers.token_mask  # (shared with every text family)


FAMILY = Family(
    name="bert",
    Config=Config,
    Model=Model,
    symmetry_spec=symmetry_spec,
    example_inputs=example_inputs,
    batch_inputs=batch_inputs,
    token_mask=token_mask,
    input_names=("input_ids", "attention_mask", "token_type_ids"),
    model_types=("bert", "roberta"),
    training_fields=(
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "initializer_range",
        "scan_layers",
    ),
    inert=(r"(^|/)attention/key/bias$",),
)
"""BERT and RoBERTa: post-LN blocks, so the residual stream admits permutations only (the
LayerNorm sits on the stream itself and commutes with permutations, not with rotations)."""
