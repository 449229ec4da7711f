"""Checkpoint files: reading configs and weights (safetensors, sharded or not, and PyTorch
``.bin``), writing JSON, and swapping a finished directory into place."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rotjax._atomic import sync, sync_tree
from rotjax.hf._mapping import IGNORED

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
    "added_tokens.json",
    "spm.model",  # DeBERTa-v2/v3 (SentencePiece)
    "tokenizer.model",  # LLaMA, Mistral (SentencePiece)
    "sentencepiece.bpe.model",  # XLM-RoBERTa
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist or is a file")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found")
    config = read_json(config_file)
    for key in OBJECT_FIELDS:  # read as mappings: anything else failed later, as a traceback
        if config.get(key) is not None and not isinstance(config[key], dict):
            got = type(config[key]).__name__
            raise ValueError(f"{config_file}: {key} must be a JSON object (or null), got {got}")
    return config


OBJECT_FIELDS = ("id2label", "label2id", "rope_scaling", "rope_parameters")


def read_weights(directory: Path, readers=None) -> dict[str, Any]:
    """``{tensor name: tensor}`` of a checkpoint's weights file(s); ``readers``: the
    ``(safetensors file, PyTorch file)`` readers (file -> ``{name: value}``) to read them
    with instead (default: the tensors, `read_safetensors` and `read_torch_file`)."""
    safetensors, torch = readers or (read_safetensors, read_torch_file)
    if (directory / SAFETENSORS_FILE).is_file():
        return safetensors(directory / SAFETENSORS_FILE)
    if (directory / SAFETENSORS_INDEX).is_file():
        return read_shards(directory / SAFETENSORS_INDEX, safetensors)
    if (directory / TORCH_FILE).is_file():
        return torch(directory / TORCH_FILE)
    if (directory / TORCH_INDEX).is_file():
        return read_shards(directory / TORCH_INDEX, torch)
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
        f"{TORCH_FILE} or {TORCH_INDEX}"
    )


def stored_dtypes(directory: Path) -> set[str]:
    """The dtypes a checkpoint stores its floating parameters in (``{"bfloat16"}``, ...), from
    the tensors `read_weights` reads (of a sharded checkpoint, each where its index maps it),
    buffers that loading drops aside (an old LLaMA's float32 ``rotary_emb.inv_freq``): the
    safetensors headers alone, a PyTorch file memory-mapped (its bfloat16 and float16 tensors
    are read as float32, so the arrays cannot say). Empty if it has no weights, or an index
    that maps none (which loading refuses, naming it)."""
    try:
        found = read_weights(directory, (_safetensors_dtypes, _torch_dtypes))
    except (FileNotFoundError, ValueError):
        return set()
    buffer = lambda name: any(name == b or name.endswith(f".{b}") for b in IGNORED)
    return {dtype for name, dtype in found.items() if not buffer(name)}


_SAFETENSORS_FLOATS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _safetensors_dtypes(file: Path) -> dict[str, str]:
    """``{tensor name: dtype name}`` of a safetensors file's floating tensors (its header)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="np") as f:
        kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
    return {k: _SAFETENSORS_FLOATS[t] for k, t in kinds.items() if t in _SAFETENSORS_FLOATS}


def _torch_dtypes(file: Path) -> dict[str, str]:
    """``{tensor name: dtype name}`` of a PyTorch file's floating tensors (memory-mapped)."""
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file of torch's legacy format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    return {
        k: str(t.dtype).removeprefix("torch.") for k, t in state.items() if t.is_floating_point()
    }


def read_shards(index_file: Path, read) -> dict[str, np.ndarray]:
    """The tensors of a sharded checkpoint: every shard its index's ``weight_map`` names, and
    every tensor named there found in its shard (a copy of it in another shard, left by an
    older save, is not read; tensors the map does not name are read from every shard)."""
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no weight_map")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        file = index_file.parent / shard
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (a shard named by {index_file})")
        tensors.update({k: v for k, v in read(file).items() if weight_map.get(k, shard) == shard})
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(
            f"{index_file} maps {len(missing)} tensor(s) to shards that lack them, e.g. "
            f"{missing[0]!r} in {weight_map[missing[0]]}"
        )
    return tensors


def read_json(file: Path) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(out).__name__}")
    return out


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    with open(file, "rb"):  # its OSError (safetensors said "No such file" for "Permission denied")
        pass
    try:
        with safe_open(str(file), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e


def read_torch_file(file: Path) -> dict[str, np.ndarray]:
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
    # (a training checkpoint's {"state_dict": ..., "epoch": ...}, or a state dict with extras)
    others = [f"{k!r}: {type(v).__name__}" for k, v in state.items() if not torch.is_tensor(v)]
    if others:
        raise ValueError(
            f"{file} is not a state dict of tensors: it also holds {', '.join(others[:5])}"
            + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        )
    return {k: torch_to_numpy(v) for k, v in state.items()}


def torch_to_numpy(t: Any) -> np.ndarray:
    # A copy: numpy views of torch tensors share memory, and params must not alias the source.
    # float64 stays float64, for `float32_overflow` to see what float32 cannot hold; bfloat16
    # and float16 become float32 (numpy has no bfloat16), which holds them exactly.
    t = t.detach().cpu()
    if t.is_floating_point() and t.element_size() < 4:
        t = t.float()
    return np.array(t.numpy(), copy=True)


def float32_overflow(x: Any) -> float | None:
    """The largest magnitude among the finite values of ``x`` that float32 (which rotjax
    computes in and writes) cannot hold, or None: ``x.astype(float32)`` makes them ±Inf."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize <= 4:
        return None
    with np.errstate(over="ignore"):
        lost = np.isfinite(x) & np.isinf(x.astype(np.float32))
    return float(np.abs(x[lost]).max()) if lost.any() else None


def write_json(file: Path, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def replace_dir(new: Path, path: Path, *, overwrite: bool = True) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is swapped out, then removed (a
    symbolic link as a link: what it points to is left alone).

    Without ``overwrite``, only a missing ``path`` or an empty directory is replaced, by one
    atomic rename: a directory that another process filled since the caller checked it is
    never removed (FileExistsError).

    Everything under ``new`` reaches the disk before the rename, and the rename before the
    return (fsync of each file, of each directory, then of ``path``'s parent): a power loss
    leaves the old ``path`` or the whole new one, never a renamed directory of empty files.
    """
    sync_tree(new)
    try:
        _replace_dir(new, path, overwrite)
    finally:
        sync(path.parent)


def _replace_dir(new: Path, path: Path, overwrite: bool) -> None:
    if not overwrite and not path.is_symlink():
        try:
            os.rename(new, path)  # rename(2): onto nothing or an empty directory only
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise FileExistsError(
                f"{path} is no longer missing or empty (written meanwhile?); "
                "pass overwrite=True to replace it"
            ) from None
        return
    if not path.exists() and not path.is_symlink():
        os.rename(new, path)
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
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
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
