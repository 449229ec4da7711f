"""Saving rotjax models as Hugging Face checkpoint directories."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rotjax import symmetry as sym
from rotjax._atomic import check_name_lengths, holds_cwd, temporary_sibling
from rotjax.hf import _mapping
from rotjax.hf._files import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    TOKENIZER_FILES,
    float32_overflow,
    read_config,
    replace_dir,
    write_json,
)
from rotjax.models import class_ids, family, unstack_layers
from rotjax.tree import flatten

Config = Any  # a registered model config (`rotjax.models.family`)
# Config fields that are rotjax's own, not Hugging Face's.
_ROTJAX_FIELDS = frozenset({"task", "add_pooling_layer", "scan_layers"})


def save(
    path: str | os.PathLike[str],
    config: Config,
    params: Any,
    *,
    source: str | os.PathLike[str] | None = None,
    tokenizer_from: str | os.PathLike[str] | None = None,
    id2label: Mapping[int, str] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write a rotjax model as a Hugging Face checkpoint directory.

    Writes ``config.json`` (``architectures``, ``model_type``, ``id2label``/``label2id`` and
    every Hugging Face field of ``config``) and ``model.safetensors`` (float32, names as
    ``save_pretrained`` writes them), so ``transformers``'
    ``AutoModelFor...from_pretrained(path)`` loads it with no missing or unexpected keys. (A base
    model saved without its pooler needs ``from_pretrained(path, add_pooling_layer=False)``,
    since ``config.json`` cannot say so.) A ViT's image processor comes from ``source`` or
    ``tokenizer_from``, or from `vit_image_processor` through ``extra_files`` (for a ViT
    trained on `rotjax.models.vit.image_pixels`). The directory appears whole or not at all:
    it is written beside ``path`` under a temporary name, then renamed. Every file follows the
    umask (the safetensors writer's own 0600 is not kept).

    Args:
      path: The directory to create. It may exist only if empty, unless ``overwrite``.
      config: The model's config; scanned params (``config.scan_layers``) are unstacked.
      params: The model's params, as ``Model(config).init(...)["params"]``. Not modified.
      source: The checkpoint directory the model came from (for a merge: the anchor's). Its
        ``config.json`` fields are all kept (label names, ``problem_type``, ...) except those
        this model's config sets (and its head's: its label names unless it names as many
        classes, its ``problem_type``, transformers' choice of loss, unless it has this
        model's architecture and number of labels), and every other file and folder is
        copied (tokenizer, sentence-transformers' ``modules.json`` and its modules, model
        card...), except weights (``*.safetensors``, ``*.bin``, ``*.h5``, ``*.msgpack``,
        ``*.onnx``, ... which would describe other weights) but those of the
        sentence-transformers modules in their own folders (`module_weights`: a ``2_Dense``
        projection after the pooling).
      tokenizer_from: A directory whose tokenizer and preprocessor files (``tokenizer.json``,
        ``vocab.txt``, ``preprocessor_config.json``, ...) are copied alongside.
      id2label: Label names for ``config.num_labels`` classes (default: the source's, when it
        names as many, else ``LABEL_i``).
      overwrite: Replace an existing non-empty directory at ``path`` (the old one is removed
        only once the new one is complete).
      extra_files: more files to write into the directory (name -> text or bytes), as part of
        the same atomic write (a report that must not appear without its checkpoint); plain
        file names, none of the checkpoint's own (``config.json``, the weights) nor of those
        copied from ``source`` or ``tokenizer_from``.

    Returns:
      ``path`` as a `pathlib.Path`.

    Raises:
      ValueError: ``params`` do not match ``config`` (paths and shapes listed), hold finite
        values beyond float32's range (float64; listed), ``id2label`` has the wrong number
        of labels, an ``extra_files`` name is not a plain new file,
        ``path`` is the working directory or holds it (the directory is replaced by a rename:
        the process would go on in the old one, deleted), or a name in ``path`` is too long
        for its file system (`rotjax._atomic.check_name_lengths`).
      FileExistsError: ``path`` exists and is not an empty directory, or is a symbolic link,
        and not ``overwrite``.
      FileNotFoundError: ``tokenizer_from`` is missing or holds none of the files.
      OSError: a file of ``source`` to copy cannot be read (nothing is left written).

    Warns:
      NotCopiedWarning: a folder of ``source`` to copy cannot be read (it is left out, the
        rest written).
    """
    path = Path(path)
    check_name_lengths(path)
    if holds_cwd(path):
        raise ValueError(f"{path} is the working directory or holds it; name a new directory")
    for name in extra_files or {}:
        if Path(name).name != name or name in ("", ".", "..", CONFIG_FILE, SAFETENSORS_FILE):
            raise ValueError(f"extra_files: {name!r} is not a plain file name of its own")
    sym.validate(family(config).symmetry_spec(config), params)
    params = jax.tree.map(np.asarray, params)  # numpy: no XLA programs for unstacking
    if config.scan_layers:
        params = unstack_layers(params)
        config = dataclasses.replace(config, scan_layers=False)
    arch = _mapping.architecture_for(config.model_type, config.task)
    prefixed = arch.task is not None
    paths, leaves = flatten(params)[:2]
    over = {
        p: big
        for p, x in zip(paths, leaves, strict=True)
        if (big := float32_overflow(x)) is not None
    }
    if over:
        raise ValueError(
            "params hold finite values beyond float32's range (3.4e38), which checkpoints are "
            "written in (they would be Inf):\n"
            + "\n".join(f"  {p}  |x| up to {big:.3g}" for p, big in over.items())
        )
    tensors = {}
    for p, leaf in zip(paths, leaves, strict=True):
        name, conv = _mapping.hf_name(arch, p, prefixed=prefixed)
        tensors[name] = np.ascontiguousarray(conv.to_hf(np.asarray(leaf, np.float32)))
    source_config = read_config(Path(source)) if source is not None else {}
    names = source_config.get("id2label") or {}
    if id2label is None and len(names) == config.num_labels:
        id2label = names  # (its keys checked as a given one's)
    source_config.pop("torch_dtype", None)  # the old name of `dtype`, which is rewritten
    # Another head: a regression source's problem_type would make transformers' loss the MSE
    labels = len(names) or source_config.get("num_labels", 2)
    architectures = source_config.get("architectures", [arch.name])
    if (labels, architectures) != (config.num_labels, [arch.name]):
        source_config.pop("problem_type", None)
    hf_config = {**source_config, **_hf_config(arch, config, id2label)}
    given = source_config.get("pos_att_type")  # DeBERTa's: kept as the source writes it
    if isinstance(given, str):  # (transformers' legacy "p2c|c2p")
        given = [t.strip() for t in given.lower().split("|")]
    if isinstance(given, list) and sorted(given) == sorted(hf_config.get("pos_att_type") or []):
        hf_config["pos_att_type"] = source_config["pos_att_type"]
    kept = _source_files(source) if source is not None else []
    tokenizer_files = _tokenizer_files(tokenizer_from)
    copied = {str(rel) for rel in kept} | {f.name for f in tokenizer_files}
    if clash := sorted(set(extra_files or {}) & copied):
        raise ValueError(
            f"extra_files: {clash} would replace files copied from "
            f"{' and '.join(str(d) for d in (source, tokenizer_from) if d is not None)}"
        )

    if path.is_symlink() and not overwrite:  # (the link would be replaced, not written through)
        raise FileExistsError(
            f"{path} is a symbolic link; name the directory it points to, or pass "
            "overwrite=True to replace the link"
        )
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; pass overwrite=True")
    # the parents this call creates, innermost first: removed again if it fails
    created = [p for p in path.absolute().parents if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask
        for rel in kept:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(source) / rel, target)  # contents only: modes follow the umask
        write_json(tmp / CONFIG_FILE, hf_config)
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        # The writer creates its file 0600; give it the mode every file we create gets.
        os.chmod(tmp / SAFETENSORS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / f.name)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        replace_dir(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            with contextlib.suppress(OSError):  # not empty: someone else's files meanwhile
                p.rmdir()
        raise
    return path


def transformers_config(config: Config, *, id2label: Mapping[int, str] | None = None) -> Any:
    """``config`` as a ``transformers`` config: the ``config.json`` that `save` writes.

    Its ``architectures[0]`` names the ``transformers`` class of the same model, so
    ``getattr(transformers, c.architectures[0])(c)`` builds the PyTorch twin of
    ``Model(config)`` (with ``add_pooling_layer=False`` for a base model without pooler).
    """
    import transformers

    arch = _mapping.architecture_for(config.model_type, config.task)
    fields = _hf_config(arch, config, id2label)
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def _hf_config(
    arch: _mapping.Architecture, config: Config, id2label: Mapping[int, str] | None
) -> dict[str, Any]:
    out = {
        # (tuples, which keep configs hashable, are lists in config.json: DeBERTa's pos_att_type)
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
        if f.name not in _ROTJAX_FIELDS
    }
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(config.num_labels)}
    if class_ids(id2label) != list(range(config.num_labels)):
        got = sorted(map(str, id2label)) if isinstance(id2label, Mapping) else id2label
        raise ValueError(
            f"id2label must name labels 0..{config.num_labels - 1} (num_labels) by their ids, "
            f"got the keys {got!r}"
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
    if "rope_theta" in out:  # transformers 5 keeps RoPE's settings in one dict (and prefers
        # it); transformers 4 reads only the top-level key (else 10000: another function)
        out["rope_parameters"] = {"rope_theta": out["rope_theta"], "rope_type": "default"}
    if arch.model_type in ("mistral", "qwen2"):  # bias flags their classes do not read (no
        # such biases; Qwen2's attention biases are fixed): a source's are kept as it has them
        out.pop("attention_bias", None)
        out.pop("mlp_bias", None)
    if arch.model_type == "qwen2":
        out["use_sliding_window"] = config.sliding_window is not None
        # what transformers 5 derives from these and reads the window from (a source's, of
        # another depth, would make it refuse the checkpoint)
        first = config.max_window_layers if config.sliding_window is not None else None
        out["layer_types"] = [
            "sliding_attention" if first is not None and i >= first else "full_attention"
            for i in range(config.num_hidden_layers)
        ]
    if out.get("max_window_layers", 0) is None:  # transformers' default (unused without window)
        del out["max_window_layers"]
    return out


NOT_COPIED = (
    "alignment.json",  # rotjax's reports describe the operation that wrote the source
    "merge.json",
    "adapter_*",  # an adapter of other weights: transformers would try to load it
    "trainer_state.json",  # a Trainer's log of the source's training
    "training_args.bin",  # and its options (a weight's name pattern: named for the reader)
    "events.out.tfevents.*",
)
"""Files of a source checkpoint that `save` does not copy besides the weights."""

WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.ot",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
)
"""Files of a source checkpoint that `save` never copies: weights (of other params)."""


