"""Loading Hugging Face checkpoints into rotjax models and saving rotjax models as checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax.hf import _mapping
from rotjax.hf._layout import stack_layers, unstack_layers
from rotjax.models import bert, vit

Config = bert.Config | vit.Config

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
    "preprocessor_config.json",
)
# Config fields that are rotjax's own, not Hugging Face's.
_ROTJAX_FIELDS = frozenset({"task", "add_pooling_layer", "scan_layers"})


def load(source: str | os.PathLike[str] | Any, *, scan_layers: bool = False) -> tuple[Config, Any]:
    """Convert a Hugging Face BERT, RoBERTa or ViT model into a rotjax config and params.

    Supported architectures: ``BertModel``, ``BertForSequenceClassification``,
    ``BertForTokenClassification``, the same three for RoBERTa, ``ViTModel`` and
    ``ViTForImageClassification``. The architecture comes from ``config.json``'s
    ``architectures`` (or the class of an in-memory model; a config without ``architectures``
    is a base model of its ``model_type``); whether a base model keeps its pooler comes from
    whether the checkpoint has pooler weights. Every tensor is accounted for: the known
    non-parameter buffers (``embeddings.position_ids``, ``embeddings.token_type_ids``) are
    ignored, anything else unexpected is an error.

    Args:
      source: A local directory with ``config.json`` and ``model.safetensors`` (possibly
        sharded, with ``model.safetensors.index.json``) or ``pytorch_model.bin`` (needs torch),
        or an in-memory ``transformers`` PyTorch model (``PreTrainedModel``).
      scan_layers: Return the params stacked for ``config.scan_layers=True`` (every per-layer
        leaf gains a leading layer axis ``L``).

    Returns:
      ``(config, params)``: a `rotjax.models.bert.Config` or `rotjax.models.vit.Config` with
      the checkpoint's hyper-parameters, ``task``, ``model_type`` and ``add_pooling_layer``,
      and float32 params with exactly the structure of ``Model(config).init(...)["params"]``,
      e.g. for BERT ``encoder/layer_i/attention/query/kernel`` ``(D, H, d)`` from
      ``encoder.layer.i.attention.self.query.weight`` ``(H*d, D)``.

    Raises:
      FileNotFoundError: The directory, its ``config.json`` or its weights file is missing.
      ValueError: An unsupported architecture or config option, an unreadable file, or
        tensors missing, unexpected or of the wrong shape (all listed, with shapes).
      ImportError: ``pytorch_model.bin`` without torch installed.
    """
    if isinstance(source, str | os.PathLike):
        directory = Path(source)
        hf_config = _read_config(directory)
        arch = _architecture(hf_config, where=str(directory / CONFIG_FILE))
        tensors = _read_weights(directory)
    else:
        hf_config, tensors, arch = _read_torch_model(source)
    tensors = _canonical_names(tensors, arch)
    has_pooler = any(name.startswith("pooler.") for name in tensors)
    config = _rotjax_config(arch, hf_config, has_pooler=has_pooler)
    params = _to_rotjax(arch, config, tensors)
    if scan_layers:
        params = stack_layers(params)
        config = dataclasses.replace(config, scan_layers=True)
    params = jax.device_put(params)  # one transfer; jnp.asarray would stage a program per leaf
    sym.validate(_module(config).symmetry_spec(config), params)
    return config, params


def save(
    path: str | os.PathLike[str],
    config: Config,
    params: Any,
    *,
    tokenizer_from: str | os.PathLike[str] | None = None,
    id2label: Mapping[int, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a rotjax model as a Hugging Face checkpoint directory.

    Writes ``config.json`` (``architectures``, ``model_type``, ``id2label``/``label2id`` and
    every Hugging Face field of ``config``) and ``model.safetensors`` (float32, names as
    ``save_pretrained`` writes them), so ``transformers``'
    ``AutoModelFor...from_pretrained(path)`` loads it with no missing or unexpected keys. (A base
    model saved without its pooler needs ``from_pretrained(path, add_pooling_layer=False)``,
    since ``config.json`` cannot say so.) The directory appears whole or not at all: it is
    written beside ``path`` under a temporary name, then renamed.

    Args:
      path: The directory to create. It may exist only if empty, unless ``overwrite``.
      config: The model's config; scanned params (``config.scan_layers``) are unstacked.
      params: The model's params, as ``Model(config).init(...)["params"]``. Not modified.
      tokenizer_from: A directory whose tokenizer and preprocessor files (``tokenizer.json``,
        ``vocab.txt``, ``preprocessor_config.json``, ...) are copied alongside.
      id2label: Label names for ``config.num_labels`` classes (default ``LABEL_i``).
      overwrite: Replace an existing non-empty directory at ``path`` (the old one is removed
        only once the new one is complete).

    Returns:
      ``path`` as a `pathlib.Path`.

    Raises:
      ValueError: ``params`` do not match ``config`` (paths and shapes listed), or
        ``id2label`` has the wrong number of labels.
      FileExistsError: ``path`` exists and is not an empty directory, and not ``overwrite``.
      FileNotFoundError: ``tokenizer_from`` is missing or holds none of the files.
    """
    path = Path(path)
    sym.validate(_module(config).symmetry_spec(config), params)
    params = jax.tree.map(np.asarray, params)  # numpy: no XLA programs for unstacking
    if config.scan_layers:
        params = unstack_layers(params)
        config = dataclasses.replace(config, scan_layers=False)
    arch = _mapping.architecture_for(_model_type(config), config.task)
    prefixed = arch.task is not None
    tensors = {}
    for p, leaf in zip(*sym.flatten(params)[:2], strict=True):
        name, conv = _mapping.hf_name(arch, p, prefixed=prefixed)
        tensors[name] = np.ascontiguousarray(conv.to_hf(np.asarray(leaf, np.float32)))
    hf_config = _hf_config(arch, config, id2label)
    tokenizer_files = _tokenizer_files(tokenizer_from)

    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask
    try:
        _write_json(tmp / CONFIG_FILE, hf_config)
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def transformers_config(config: Config, *, id2label: Mapping[int, str] | None = None) -> Any:
    """``config`` as a ``transformers`` config: the ``config.json`` that `save` writes.

    Its ``architectures[0]`` names the ``transformers`` class of the same model, so
    ``getattr(transformers, c.architectures[0])(c)`` builds the PyTorch twin of
    ``Model(config)`` (with ``add_pooling_layer=False`` for a base model without pooler).
    """
    import transformers

    arch = _mapping.architecture_for(_model_type(config), config.task)
    fields = _hf_config(arch, config, id2label)
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


