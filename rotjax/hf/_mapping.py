"""The one table between rotjax param paths and Hugging Face tensor names, as data.

Each row is ``(rotjax path pattern, Hugging Face name pattern, conversion)``; ``{i}`` stands for
a layer index in both patterns. Rows are looked up from the rotjax side only (the model's own
param paths pick their rows), so the same table serves loading (Hugging Face -> rotjax) and
saving (rotjax -> Hugging Face). Hugging Face names here are those of checkpoints on disk (what
``save_pretrained`` writes), without the base-model prefix (``bert.``, ``roberta.``, ``vit.``,
``model.``, ``deberta.``), which encoder tensors carry in checkpoints of models with a task head.

A `Conversion` maps a PyTorch tensor to the Flax layout and back (``D`` hidden size, ``H``
heads, ``d`` head width, ``F`` FFN width, ``C`` channels, ``p`` patch size):

- ``SAME``: unchanged (embeddings, LayerNorm weight -> scale, biases, cls token, positions).
- ``LINEAR``: ``nn.Linear`` weight ``(out, in)`` <-> Dense kernel ``(in, out)``.
- ``QKV_KERNEL``: query/key/value weight ``(H*d, D)`` <-> kernel ``(D, H, d)``.
- ``HEAD_BIAS``: query/key/value bias ``(H*d,)`` <-> ``(H, d)``.
- ``OUT_KERNEL``: attention output weight ``(D, H*d)`` <-> kernel ``(H, d, D)``.
- ``CONV``: patch projection weight ``(D, C, p, p)`` <-> Conv kernel ``(p, p, C, D)``.

Torch flattens heads as ``h * d + j``, which is exactly numpy's row-major reshape of ``(H, d)``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np


class Conversion(NamedTuple):
    """How one tensor's layout differs between Hugging Face (PyTorch) and rotjax (Flax).

    Attributes:
      name: A short name, for error messages.
      to_flax: ``(hf_array, flax_shape) -> flax_array``.
      to_hf: ``flax_array -> hf_array``; the exact inverse of ``to_flax``.
    """

    name: str
    to_flax: Callable[[Any, tuple[int, ...]], Any]
    to_hf: Callable[[Any], Any]

    def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of a tensor whose rotjax shape is ``flax_shape``."""
        # A zero-stride dummy: transposes and reshapes of it are views, nothing is allocated.
        return tuple(self.to_hf(np.broadcast_to(np.float32(0), flax_shape)).shape)


SAME = Conversion("same", lambda x, shape: x, lambda x: x)
LINEAR = Conversion("linear", lambda x, shape: x.T, lambda x: x.T)
QKV_KERNEL = Conversion(
    "qkv_kernel", lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T
)
HEAD_BIAS = Conversion("head_bias", lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1))
OUT_KERNEL = Conversion(
    "out_kernel", lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T
)
CONV = Conversion(
    "conv", lambda x, shape: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)
)

Row = tuple[str, str, Conversion]


def _dense(flax: str, hf: str) -> tuple[Row, ...]:
    return (f"{flax}/kernel", f"{hf}.weight", LINEAR), (f"{flax}/bias", f"{hf}.bias", SAME)


def _norm(flax: str, hf: str) -> tuple[Row, ...]:
    return (f"{flax}/scale", f"{hf}.weight", SAME), (f"{flax}/bias", f"{hf}.bias", SAME)


def _attention(flax: str, hf_qkv: str, hf_out: str) -> tuple[Row, ...]:
    rows: list[Row] = []
    for name in ("query", "key", "value"):
        rows += [
            (f"{flax}/{name}/kernel", f"{hf_qkv}.{name}.weight", QKV_KERNEL),
            (f"{flax}/{name}/bias", f"{hf_qkv}.{name}.bias", HEAD_BIAS),
        ]
    rows += [
        (f"{flax}/out/kernel", f"{hf_out}.weight", OUT_KERNEL),
        (f"{flax}/out/bias", f"{hf_out}.bias", SAME),
    ]
    return tuple(rows)