class NotCopiedWarning(UserWarning):
    """`save` could not read a folder of its ``source`` (one it would copy: not hidden, not in
    another checkpoint) and did not copy it."""


def walk(root: str | os.PathLike[str], *, unreadable: list[OSError] | None = None) -> list[Path]:
    """Every file and folder under ``root``, sorted, through symbolic links to folders too
    (`Path.rglob` does not enter them: a shared ``tokenizer`` folder linked into a checkpoint
    was not copied), except a folder already on the way to it (a cycle of links, however
    long). A folder that cannot be read raises its `OSError`, or, given a list
    ``unreadable``, is skipped and its error appended to it."""

    def fail(e: OSError):
        if unreadable is None:
            raise e
        unreadable.append(e)

    out, ways = [], {os.fspath(root): {Path(root).resolve()}}  # each folder's real ancestors
    for d, dirs, files in os.walk(root, followlinks=True, onerror=fail):
        way = ways.pop(d)
        real = {n: Path(d, n).resolve() for n in dirs}
        dirs[:] = [n for n in dirs if real[n] not in way]
        ways.update({os.path.join(d, n): way | {real[n]} for n in dirs})
        out += [Path(d, n) for n in (*dirs, *files)]
    return sorted(out)


def _source_files(source: str | os.PathLike[str]) -> list[Path]:
    """The paths (relative to ``source``) of every file to copy: all but weights (except those
    of sentence-transformers modules, `module_weights`), the config (rewritten), hidden files
    and other checkpoints inside it (a folder with a config and weights of its own that
    ``modules.json`` does not list, such as a Trainer's ``checkpoint-500``: its weights were
    never copied). A folder that cannot be read is not copied, with a `NotCopiedWarning`
    unless it is hidden or in another checkpoint (it was left out, silently)."""
    root = Path(source)
    modules = set(module_weights(root))
    listed = {folder for folder, _ in _modules(root)}
    weighs = lambda d: any(fnmatch.fnmatch(f.name, p) for f in d.iterdir() for p in WEIGHT_PATTERNS)
    unreadable: list[OSError] = []
    found = walk(root, unreadable=unreadable)
    nested = {f.parent.relative_to(root) for f in found if f.name == CONFIG_FILE}
    nested = {d for d in nested - listed - {Path()} if weighs(root / d)}
    hidden = lambda rel: any(p.startswith(".") for p in rel.parts)
    for e in unreadable:
        if e.filename is None:
            raise e
        rel = Path(e.filename).relative_to(root)
        if not hidden(rel) and not nested.intersection(rel.parents):
            warnings.warn(
                f"{e.filename} cannot be read ({e.strerror or e}): not copied",
                NotCopiedWarning,
                stacklevel=3,
            )
    out = []
    for f in found:
        rel = f.relative_to(root)
        if not f.is_file() or rel == Path(CONFIG_FILE) or hidden(rel):
            continue
        if nested.intersection(rel.parents):
            continue
        skip = any(fnmatch.fnmatch(f.name, p) for p in (*WEIGHT_PATTERNS, *NOT_COPIED))
        if skip and rel not in modules:
            continue
        out.append(rel)
    return out