# ---------------------------------------------------------------------------------------------
# Reading


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist or is a file")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found")
    return _read_json(config_file)


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    if (directory / SAFETENSORS_FILE).is_file():
        return _read_safetensors(directory / SAFETENSORS_FILE)
    if (directory / SAFETENSORS_INDEX).is_file():
        index = _read_json(directory / SAFETENSORS_INDEX)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{directory / SAFETENSORS_INDEX} has no weight_map")
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(_read_safetensors(directory / shard))
        return tensors
    if (directory / TORCH_FILE).is_file():
        return _read_torch_file(directory / TORCH_FILE)
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or "
        f"{TORCH_FILE}"
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(out).__name__}")
    return out


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        with safe_open(str(file), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e


def _read_torch_file(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {file} needs PyTorch (pip install torch), or convert it to {SAFETENSORS_FILE}"
        ) from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"{file} is not a readable PyTorch state dict: {e}") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return {k: _torch_to_numpy(v) for k, v in state.items()}


def _torch_to_numpy(t: Any) -> np.ndarray:
    # A copy: numpy views of torch tensors share memory, and params must not alias the source.
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
    return np.array(t.numpy(), copy=True)


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
    tensors = {k: _torch_to_numpy(v) for k, v in state.items()}
    return model.config.to_dict(), tensors, _mapping.ARCHITECTURES[name]


# ---------------------------------------------------------------------------------------------
# Conversion


def _architecture(hf_config: Mapping[str, Any], *, where: str) -> _mapping.Architecture:
    names = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    supported = sorted(_mapping.ARCHITECTURES)
    if not names:
        if model_type in ("bert", "roberta", "vit"):
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


def _canonical_names(
    tensors: Mapping[str, np.ndarray], arch: _mapping.Architecture
) -> dict[str, np.ndarray]:
    """Strip the base-model prefix, rename legacy LayerNorm gamma/beta, drop known buffers."""
    prefix = f"{arch.model_type}."
    out: dict[str, np.ndarray] = {}
    original: dict[str, str] = {}
    for name, x in tensors.items():
        short = name.removeprefix(prefix)
        for old, new in _mapping.LEGACY_SUFFIXES:
            if short.endswith(f"LayerNorm{old}"):
                short = short.removesuffix(old) + new
        if short in _mapping.IGNORED:
            continue
        if short in out:
            raise ValueError(f"tensors {original[short]!r} and {name!r} are the same parameter")
        out[short], original[short] = x, name
    return out


