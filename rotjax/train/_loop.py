"""The training loop: sharded jitted steps, periodic eval, orbax checkpoints, JSON-lines logs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from rotjax import data as _data
from rotjax._atomic import write_whole
from rotjax._numbers import is_int
from rotjax.models import check_ids
from rotjax.train import _checkpoint, _mesh, _metrics, _steps
from rotjax.train._steps import Steps, TrainState

Record = dict[str, Any]
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# What step t's batch is a function of (`rotjax.data.train_batches`), kept beside the
# checkpoints: resuming under other values would replay some examples and skip others (or,
# for trim, cut them otherwise).
BATCHES_FILE = "batches.json"


class FitResult(NamedTuple):
    """What `fit` returns.

    Attributes:
        state: The final train state (replicated over the mesh).
        eval_metrics: Final eval metrics (``loss``, ``accuracy``, ``macro_f1``, ``count``;
            the sums of a custom eval step's other statistics), or ``None`` without eval
            data.
        history: The records logged by this call, in order (train and eval).
        resumed_from: The checkpoint step this call started from, or ``None`` if it started
            from the given state.
    """

    state: TrainState
    eval_metrics: dict[str, Any] | None
    history: list[Record]
    resumed_from: int | None


class MetricsWriter:
    """Appends records as JSON lines to ``path``.

    On a resumed run, `MetricsWriter(path, resume_step=s)` first drops the records of steps
    after ``s``, which a crashed run logged past its last checkpoint and which the resumed run
    will log again, and a last line cut short by a crash or a full disk.
    """

    def __init__(self, path: str | os.PathLike[str], *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = []
        if self.path.exists() and resume_step is not None:  # a fresh run replaces the log
            text = self.path.read_text().splitlines()
            lines = [(i, line) for i, line in enumerate(text, 1) if line.strip()]  # i: file's
            for k, (i, line) in enumerate(lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if k < len(lines) - 1:  # only the last line can be cut by a crash
                        raise ValueError(f"{self.path}:{i} is not a JSON record") from None
            records = [r for r in records if r.get("step", 0) <= resume_step]
        self._seen = {_key(r) for r in records}
        write_whole(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def has(self, split: str, step: int) -> bool:
        """Whether a record of ``split`` at ``step`` is already in the file."""
        return (split, step) in self._seen

    def write(self, record: Record, *, replace: bool = False) -> None:
        """Append ``record``; with ``replace``, a record of the same split and step already in
        the file is dropped first (the file rewritten whole)."""
        key = _key(record)
        if replace and key in self._seen:
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if _key(json.loads(line)) != key]
            write_whole(self.path, "".join(line + "\n" for line in kept))
        self._seen.add(key)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of named arrays (names, dtypes, shapes and values): another split of the same
    size (another validation seed, say) has another."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        x = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{x.dtype.str}|{x.shape}|".encode())
        h.update(x.view(np.uint8))  # (bfloat16 has no buffer format to cast by memoryview)
    return h.hexdigest()[:16]


def _key(record: Record) -> tuple:
    return record.get("split"), record.get("step")


def _check_batches(
    workdir: Path, order: dict, resumed_from: int | None, allow: bool, *, write: bool
) -> None:
    """Refuse to resume a run in ``workdir`` whose batch order (``order``: seed, batch size,
    training examples, trim) was another, unless ``allow``; then record this call's (if
    ``write``: process 0)."""
    path = workdir / BATCHES_FILE
    if resumed_from is not None and not allow:
        try:  # runs from before the file (and trim) recorded nothing and cut nothing
            old = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not a run's batch order ({e}); remove it, or use another workdir"
            ) from None
        old = {"trim": None, **old}
        diff = {k: (old[k], v) for k, v in order.items() if k in old and old[k] != v}
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            why = (
                "would replay some examples and skip others"
                if set(diff) - {"trim", "data"}
                else "would continue it on other training data"
                if "data" in diff
                else "would continue it with batches cut otherwise (other dropout masks)"
            )
            raise ValueError(
                f"{workdir} holds a run (checkpoint at step {resumed_from}) whose batches were "
                f"drawn otherwise ({shown}): resuming {why}; use another workdir, or "
                "allow_other_batches=True"
            )
    if write:
        write_whole(path, json.dumps(order) + "\n")


def _jit_eval(eval_step: Callable, mesh: Mesh) -> Callable:
    rep = _mesh.replicated(mesh)
    return jax.jit(eval_step, in_shardings=(rep, _mesh.batch_sharding(mesh)), out_shardings=rep)


def _check_finite(data: Mapping[str, np.ndarray], what: str) -> None:
    """ValueError naming each floating array of ``data`` with NaN or Inf (a NaN pixel made
    every param NaN within steps, silently; an eval of NaN inputs reported chance accuracy),
    and float ``images`` outside [0, 1]."""
    floats = {k: x for k, x in data.items() if np.issubdtype(np.asarray(x).dtype, np.inexact)}
    counts = {k: int(np.size(x) - np.count_nonzero(np.isfinite(x))) for k, x in floats.items()}
    if bad := {k: n for k, n in counts.items() if n}:
        raise ValueError(f"{what} arrays with NaN or Inf (entries by name): {bad}")
    images = floats.get("images")  # raw images, as `rotjax.models.vit.image_pixels` reads them
    if images is not None and np.size(images) and not 0 <= np.min(images) <= np.max(images) <= 1:
        raise ValueError(  # (floats in [0, 255] trained, 255x too bright, silently)
            f"{what} images are floats in [{np.min(images):g}, {np.max(images):g}]: give "
            "floats in [0, 1] or uint8 in [0, 255]"
        )


def _check_fits(step: Callable, first: Any, batch: Mapping[str, Any], what: str) -> Any:
    """``step(first, batch)``'s output shapes, or a ValueError if it cannot run (traced
    abstractly: no compute)."""
    try:
        return jax.eval_shape(step, first, batch)
    except KeyError as e:
        missing = e.args[0] if e.args else None
        if not isinstance(missing, str) or missing in batch:  # not a missing array
            raise
        raise ValueError(
            f"{what}_data does not fit the model: it has no {missing!r} array (it has "
            f"{sorted(batch)})"
        ) from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}_data does not fit the model: {e}") from None


def _check_eval_data(
    data: Mapping[str, np.ndarray],
    num_classes: int | None = None,
    tables: Mapping[str, int] | None = None,
) -> None:
    if "labels" not in data:
        raise ValueError(f"eval arrays need 'labels', got {sorted(data)}")
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1 or not lengths["labels"]:
        raise ValueError(f"eval arrays must share one non-zero length, got {lengths}")
    _data.check_labels(data["labels"], "eval labels", num_classes)
    check_ids(data, tables or {}, "eval ")
    _check_finite(data, "eval")


def _run_eval(
    jitted: Callable,
    params: Any,
    data: Mapping[str, np.ndarray],
    batch_size: int,
    mesh: Mesh,
    trim: int | None = None,
) -> dict[str, Any]:
    """The metrics of ``data``, checked by the caller (`_check_eval_data`) once, not per call."""
    rows = _mesh.process_rows(batch_size)
    stats = [
        jitted(params, _mesh.shard_batch(batch, mesh))
        for batch in _data.batches(data, batch_size, pad=True, rows=rows, trim=trim)
    ]
    return _metrics.summarize(stats)


def evaluate(
    eval_step: Callable | Steps,
    params: Any,
    data: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    trim: int | None = None,
) -> dict[str, Any]:
    """Loss, accuracy and macro-F1 over a whole eval set.

    Args:
        eval_step: ``(params, batch) -> batch_metrics`` (or `Steps`, whose ``eval_step`` is
            used); jitted here with the mesh's shardings.
        params: Model params.
        data: Named arrays, ``labels`` included (all rows, on every process).
        batch_size: Global eval batch size, a multiple of the number of devices; the last
            batch is padded and the padding ignored.
        mesh: Data mesh; default `rotjax.train.data_mesh()`.
        trim: Cut each batch's padding columns to a multiple of ``trim``
            (`rotjax.data.trim_padding`; token data with an ``attention_mask``): the same
            metrics up to float rounding, less work on short texts. ``None`` does not cut.

    Returns:
        ``{"loss", "accuracy", "macro_f1", "count"}``; macro-F1 comes from the confusion counts
        of the whole set (`rotjax.train.macro_f1`); a custom eval step's other statistics
        summed over the batches (`rotjax.train.summarize`, which refuses such a statistic
        named as one of those).
    """
    classes = tables = None
    if isinstance(eval_step, Steps):
        eval_step, classes, tables = (
            eval_step.eval_step,
            eval_step.num_classes,
            eval_step.token_tables,
        )
    mesh = _mesh.data_mesh() if mesh is None else mesh
    _mesh.check_batch_size(batch_size, mesh)
    params = _mesh.replicate(params, mesh)
    _check_eval_data(data, classes, tables)
    if trim is not None:  # a bad trim raised before compiling
        _data.batches(data, batch_size, trim=trim)
    return _run_eval(_jit_eval(eval_step, mesh), params, data, batch_size, mesh, trim)


def evaluator(
    model: Any,
    data: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    inputs: Callable | None = None,
    trim: int | None = None,
) -> Callable[[Any], dict[str, float]]:
    """``params -> {"loss", "accuracy", "macro_f1", "count"}`` of ``model`` over ``data``,
    compiled once for every params of the model's structure (a linear path, many merges).

    Args:
        model: a classification model (``rotjax.models.family(config).Model(config)``).
        data: named arrays with ``labels`` (see `evaluate`).
        batch_size: global eval batch size, a multiple of the mesh's devices.
        mesh: data mesh; default `rotjax.train.data_mesh()`.
        inputs: ``batch -> positional model inputs``; default the family's.
        trim: cut padding columns batch by batch (see `evaluate`).
    """
    mesh = _mesh.data_mesh() if mesh is None else mesh
    _mesh.check_batch_size(batch_size, mesh)
    _check_eval_data(data, _steps.num_classes(model), _steps.tables(model))
    if trim is not None:  # a bad trim raised now, not at the first call
        _data.batches(data, batch_size, trim=trim)
    jitted = _jit_eval(_steps.eval_step(model, inputs=inputs), mesh)
    return lambda params: _run_eval(
        jitted, _mesh.replicate(params, mesh), data, batch_size, mesh, trim
    )


def predictor(
    model: Any, *, batch_size: int, inputs: Callable | None = None, trim: int | None = None
) -> Callable[[Any, Mapping[str, np.ndarray]], np.ndarray]:
    """``(params, data) -> argmax predictions`` (``(N,)`` or ``(N, T)``) of a classification
    model over named arrays, one compiled program for every params of the model (and, with
    ``trim``, every length its batches are cut to: see `evaluate`; token predictions of the
    cut padding positions are `rotjax.data.IGNORE_LABEL`)."""
    inputs = _steps.default_inputs(model) if inputs is None else inputs
    tables = _steps.tables(model)
    apply = jax.jit(  # inference mode stated, as the eval step does (no dropout)
        lambda p, b: jax.numpy.argmax(
            model.apply({"params": p}, *inputs(b), deterministic=True), -1
        )
    )

    def predict(params, data):
        # (labels only for trim's check that no row's padding is labelled)
        fields = {k: v for k, v in data.items() if k != "labels" or trim is not None}
        if not any(k != "labels" for k in fields):
            raise ValueError(f"predict: no model inputs in data (its keys: {sorted(data)})")
        n = len(next(iter(data.values())))
        if not n:
            raise ValueError(f"predict: no examples in {sorted(data)}")
        # ids outside the tables: NaN logits (past the end) or the last rows (negative), silently
        check_ids(data, tables or {}, "predict ")
        batches = _data.batches(fields, batch_size, pad=True, trim=trim)  # checks trim
        width = np.shape(fields["attention_mask"])[1] if trim is not None else None
        out = []
        for b in batches:
            y = np.asarray(apply(params, {k: v for k, v in b.items() if k != "labels"}))
            if width is not None and y.ndim == 2 and y.shape[1] < width:  # cut positions
                y = np.pad(y, ((0, 0), (0, width - y.shape[1])), constant_values=_data.IGNORE_LABEL)
            out.append(y)
        return np.concatenate(out)[:n]

    return predict


# Per-label means within a step: over a window, weighted by each step's label count (a token
# task's batches hold different numbers of labelled tokens), so that a record's loss and
# accuracy are those of all its labels together.
_PER_LABEL = ("loss", "accuracy")


def _mean(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """One record's values from its steps' metrics: ``count`` summed, the per-label means
    (`_PER_LABEL`) weighted by it, everything else (gradient norm, learning rate) averaged."""
    host = jax.device_get(list(metrics))
    out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if "count" in out:
        counts = np.array([m["count"] for m in host], np.float64)
        out["count"] = float(counts.sum())
        for k in _PER_LABEL if counts.sum() > 0 else ():
            if k in out:
                out[k] = float(np.average([m[k] for m in host], weights=counts))
    return out


def _finished(unshown: list[Any]) -> int:
    """How many of the oldest steps in ``unshown`` (their metrics, oldest first) have finished,
    removed from it: a progress bar counts those, not the steps dispatched (dispatch is
    asynchronous and runs ahead of the computation until a log waits for it)."""
    n = 0
    while n < len(unshown) and all(x.is_ready() for x in jax.tree.leaves(unshown[n])):
        n += 1
    del unshown[:n]
    return n


def fit(
    state: TrainState,
    steps: Steps,
    train_data: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    num_steps: int,
    seed: int = 0,
    eval_data: Mapping[str, np.ndarray] | None = None,
    eval_batch_size: int | None = None,
    eval_every: int | None = None,
    workdir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = 2,
    log_every: int = 100,
    mesh: Mesh | None = None,
    progress: bool = False,
    callback: Callable[[Record], None] | None = None,
    allow_other_batches: bool = False,
    trim: int | None = None,
) -> FitResult:
    """Trains until ``state.step == num_steps``, data-parallel over all devices.

    Step ``t`` trains on the batch `rotjax.data.batch_indices` ``(seed, t)`` with the keys
    ``split(fold_in(state.key, t))`` (augmentation, dropout): both depend only on ``t``. With
    a ``workdir``, the latest checkpoint in ``workdir/checkpoints`` (if any) replaces
    ``state``, so calling `fit` again after an interruption continues the same run exactly
    (bitwise on the same hardware; on a GPU only with deterministic ops, XLA_FLAGS
    ``--xla_gpu_deterministic_ops=true``, as its scatter-adds are atomic).

    Args:
        state: Initial state (e.g. `create_train_state`); not modified.
        steps: The pure steps (e.g. `classification_steps`).
        train_data: Named training arrays (all rows, on every process), ``labels`` included.
        batch_size: Global batch size, a multiple of the number of devices.
        num_steps: Step count to stop at (the total of the run, not of this call).
        seed: Seed of the batch order.
        eval_data: Named eval arrays; evaluated every ``eval_every`` steps and at the end.
        eval_batch_size: Global eval batch size (default ``batch_size``).
        eval_every: Eval period in steps; ``None`` evaluates only at the end.
        workdir: Directory of ``checkpoints/`` and ``metrics.jsonl``; ``None`` for neither.
        checkpoint_every: Checkpoint period in steps (a checkpoint is also written at the end);
            ``None`` saves only at the end. Needs ``workdir``.
        keep_checkpoints: Number of latest checkpoints kept; ``None`` keeps all.
        log_every: Period in steps of the train records (means over the period; each record's
            ``steps`` says how many steps its means are over, its ``count`` how many labels:
            its loss and accuracy are over those labels together, each step weighted by its
            labels, which differ from batch to batch for token classification). After a
            resume from a checkpoint between two records, the first record is over the
            steps since the checkpoint: the steps between the last record and the checkpoint
            are in no record (a ``checkpoint_every`` that ``log_every`` divides loses none).
        mesh: Data mesh; default `rotjax.train.data_mesh()` (all devices).
        progress: Whether to show a tqdm progress bar (on stderr, process 0 only).
        callback: Called with every record (dicts with ``step``, ``split`` and metrics).
        allow_other_batches: Resume a run whose ``seed``, ``batch_size``, training examples
            (their number, or their values: a digest) or ``trim`` differ from this call's
            (recorded in ``workdir/batches.json``): its later steps then draw other batches,
            replaying some examples and skipping others, or train on other data (or cut
            batches otherwise). Off by default: such a resume is refused.
        trim: Cut each train and eval batch's padding columns to a multiple of ``trim``
            (`rotjax.data.trim_padding`, by the ``attention_mask``): a step on short texts
            costs what their length costs, not the padded length's; one compilation per
            length met (at most ``ceil(T / trim)``). The same examples and the same loss up to float
            rounding, but dropout masks are drawn for the cut shape: not bitwise the run
            without it. ``None`` does not cut.

    Returns:
        A `FitResult`.

    Raises:
        TypeError: A ``state`` that is not a `TrainState`, or data that are not dicts.
        ValueError: On a seed that is not an int >= 0, batch sizes that do not split over the
            devices, too little data, no
            ``labels`` (in ``train_data`` or ``eval_data``), labels outside the model's
            classes (``steps.num_classes``) other than `rotjax.data.IGNORE_LABEL` or of a
            non-integer dtype, token ids outside the model's tables (``steps.token_tables``),
            floating arrays with NaN or Inf, float ``images`` outside [0, 1],
            train or eval arrays the model cannot take (traced on one batch: a missing
            input, another image size) or eval arrays without one of ``train_data``'s names,
            train or eval arrays of different lengths (eval arrays of no rows), ``eval_every``,
            ``checkpoint_every``, ``keep_checkpoints`` or ``log_every`` not an int >= 1,
            ``num_steps`` not an int >= 0, ``eval_every`` without ``eval_data``,
            ``checkpoint_every`` without ``workdir``, a ``trim`` that is not an int >= 1, has no
            ``attention_mask`` to cut by or finds labelled padding (in ``train_data`` or
            ``eval_data``, all refused before training), or
            a ``state`` or a checkpoint in ``workdir`` past ``num_steps`` (that run trained
            longer than asked).
    """
    if not isinstance(state, TrainState):  # (a params dict: AttributeError 'key')
        raise TypeError(
            f"state must be a TrainState (rotjax.train.create_train_state), got a "
            f"{type(state).__name__}"
        )
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None and not isinstance(data, Mapping):  # (a tuple: numpy's ambiguity)
            raise TypeError(
                f"{name} must be a dict of named arrays (e.g. input_ids, attention_mask, "
                f"labels), got a {type(data).__name__}"
            )
    # (checked at the first batch, after the workdir's files were written, it blocked a rerun)
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    mesh = _mesh.data_mesh() if mesh is None else mesh
    _mesh.check_batch_size(batch_size, mesh)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    if eval_data is not None:  # checked now, not after the training it would come after
        _mesh.check_batch_size(eval_batch_size, mesh, "eval_batch_size")
        _check_eval_data(eval_data, steps.num_classes, steps.token_tables)
    if "labels" not in train_data:
        raise ValueError(f"train_data needs 'labels', got {sorted(train_data)}")
    if eval_data is not None and (missing := sorted(set(train_data) - set(eval_data))):
        raise ValueError(  # the model would read them as absent, silently
            f"eval_data lacks {missing}, which train_data has (without an attention_mask, "
            "say, the padding is attended)"
        )
    if len({len(v) for v in train_data.values()}) != 1:
        lengths = {k: len(v) for k, v in train_data.items()}
        raise ValueError(f"train_data arrays must share one length, got {lengths}")
    for name, value, least, none in (  # (a checkpoint_every of 1.5 was taken; a float
        ("eval_every", eval_every, 1, "None or "),  # num_steps failed in range())
        ("checkpoint_every", checkpoint_every, 1, "None or "),
        ("keep_checkpoints", keep_checkpoints, 1, "None or "),
        ("log_every", log_every, 1, ""),
        ("num_steps", num_steps, 0, ""),
    ):
        if not ((value is None and none) or (is_int(value) and value >= least)):
            raise ValueError(f"{name} must be {none}an int >= {least}, got {value!r}")
    # numpy ints, taken: Python ones for the records (JSON wrote no np.int64: the run trained,
    # then failed writing its final evaluation)
    seed, log_every, num_steps = int(seed), int(log_every), int(num_steps)
    eval_every, checkpoint_every, keep_checkpoints = (
        None if v is None else int(v) for v in (eval_every, checkpoint_every, keep_checkpoints)
    )
    if eval_every is not None and eval_data is None:  # (it was ignored, silently)
        raise ValueError("eval_every needs eval_data to evaluate")
    _data.check_labels(train_data["labels"], "train_data labels", steps.num_classes)
    check_ids(train_data, steps.token_tables or {}, "train_data ")
    _check_finite(train_data, "train_data")
    # The first batch of each, as the run cuts it (both calls check ``trim``, a bad one
    # raising here, before training; train_batches also too little data for a batch)
    train_first = _data.train_batches(
        train_data, batch_size=batch_size, seed=seed, rows=_mesh.process_rows(batch_size), trim=trim
    )
    if eval_data is not None:
        rows = _mesh.process_rows(eval_batch_size)
        eval_first = next(_data.batches(eval_data, eval_batch_size, pad=True, rows=rows, trim=trim))
    n_train = len(train_data["labels"])
    # Traced (abstractly) now, the train step with its augmentation: arrays that do not fit
    # the model (another image size, a missing input) were refused at the first step or
    # eval, after the workdir's files
    _check_fits(steps.train_step, state, next(train_first), "train")
    if eval_data is not None:
        _metrics.check_statistics(_check_fits(steps.eval_step, state.params, eval_first, "eval"))
    if checkpoint_every is not None and workdir is None:
        raise ValueError("checkpoint_every needs a workdir to write checkpoints to")
    if (given := int(jax.device_get(state.step))) > num_steps:
        raise ValueError(f"state.step={given} is past num_steps={num_steps}")

    rep = _mesh.replicated(mesh)
    train_fn = jax.jit(
        steps.train_step,
        in_shardings=(rep, _mesh.batch_sharding(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    eval_fn = _jit_eval(steps.eval_step, mesh)
    state = _mesh.replicate(state, mesh)  # a copy: donation never touches the caller's state

    lead = jax.process_index() == 0
    manager, writer, resumed_from = None, None, None
    if workdir is not None:
        workdir = Path(workdir)
        manager = _checkpoint.checkpoint_manager(
            workdir / CHECKPOINT_DIR, save_every=checkpoint_every, keep=keep_checkpoints
        )
        try:  # a checkpoint that does not fit, or an unwritable log: the manager closed
            restored = _checkpoint.restore_checkpoint(manager, state, sharding=rep)
            if restored is not None:
                state = restored
                resumed_from = int(jax.device_get(state.step))
                if resumed_from > num_steps:
                    raise ValueError(
                        f"{workdir / CHECKPOINT_DIR} holds a checkpoint at step {resumed_from}, "
                        f"past num_steps={num_steps}: that run trained longer than asked "
                        "(use another workdir, or num_steps >= its step)"
                    )
            order = {"seed": int(seed), "batch_size": int(batch_size), "examples": n_train}
            order["trim"] = None if trim is None else int(trim)  # numpy ints: JSON
            order["data"] = _fingerprint(train_data)
            _check_batches(workdir, order, resumed_from, allow_other_batches, write=lead)
            if lead:
                writer = MetricsWriter(workdir / METRICS_FILE, resume_step=resumed_from)
        except BaseException:
            manager.close()
            raise

    history: list[Record] = []

    def emit(record: Record) -> None:
        history.append(record)
        # A resumed run's train records past its checkpoint are its own (the log's later
        # ones were dropped); an evaluation is logged as computed now, replacing one of the
        # same step (a finished run evaluated again, on other data, returned new metrics
        # while its log kept the old).
        if writer is not None and record["split"] != "train":
            writer.write(record, replace=True)
        elif writer is not None and not writer.has(record["split"], record["step"]):
            writer.write(record)
        if callback is not None:
            callback(record)

    eval_metrics, bar = None, None
    begin = time.perf_counter()
    try:
        start = int(jax.device_get(state.step))
        if progress and lead:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=num_steps, initial=min(start, num_steps), unit="step", dynamic_ncols=True
            )
        batches = _data.train_batches(
            train_data,
            batch_size=batch_size,
            seed=seed,
            start_step=start,
            rows=_mesh.process_rows(batch_size),
            trim=trim,
        )
        pending: list[dict[str, jax.Array]] = []
        unshown: list[dict[str, jax.Array]] = []  # metrics of steps the bar does not count yet
        tick, ticked = time.perf_counter(), start
        for step in range(start, num_steps):
            # Dispatch is asynchronous: the host prepares batch t + 1 while step t runs.
            state, metrics = train_fn(state, _mesh.shard_batch(next(batches), mesh))
            pending.append(metrics)
            done = step + 1
            if done % log_every == 0 or done == num_steps:
                means = _mean(pending)
                now = time.perf_counter()
                rate = (done - ticked) / max(now - tick, 1e-9)
                record = {
                    "step": done,
                    "split": "train",
                    **means,
                    # the steps the means are over: log_every, fewer at the end and in the
                    # first window after resuming from a step between two logs
                    "steps": len(pending),
                    "steps_per_second": rate,
                    "examples_per_second": rate * batch_size,
                    "elapsed": now - begin,
                }
                emit(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}")
                pending, tick, ticked = [], now, done
            due = eval_every and done % eval_every == 0 and done != num_steps
            if eval_data is not None and due:
                paused = time.perf_counter()
                m = _run_eval(eval_fn, state.params, eval_data, eval_batch_size, mesh, trim)
                emit({"step": done, "split": "eval", **m, "elapsed": time.perf_counter() - begin})
                tick += time.perf_counter() - paused  # the rate counts training time only
            if manager is not None:
                _checkpoint.save_checkpoint(manager, state, step=done)
            if bar is not None:
                unshown.append(metrics)
                bar.update(_finished(unshown))
        if manager is not None:
            _checkpoint.save_checkpoint(manager, state, force=True)
        if eval_data is not None:
            eval_metrics = _run_eval(eval_fn, state.params, eval_data, eval_batch_size, mesh, trim)
            emit(
                {
                    "step": num_steps,
                    "split": "eval",
                    **eval_metrics,
                    "elapsed": time.perf_counter() - begin,
                }
            )
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return FitResult(state, eval_metrics, history, resumed_from)
