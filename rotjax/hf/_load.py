"""Loading Hugging Face checkpoints (directories or in-memory ``transformers`` models) into
rotjax configs and Flax params."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.hf import _mapping
from rotjax.hf._files import (
    CONFIG_FILE,
    float32_overflow,
    read_config,
    read_weights,
    torch_to_numpy,
)
from rotjax.models import family, family_of_model_type, stack_layers, with_pretrained
from rotjax.tree import flatten

Config = Any  # a registered model config (`rotjax.models.family`)


class DroppedHeadWarning(UserWarning):
    """`load` read a pretraining checkpoint's encoder and left its head out."""


def load(source: str | os.PathLike[str] | Any, *, scan_layers: bool = False) -> tuple[Config, Any]:
    """Convert a Hugging Face BERT, RoBERTa, ViT, Llama/Mistral/Qwen2 or DeBERTa-v2/v3 model into
    a rotjax config and params.

    Supported architectures: ``BertModel``, ``BertForSequenceClassification``,
    ``BertForTokenClassification``, the same three for RoBERTa and for DeBERTa-v2
    (``DebertaV2Model`` ...), ``ViTModel`` and ``ViTForImageClassification``, ``LlamaModel``,
    ``LlamaForCausalLM``, ``LlamaForSequenceClassification`` and the same for Mistral and Qwen2;
    of pretraining checkpoints (``BertForMaskedLM``, ``BertForPreTraining``,
    ``RobertaForMaskedLM``, ``ViTForMaskedImageModeling``, ``DebertaV2ForMaskedLM``) the encoder,
    with a `DroppedHeadWarning` saying which head tensors were left out. The architecture comes
    from ``config.json``'s ``architectures`` (or the class of an in-memory model; a config
    without ``architectures`` is a base model of its ``model_type``, or the architecture
    whose head tensors the checkpoint holds when they name one: a decoder's ``lm_head`` or
    ``score``, a ViT's ``classifier``); whether a base model keeps its pooler comes from
    whether the checkpoint has pooler weights. Every tensor is
    accounted for: the known non-parameter buffers (``embeddings.position_ids``,
    ``embeddings.token_type_ids``) are ignored, a pooler that the head does not read (old
    RoBERTa and ViT classifiers) is dropped with a `DroppedHeadWarning`, anything else
    unexpected is an error.

    Args:
      source: A local directory with ``config.json`` and ``model.safetensors`` or
        ``pytorch_model.bin`` (needs torch), either possibly sharded (with
        ``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``), or an
        in-memory ``transformers`` PyTorch model (``PreTrainedModel``).
      scan_layers: Return the params stacked for ``config.scan_layers=True`` (every per-layer
        leaf gains a leading layer axis ``L``).

    Returns:
      ``(config, params)``: the ``Config`` of the checkpoint's family (`rotjax.models.bert`,
      ``vit``, ``deberta`` or ``llama``) with its hyper-parameters and ``task`` (and, where the
      family has them, ``model_type`` and ``add_pooling_layer``),
      and float32 params with exactly the structure of ``Model(config).init(...)["params"]``,
      e.g. for BERT ``encoder/layer_i/attention/query/kernel`` ``(D, H, d)`` from
      ``encoder.layer.i.attention.self.query.weight`` ``(H*d, D)``.

    Raises:
      FileNotFoundError: The directory, its ``config.json`` or its weights file is missing.
      ValueError: An unsupported architecture or config option, an unreadable file, or
        tensors missing, unexpected or of the wrong shape (all listed, with shapes), or
        float64 tensors holding finite values beyond float32's range (listed; they are not
        loaded as Inf). NaN and Inf stored in the checkpoint are loaded as they are.
      ImportError: ``pytorch_model.bin`` without torch installed.
    """
    if isinstance(source, str | os.PathLike):
        directory = Path(source)
        hf_config = read_config(directory)
        arch = _architecture(hf_config, where=str(directory / CONFIG_FILE))
        tensors = read_weights(directory)
    else:
        hf_config, tensors, arch = _read_torch_model(source)
    tensors = _canonical_names(tensors, arch)
    if isinstance(source, str | os.PathLike) and not hf_config.get("architectures"):
        arch = _pretraining_head(arch, tensors)
    if arch.dropped_head:
        head = sorted(n for n in tensors if n.startswith(arch.dropped_head))
        tensors = {n: x for n, x in tensors.items() if not n.startswith(arch.dropped_head)}
        warnings.warn(
            f"{arch.name}: loaded the encoder; the pretraining head ({len(head)} tensors: "
            f"{', '.join(head[:3])}{', ...' if len(head) > 3 else ''}) was dropped",
            DroppedHeadWarning,
            stacklevel=2,
        )
    if arch.model_type == "deberta-v2" and not hf_config.get("position_biased_input", True):
        # Microsoft's checkpoints keep a position table that the model never reads (transformers
        # ignores it on load too).
        tensors.pop("embeddings.position_embeddings.weight", None)
    has_pooler = any(name.startswith("pooler.") for name in tensors)
    config = _rotjax_config(arch, hf_config, has_pooler=has_pooler)
    if has_pooler and not getattr(config, "has_pooler", True):
        # Old fine-tunes keep a pooler their head never reads (RoBERTa's and ViT's classifiers
        # read the first token; transformers skips it with a warning).
        unused = sorted(n for n in tensors if n.startswith("pooler."))
        tensors = {n: x for n, x in tensors.items() if not n.startswith("pooler.")}
        warnings.warn(
            f"{arch.name}: its head reads no pooler; the checkpoint's ({', '.join(unused)}) "
            "was dropped",
            DroppedHeadWarning,
            stacklevel=2,
        )
    tensors = _untie(config, tensors)
    try:
        params = _to_rotjax(arch, config, tensors)
    except ValueError as e:  # (a guess named the class as if config.json had)
        if isinstance(source, str | os.PathLike) and not hf_config.get("architectures"):
            raise ValueError(
                f"{e}\n({directory / CONFIG_FILE} names no 'architectures': {arch.name} is a "
                "guess from its model_type and tensors; name the checkpoint's class there)"
            ) from None
        raise
    if scan_layers:
        params = stack_layers(params)
        config = dataclasses.replace(config, scan_layers=True)
    params = jax.device_put(params)  # one transfer; jnp.asarray would stage a program per leaf
    sym.validate(family(config).symmetry_spec(config), params)
    return config, params