def _check_hf_config(arch: _mapping.Architecture, hf_config: Mapping[str, Any]) -> None:
    """Reject config options that rotjax's models do not implement (silently wrong otherwise)."""
    problems = []
    if hf_config.get("position_embedding_type", "absolute") not in (None, "absolute"):
        problems.append(f"position_embedding_type={hf_config['position_embedding_type']!r}")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf_config.get(flag):
            problems.append(f"{flag}=True")
    if arch.model_type == "vit":
        if hf_config.get("pooler_act", "tanh") != "tanh":
            problems.append(f"pooler_act={hf_config['pooler_act']!r}")
        size = hf_config.get("pooler_output_size")
        if size is not None and size != hf_config.get("hidden_size"):
            problems.append(f"pooler_output_size={size} != hidden_size")
    if problems:
        raise ValueError(f"{arch.name} config not supported by rotjax: {', '.join(problems)}")


def _rotjax_config(
    arch: _mapping.Architecture, hf_config: Mapping[str, Any], *, has_pooler: bool
) -> Config:
    _check_hf_config(arch, hf_config)
    overrides: dict[str, Any] = {"task": arch.task, "scan_layers": False}
    overrides["add_pooling_layer"] = arch.task is None and has_pooler
    if arch.model_type == "vit":
        return vit.Config.from_hf_dict(dict(hf_config), **overrides)
    return bert.Config.from_hf_dict(dict(hf_config), model_type=arch.model_type, **overrides)


def _module(config: Config):
    if isinstance(config, bert.Config):
        return bert
    if isinstance(config, vit.Config):
        return vit
    raise TypeError(f"config must be a bert.Config or vit.Config, got {type(config).__name__}")


def _model_type(config: Config) -> str:
    return "vit" if isinstance(config, vit.Config) else config.model_type


def _param_shapes(config: Config) -> Any:
    """The model's own params structure and shapes (traced, nothing computed or compiled)."""
    model = _module(config).Model(config)
    if isinstance(config, vit.Config):
        shape = (1, config.image_size, config.image_size, config.num_channels)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
    else:
        x = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def _to_rotjax(
    arch: _mapping.Architecture, config: Config, tensors: Mapping[str, np.ndarray]
) -> Any:
    """Unscanned numpy params of ``Model(config)`` from canonical Hugging Face tensors."""
    paths, shapes, treedef = sym.flatten(_param_shapes(config))
    prefix = f"{arch.model_type}."
    wanted = []
    for path, leaf in zip(paths, shapes, strict=True):
        name, conv = _mapping.hf_name(arch, path, prefixed=False)
        wanted.append((name, conv, tuple(leaf.shape)))

    def shown(name: str) -> str:  # names as in the checkpoint, prefix included
        first = name.split(".", 1)[0]
        keep = arch.task is None or first in _mapping.HEAD_MODULES
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
    leaves = [
        np.ascontiguousarray(conv.to_flax(np.asarray(tensors[name], np.float32), shape))
        for name, conv, shape in wanted
    ]
    return jax.tree.unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------------
# Writing


def _hf_config(
    arch: _mapping.Architecture, config: Config, id2label: Mapping[int, str] | None
) -> dict[str, Any]:
    out = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _ROTJAX_FIELDS
    }
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(config.num_labels)}
    if sorted(int(i) for i in id2label) != list(range(config.num_labels)):
        raise ValueError(
            f"id2label must name labels 0..{config.num_labels - 1} (num_labels), got "
            f"{sorted(id2label)}"
        )
    labels = {str(int(i)): str(v) for i, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
    out.update(
        architectures=[arch.name],
        model_type=arch.model_type,
        id2label=labels,
        label2id={v: int(i) for i, v in labels.items()},
        dtype="float32",
    )
    if arch.model_type == "vit":
        out.update(pooler_output_size=config.hidden_size, pooler_act="tanh")
    return out


def _write_json(file: Path, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _tokenizer_files(directory: str | os.PathLike[str] | None) -> list[Path]:
    if directory is None:
        return []
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer_from directory {directory} does not exist")
    files = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{directory} holds none of {list(TOKENIZER_FILES)}")
    return files


def _replace_dir(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is swapped out, then removed."""
    if not path.exists():
        os.rename(new, path)
        return
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        os.rename(new, path)
        return
    old = path.parent / f".{path.name}.old-{secrets.token_hex(6)}"
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
