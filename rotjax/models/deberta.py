"""DeBERTa-v2/v3 encoders in Flax Linen, with their symmetry spec.

Follows Hugging Face's `DebertaV2Model` / `DebertaV2ForSequenceClassification` /
`DebertaV2ForTokenClassification`: post-LN blocks whose attention adds to the content scores
``q_i·k_j`` the disentangled terms of relative positions (He et al., DeBERTa, 2021),
content-to-position ``q_i·pk_δ`` (``c2p``) and position-to-content ``k_j·pq_δ`` (``p2c``),
where ``pq = rel Wq``, ``pk = rel Wk`` project the (LayerNorm'd) relative embeddings with the
query/key kernels themselves (``share_att_key``, DeBERTa-v3) or with their own ``pos_query`` /
``pos_key`` kernels, and ``δ`` is the (log-bucketed) relative distance, as in transformers.
Every term is divided by ``sqrt(d · (1 + number of pos_att_type terms))``.

Params (unscanned; with ``scan_layers=True`` the ``layer_i`` level becomes ``layers`` and every
leaf below it gains a leading layer axis)::

    embeddings/word_embeddings/embedding                     (V, D)
    embeddings/position_embeddings/embedding                 (P, D)  position_biased_input
    embeddings/token_type_embeddings/embedding               (T, D)  type_vocab_size > 0
    embeddings/LayerNorm/{scale,bias}                        (D,)
    encoder/rel_embeddings/embedding                         (2S, D) relative_attention
    encoder/LayerNorm/{scale,bias}                           (D,)    norm_rel_ebd="layer_norm"
    encoder/layer_i/attention/{query,key,value}/kernel       (D, H, d)   bias (H, d)
    encoder/layer_i/attention/{pos_key,pos_query}/kernel     (D, H, d)   bias (H, d)
                                     (not share_att_key; pos_key for c2p, pos_query for p2c)
    encoder/layer_i/attention/out/kernel                     (H, d, D)   bias (D,)
    encoder/layer_i/attention_norm/{scale,bias}              (D,)
    encoder/layer_i/ffn/intermediate/kernel (D, F)   ffn/output/kernel (F, D)   biases
    encoder/layer_i/output_norm/{scale,bias}                 (D,)
    pooler/{kernel,bias}       (D, D)       sequence classification (transformers' ContextPooler)
    classifier/{kernel,bias}   (D, labels)  both heads
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.models import _layers
from rotjax.models._family import Family
from rotjax.symmetry import Action

TASKS = (None, "sequence_classification", "token_classification")
POS_ATT_TYPES = ("c2p", "p2c")
NORM_REL_EBD = ("none", "layer_norm")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters, named as in Hugging Face's `DebertaV2Config` (with the fields that
    transformers reads with ``getattr`` defaults: ``share_att_key``, ``position_buckets``,
    ``norm_rel_ebd``, ``conv_kernel_size``, ``embedding_size``, ...).

    ``pos_att_type`` is kept as a tuple in the order of `POS_ATT_TYPES` (transformers also
    takes a list or ``"p2c|c2p"``); ``embedding_size``, ``pooler_hidden_size`` and
    ``attention_head_size`` are resolved on construction, so a loaded config equals the one it
    was saved from. Options rotjax does not implement are refused with a ValueError naming the
    field: ``conv_kernel_size > 0`` (the convolution beside the first layer), ``embedding_size``
    or ``pooler_hidden_size`` other than ``hidden_size``, ``attention_head_size`` other than
    ``hidden_size / num_attention_heads``, ``pos_att_type`` entries other than c2p/p2c,
    ``norm_rel_ebd`` other than none/layer_norm (and layer_norm without relative attention,
    whose LayerNorm transformers builds but never uses), ``position_buckets=1``.
    """

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0  # 0: no token type embeddings
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    position_buckets: int = -1  # > 0: log buckets, 2 * position_buckets relative embeddings
    pos_att_type: tuple[str, ...] | None = ()
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    position_biased_input: bool = True
    pad_token_id: int | None = 0
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    pooler_hidden_size: int | None = None
    cls_dropout: float | None = None
    embedding_size: int | None = None
    attention_head_size: int | None = None
    conv_kernel_size: int = 0
    model_type: str = "deberta-v2"
    num_labels: int = 2
    # rotjax-specific:
    task: str | None = "sequence_classification"  # one of TASKS; None = bare encoder
    scan_layers: bool = False

    def __post_init__(self):
        types = self.pos_att_type
        if isinstance(types, str):  # transformers' legacy "p2c|c2p", which it lowercases
            types = [t.strip() for t in types.lower().split("|")]
        if types is None:
            types = ()
        if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
            raise ValueError(f"config field pos_att_type must be a list of strings, got {types!r}")
        # A list's entries as they are: transformers compares them as given (["C2P"] adds no
        # term there), so anything but "c2p" and "p2c" is refused below.
        unknown = [t for t in types if t not in POS_ATT_TYPES]
        if unknown:
            raise ValueError(
                f"pos_att_type={self.pos_att_type!r} is not supported: {unknown} "
                f"(implemented: {list(POS_ATT_TYPES)})"
            )
        object.__setattr__(self, "pos_att_type", tuple(t for t in POS_ATT_TYPES if t in types))
        _layers.check_fields(self, may_be_zero=("type_vocab_size", "conv_kernel_size"))
        head = _layers.head_dim(self.hidden_size, self.num_attention_heads)
        for name, value in (
            ("embedding_size", self.hidden_size),
            ("pooler_hidden_size", self.hidden_size),
            ("attention_head_size", head),
        ):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
            elif getattr(self, name) != value:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not supported (only {value}, as "
                    f"hidden_size={self.hidden_size} and "
                    f"num_attention_heads={self.num_attention_heads} give)"
                )
        if self.model_type != "deberta-v2":
            raise ValueError(f"model_type must be 'deberta-v2', got {self.model_type!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.conv_kernel_size > 0:
            raise ValueError(
                f"conv_kernel_size={self.conv_kernel_size} is not supported (the convolution "
                "layer is not implemented; use 0)"
            )
        norms = [x.strip() for x in self.norm_rel_ebd.lower().split("|")]
        if any(n not in NORM_REL_EBD for n in norms):
            raise ValueError(
                f"norm_rel_ebd={self.norm_rel_ebd!r} is not supported (only {NORM_REL_EBD})"
            )
        if self.rel_norm and not self.relative_attention:
            raise ValueError(
                f"norm_rel_ebd={self.norm_rel_ebd!r} with relative_attention=False is not "
                "supported (transformers builds a LayerNorm it never uses)"
            )
        relative = self.relative_attention  # else transformers reads no bucket field
        if relative and self.position_buckets == 1:
            raise ValueError("position_buckets=1 is not supported (no log buckets of width 0)")
        if (
            relative
            and self.position_buckets > 1
            and self.max_relative - 1 == self.position_buckets // 2
        ):
            raise ValueError(  # log((max_relative - 1) / mid) = 0: transformers divides by it
                f"position_buckets={self.position_buckets} with max_relative_positions="
                f"{self.max_relative} gives log buckets of zero width"
            )
        _layers.activation(self.hidden_act)
        if self.pooler_hidden_act not in _layers.ACTIVATIONS:
            raise ValueError(
                f"pooler_hidden_act={self.pooler_hidden_act!r} is not supported; known: "
                f"{sorted(_layers.ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.attention_head_size

    @property
    def rel_norm(self) -> bool:
        return "layer_norm" in [x.strip() for x in self.norm_rel_ebd.lower().split("|")]

    @property
    def max_relative(self) -> int:
        """The largest relative distance (transformers' resolved ``max_relative_positions``)."""
        if self.max_relative_positions < 1:
            return self.max_position_embeddings
        return self.max_relative_positions

    @property
    def span(self) -> int:
        """transformers' ``pos_ebd_size``: the relative embeddings are ``2 * span`` rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def scale_factor(self) -> int:
        """Scores are divided by ``sqrt(head_dim * scale_factor)`` (with or without relative
        attention, as transformers)."""
        return 1 + len(self.pos_att_type)

    @property
    def pos_projections(self) -> tuple[str, ...]:
        """The separate position projections (``share_att_key=False``): ``pos_key`` reads the
        relative embeddings for c2p, ``pos_query`` for p2c."""
        if not self.relative_attention or self.share_att_key:
            return ()
        return tuple(
            n for t, n in (("c2p", "pos_key"), ("p2c", "pos_query")) if t in self.pos_att_type
        )

    from_hf_dict = classmethod(_layers.config_from_hf_dict)


Encoded = _layers.Encoded


def relative_positions(config: Config, tokens: int) -> np.ndarray:
    """``δ[i, j]``, the relative position of key j seen from query i, as transformers'
    ``build_relative_position``: ``i - j``, log-bucketed when ``position_buckets > 0`` (in
    float32, as torch computes it). Static (numpy): it depends on the length only."""
    ids = np.arange(tokens)
    rel = ids[:, None] - ids[None, :]
    if config.position_buckets <= 0:
        return rel
    mid = config.position_buckets // 2
    sign = np.sign(rel)
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float32)
    denom = np.log(np.float32((config.max_relative - 1) / mid))  # != 0: Config checks it
    far = np.where(abs_pos > mid, abs_pos, np.float32(mid + 1))  # the log only where it is used
    log_pos = np.ceil(np.log(far / np.float32(mid)) / denom * np.float32(mid - 1)) + mid
    return np.where(abs_pos <= mid, rel, log_pos * sign).astype(np.int64)


class Attention(nn.Module):
    """Disentangled self-attention with an explicit head axis.

    For head h: ``s_ij = (q_i·k_j + [c2p] q_i·pk[c(δ_ij)] + [p2c] k_j·pq[c(-δ_ji)]) /
    sqrt(d · scale_factor)`` with ``c(x) = clip(x + S, 0, 2S - 1)``, ``pq = rel Wq[:, h] +
    bq[h]`` (or ``pos_query``), ``pk`` likewise; padded queries and keys are masked (a padded
    query row attends uniformly, as transformers' ``-inf`` everywhere does).
    """

    config: Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, rel):
        c = self.config
        H, d = c.num_attention_heads, c.head_dim
        init = nn.initializers.normal(c.initializer_range)
        proj = {
            n: nn.DenseGeneral((H, d), axis=-1, kernel_init=init, name=n)
            for n in ("query", "key", "value", *c.pos_projections)
        }
        q, k, v = (proj[n](x) for n in ("query", "key", "value"))
        scale = jnp.sqrt(jnp.float32(d * c.scale_factor)).astype(q.dtype)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k / scale)
        if c.relative_attention and c.pos_att_type:
            rel = nn.Dropout(c.hidden_dropout_prob)(rel, deterministic=self.deterministic)
            span = c.span
            delta = relative_positions(c, x.shape[1])

            def position(name):  # (2S, H, d): the relative embeddings through a projection
                if not c.share_att_key:
                    # Called on a (1, 1, 2S, D) block: rotjax.merge's capture weights rows of
                    # a (batch,) or (batch, tokens) shape by the mask, and 2S rows of a batch
                    # of 2S examples were taken for examples (a filler's zeroed one).
                    return proj[name](rel[None, None])[0, 0]
                # The query/key layers' own affine map, not a second call of them: what
                # rotjax.merge captures from a layer (Grams, activations) stays its tokens'.
                p = proj[{"pos_key": "key", "pos_query": "query"}[name]].variables["params"]
                return jnp.einsum("rD,Dhd->rhd", rel, p["kernel"]) + p["bias"][None]

            if "c2p" in c.pos_att_type:
                pk = position("pos_key")
                c2p = jnp.einsum("bqhd,rhd->bhqr", q, pk)
                idx = np.clip(delta + span, 0, 2 * span - 1)
                scores = scores + jnp.take_along_axis(c2p, idx[None, None], axis=-1) / scale
            if "p2c" in c.pos_att_type:
                pq = position("pos_query")
                p2c = jnp.einsum("bkhd,rhd->bhkr", k, pq)
                idx = np.clip(-delta + span, 0, 2 * span - 1)
                p2c = jnp.take_along_axis(p2c, idx[None, None], axis=-1)  # (b, h, key, query)
                scores = scores + jnp.swapaxes(p2c, -1, -2) / scale
        if mask is not None:
            keep = mask > 0
            allowed = keep[:, None, :, None] & keep[:, None, None, :]
            scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=self.deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), kernel_init=init, name="out")(ctx)


class Block(nn.Module):
    """Post-LN block: ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``."""

    config: Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, inputs):
        c = self.config
        mask, rel = inputs
        norm = functools.partial(_layers.LayerNorm, epsilon=c.layer_norm_eps)
        drop = nn.Dropout(c.hidden_dropout_prob, deterministic=self.deterministic)
        h = Attention(c, self.deterministic, name="attention")(x, mask, rel)
        x = norm(name="attention_norm")(x + drop(h))
        h = _layers.FeedForward(
            c.intermediate_size,
            c.hidden_act,
            dropout_rate=c.hidden_dropout_prob,
            kernel_init=nn.initializers.normal(c.initializer_range),
            deterministic=self.deterministic,
            name="ffn",
        )(x)
        return norm(name="output_norm")(x + h)


class Encoder(nn.Module):
    """The relative embeddings (LayerNorm'd once, read by every layer) and the blocks."""

    config: Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        rel = None
        if c.relative_attention:
            rel_embed = nn.Embed(
                2 * c.span,
                c.hidden_size,
                embedding_init=nn.initializers.normal(c.initializer_range),
                name="rel_embeddings",
            )
            rel = rel_embed(jnp.arange(2 * c.span))  # the whole table
            if c.rel_norm:
                rel = _layers.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(rel)
        run = _layers.stack(
            Block, c.num_hidden_layers, c.scan_layers, config=c, deterministic=self.deterministic
        )
        return run(x, (mask, rel))


class Model(nn.Module):
    """DeBERTa-v2 encoder with an optional classification head (``config.task``).

    ``__call__(input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True)``
    returns logits ``(batch, num_labels)`` for sequence classification (the first token through
    ``pooler`` and ``pooler_hidden_act``), ``(batch, tokens, num_labels)`` for token
    classification, and `Encoded` (no pooler output) for ``task=None``. As transformers, the
    embeddings of padded tokens are zeroed. Inference mode (no dropout) is the default.
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
        _layers.check_tokens(
            input_ids,
            c.max_position_embeddings if c.position_biased_input else None,
            "max_position_embeddings",
            sizes=_layers.token_tables(c),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        )
        init = nn.initializers.normal(c.initializer_range)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(c, name="embeddings")(input_ids, token_type_ids)
        if attention_mask is not None:
            x = x * attention_mask[..., None].astype(x.dtype)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        x = Encoder(c, deterministic, name="encoder")(x, attention_mask)
        if c.task is None:
            return Encoded(x, None)
        if c.task == "token_classification":
            x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
            return nn.Dense(c.num_labels, kernel_init=init, name="classifier")(x)
        pooled = nn.Dropout(c.pooler_dropout)(x[:, 0], deterministic=deterministic)
        pooled = nn.Dense(c.hidden_size, kernel_init=init, name="pooler")(pooled)
        pooled = _layers.ACTIVATIONS[c.pooler_hidden_act](pooled)
        rate = c.hidden_dropout_prob if c.cls_dropout is None else c.cls_dropout
        pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
        return nn.Dense(c.num_labels, kernel_init=init, name="classifier")(pooled)


class Embeddings(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        embed = functools.partial(
            nn.Embed,
            features=c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        x = embed(c.vocab_size, name="word_embeddings")(input_ids)
        if c.position_biased_input:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
            x = x + embed(c.max_position_embeddings, name="position_embeddings")(positions)
        if c.type_vocab_size > 0:
            x = x + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        return _layers.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


def symmetry_spec(config: Config, *, stream_rotation: bool = False) -> sym.Spec:
    """The symmetry spec of `Model(config)`'s params.

    Groups: ``residual`` (the stream permutation: every embedding, LayerNorm and projection in
    or out of it, and also the relative embeddings and their LayerNorm, whose features the
    query/key kernels read like the stream's), per layer the attention groups of
    `rotjax.symmetry.attention` with the position projections ``pos_key`` / ``pos_query``
    acting as K / Q (``share_att_key=False``), the FFN hidden permutation, and ``pooler`` (the
    units of the sequence head). Every disentangled score pairs a query-side vector with a
    key-side one (c2c ``q·k``, c2p ``q·pk``, p2c ``pq·k``, with ``pq``/``pk`` the relative
    embeddings through the query/key side), so a per-head ``qk_rotation`` R (``q R``, ``k R``,
    ``pq R``, ``pk R``) and ``qk_scale`` a (``q·a``, ``pq·a``, ``k/a``, ``pk/a``) keep every
    term. Not declared (symmetries too): with ``share_att_key=False`` only the position
    projections read the relative embeddings, so their features could move apart from the
    stream (a permutation of their own; without their LayerNorm, any invertible map folded
    into ``pos_key`` / ``pos_query``).
    """
    if stream_rotation:
        raise ValueError(
            "DeBERTa is post-norm: the LayerNorm sits on the residual stream itself and "
            "commutes with permutations only, so the stream admits no rotation"
        )
    c = config
    D, H, d, L = c.hidden_size, c.num_attention_heads, c.head_dim, c.num_hidden_layers
    res = "residual"
    frags = [
        sym.permutation(res, D),
        sym.embedding("embeddings/word_embeddings", c.vocab_size, D, res),
        sym.layer_norm("embeddings/LayerNorm", D, res),
    ]
    if c.position_biased_input:
        frags.append(
            sym.embedding("embeddings/position_embeddings", c.max_position_embeddings, D, res)
        )
    if c.type_vocab_size > 0:
        frags.append(sym.embedding("embeddings/token_type_embeddings", c.type_vocab_size, D, res))
    if c.relative_attention:
        frags.append(sym.embedding("encoder/rel_embeddings", 2 * c.span, D, res))
        if c.rel_norm:
            frags.append(sym.layer_norm("encoder/LayerNorm", D, res))
    for prefix, batch, layer in _layers.layer_prefixes("encoder", L, c.scan_layers):
        b = len(batch)
        at = f"{prefix}/attention"
        frags.append(
            sym.attention(
                at, hidden_size=D, num_heads=H, head_dim=d, stream=res, batch=batch, layer=layer
            )
        )
        for name in c.pos_projections:  # the key side (c2p) or the query side (p2c)
            power = -1 if name == "pos_key" else 1
            head = [
                Action(f"{at}/heads", (b + 1,)),
                Action(f"{at}/qk_rotation", (b + 1, b + 2)),
                Action(f"{at}/qk_scale", (b + 1,), power),
            ]
            frags += [
                sym.param(f"{at}/{name}/kernel", (*batch, D, H, d), Action(res, (b,)), *head),
                sym.param(
                    f"{at}/{name}/bias",
                    (*batch, H, d),
                    *(Action(a.group, tuple(x - 1 for x in a.axes), a.power) for a in head),
                ),
            ]
        frags += [
            sym.layer_norm(f"{prefix}/attention_norm", D, res, batch=batch),
            sym.mlp(
                f"{prefix}/ffn",
                hidden_size=D,
                intermediate_size=c.intermediate_size,
                stream=res,
                batch=batch,
                layer=layer,
            ),
            sym.layer_norm(f"{prefix}/output_norm", D, res, batch=batch),
        ]
    if c.task == "token_classification":
        frags.append(sym.dense("classifier", D, c.num_labels, in_group=res))
    elif c.task == "sequence_classification":
        frags += [
            sym.permutation("pooler", D, role="ffn"),
            sym.dense("pooler", D, D, in_group=res, out_group="pooler"),
            sym.dense("classifier", D, c.num_labels, in_group="pooler"),
        ]
    return sym.Spec.combine(*frags)


def example_inputs(config: Config, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(input_ids, attention_mask)`` of ``batch_size`` rows of up to 8 real tokens."""
    c = config
    tokens = min(8, c.max_position_embeddings) if c.position_biased_input else 8
    ids = jnp.full((batch_size, tokens), ((c.pad_token_id or 0) + 1) % c.vocab_size, jnp.int32)
    return ids, jnp.ones((batch_size, tokens), jnp.int32)


batch_inputs = _layers.text_inputs  # (shared with BERT)


FAMILY = Family(
    name="deberta",
    Config=Config,
    Model=Model,
    symmetry_spec=symmetry_spec,
    example_inputs=example_inputs,
    batch_inputs=batch_inputs,
    token_mask=_layers.token_mask,
    input_names=("input_ids", "attention_mask", "token_type_ids"),
    model_types=("deberta-v2",),
    training_fields=(
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "pooler_dropout",
        "cls_dropout",
        "initializer_range",
        "scan_layers",
    ),
)
"""DeBERTa-v2/v3: post-LN blocks, so the residual stream admits permutations only."""