_LAYER, _HF_LAYER = "encoder/layer_{i}", "encoder.layer.{i}"

BERT_TABLE: tuple[Row, ...] = (
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", SAME),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", SAME),
    ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", SAME),
    *_norm("embeddings/LayerNorm", "embeddings.LayerNorm"),
    *_attention(
        f"{_LAYER}/attention", f"{_HF_LAYER}.attention.self", f"{_HF_LAYER}.attention.output.dense"
    ),
    *_norm(f"{_LAYER}/attention_norm", f"{_HF_LAYER}.attention.output.LayerNorm"),
    *_dense(f"{_LAYER}/ffn/intermediate", f"{_HF_LAYER}.intermediate.dense"),
    *_dense(f"{_LAYER}/ffn/output", f"{_HF_LAYER}.output.dense"),
    *_norm(f"{_LAYER}/output_norm", f"{_HF_LAYER}.output.LayerNorm"),
    *_dense("pooler", "pooler.dense"),
    *_dense("classifier", "classifier"),  # BERT heads, RoBERTa token head
    *_dense("classifier/dense", "classifier.dense"),  # RoBERTa sequence head
    *_dense("classifier/out_proj", "classifier.out_proj"),
)

VIT_TABLE: tuple[Row, ...] = (
    ("embeddings/cls_token", "embeddings.cls_token", SAME),
    ("embeddings/position_embeddings", "embeddings.position_embeddings", SAME),
    ("embeddings/patch_embeddings/kernel", "embeddings.patch_embeddings.projection.weight", CONV),
    ("embeddings/patch_embeddings/bias", "embeddings.patch_embeddings.projection.bias", SAME),
    *_norm(f"{_LAYER}/layernorm_before", f"{_HF_LAYER}.layernorm_before"),
    *_attention(
        f"{_LAYER}/attention",
        f"{_HF_LAYER}.attention.attention",
        f"{_HF_LAYER}.attention.output.dense",
    ),
    *_norm(f"{_LAYER}/layernorm_after", f"{_HF_LAYER}.layernorm_after"),
    *_dense(f"{_LAYER}/ffn/intermediate", f"{_HF_LAYER}.intermediate.dense"),
    *_dense(f"{_LAYER}/ffn/output", f"{_HF_LAYER}.output.dense"),
    *_norm("layernorm", "layernorm"),
    *_dense("pooler", "pooler.dense"),
    *_dense("classifier", "classifier"),
)

_DEC, _HF_DEC = "decoder/layer_{i}", "layers.{i}"

LLAMA_TABLE: tuple[Row, ...] = (  # Llama, Mistral, Qwen2 (base-model prefix "model.")
    ("embed_tokens/embedding", "embed_tokens.weight", SAME),
    (f"{_DEC}/input_layernorm/scale", f"{_HF_DEC}.input_layernorm.weight", SAME),
    (f"{_DEC}/post_attention_layernorm/scale", f"{_HF_DEC}.post_attention_layernorm.weight", SAME),
    *(
        row
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))
        for row in (
            (f"{_DEC}/attention/{ours}/kernel", f"{_HF_DEC}.self_attn.{theirs}.weight", QKV_KERNEL),
            (f"{_DEC}/attention/{ours}/bias", f"{_HF_DEC}.self_attn.{theirs}.bias", HEAD_BIAS),
        )
    ),
    (f"{_DEC}/attention/out/kernel", f"{_HF_DEC}.self_attn.o_proj.weight", OUT_KERNEL),
    (f"{_DEC}/attention/out/bias", f"{_HF_DEC}.self_attn.o_proj.bias", SAME),
    *_dense(f"{_DEC}/mlp/gate", f"{_HF_DEC}.mlp.gate_proj"),
    *_dense(f"{_DEC}/mlp/up", f"{_HF_DEC}.mlp.up_proj"),
    *_dense(f"{_DEC}/mlp/down", f"{_HF_DEC}.mlp.down_proj"),
    ("norm/scale", "norm.weight", SAME),
    *_dense("lm_head", "lm_head"),
    *_dense("score", "score"),
)
DECODER_TYPES = ("llama", "mistral", "qwen2")