def load_for_task(
    source: str | os.PathLike[str] | Any,
    *,
    task: str,
    num_labels: int,
    key: jax.Array,
    scan_layers: bool = False,
) -> tuple[Config, Any]:
    """A pretrained checkpoint's model under a new task head, ready to fine-tune.

    The config is the checkpoint's with ``task`` and ``num_labels`` (and no pooler unless the
    task has one); every param whose path and shape the new model shares comes from the
    checkpoint, the rest is drawn from ``key`` (`rotjax.models.with_pretrained`:
    ``normal(initializer_range)`` kernels, zero biases, as transformers initialises a head).
    So a checkpoint's head of another task is drawn anew whole, even where its shapes fit;
    one of the same task keeps what fits, as transformers' ``ignore_mismatched_sizes`` does:
    with another number of classes only the layers shaped by it are drawn (a RoBERTa
    classifier keeps its ``dense`` layer), with the same number the whole head is kept.

    Args:
      source: as for `load`.
      task: the new ``Config.task`` (e.g. ``"sequence_classification"``).
      num_labels: its number of classes.
      key: draws the new head.
      scan_layers: as for `load`.

    Raises:
      As `load`; ValueError for a task the family does not have.
    """
    pretrained_config, pretrained = load(source, scan_layers=scan_layers)
    changes = {"task": task, "num_labels": num_labels}
    if hasattr(pretrained_config, "add_pooling_layer"):  # a new head reads no pooler
        changes["add_pooling_layer"] = False
    config = dataclasses.replace(pretrained_config, **changes)
    f = family(config)
    keep = {path: x for path, x in zip(*flatten(pretrained)[:2], strict=True)}
    if task != pretrained_config.task:  # another task's head, even of the same shape, is not it
        heads = _mapping.architecture_for(config.model_type, task).head_modules
        keep = {path: x for path, x in keep.items() if path.split("/", 1)[0] not in heads}
    shapes = f.param_shapes(config)
    wanted = dict(zip(*flatten(shapes)[:2], strict=True))
    params = with_pretrained(
        shapes,
        {p: x for p, x in keep.items() if p in wanted and np.shape(x) == wanted[p].shape},
        key,
        std=getattr(config, "initializer_range", 0.02),
    )
    return config, params


