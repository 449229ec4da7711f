"""What every `rotjax` command shares: errors as one clear message, signals, the output
directory, loading and comparing checkpoints, reports."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rotjax import hf
from rotjax._atomic import check_name_lengths, holds_cwd, nearest_existing
from rotjax.hf._files import read_config, stored_dtypes
from rotjax.hf._save import check_source, walk
from rotjax.match._checks import few, non_finite
from rotjax.models import family
from rotjax.tree import to_dict

MAX_REASON_LINES = 25


class CLIError(ValueError):
    """A problem with the command's input, reported as one message and exit status 2."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds like KeyboardInterrupt (temporary files are removed on the
    way out), then the command exits 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt():
    """Within the block, SIGINT and SIGTERM raise `Interrupted` (the default SIGTERM kills the
    process with its temporary files still on disk); the previous handlers come back after."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def reason(e: BaseException) -> str:
    """The whole message of an error, its lines indented, cut after `MAX_REASON_LINES`."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    if len(lines) > MAX_REASON_LINES:
        lines = [*lines[:MAX_REASON_LINES], f"... ({len(lines) - MAX_REASON_LINES} more lines)"]
    return "\n  ".join(lines)


def checked_out_dir(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]] = ()
) -> Path:
    """``--out``, checked before any work: it must not exist (or be an empty directory that
    is not a mount point), nor hold the working directory (it is replaced as a whole) or lie
    inside one of ``inputs`` (they are left unchanged), and its parent must be writable (a
    probe file is created there and removed)."""
    if not os.fspath(out):  # (Path("") is the working directory)
        raise CLIError("--out is empty; name a new directory")
    out = Path(out)
    try:
        check_name_lengths(out)
    except ValueError as e:
        raise CLIError(f"--out {e}") from None
    if out.is_symlink():  # it would be replaced by the checkpoint, not written through
        raise CLIError(f"--out {out} is a symbolic link; name the directory it points to")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"--out {out} exists and is not an empty directory")
    if out.is_dir() and os.path.ismount(out):  # the checkpoint is renamed onto --out: EBUSY
        raise CLIError(f"--out {out} is a mount point; name a new directory inside it")
    where = out.absolute().resolve()
    if holds_cwd(out):
        raise CLIError(f"--out {out} is the working directory or holds it; name a new directory")
    for f in inputs:
        # the input's folders linked from elsewhere are the input too (hf.save copies them)
        # (an unreadable folder is refused where it is copied: `load_models`' ``copied``)
        linked = [p for p in walk(f, unreadable=[]) if p.is_symlink() and p.is_dir()]
        if any(where.is_relative_to(d.absolute().resolve()) for d in (Path(f), *linked)):
            raise CLIError(f"--out {out} is inside the input {f}")
    # The checkpoint is written beside --out and renamed into place: probe the nearest
    # existing ancestor of its parent, creating nothing that would stay behind.
    parent = nearest_existing(out.absolute().parent)
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a directory")
        probe = parent / f".rotjax-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"--out {out} is not writable: {e.strerror or e}") from None
    return out