_DEB = "encoder.layer.{i}.attention"

DEBERTA_TABLE: tuple[Row, ...] = (  # DeBERTa-v2/v3 (base-model prefix "deberta.")
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", SAME),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", SAME),
    ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", SAME),
    *_norm("embeddings/LayerNorm", "embeddings.LayerNorm"),
    ("encoder/rel_embeddings/embedding", "encoder.rel_embeddings.weight", SAME),
    *_norm("encoder/LayerNorm", "encoder.LayerNorm"),
    *(
        row
        for ours in ("query", "key", "value", "pos_key", "pos_query")
        for row in (
            (f"{_LAYER}/attention/{ours}/kernel", f"{_DEB}.self.{ours}_proj.weight", QKV_KERNEL),
            (f"{_LAYER}/attention/{ours}/bias", f"{_DEB}.self.{ours}_proj.bias", HEAD_BIAS),
        )
    ),
    (f"{_LAYER}/attention/out/kernel", f"{_DEB}.output.dense.weight", OUT_KERNEL),
    (f"{_LAYER}/attention/out/bias", f"{_DEB}.output.dense.bias", SAME),
    *_norm(f"{_LAYER}/attention_norm", f"{_DEB}.output.LayerNorm"),
    *_dense(f"{_LAYER}/ffn/intermediate", f"{_HF_LAYER}.intermediate.dense"),
    *_dense(f"{_LAYER}/ffn/output", f"{_HF_LAYER}.output.dense"),
    *_norm(f"{_LAYER}/output_norm", f"{_HF_LAYER}.output.LayerNorm"),
    *_dense("pooler", "pooler.dense"),  # ContextPooler: beside the base model, not in it
    *_dense("classifier", "classifier"),
)

# Top-level rotjax modules that sit outside the base model, so their Hugging Face names carry
# no base-model prefix (DeBERTa's pooler too: `Architecture.head_modules`).
HEAD_MODULES = frozenset({"classifier", "lm_head", "score"})

# Tensors in checkpoints that are not parameters (registered buffers), ignored on load.
# Names after the base-model prefix is stripped.
# Buffers, not parameters (old LLaMA checkpoints also keep a per-layer "...rotary_emb.inv_freq").
IGNORED = frozenset({"embeddings.position_ids", "embeddings.token_type_ids", "rotary_emb.inv_freq"})

# Legacy suffixes of old TF-converted BERT checkpoints, renamed on load as transformers does.
LEGACY_SUFFIXES = ((".gamma", ".weight"), (".beta", ".bias"))