def _read_torch_model(model: Any) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
    if not (hasattr(model, "state_dict") and hasattr(getattr(model, "config", None), "to_dict")):
        raise TypeError(
            "source must be a checkpoint directory or a transformers PreTrainedModel, got "
            f"{type(model).__name__}"
        )
    name = type(model).__name__
    if name not in _mapping.ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {name!r}; supported: {sorted(_mapping.ARCHITECTURES)}"
        )
    state = model.state_dict()
    try:
        # transformers >= 5 may name tensors in memory differently from its checkpoints (ViT's
        # `layers.i.attention.q_proj`); map back to the checkpoint names, as save_pretrained does.
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: memory and checkpoint names agree
        pass
    else:
        state = revert_weight_conversion(model, state)
    tensors = {k: torch_to_numpy(v) for k, v in state.items()}
    return model.config.to_dict(), tensors, _mapping.ARCHITECTURES[name]


def _architecture(hf_config: Mapping[str, Any], *, where: str) -> _mapping.Architecture:
    names = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    supported = sorted(_mapping.ARCHITECTURES)
    if not names:
        if any(a.model_type == model_type for a in _mapping.ARCHITECTURES.values()):
            return _mapping.architecture_for(model_type, None)
        raise ValueError(
            f"{where}: no 'architectures' and unsupported model_type {model_type!r}; "
            f"supported architectures: {supported}"
        )
    if len(names) != 1 or names[0] not in _mapping.ARCHITECTURES:
        raise ValueError(f"{where}: unsupported architectures {names}; supported: {supported}")
    arch = _mapping.ARCHITECTURES[names[0]]
    if model_type is not None and model_type != arch.model_type:
        raise ValueError(
            f"{where}: model_type {model_type!r} does not match architecture {arch.name} "
            f"(model_type {arch.model_type!r})"
        )
    return arch


def _pretraining_head(
    arch: _mapping.Architecture, tensors: Mapping[str, np.ndarray]
) -> _mapping.Architecture:
    """A ``config.json`` without ``architectures`` (microsoft/deberta-v3-base's) names no head:
    if the checkpoint holds the pretraining head of an architecture of its model type, it is
    that architecture (whose head `load` drops), not the base model; a decoder's ``lm_head``
    or ``score`` tensor makes it the causal LM or the sequence classifier, and a ViT's
    ``classifier`` the image classifier (their heads are unambiguous; a text encoder's
    ``classifier`` could be either of two tasks)."""
    heads = {"lm_head.": "causal_lm", "score.": "sequence_classification"}
    if arch.model_type == "vit":
        heads = {"classifier.": "image_classification"}
    elif arch.model_type not in _mapping.DECODER_TYPES:
        heads = {}
    for head, task in heads.items():
        if arch.task is None and any(name.startswith(head) for name in tensors):
            return _mapping.architecture_for(arch.model_type, task)
    for a in _mapping.ARCHITECTURES.values():
        same_type = a.model_type == arch.model_type and a.dropped_head
        if same_type and any(name.startswith(a.dropped_head) for name in tensors):
            return a
    return arch


def _canonical_names(
    tensors: Mapping[str, np.ndarray], arch: _mapping.Architecture
) -> dict[str, np.ndarray]:
    """Strip the base-model prefix, rename legacy LayerNorm gamma/beta, drop known buffers."""
    prefix = f"{arch.prefix}."
    out: dict[str, np.ndarray] = {}
    original: dict[str, str] = {}
    for name, x in tensors.items():
        short = name.removeprefix(prefix)
        for old, new in _mapping.LEGACY_SUFFIXES:
            if short.endswith(f"LayerNorm{old}"):
                short = short.removesuffix(old) + new
        if short in _mapping.IGNORED or short.endswith(".rotary_emb.inv_freq"):
            continue
        if short in out:
            raise ValueError(f"tensors {original[short]!r} and {name!r} are the same parameter")
        out[short], original[short] = x, name
    return out