def check_source(source: str | os.PathLike[str]) -> None:
    """Raise the `OSError` of the first file that `save` with this ``source`` would copy but
    cannot read (the command line checks before any work: it failed when saving); warn of
    its folders that cannot be read as `save` does (`NotCopiedWarning`)."""
    for rel in _source_files(source):
        with open(Path(source, rel), "rb"):
            pass


def module_weights(source: str | os.PathLike[str]) -> list[Path]:
    """Weight files (relative paths) of the sentence-transformers modules that ``source``'s
    ``modules.json`` lists in their own folders (a ``2_Dense`` projection after the pooling):
    weights of other layers than the model's, which `save` copies with the module. They read
    the model's output, so they fit a saved model only while its residual stream keeps the
    source's basis. The model's own module (type ``...Transformer``, or a folder that is the
    checkpoint itself: its weights are what `save` writes anew) is not one of them. A module
    folder that cannot be read has none to list (`save` warns that it is not copied)."""
    root = Path(source)
    folders = {f for f, kind in _modules(root) if kind.rsplit(".", 1)[-1] != "Transformer"}
    # a folder of the checkpoint by its name (a link to a shared one too), not beside it
    inside = lambda f: not f.is_absolute() and ".." not in f.parts and (root / f).is_dir()
    return sorted(
        f.relative_to(root)
        for folder in folders
        if inside(folder) and (root / folder).resolve() != root.resolve()
        for f in walk(root / folder, unreadable=[])  # (`_source_files` warns of the folder)
        if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in WEIGHT_PATTERNS)
    )


def _modules(root: Path) -> list[tuple[Path, str]]:
    """``(folder, type)`` of each module that ``root``'s ``modules.json`` (sentence-transformers)
    lists in a folder; none without a readable one."""
    try:
        listed = json.loads((root / "modules.json").read_text(encoding="utf-8"))
        return [
            (Path(m["path"]), str(m.get("type", "")))
            for m in listed
            if isinstance(m, dict) and m.get("path")
        ]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def vit_image_processor(config: Config, *, mean: float = 0.5, std: float = 0.5) -> str:
    """``preprocessor_config.json`` for transformers' ``ViTImageProcessor`` that reproduces
    `rotjax.models.vit.image_pixels` (``(x / 255 - mean) / std`` per channel) on images of
    the config's size (a resize to the same size changes nothing), for ``save``'s
    ``extra_files``: ``{"preprocessor_config.json": vit_image_processor(config)}``. Only for
    a ViT trained on those inputs (a pretrained one has its own processor: copy it with
    ``source``)."""
    config_dict = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [mean] * config.num_channels,
        "image_std": [std] * config.num_channels,
    }
    return json.dumps(config_dict, indent=2) + "\n"


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