class Architecture(NamedTuple):
    """A supported Hugging Face architecture.

    Attributes:
      name: The transformers class name, as in ``config.json``'s ``architectures``.
      model_type: ``"bert"``, ``"roberta"``, ``"vit"``, ``"llama"``, ``"mistral"``, ``"qwen2"``,
        ``"deberta-v2"``.
      task: The rotjax ``Config.task`` of the head (None for a base model).
      dropped_head: For pretraining architectures (masked LM ...): the name prefixes of the
        head's tensors, which `load` drops (it loads the encoder; `save` never writes these).
    """

    name: str
    model_type: str
    task: str | None
    dropped_head: tuple[str, ...] = ()

    @property
    def table(self) -> tuple[Row, ...]:
        if self.model_type in DECODER_TYPES:
            return LLAMA_TABLE
        if self.model_type == "deberta-v2":
            return DEBERTA_TABLE
        return VIT_TABLE if self.model_type == "vit" else BERT_TABLE

    @property
    def prefix(self) -> str:
        """The base-model prefix of tensor names in checkpoints of models with a head."""
        if self.model_type in DECODER_TYPES:
            return "model"
        return "deberta" if self.model_type == "deberta-v2" else self.model_type

    @property
    def head_modules(self) -> frozenset[str]:
        """Top-level rotjax modules outside the base model (names without the prefix)."""
        return HEAD_MODULES | {"pooler"} if self.model_type == "deberta-v2" else HEAD_MODULES


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("BertModel", "bert", None),
        Architecture("BertForSequenceClassification", "bert", "sequence_classification"),
        Architecture("BertForTokenClassification", "bert", "token_classification"),
        Architecture("RobertaModel", "roberta", None),
        Architecture("RobertaForSequenceClassification", "roberta", "sequence_classification"),
        Architecture("RobertaForTokenClassification", "roberta", "token_classification"),
        Architecture("ViTModel", "vit", None),
        Architecture("ViTForImageClassification", "vit", "image_classification"),
        # Pretraining checkpoints (e.g. bert-base-uncased names BertForMaskedLM): the encoder.
        Architecture("BertForMaskedLM", "bert", None, ("cls.",)),
        Architecture("BertForPreTraining", "bert", None, ("cls.",)),
        Architecture("RobertaForMaskedLM", "roberta", None, ("lm_head.",)),
        Architecture(
            "ViTForMaskedImageModeling", "vit", None, ("decoder.", "embeddings.mask_token")
        ),
        *(
            Architecture(f"{name}{suffix}", model_type, task)
            for name, model_type in (("Llama", "llama"), ("Mistral", "mistral"), ("Qwen2", "qwen2"))
            for suffix, task in (
                ("Model", None),
                ("ForCausalLM", "causal_lm"),
                ("ForSequenceClassification", "sequence_classification"),
            )
        ),
        Architecture("DebertaV2Model", "deberta-v2", None),
        Architecture("DebertaV2ForSequenceClassification", "deberta-v2", "sequence_classification"),
        Architecture("DebertaV2ForTokenClassification", "deberta-v2", "token_classification"),
        # Pretraining checkpoints: the legacy and the new MLM head; v3's replaced-token
        # detection checkpoints also keep a mask_predictions head.
        Architecture(
            "DebertaV2ForMaskedLM",
            "deberta-v2",
            None,
            ("cls.", "lm_predictions.", "mask_predictions."),
        ),
    )
}


def architecture_for(model_type: str, task: str | None) -> Architecture:
    """The architecture with this model type and task."""
    for a in ARCHITECTURES.values():
        if (a.model_type, a.task) == (model_type, task) and not a.dropped_head:
            return a
    raise ValueError(f"no Hugging Face architecture for model_type={model_type!r}, task={task!r}")


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)"))


@functools.cache
def _compiled(table: tuple[Row, ...]) -> list[tuple[re.Pattern[str], str, Conversion]]:
    return [(_compile(flax), hf, conv) for flax, hf, conv in table]


def hf_name(arch: Architecture, path: str, *, prefixed: bool) -> tuple[str, Conversion]:
    """The Hugging Face tensor name and conversion of the rotjax param at ``path``.

    Args:
      arch: The architecture (selects the table and the prefix).
      path: A ``"/"`` path of an unscanned rotjax param, e.g. ``"encoder/layer_3/ffn/output/bias"``.
      prefixed: Whether encoder tensors carry the base-model prefix (``"bert."`` ...).

    Raises:
      ValueError: If no row of the table matches ``path``.
    """
    for regex, hf, conv in _compiled(arch.table):
        m = regex.fullmatch(path)
        if m is not None:
            name = hf.format(**m.groupdict())
            if prefixed and path.split("/", 1)[0] not in arch.head_modules:
                name = f"{arch.prefix}.{name}"
            return name, conv
    raise ValueError(f"rotjax param {path!r} has no Hugging Face name for {arch.name}")