def _untie(config: Config, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop an in-memory model's ``lm_head.weight`` when it is tied to the token embedding
    (files saved by transformers leave it out; a model object's state dict has both)."""
    if not getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in tensors:
        return tensors
    head, embed = tensors["lm_head.weight"], tensors.get("embed_tokens.weight")
    if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
        if embed is None:
            how = "there is no embed_tokens.weight"
        elif head.shape != embed.shape:
            how = f"shapes {head.shape} vs {embed.shape}"
        else:
            how = f"values differ, shapes {head.shape}"
        raise ValueError(
            f"tie_word_embeddings=True but lm_head.weight differs from embed_tokens.weight ({how})"
        )
    return {n: x for n, x in tensors.items() if n != "lm_head.weight"}


def _rotjax_config(
    arch: _mapping.Architecture, hf_config: Mapping[str, Any], *, has_pooler: bool
) -> Config:
    cls = family_of_model_type(arch.model_type).Config
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides: dict[str, Any] = {"task": arch.task, "scan_layers": False}
    if "add_pooling_layer" in fields:
        overrides["add_pooling_layer"] = arch.task is None and has_pooler
    if "model_type" in fields:
        overrides["model_type"] = arch.model_type
    # The type's own defaults (RoBERTa's pad_token_id 1, Qwen2 without a window) key on the
    # dict's model_type: a config named only by its architecture has the architecture's.
    return cls.from_hf_dict({**hf_config, "model_type": arch.model_type}, **overrides)


def _to_rotjax(
    arch: _mapping.Architecture, config: Config, tensors: Mapping[str, np.ndarray]
) -> Any:
    """Unscanned numpy params of ``Model(config)`` from canonical Hugging Face tensors."""
    paths, shapes, treedef = flatten(family(config).param_shapes(config))
    prefix = f"{arch.prefix}."
    wanted = []
    for path, leaf in zip(paths, shapes, strict=True):
        name, conv = _mapping.hf_name(arch, path, prefixed=False)
        wanted.append((name, conv, tuple(leaf.shape)))

    def shown(name: str) -> str:  # names as in the checkpoint, prefix included
        first = name.split(".", 1)[0]
        keep = arch.task is None or first in arch.head_modules
        return name if keep else prefix + name

    known = {name for name, _, _ in wanted}
    problems = [
        f"  missing:    {shown(name)}  {conv.hf_shape(shape)}"
        for name, conv, shape in wanted
        if name not in tensors
    ]
    problems += [
        f"  unexpected: {shown(name)}  {tuple(x.shape)}"
        for name, x in sorted(tensors.items())
        if name not in known
    ]
    problems += [
        f"  wrong shape: {shown(name)}  {tuple(tensors[name].shape)}, expected "
        f"{conv.hf_shape(shape)}"
        for name, conv, shape in wanted
        if name in tensors and tuple(tensors[name].shape) != conv.hf_shape(shape)
    ]
    problems += [
        f"  not floating point: {shown(name)}  {tensors[name].dtype}"
        for name, _, _ in wanted
        if name in tensors and not jnp.issubdtype(tensors[name].dtype, jnp.floating)  # bf16 too
    ]
    if problems:
        raise ValueError(
            f"checkpoint tensors do not match {arch.name} "
            f"(hidden_size={config.hidden_size}, layers={config.num_hidden_layers}, "
            f"heads={config.num_attention_heads}):\n" + "\n".join(problems)
        )
    over = {n: big for n, _, _ in wanted if (big := float32_overflow(tensors[n])) is not None}
    if over:
        raise ValueError(
            "checkpoint tensors hold finite values beyond float32's range (3.4e38), which "
            "rotjax computes in (they would be Inf):\n"
            + "\n".join(
                f"  {shown(n)}  {tensors[n].dtype}, |x| up to {big:.3g}" for n, big in over.items()
            )
        )
    leaves = [
        np.ascontiguousarray(conv.to_flax(np.asarray(tensors[name], np.float32), shape))
        for name, conv, shape in wanted
    ]
    return jax.tree.unflatten(treedef, leaves)
