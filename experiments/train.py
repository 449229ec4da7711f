"""Train the models that rotjax aligns and merges: a ViT on Fashion-MNIST from scratch, and
all-MiniLM-L6-v2 fine-tuned on the WordNet classification datasets.

Flax-examples layout: the configs are plain dataclasses (`Config`, presets in `CONFIGS`),
`train_and_evaluate(config, workdir)` does one run, `main` only parses flags. A run writes
into ``workdir``::

    config.json       the run's Config
    metrics.jsonl     train records every log_every steps, eval records (rotjax.train.fit)
    checkpoints/      orbax checkpoints of the whole TrainState (resume: run the same command)
    hf/               final model as a Hugging Face checkpoint (rotjax.hf.save)
    summary.json      final validation/test metrics, majority baseline, steps and wall time

Usage::

    python -m experiments.train --config vit_fashion_mnist --seed 0 --workdir runs/vit-s0
    python -m experiments.train --config minilm_wordnet_glosses --workdir runs/glosses-s0
    python -m experiments.train --config vit_fashion_mnist --quick --set num_epochs=2

Multi-host: start the same command on every host with ``--distributed`` (or
``ROTJAX_DISTRIBUTED=1``); see `rotjax.train.initialize_distributed`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax

import rotjax.data
import rotjax.hf
from rotjax import train
from rotjax._atomic import write_whole
from rotjax.models import check_fields, family, vit

VIT_FASHION_MNIST = vit.Config(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.02,
    layer_norm_eps=1e-6,
    image_size=28,
    patch_size=4,
    num_channels=1,
    num_labels=10,
)
"""A small ViT for 28x28x1 images: 7x7 patches of 4x4 pixels, width 64, 6 pre-LN layers."""

DATASETS = (
    "fashion_mnist",
    "digits",
    "mnist_sample",
    "wordnet_glosses",
    "wordnet_examples",
    "wordnet_multitask",  # glosses and examples together (one label space)
    "supersense_nouns",  # token classification (rotjax.data.wordnet_supersense)
    "supersense_verbs",
    "supersense_both",
)
TOKEN_DATASETS = ("supersense_nouns", "supersense_verbs", "supersense_both")
TRIM = 8  # MiniLM batches are cut to their longest text, rounded up to this many tokens


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run.

    Attributes:
        name: Run name (summary tables).
        model: ``"vit"`` (from scratch, ``vit_config``) or ``"minilm"`` (all-MiniLM-L6-v2,
            pretrained encoder and a new seeded sequence-classification head).
        dataset: One of ``DATASETS``.
        seed: Seed of the head/model init, dropout, augmentation and batch order.
        vit_config: The ViT architecture (``model="vit"``).
        max_length: Tokens per text (``model="minilm"``).
        train_limit: Use only the first examples of the training split (``None``: all).
        eval_limit: Use only the first examples of the validation and test splits.
        batch_size: Global batch size.
        num_epochs: Passes over the (limited) training split; sets the number of steps.
        learning_rate: Peak learning rate.
        warmup_fraction: Share of the steps spent in linear warmup.
        decay: ``"cosine"`` or ``"linear"`` decay to 0 after the warmup.
        weight_decay: AdamW's decoupled weight decay (not on biases and LayerNorms).
        max_grad_norm: Global-norm gradient clipping.
        augment: Random horizontal flips (Fashion-MNIST only: not of digits) and +-2 pixel
            shifts of images (train only).
        eval_every: Eval period in steps (``None``: only at the end).
        checkpoint_every: Checkpoint period in steps (a final checkpoint is always written).
        keep_checkpoints: Number of checkpoints kept.
        log_every: Period of the train records.
        eval_batch_size: Global eval batch size.
        export_hf: Whether to write the final model with `rotjax.hf.save`.
    """

    name: str
    model: str
    dataset: str
    seed: int = 0
    vit_config: vit.Config = VIT_FASHION_MNIST
    max_length: int = 48
    train_limit: int | None = None
    eval_limit: int | None = None
    batch_size: int = 128
    num_epochs: float = 15.0
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.05
    decay: str = "cosine"
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    augment: bool = False
    eval_every: int | None = None
    checkpoint_every: int | None = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_batch_size: int = 256
    export_hf: bool = True

    def __post_init__(self):
        check_fields(self)  # `--set batch_size=abc` fails here, in one line
        if self.model not in ("vit", "minilm"):
            raise ValueError(f"model must be 'vit' or 'minilm', got {self.model!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        text = self.dataset.startswith(("wordnet", "supersense"))
        if text != (self.model == "minilm"):
            raise ValueError(f"model {self.model!r} cannot train on dataset {self.dataset!r}")
        # Ranges, so that a bad `--set` fails here, before any workdir exists (they failed in
        # the schedule or in `fit`, after config.json and data.json were written)
        if self.seed < 0:  # (refused at the first batch, the workdir blocked the rerun)
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        counts = ("eval_every", "checkpoint_every", "log_every", "keep_checkpoints")
        for name in (*counts, "train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.decay not in train.DECAYS:
            raise ValueError(f"decay must be one of {train.DECAYS}, got {self.decay!r}")
        for name, ok, bound in (
            ("num_epochs", lambda v: v > 0, "> 0"),
            ("warmup_fraction", lambda v: 0 <= v <= 1, "in [0.0, 1.0]"),
            ("learning_rate", lambda v: v >= 0, ">= 0"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("max_grad_norm", lambda v: v > 0, "> 0"),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{name} must be a finite number {bound}, got {value}")


def vit_fashion_mnist(**overrides: Any) -> Config:
    """ViT from scratch on Fashion-MNIST: 10 epochs of batch 128 (4680 steps), AdamW 1e-3,
    warmup + cosine, no augmentation (with ``augment=True`` the model underfits in 10 epochs:
    86.96% test accuracy, train accuracy no higher). See `experiments.make_pairs` for the
    measured accuracy."""
    c = Config(
        name="vit-fashion_mnist",
        model="vit",
        dataset="fashion_mnist",
        num_epochs=10.0,
        eval_every=1000,
    )
    return dataclasses.replace(c, **overrides)


EPOCHS = {
    "wordnet_glosses": 1.0,
    "wordnet_examples": 2.0,
    "wordnet_multitask": 0.5,
    "supersense_nouns": 2.0,
    "supersense_verbs": 2.0,
    "supersense_both": 1.0,
}


def minilm_wordnet(dataset: str = "wordnet_glosses", **overrides: Any) -> Config:
    """all-MiniLM-L6-v2 fine-tuned on a WordNet dataset (16 lexicographer classes shared by
    all): batch 32, AdamW 1e-4 with 10% warmup, linear decay, 48 tokens; 1 epoch of the
    glosses (21177 examples, 661 steps), 2 of the examples (14903, 930 steps), half of both
    together (multitask, 564 steps); supersense tagging (token classification): 2 epochs of a
    domain's sentences (~7k: 422 and 490 steps), 1 of both domains together (456 steps).
    (Measured earlier with 2 and 3 epochs: glosses 80.05%, examples 46.34% test accuracy.)"""
    c = Config(
        name=f"minilm-{dataset}",
        model="minilm",
        dataset=dataset,
        max_length=48,
        batch_size=32,
        num_epochs=EPOCHS[dataset],
        learning_rate=1e-4,
        warmup_fraction=0.1,
        decay="linear",
        weight_decay=0.01,
        eval_every=500,
        eval_batch_size=128,
    )
    return dataclasses.replace(c, **overrides)


CONFIGS = {
    "vit_fashion_mnist": vit_fashion_mnist,
    **{f"minilm_{d}": functools.partial(minilm_wordnet, d) for d in EPOCHS},
}


def quick(config: Config) -> Config:
    """A 1-2 minute version of a run on a 2-core CPU: a subset, one short pass, a higher
    learning rate; for MiniLM also 32 tokens (95% of the glosses fit)."""
    if config.model == "vit":
        return dataclasses.replace(
            config,
            train_limit=12_800,
            eval_limit=2_000,
            batch_size=64,
            num_epochs=1.0,
            learning_rate=1e-3,
            warmup_fraction=0.1,
            augment=False,
            eval_every=None,
            checkpoint_every=None,
        )
    return dataclasses.replace(
        config,
        max_length=32,
        train_limit=2_048,
        eval_limit=512,
        num_epochs=1.0,
        learning_rate=3e-4,
        eval_every=None,
        checkpoint_every=None,
    )


def smoke(config: Config) -> Config:
    """Seconds: two steps on a few examples, to check that a run goes through end to end."""
    small = dict(train_limit=64, eval_limit=16, batch_size=16, num_epochs=0.5, eval_batch_size=16)
    if config.model == "minilm":
        small = dict(small, max_length=16, train_limit=32, batch_size=8, eval_batch_size=8)
    return dataclasses.replace(config, eval_every=None, checkpoint_every=None, **small)


# ----------------------------------------------------------------------------- input pipeline


DATA_FILE = "data.json"  # a run's data version, written when it starts


def run_data_version(workdir: str | os.PathLike[str], default: str | None) -> str | None:
    """The data version a run in ``workdir`` started on (`DATA_FILE`; ``default`` for runs
    that predate the file, whose version is unknown)."""
    path = Path(workdir) / DATA_FILE
    try:
        return json.loads(path.read_text())["data_version"]
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a run's data version ({e}); remove it or the run") from e


def data_version(config: Config) -> str | None:
    """The version of the data a run's examples come from, kept in its summary, so that
    `cached` trains a run of older data afresh: the WordNet datasets' selection, order and
    tags have changed over time (their cache versions), and their token ids are the
    tokenizer's (a digest of the files it reads, `tokenizer_stamp`: another release of
    all-MiniLM-L6-v2's package may tokenize otherwise) and the WordNet files' (their sizes:
    another release of the database changes them, an install only their times); the image
    loaders have not (None)."""
    if config.model == "vit":
        return None
    from rotjax.data import _supersense, _text, _tokenize, _wordnet

    stamp = _tokenize.tokenizer_stamp(_tokenize.tokenizer_file(None))
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    files = [_wordnet.pos_file(_wordnet.WORDNET_DIR, p) for p in ("noun", "verb", "adj", "adv")]
    sizes = json.dumps([f.stat().st_size if f.is_file() else None for f in files])
    wordnet = hashlib.sha256(sizes.encode()).hexdigest()[:8]
    version = f"wordnet-{_text._CACHE_VERSION}-{wordnet}-tokenizer-{digest}"
    return version + (f"-tags{_supersense._RULES}" if config.dataset in TOKEN_DATASETS else "")


def load_data(config: Config) -> dict[str, Any]:
    """``{"train", "validation", "test"}`` array dicts (``validation`` may be ``None``) and
    ``label_names``."""
    if config.model == "vit":
        sources = [getattr(rotjax.data, config.dataset)()]
    elif config.dataset == "wordnet_multitask":
        sources = [
            rotjax.data.wordnet_glosses(max_length=config.max_length),
            rotjax.data.wordnet_examples(max_length=config.max_length),
        ]
    elif config.dataset in TOKEN_DATASETS:
        domain = config.dataset.split("_")[1]
        sources = [rotjax.data.wordnet_supersense(domain, max_length=config.max_length)]
    else:
        sources = [getattr(rotjax.data, config.dataset)(max_length=config.max_length)]

    def arrays(split, limit):
        parts = [getattr(s, split) for s in sources]
        if parts[0] is None:
            return None
        # each source alike, ``limit`` in all (the first sources one more when it is odd)
        n = len(parts)
        shares = [None if limit is None else limit // n + (i < limit % n) for i in range(n)]
        cut = [
            {k: v[:s] for k, v in p.arrays().items()} for p, s in zip(parts, shares, strict=True)
        ]
        return rotjax.data.concat(cut)

    return {
        "train": arrays("train", config.train_limit),
        "validation": arrays("validation", config.eval_limit),
        "test": arrays("test", config.eval_limit),
        "label_names": sources[0].train.label_names,
    }


# ----------------------------------------------------------------------------- models


def model_and_params(config: Config, num_labels: int, key: jax.Array, image_shape=None):
    """``(model config, initial params)`` of a run: a fresh ViT (its image size and channels
    those of the dataset's ``image_shape`` (H, W, C)), or all-MiniLM-L6-v2's pretrained encoder
    under a new sequence- or token-classification head drawn from ``key``."""
    if config.model == "vit":
        mconfig = dataclasses.replace(config.vit_config, num_labels=num_labels)
        if image_shape is not None:
            h, w, channels = image_shape
            if h != w:
                raise ValueError(f"{config.dataset}: images of {h}x{w}; the ViT takes squares")
            mconfig = dataclasses.replace(mconfig, image_size=h, num_channels=channels)
        return mconfig, family(mconfig).init(mconfig, key)
    token = config.dataset in TOKEN_DATASETS
    task = "token_classification" if token else "sequence_classification"
    return rotjax.hf.load_for_task(
        rotjax.data.minilm_dir(), task=task, num_labels=num_labels, key=key
    )


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    progress=False,
    allow_config_change: bool = False,
):
    """Trains and evaluates one run; resumes from ``workdir``'s latest checkpoint if any.

    A workdir holding a run of another config is not resumed (its checkpoints would be
    continued under the new settings, or, finished, kept while the summary claimed the new
    ones) unless ``allow_config_change``; nor one of the same config whose training data has
    changed since it started: its data version (`data_version`, recorded in `DATA_FILE`) or
    its size (its later batches would replay and skip examples: `rotjax.train.fit`).

    Returns:
        The summary dict also written to ``workdir/summary.json``.

    Raises:
        ValueError: the workdir's run has another config (the differing fields named) or
            other training data.
    """
    workdir = Path(workdir).absolute()
    new = _json(config)
    old_file = workdir / "config.json"
    started = (workdir / train.CHECKPOINT_DIR).is_dir() or (workdir / "summary.json").is_file()
    if old_file.is_file() and started:
        old = json.loads(old_file.read_text())
        diff = config_diff(old, config)
        if diff and not allow_config_change:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff)
            raise ValueError(
                f"{workdir} holds a run of another config ({shown}); use another workdir, or "
                "--allow-config-change to continue it under the new settings"
            )
        if diff:  # the old run's summary would stand beside the new config
            (workdir / "summary.json").unlink(missing_ok=True)
    version = data_version(config)
    begun_on = run_data_version(workdir, version) if started else version
    if begun_on != version:
        if not allow_config_change:  # its batches so far were other examples, or in another order
            raise ValueError(
                f"{workdir} holds a run of other training data (data version {begun_on!r}, "
                f"now {version!r}); use another workdir, or --allow-config-change to continue "
                "it on today's data"
            )
        (workdir / "summary.json").unlink(missing_ok=True)
    begin = time.perf_counter()
    data = load_data(config)  # first: a dataset not installed leaves no workdir behind
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # one writer; whole files, as other processes read them
        write_whole(old_file, json.dumps(new, indent=2))
        write_whole(workdir / DATA_FILE, json.dumps({"data_version": version}) + "\n")
    num_labels = len(data["label_names"])
    key_init, key_run = jax.random.split(jax.random.key(config.seed))
    images = data["train"].get("images")
    shape = None if images is None else images.shape[1:]
    mconfig, params = model_and_params(config, num_labels, key_init, shape)
    model = family(mconfig).Model(mconfig)

    n_train = len(data["train"]["labels"])
    num_steps = math.ceil(
        config.num_epochs * rotjax.data.steps_per_epoch(n_train, config.batch_size)
    )
    schedule = train.learning_rate_schedule(
        peak_value=config.learning_rate,
        total_steps=num_steps,
        warmup_steps=round(config.warmup_fraction * num_steps),
        decay=config.decay,
    )
    tx = train.optimizer(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        frozen=family(mconfig).inert,
    )
    state = train.create_train_state(params, tx, key=key_run)
    steps = train.classification_steps(
        model,
        tx,
        learning_rate=schedule,
        augment=functools.partial(train.augment_images, flip=config.dataset == "fashion_mnist")
        if config.augment
        else None,
    )
    eval_data = data["validation"] if data["validation"] is not None else data["test"]
    # Texts are padded to max_length; each batch is cut to its longest text (rounded up to 8
    # tokens): the same examples and losses (up to float rounding; MiniLM's dropout masks,
    # drawn for the cut shape, differ) in half the time on the WordNet example sentences. Not
    # a recipe setting: the config and its cache key are unchanged; batches.json and the
    # summary record it, and a checkpoint of an uncut run is not resumed cut.
    trim = batch_trim(config)
    result = train.fit(
        state,
        steps,
        data["train"],
        batch_size=config.batch_size,
        num_steps=num_steps,
        seed=config.seed,
        eval_data=eval_data,
        eval_batch_size=config.eval_batch_size,
        eval_every=config.eval_every,
        workdir=workdir,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        log_every=config.log_every,
        progress=progress,
        allow_other_batches=allow_config_change,
        trim=trim,
    )
    params = jax.device_get(result.state.params)
    test = result.eval_metrics
    if data["validation"] is not None:
        test = train.evaluate(
            steps, result.state.params, data["test"], batch_size=config.eval_batch_size, trim=trim
        )
    if config.dataset in TOKEN_DATASETS:  # the CoNLL measure: entity-level F1 (seqeval)
        predict = train.predictor(model, batch_size=config.eval_batch_size, trim=trim)
        test = dict(test)
        test["entity_f1"] = train.entity_f1(
            predict(params, data["test"]), data["test"]["labels"], data["label_names"]
        )
    train_time = [r for r in result.history if r["split"] == "train"]
    summary = {
        "name": config.name,
        "model": config.model,
        "dataset": config.dataset,
        "data_version": data_version(config),
        "seed": config.seed,
        "num_steps": num_steps,
        "trim": trim,  # batches cut to their longest text, rounded up to this many tokens
        "train_examples": n_train,
        # examples; test["count"] counts labels (tokens when tagging)
        "test_examples": len(data["test"]["labels"]),
        "resumed_from": result.resumed_from,
        "validation": result.eval_metrics if data["validation"] is not None else None,
        "test": test,
        "majority_baseline": train.majority_baseline(
            data["train"]["labels"], data["test"]["labels"]
        ),
        # the run's last train record: this call's, or the log's when it resumed a finished
        # run (nothing left to train, no record of its own)
        "final_train_loss": (
            train_time[-1]["loss"]
            if train_time
            else last_train_loss(workdir / train.METRICS_FILE)
            if jax.process_index() == 0
            else None
        ),
        "wall_seconds": time.perf_counter() - begin,
        "train_seconds": (
            train_seconds(workdir / train.METRICS_FILE) if jax.process_index() == 0 else None
        ),
        "workdir": str(workdir),
        "hf": None,
    }
    if config.export_hf and jax.process_index() == 0:
        tokenizer = rotjax.data.minilm_dir() if config.model == "minilm" else None
        processor = {}  # a ViT: the image_pixels it was trained on, for transformers' pipelines
        if config.model == "vit":
            processor = {"preprocessor_config.json": rotjax.hf.vit_image_processor(mconfig)}
        summary["hf"] = str(
            rotjax.hf.save(
                workdir / "hf",
                mconfig,
                params,
                tokenizer_from=tokenizer,
                id2label=dict(enumerate(data["label_names"])),
                overwrite=True,
                extra_files=processor,
            )
        )
    if jax.process_index() == 0:  # whole (`finished` reads it: a torn one failed to parse)
        write_whole(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _train_records(metrics_file: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return [r for r in records if r.get("split") == "train"]


def train_seconds(metrics_file: Path) -> float:
    """Measured seconds of training steps over the whole run, resumed parts included: the sum of
    every train record's period (its ``steps`` over its ``steps_per_second``), compilation in
    the first period of each (re)start included, evaluation not."""
    total, last = 0.0, 0
    for r in _train_records(metrics_file):
        if r.get("steps_per_second"):
            steps = r.get("steps", r["step"] - last)  # older logs: the steps since the last
            total, last = total + steps / r["steps_per_second"], r["step"]
    return total


def last_train_loss(metrics_file: Path) -> float | None:
    """The loss of the last train record of a run's log (None if it has none)."""
    records = [r for r in _train_records(metrics_file) if "loss" in r]
    return records[-1]["loss"] if records else None


def config_diff(old: dict, config: Config) -> list[tuple[str, Any, Any]]:
    """``(field, old value, new value)`` of every field where a run's ``config.json`` (``old``)
    differs from ``config``; a field the old run predates counts as its default."""
    required = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(Config)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    out: list[tuple[str, Any, Any]] = []

    def walk(a, b, default, prefix):
        for k in sorted({*a, *b}):
            if k not in b:
                out.append((prefix + k, a[k], None))
            elif k not in a:
                if not isinstance(default, dict) or default.get(k) != b[k]:
                    out.append((prefix + k, None, b[k]))
            elif isinstance(a[k], dict) and isinstance(b[k], dict):
                walk(
                    a[k],
                    b[k],
                    default.get(k) if isinstance(default, dict) else None,
                    f"{prefix}{k}.",
                )
            elif a[k] != b[k]:
                out.append((prefix + k, a[k], b[k]))

    walk(old, _json(config), _json(Config(**required)), "")
    return out


def finished(config: Config, workdir: str | os.PathLike[str]) -> dict | None:
    """The summary of ``config``'s finished run in ``workdir``, or None if it holds none."""
    workdir = Path(workdir).absolute()
    if not (workdir / "summary.json").is_file() or not (workdir / "config.json").is_file():
        return None
    if config_diff(json.loads((workdir / "config.json").read_text()), config):
        return None
    summary = json.loads((workdir / "summary.json").read_text())
    if summary.get("data_version") != data_version(config):  # older data: not this run
        return None
    metrics = workdir / train.METRICS_FILE
    if "train_seconds" not in summary and metrics.is_file():  # older summaries
        summary["train_seconds"] = train_seconds(metrics)
    summary["workdir"] = str(workdir)  # this run directory's paths, wherever it was trained
    if summary.get("hf"):
        summary["hf"] = str(workdir / "hf")
    return summary


def cached(config: Config, workdir: str | os.PathLike[str], *, progress=False) -> dict:
    """The summary of ``config``'s finished run in ``workdir``, training it first if needed: a
    workdir holding a run of another config (an edited preset, another mode) is deleted and
    trained afresh, and so is a run of older data (`data_version`, finished or not); an unfinished
    run of the same config resumes from its checkpoints (one begun with batches cut otherwise,
    `batch_trim`, is trained afresh: its checkpoints would not resume).

    Raises:
      ValueError: ``workdir`` holds something other than a run of `train_and_evaluate` (its
        ``config.json`` is not a run's config, or checkpoints without one): nothing deleted.
    """
    summary = finished(config, workdir)
    if summary is not None:
        return summary
    old = Path(workdir) / "config.json"
    if not old.is_file() and (Path(workdir) / train.CHECKPOINT_DIR).is_dir():
        raise ValueError(  # resuming them would continue a run of unknown settings
            f"{workdir} holds checkpoints but no config.json; remove it to train afresh"
        )
    if old.is_file():
        try:
            run = json.loads(old.read_text())
        except json.JSONDecodeError:
            run = None
        if not isinstance(run, dict) or not {"name", "model", "dataset"} <= set(run):
            raise ValueError(f"{workdir} is not a training run (its config.json); not deleting it")
        # another config, or (same config, `finished` said no) a run of older data, finished
        # or not (an unfinished one would resume its checkpoints on today's data)
        version = data_version(config)
        older = run_data_version(workdir, version) != version
        older |= _run_trim(workdir) != batch_trim(config)  # begun with batches cut otherwise
        if config_diff(run, config) or (Path(workdir) / "summary.json").is_file() or older:
            shutil.rmtree(workdir)
    return train_and_evaluate(config, workdir, progress=progress)


def batch_trim(config: Config) -> int | None:
    """What `train.fit` cuts ``config``'s batches to (``trim``): MiniLM's texts to their
    longest, rounded up to `TRIM` tokens; images not at all."""
    return TRIM if config.model == "minilm" else None


def _run_trim(workdir) -> int | None:
    """The ``trim`` a run in ``workdir`` began with (None: before it was recorded, or none)."""
    try:
        return json.loads((Path(workdir) / train.BATCHES_FILE).read_text()).get("trim")
    except (OSError, ValueError, AttributeError):
        return None


def _json(config: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


# ----------------------------------------------------------------------------- flags


def _override(config: Config, assignment: str) -> Config:
    name, _, value = assignment.partition("=")
    fields = {f.name for f in dataclasses.fields(Config)}
    if name not in fields:
        raise SystemExit(f"--set {name}: not a Config field; known: {sorted(fields)}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return dataclasses.replace(config, **{name: parsed})


def main(argv=None):
    p = argparse.ArgumentParser(description="Train one rotjax model.")
    p.add_argument("--config", required=True, choices=sorted(CONFIGS))
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a 1-2 minute version of the run")
    p.add_argument("--smoke", action="store_true", help="two steps on a few examples")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run of another config or training data",
    )
    args = p.parse_args(argv)
    train.initialize_distributed(enabled=args.distributed or None)
    train.enable_compilation_cache()
    try:  # every bad --set is one line, before any workdir exists
        preset = CONFIGS[args.config](seed=args.seed)
        named = f"{preset.name}-s{args.seed}"
        config = dataclasses.replace(preset, name=named)
        if args.quick:
            config = quick(config)
        if args.smoke:
            config = smoke(config)
        for assignment in args.set:
            config = _override(config, assignment)
        if config.name == named:
            # a preset on other data or another seed (`--set seed=1`) is named for them
            # (`--set name=...` still wins): the MNIST sample's runs were named
            # vit-fashion_mnist-s0, and `--set seed=1`'s run ...-s0
            stem = (
                preset.name
                if config.dataset == preset.dataset
                else f"{config.model}-{config.dataset}"
            )
            config = dataclasses.replace(config, name=f"{stem}-s{config.seed}")
        summary = train_and_evaluate(
            config,
            args.workdir,
            progress=not args.no_progress,
            allow_config_change=args.allow_config_change,
        )
    except (ValueError, TypeError, rotjax.data.DataSourceError) as e:  # (a missing dataset)
        raise SystemExit(f"experiments.train: error: {e}") from None
    print(json.dumps({k: summary[k] for k in ("name", "test", "majority_baseline")}, indent=2))


if __name__ == "__main__":
    main()