def save(*args: Any, **kwargs: Any) -> Path:
    """`hf.save`, its `hf.NotCopiedWarning` silenced: `load_models` (``copied``) made each a
    note already."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.NotCopiedWarning)
        return hf.save(*args, **kwargs)


def load_models(
    named: list[tuple[str, str]],
    *,
    same_classes: bool = False,
    writes: bool = True,
    copied: int | None = None,
) -> tuple[list[Any], list[Any], list[str]]:
    """Load ``(label, directory)`` checkpoints; ``(configs, params, notes)``. Every error names
    the input it concerns; models of different families or architectures are refused before
    any work (fields that only matter to training are reported as notes). With
    ``same_classes`` (a merge), classifiers whose ``id2label`` name their classes differently
    are refused too (their heads' rows would be averaged across classes). ``writes``: the
    command writes a checkpoint (the notes on a stored dtype say what it writes). ``copied``:
    the index of the model whose other files the checkpoint copies (`hf.save`'s ``source``):
    its files must be readable (an unreadable one failed when saving, after all the work);
    its folders that cannot be read are notes (they were left out, silently)."""
    configs, params, notes = [], [], []
    for i, (label, directory) in enumerate(named):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", hf.DroppedHeadWarning)
            warnings.simplefilter("always", hf.NotCopiedWarning)
            try:
                config, p = hf.load(directory)
                if i == copied:
                    check_source(directory)
            except (ValueError, OSError, TypeError) as e:
                inner = Path(directory) / "hf"  # (a run of experiments.train: its checkpoint)
                hint = (
                    f" ({inner} holds a checkpoint: give that)"
                    if (inner / "config.json").is_file()
                    else ""
                )
                raise CLIError(f"{label} ({directory}): {reason(e)}{hint}") from None
        noted = (hf.DroppedHeadWarning, hf.NotCopiedWarning)
        notes += [f"{label}: {w.message}" for w in caught if issubclass(w.category, noted)]
        # The tensors' own dtypes: config.json's "dtype" may be missing or wrong (a bfloat16
        # checkpoint without it had no note, a float32 one saying float16 was "float16")
        stored = sorted(stored_dtypes(Path(directory)))
        if stored not in ([], ["float32"]):
            notes.append(_dtype_note(label, stored, writes=writes))
        bad = non_finite(to_dict(p))  # (float64 beyond float32's range: hf.load refused it)
        if bad:
            raise CLIError(f"{label} ({directory}): non-finite values (NaN or Inf) in {few(bad)}")
        configs.append(config)
        params.append(p)
    first = configs[0]
    classifier = str(getattr(first, "task", None)).endswith("_classification")  # images too
    first_names = _label_names(named[0][1]) if same_classes and classifier else None
    for (label, directory), config in zip(named[1:], configs[1:], strict=True):
        a, b = family(first), family(config)
        if a is not b:
            raise CLIError(
                f"{label} ({directory}) is a {b.name} model ({config.model_type}), "
                f"{named[0][0]} a {a.name} model ({first.model_type}): different families"
            )
        diff = {
            f.name: (getattr(first, f.name), getattr(config, f.name))
            for f in dataclasses.fields(first)
            if getattr(first, f.name) != getattr(config, f.name)
        }
        # Models without a head read no num_labels (an encoder saved from a fine-tuned
        # classifier keeps its id2label)
        headless = ("num_labels",) if first.task is None and config.task is None else ()
        shaping = {k: v for k, v in diff.items() if k not in (*a.training_fields, *headless)}
        if shaping:
            shown = ", ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in sorted(shaping.items()))
            raise CLIError(f"architectures differ ({named[0][0]} vs {label}): {shown}")
        notes += [
            f"{label} differs from {named[0][0]} in {k} ({y!r} vs {x!r}), which "
            + ("a model without a head does not read" if k in headless else "only training uses")
            for k, (x, y) in sorted(diff.items())
        ]
        names = _label_names(directory) if same_classes and classifier else None
        if names is not None and first_names is None:  # the checkpoint takes the anchor's
            notes.append(
                f"{label} names its classes (config.json's id2label), {named[0][0]} does not: "
                f"they are not compared, and the merge keeps {named[0][0]}'s names"
            )
        elif names is not None and names != first_names:  # a row would average other classes
            raise CLIError(
                f"label names differ ({named[0][0]} vs {label}): {first_names} vs {names} "
                "(config.json's id2label): the classifiers' rows are different classes"
            )
        kinds = [_problem_type(d, c) for d, c in ((named[0][1], first), (directory, config))]
        if same_classes and classifier and kinds[0][0] != kinds[1][0]:
            shown = " vs ".join(f"{k}{' (inferred)' if guess else ''}" for k, guess in kinds)
            raise CLIError(
                f"problem_type differs ({named[0][0]} vs {label}): {shown} (config.json): "
                "their heads are read by different losses"
            )
    return configs, params, notes


def _problem_type(directory, config) -> tuple[str, bool]:
    """A classifier's ``problem_type`` (config.json) and False, or what transformers infers
    without one from integer labels (regression for one label, single-label classification
    for more) and True."""
    kind = _hf_config(directory).get("problem_type")
    if kind is not None:
        return kind, False
    one = getattr(config, "num_labels", 2) == 1
    return ("regression" if one else "single_label_classification"), True


def _hf_config(directory) -> dict:
    """A checkpoint's ``config.json`` as a dict ({} if unreadable: `hf.load` has read it)."""
    try:
        return read_config(Path(directory))
    except (OSError, ValueError):
        return {}


def _dtype_note(label: str, stored: list[str], *, writes: bool) -> str:
    note = f"{label}: its weights are {' and '.join(stored)}; rotjax computes in float32"
    if not writes:
        return note
    if len(stored) > 1:
        return note + " and writes float32"
    size = "half its size" if stored[0] == "float64" else "twice its size"
    return note + (
        f" and writes float32 (a checkpoint {size}: cast it back when loading, e.g. "
        f"transformers' dtype=torch.{stored[0]})"
    )


def _label_names(directory) -> dict[int, str] | None:
    """A classifier's class names (``id2label``), None when absent or transformers' defaults
    (``LABEL_i``: nothing to compare)."""
    raw = _hf_config(directory).get("id2label")
    try:
        names = {int(i): str(v) for i, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        return None
    if all(v == f"LABEL_{i}" for i, v in names.items()):
        return None
    return dict(sorted(names.items()))


def pooler_note(config: Any) -> list[str]:
    """A note for a base BERT, RoBERTa or ViT written without a pooler (the encoder of a
    pretraining checkpoint): transformers' base class builds one, of random weights, unless
    told not to, and ``config.json`` cannot tell it."""
    if getattr(config, "task", ...) is not None or getattr(config, "has_pooler", True):
        return []
    return [
        f"the written {config.model_type} base model has no pooler: load it with "
        "from_pretrained(DIR, add_pooling_layer=False), or transformers adds one of random "
        "weights (pooler_output)"
    ]


def check_finite(params: Any, what: str) -> None:
    """Refuse to write a result with NaN or Inf (naming the paths)."""
    bad = non_finite(to_dict(jax.device_put(params)))
    if bad:
        raise CLIError(f"{what} has non-finite values (NaN or Inf) in {few(bad)}; nothing written")


def report_json(report: dict[str, Any]) -> str:
    """The JSON text of a report (arrays as lists)."""

    def default(x):
        if isinstance(x, np.generic | np.ndarray | jax.Array):
            return np.asarray(x).tolist()
        return str(x)

    return json.dumps(report, indent=2, default=default) + "\n"


def show_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def progress(total: int, desc: str, quiet: bool):
    import tqdm

    return tqdm.tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False)
