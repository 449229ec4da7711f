"""``rotjax merge A B [C ...] --out DIR --method M``: align the models to the first one, merge
them, write the result as a checkpoint (the anchor's metadata kept) and ``merge.json``."""

from __future__ import annotations

import json
import time
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np

from rotjax import data, match, merge
from rotjax import symmetry as sym
from rotjax.cli._common import (
    CLIError,
    _hf_config,
    check_finite,
    checked_out_dir,
    load_models,
    pooler_note,
    progress,
    reason,
    report_json,
    save,
    show_notes,
)
from rotjax.data import IGNORE_LABEL, check_labels
from rotjax.merge._methods import MAX_RIDGE
from rotjax.merge._stats import _no_classes
from rotjax.models import family

METHODS = ("average", "fisher", "regmean", "task-arithmetic", "ties", "dare", "ot-acts", "ot-wts")
ALIGNS = ("none", "paper", "all", "activations")
NEEDS_DATA = ("fisher", "regmean", "ot-acts")
NEEDS_BASE = ("task-arithmetic", "ties", "dare")
# option -> (its default, the methods that read it)
OPTIONS = {
    "alpha": (0.9, ("regmean",)),
    "fisher": (None, ("fisher",)),  # exact; sampled for causal LMs (set in `run`)
    "normalize": (False, ("fisher",)),
    "scale": (1.0, NEEDS_BASE),
    "density": (0.2, ("ties",)),
    "drop": (0.9, ("dare",)),
    "transport": ("exact", ("ot-acts", "ot-wts")),
    "epsilon": (None, ("ot-acts", "ot-wts")),  # None: `merge.SINKHORN_EPSILON`'s, per mode
    "ridge": (1e-4, METHODS),
}
# options read only under another flag too -> (whether it is given, the refusal without it)
UNDER = {
    "epsilon": (
        lambda args: args.transport == "sinkhorn",  # (--transport is set by then: it is first)
        "--epsilon applies only to --method ot-acts or ot-wts with --transport sinkhorn",
    ),
    "ridge": (lambda args: args.refit, "--ridge does not apply without --refit"),
}

EPILOG = """\
methods (--method):
  average          θ = Σ λ_i θ_i / Σ λ_i
  fisher           Fisher-weighted average (Matena & Raffel), needs --data; --fisher,
                   --normalize (each model's λ divided by its Fisher's norm: the paper
                   code's default)
  regmean          per dense kernel (Σ G̃_i)⁻¹ Σ G̃_i W_i (Jin et al.), needs --data; --alpha
  task-arithmetic  θ_base + λ Σ (θ_i - θ_base), needs --base; --scale
  ties             trim, elect sign, disjoint mean (Yadav et al.), needs --base; --density
  dare             drop and rescale task vectors (Yu et al.), needs --base; --drop
  ot-acts, ot-wts  optimal-transport fusion from activations (needs --data) or weights
  --circuits       after average, fisher, regmean or ot-*: each attention head from the mean
                   of its circuits W_Q W_Kᵀ and W_V W_O, refactored by truncated SVD
  --refit          last, after average, fisher, regmean or ot-*: every dense layer in forward
                   order refitted by least squares from the merged model's own inputs (on
                   --data) to the mean of the models' outputs; --ridge
alignment (--align), to the first model, before merging:
  none, paper (rotation + scale + FFN units), all (every group of the spec: for pre-norm
  models such as ViT, in canonical form, the residual stream's rotation too),
  activations (permutations and rotations from activations on --data, then 0-4 sweeps of
  all, or all from its data-free start: the one whose average agrees best with both models'
  predictions on --data); --descent-steps N then refines it by N steps of straight-through
  descent on that agreement (Git Re-Basin's estimator; 300 took ViTs trained from different
  seeds from 68% to 82% on average; 2 cores: 0.4 s per step for a 6-layer ViT of width 64,
  2.6 s for MiniLM on 50 texts of 48 tokens)
--data FILE.npz holds model inputs under Hugging Face's names: pixel_values (N, C, H, W)
float32 as the image processor gives them (normalised, not raw pixels), or input_ids and
attention_mask (token_type_ids optional); labels optional (for --fisher empirical: a class
per example, or per token; for a causal LM, as transformers takes them: the input_ids, -100
where ignored, shifted here to the next token). Other keys are ignored (with a note). Give
it once (shared) or once per model, in the order of the models, repeating the flag
(--data a.npz --data b.npz; --refit then reads all of them, texts of different lengths
padded to the longest).

examples:
  rotjax merge ./vit-a ./vit-b --out ./merged --method regmean --align all --data val.npz
  rotjax merge ./ft-a ./ft-b --out ./ties --method ties --base ./pretrained-with-head
(--base has the models' architecture, head included: e.g. the pretrained encoder under the
same head as the fine-tunes were given before training, `rotjax.hf.load_for_task`)
"""


def add_arguments(m, *, positive_int, seed) -> None:
    m.add_argument("models", nargs="+", help="checkpoints to merge; the first is the anchor")
    m.add_argument("--out", required=True, help="new directory for the merged model + report")
    m.add_argument("--method", choices=METHODS, default="average", help="(default average)")
    m.add_argument(
        "--align", choices=ALIGNS, default="paper", help="alignment before merging (default paper)"
    )
    m.add_argument(
        "--data", action="append", default=[], help=".npz of inputs, once or per model (below)"
    )
    m.add_argument("--base", help="the base model of the task-vector methods")
    m.add_argument("--weights", help="comma-separated model weights λ (default all 1)")
    # Each method's own options: None when not given (the defaults of `OPTIONS` fill in), so
    # an option given to a method that does not read it is refused, not silently ignored.
    m.add_argument("--alpha", type=float, help="RegMean's off-diagonal scale (default 0.9)")
    m.add_argument(
        "--fisher",
        choices=merge.FISHERS,
        help="Fisher variant (default exact; sampled for causal LMs, whose exact Fisher takes a "
        "backward pass per token and vocabulary entry)",
    )
    m.add_argument(
        "--normalize",
        action="store_const",
        const=True,
        help="Fisher: divide each model's weight by its Fisher's global norm (default off)",
    )
    m.add_argument("--scale", type=float, help="λ of the task-vector methods (default 1)")
    m.add_argument("--density", type=float, help="TIES: fraction kept (default 0.2)")
    m.add_argument("--drop", type=float, help="DARE: drop probability (default 0.9)")
    m.add_argument("--transport", choices=("exact", "sinkhorn"), help="OT (default exact)")
    m.add_argument(
        "--epsilon",
        type=float,
        help="--transport sinkhorn: its regularisation on the [0, 1]-scaled cost (default 0.08 "
        "for ot-acts, 0.06 for ot-wts)",
    )
    m.add_argument(
        "--circuits",
        action="store_true",
        help="then merge each attention head by its circuits (not with task-vector methods)",
    )
    m.add_argument(
        "--refit",
        action="store_true",
        help="then refit every dense layer on the merged model's inputs (needs --data)",
    )
    m.add_argument("--ridge", type=float, help="--refit's pull to the merge (default 1e-4)")
    m.add_argument(
        "--descent-steps",
        type=positive_int,
        help="--align activations: then this many straight-through steps (default none)",
    )
    m.add_argument("--batch-size", type=positive_int, help="statistics batches (32)")
    m.add_argument("--max-examples", type=positive_int, help="per --data file (1000)")
    m.add_argument(
        "--seed", type=seed, help="random choices: alignment, DARE, sampled Fisher (default 0)"
    )
    m.add_argument("--quiet", action="store_true", help="no progress bars")


def _options(args) -> dict:
    """Everything checkable without loading a model, checked."""
    n = len(args.models)
    if n < 2:
        raise CLIError(f"merge needs at least 2 models, got {n}")
    for name, (default, readers) in OPTIONS.items():
        flag, refusal = UNDER.get(name, (None, None))
        used = args.method in readers and (flag is None or flag(args))
        if getattr(args, name) is not None and not used:
            raise CLIError(
                refusal
                or f"--{name} does not apply to --method {args.method} (only to "
                f"{', '.join(readers)})"
            )
        if used and getattr(args, name) is None:
            setattr(args, name, default)
    if args.transport == "sinkhorn" and args.epsilon is None:  # recorded as it is used
        args.epsilon = merge.SINKHORN_EPSILON[args.method[3:]]
    if args.descent_steps is not None and args.align != "activations":
        raise CLIError("--descent-steps applies to --align activations only")
    needs_data = args.method in NEEDS_DATA or args.align == "activations" or args.refit
    if needs_data and not args.data:
        why = (
            f"--method {args.method}"
            if args.method in NEEDS_DATA
            else ("--refit" if args.refit else "--align activations")
        )
        raise CLIError(f"{why} needs --data FILE.npz (model inputs)")
    if args.data and not needs_data:
        raise CLIError(
            f"--data is not read by --method {args.method} with --align {args.align}: only "
            f"by --method {', '.join(NEEDS_DATA)}, --align activations or --refit"
        )
    for name, default in (("batch_size", 32), ("max_examples", 1000)):
        if getattr(args, name) is not None and not needs_data:
            raise CLIError(f"--{name.replace('_', '-')} does not apply: nothing reads --data here")
        if getattr(args, name) is None and needs_data:  # else None in merge.json: unused
            setattr(args, name, default)
    if len(args.data) not in (0, 1, n):
        raise CLIError(f"--data given {len(args.data)} times: give it once or once per model ({n})")
    if args.method in NEEDS_BASE and not args.base:
        raise CLIError(
            f"--method {args.method} needs --base (the model the others were tuned from)"
        )
    for flag in ("circuits", "refit"):
        if getattr(args, flag) and args.method in NEEDS_BASE:
            raise CLIError(f"--{flag} does not apply to --method {args.method}")
    if args.base and args.method not in NEEDS_BASE:
        raise CLIError(f"--base does not apply to --method {args.method} (only to task vectors)")
    if args.ridge is not None and not (np.isfinite(args.ridge) and 0 <= args.ridge <= MAX_RIDGE):
        raise CLIError(f"--ridge must be a number in [0, 1e8], got {args.ridge}")
    if args.epsilon is not None and not (np.isfinite(args.epsilon) and args.epsilon > 0):
        raise CLIError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    if args.scale is not None and not (np.isfinite(args.scale) and abs(args.scale) <= 1e6):
        raise CLIError(f"--scale must be a finite number (|scale| <= 1e6), got {args.scale}")
    if args.method == "fisher" and args.fisher == "empirical" and not args.data:
        raise CLIError("--fisher empirical needs --data with labels")
    weights = None
    if args.weights is not None:
        if args.method in NEEDS_BASE:
            raise CLIError(f"--weights does not apply to --method {args.method} (use --scale)")
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise CLIError(f"--weights must be comma-separated numbers: {args.weights!r}") from None
        if len(weights) != n:
            raise CLIError(f"--weights has {len(weights)} values for {n} models")
        try:
            merge.model_weights(weights, n)
        except ValueError as e:
            raise CLIError(f"--weights: {e}") from None
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        raise CLIError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.density is not None and not 0 < args.density <= 1:
        raise CLIError(f"--density must be in (0, 1], got {args.density}")
    if args.drop is not None and not 0 <= args.drop < 1:
        raise CLIError(f"--drop must be in [0, 1), got {args.drop}")
    files = [("--data", f) for f in args.data] + ([("--base", args.base)] if args.base else [])
    for flag, f in files:
        if not Path(f).exists():
            raise CLIError(f"{flag} {f} does not exist")
    return {"weights": weights}


def read_data(
    path: str, config, max_examples: int, need_labels: bool = False, notes: list | None = None
) -> dict[str, np.ndarray]:
    """Model inputs from a ``.npz`` under Hugging Face's names, checked against the model;
    doubts that are not errors (pixel values that look unnormalised) go to ``notes``."""
    fam = family(config)
    read = (*fam.input_names, *(("labels",) if need_labels else ()))
    try:
        with open(path, "rb") as file:
            f = np.load(file, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):  # a .npy: one array, no names
                raise ValueError(f"one {type(f).__name__}, not named arrays")
            with f:  # only the arrays read are loaded (the others are named in a note)
                names = sorted(f.files)
                arrays = {k: np.asarray(f[k]) for k in names if k in read}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "pickled" in why:  # numpy's guess for a file that is neither .npz nor .npy
            why = "neither a zip of arrays nor one array"
        raise CLIError(f"--data {path}: not a readable .npz ({why})") from None
    scalar = [k for k, x in arrays.items() if x.ndim == 0]
    if scalar:
        raise CLIError(f"--data {path}: {scalar} are scalars, not arrays with a row per example")
    required = ("pixel_values",) if fam.name == "vit" else ("input_ids",)
    required += ("labels",) if need_labels else ()
    missing = [k for k in required if k not in arrays]
    if missing:
        why = " (--fisher empirical reads them)" if "labels" in missing else ""
        raise CLIError(f"--data {path}: missing {missing}{why}; it holds {names}")
    n = len(arrays[required[0]])
    if n == 0:
        raise CLIError(f"--data {path}: {required[0]} has no rows")
    out = {}
    if max_examples is not None and n > max_examples and notes is not None:
        notes.append(f"--data {path}: its first {max_examples} of {n} rows used (--max-examples)")
    unread = sorted(set(names) - {*fam.input_names, "labels"})
    if unread and notes is not None:  # e.g. a misspelled attention_mask: say so
        notes.append(
            f"--data {path}: ignored {unread} (a {fam.name} model reads "
            f"{', '.join(fam.input_names)})"
        )
    if "labels" in names and not need_labels and notes is not None:
        notes.append(f"--data {path}: labels not read (only --fisher empirical reads them)")
    for k, x in arrays.items():  # (labels only if the empirical Fisher reads them)
        if len(x) != n:
            raise CLIError(f"--data {path}: {k} has {len(x)} rows, {required[0]} {n}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise CLIError(f"--data {path}: {k} has NaN or Inf")
        out[k] = x[:max_examples]
    if fam.name == "vit":
        want = (config.num_channels, config.image_size, config.image_size)
        got = out["pixel_values"].shape
        if len(got) != 4 or got[1:] != want:
            last = len(got) == 4 and got[1:] == want[1:] + want[:1]  # (rotjax's loaders' layout)
            raise CLIError(
                f"--data {path}: pixel_values must be (N, {', '.join(map(str, want))}) "
                f"(N, C, H, W), got {got}"
                + (": channels last? np.transpose(x, (0, 3, 1, 2))" if last else "")
            )
        pixels = out["pixel_values"]
        if not np.issubdtype(pixels.dtype, np.floating):
            raise CLIError(
                f"--data {path}: pixel_values are {pixels.dtype}, raw pixels? The model takes the "
                "image processor's float output (rotjax's ViTs: (x / 255 - 0.5) / 0.5, "
                "rotjax.models.vit.image_pixels)"
            )
        reach = np.abs(pixels).max()
        if notes is not None and reach > 20:
            notes.append(
                f"--data {path}: pixel_values reach {reach:.0f}; normalised "
                "inputs stay within a few units (raw [0, 255] pixels merge badly)"
            )
        if reach > np.finfo(np.float32).max:  # float64 beyond float32's range: Inf
            raise CLIError(f"--data {path}: pixel_values overflow float32 (|x| > 3.4e38)")
        out["pixel_values"] = pixels.transpose(0, 2, 3, 1).astype(np.float32)
    else:
        ids = out["input_ids"]
        if ids.ndim != 2 or not ids.shape[1] or not np.issubdtype(ids.dtype, np.integer):
            raise CLIError(
                f"--data {path}: input_ids must be integers (N, T), T >= 1, got {ids.dtype} "
                f"{ids.shape}"
            )
        for k in ("attention_mask", "token_type_ids"):
            if k in out and not (np.issubdtype(out[k].dtype, np.integer) or out[k].dtype == bool):
                raise CLIError(f"--data {path}: {k} must be integers, got {out[k].dtype}")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise CLIError(f"--data {path}: input_ids outside [0, {config.vocab_size})")
        types, n_types = out.get("token_type_ids"), getattr(config, "type_vocab_size", 0)
        if types is not None and not n_types:  # DeBERTa-v3: its tokenizer gives them anyway
            if types.any() and notes is not None:  # a text pair's 1s, which it never reads
                notes.append(
                    f"--data {path}: token_type_ids ignored (the model has no token types, "
                    "type_vocab_size 0, as in transformers)"
                )
            del out["token_type_ids"]
        elif types is not None and types.size and not 0 <= types.min() <= types.max() < n_types:
            raise CLIError(f"--data {path}: token_type_ids outside [0, {n_types})")
        for k in ("attention_mask", "token_type_ids"):
            if k in out and out[k].shape != ids.shape:
                raise CLIError(
                    f"--data {path}: {k} has shape {out[k].shape}, input_ids {ids.shape}"
                )
        mask = out.get("attention_mask")
        if mask is not None and not np.isin(mask, (0, 1)).all():
            raise CLIError(f"--data {path}: attention_mask must hold 0 and 1 only")
        if mask is not None and not mask.any(axis=1).all():
            empty = np.flatnonzero(~mask.any(axis=1))
            raise CLIError(f"--data {path}: rows {empty[:10].tolist()} have no real token (mask 0)")
        pad = getattr(config, "pad_token_id", None)
        if mask is None and pad is not None and notes is not None and (ids == pad).any():
            notes.append(
                f"--data {path}: no attention_mask, so every token counts as real, the pad "
                f"token (id {pad}) at {int((ids == pad).sum())} positions included"
            )
        out = {k: v.astype(np.int32) if k != "labels" else v for k, v in out.items()}
        out.setdefault("attention_mask", np.ones_like(out["input_ids"]))
    if "labels" in out:
        _check_labels(path, out["labels"], config, out.get("input_ids"))
        if getattr(config, "task", None) == "causal_lm":
            out["labels"] = _next_tokens(out["labels"])
        out["labels"] = out["labels"].astype(np.int32)  # checked: classes, tokens or ignored
        if (out["labels"] == IGNORE_LABEL).all():  # the empirical Fisher of no example: 0
            causal = getattr(config, "task", None) == "causal_lm"
            shifted = " after the shift to next tokens" if causal else ""
            raise CLIError(f"--data {path}: every label is {IGNORE_LABEL} (ignored){shifted}")
    _check_shapes(path, config, out)
    return out


def _check_shapes(path, config, arrays) -> None:
    """The model traced (abstractly: nothing computed) on one row of the inputs, so that what
    only the model knows (e.g. more tokens than its positions, or its sliding window) is
    refused now, naming the file, not after the alignment."""
    fam = family(config)
    row = {k: v[:1] for k, v in arrays.items() if k != "labels"}
    try:
        fam.param_shapes(config, fam.batch_inputs(row))
    except ValueError as e:
        raise CLIError(f"--data {path}: {reason(e)}") from None


def _check_labels(path, labels, config, ids) -> None:
    """Integer class ids in ``[0, num_labels)`` (or `IGNORE_LABEL`), one per example, or one
    per token (``input_ids``' shape) for token classification (token ids in ``[0,
    vocab_size)`` for a causal language model)."""
    task = getattr(config, "task", None)
    token = task in ("token_classification", "causal_lm")
    want = ids.shape if token else labels.shape[:1]
    if labels.shape != want or not np.issubdtype(labels.dtype, np.integer):
        raise CLIError(
            f"--data {path}: labels must be integers of shape {want}, got {labels.dtype} "
            f"{labels.shape}"
        )
    n = config.vocab_size if task == "causal_lm" else config.num_labels
    try:  # (all ignored: refused below, after a causal LM's shift)
        check_labels(labels, f"--data {path}: labels", n, all_ignored_ok=True)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _next_tokens(labels: np.ndarray) -> np.ndarray:
    """transformers' causal-LM labels (the input ids; the model shifts them) as
    `merge.statistics` takes them: position t's label is the token its logits predict, t + 1
    (the last position predicts nothing: `IGNORE_LABEL`)."""
    shifted = np.full(labels.shape, IGNORE_LABEL, np.int64)  # signed: unsigned ids too
    shifted[:, :-1] = labels[:, 1:]
    return shifted


TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _together(datas: list[dict], pad_token_id: int | None = None) -> dict[str, np.ndarray]:
    """The model inputs (no labels) of every ``--data`` file in one set of arrays. Token inputs
    of different lengths are padded at the end to the longest (``attention_mask`` 0: refit
    counts real tokens only, and padding after a text changes none of its real tokens'
    activations; ``input_ids`` by ``pad_token_id``, or 0 without one: a LLaMA-style
    classifier reads the last token that is not the pad token); ``token_type_ids`` that only
    some files have are 0 (the model's default) in the others. Pixel values all have the
    model's shape (`read_data` checked them)."""
    datas = [{k: v for k, v in d.items() if k != "labels"} for d in datas]
    if "input_ids" in datas[0]:
        if any("token_type_ids" in d for d in datas):
            for d in datas:
                d.setdefault("token_type_ids", np.zeros_like(d["input_ids"]))
        t = max(d["input_ids"].shape[1] for d in datas)
        fill = lambda k: (pad_token_id or 0) if k == "input_ids" else 0
        pad = lambda k, v: (
            np.pad(v, ((0, 0), (0, t - v.shape[1])), constant_values=fill(k))
            if k in TOKEN_INPUTS
            else v
        )
        datas = [{k: pad(k, v) for k, v in d.items()} for d in datas]
    return data.concat(datas)


def _canonical_notes(config, labels, models, anchor) -> list[str]:
    """Models that `rotjax align --solve ...,stream` wrote (their alignment.json): aligned to
    the anchor's canonical form, not to its stored weights, which a merge without the stream
    alignment mixes them with."""
    fam = family(config)
    try:  # (a bare ViT encoder has no canonical form: nothing to note)
        stream_spec = fam.stream_spec(config) if fam.pre_norm else None
    except ValueError:
        return []
    if stream_spec is None or sym.is_canonical(stream_spec, anchor):
        return []
    out = []
    for label, directory in list(zip(labels, models, strict=True))[1:]:
        try:
            report = json.loads((Path(directory) / "alignment.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and "stream" in (report.get("solve") or ()):
            out.append(
                f"{label}: aligned to the anchor's canonical form (its alignment.json), merged "
                "here with the anchor's stored weights: --align all merges both in that form"
            )
    return out


def run(args) -> int:
    opts = _options(args)
    out = checked_out_dir(args.out, [*args.models, *([args.base] if args.base else [])])
    timings: dict[str, float] = {}
    labels = [f"model {i} ({'anchor' if i == 0 else 'merged'})" for i in range(len(args.models))]
    named = list(zip(labels, args.models, strict=True))
    if args.base:
        named.append(("base", args.base))
    tic = time.perf_counter()
    configs, params, notes = load_models(named, same_classes=True, copied=0)
    seen: dict[Path, str] = {}  # a model given twice counts twice: say so
    for label, directory in named[: len(args.models)]:
        if (twin := seen.setdefault(Path(directory).resolve(), label)) != label:
            notes.append(f"{label}: {directory} is {twin} again; it counts twice")
    config = configs[0]
    model = family(config).Model(config)
    # The base (last) goes into the same form as the models, so task vectors stay meaningful.
    spec, params, more = match.prepare(config, params, stream=args.align in ("all", "activations"))
    base = params.pop() if args.base else None
    notes += more
    if args.align in ("none", "paper"):
        notes += _canonical_notes(config, labels, args.models, params[0])
    # The Fisher and the activation alignment's choice read softmax predictions: every
    # model's head must be one (config.json's problem_type may say it is not).
    kinds = {_hf_config(m).get("problem_type") for m in args.models}
    kind = next((k for k in sorted(kinds - {None}) if k != "single_label_classification"), None)
    headless = _no_classes(config)
    why = headless or (f"problem_type {kind}" if kind else None)
    if args.method == "fisher" and why:
        raise CLIError(f"--method fisher needs models with a softmax classification head ({why})")
    if args.align == "activations" and kind and not headless:
        raise CLIError(
            f"--align activations chooses by the agreement of softmax predictions; these "
            f"models' heads are not softmax ({why}): use --align all"
        )
    if args.descent_steps and why:  # (its loss is the softmax predictions' agreement)
        raise CLIError(f"--descent-steps needs models with a softmax classification head ({why})")
    if args.align == "activations" and why:  # one output (regression): no choice to make
        notes.append(
            f"--align activations: {why}; no predictions to choose by: the activation start "
            "refined by weight matching to convergence"
        )
    if args.method == "fisher" and args.fisher is None:  # a causal LM's exact Fisher would
        # take a backward pass per token and vocabulary entry
        args.fisher = "sampled" if config.task == "causal_lm" else "exact"
    # The key: the alignment's sweep order, DARE's drops, the sampled Fisher's labels.
    seeded = args.align != "none" or args.method == "dare" or args.fisher == "sampled"
    if args.seed is not None and not seeded:
        raise CLIError(
            f"--seed is not read by --method {args.method} with --align none (only by an "
            "alignment, --method dare or the sampled Fisher)"
        )
    if seeded and args.seed is None:  # (else None in merge.json: unused)
        args.seed = 0
    key = jax.random.key(args.seed) if seeded else None
    need_labels = args.method == "fisher" and args.fisher == "empirical"
    datas = [read_data(p, config, args.max_examples, need_labels, notes) for p in args.data]
    # --refit reads every file's inputs together (any inputs serve: each model's outputs on
    # them), built before aligning so that files which cannot go together fail first
    shared = _together(datas, getattr(config, "pad_token_id", None)) if args.refit else None
    if len(datas) == 1:
        datas = datas * len(params)
    timings["load"] = time.perf_counter() - tic
    batches = lambda i: data.batches(datas[i], args.batch_size)

    tic = time.perf_counter()
    aligned, alignment = [params[0]], []
    with progress(len(params) - 1, f"aligning ({args.align})", args.quiet) as bar:
        for i, p in enumerate(params[1:], start=1):
            aligned.append(p)
            if args.align != "none":
                solve = match.PAPER if args.align == "paper" else match.ALL
                started = time.perf_counter()
                try:
                    if args.align == "activations":
                        res, chosen = merge.align_by_activations(
                            model,
                            spec,
                            params[0],
                            p,
                            batches(i),
                            key=key,
                            steps=args.descent_steps or 0,
                            progress=not args.quiet,
                        )
                    else:
                        res, chosen = match.align(spec, params[0], p, solve=solve, key=key), {}
                except ValueError as e:
                    raise CLIError(reason(e)) from None
                seconds = time.perf_counter() - started  # (activations': all its work, not
                # only its last align call's, which is what res.diagnostics times)
                aligned[-1] = res.params
                if base is not None:  # the task vector g·θ_i - g·θ_base, in the anchor's basis
                    moved_base = sym.apply(spec, base, res.transform)
                    aligned[-1] = jax.tree.map(
                        lambda x, mb, b: x - mb + b, res.params, moved_base, base
                    )
                d = res.diagnostics
                alignment.append({
                    "model": args.models[i],
                    "distance": {"before": d.distance_before, "after": d.distance_after},
                    "sweeps": chosen.get("sweeps", d.sweeps),
                    **(
                        {
                            "start": chosen["start"],
                            "prediction_loss": chosen["losses"],
                            "prediction_loss_weights_start": chosen["weights_loss"],
                            "prediction_loss_unaligned": chosen["identity_loss"],
                            **(
                                {"straight_through": chosen["straight_through"]}
                                if "straight_through" in chosen
                                else {}
                            ),
                        }
                        if chosen
                        else {}
                    ),
                    "seconds": seconds,
                })  # fmt: skip
            bar.update()
    timings["align"] = time.perf_counter() - tic

    tic = time.perf_counter()
    stats = None
    kinds = {"fisher": ("fisher",), "regmean": ("gram",)}.get(args.method)
    if kinds:
        stats = []
        for i, p in enumerate(aligned):
            try:  # e.g. finite inputs that overflow them (pixels of 3e38)
                stats.append(
                    merge.statistics(
                        model,
                        p,
                        batches(i),
                        kinds,
                        fisher=args.fisher or "exact",  # Grams: unread
                        key=key,
                        progress=not args.quiet,
                    )
                )
            except ValueError as e:
                file = args.data[i if len(args.data) > 1 else 0]
                raise CLIError(
                    f"the statistics of {labels[i]} on --data {file}: {reason(e)}; nothing written"
                ) from None
    timings["statistics"] = time.perf_counter() - tic

    tic = time.perf_counter()
    merged, members = _merge(args, opts, spec, model, aligned, stats, base, key, batches)
    if args.circuits:
        merged = merge.circuits(spec, merged, members, weights=opts["weights"])
    if args.refit:
        merged = merge.refit(
            model,
            merged,
            members,
            data.batches(shared, args.batch_size),
            weights=opts["weights"],
            ridge=args.ridge,
            progress=not args.quiet,
        )
    check_finite(merged, "the merged model")
    timings["merge"] = time.perf_counter() - tic
    notes += pooler_note(config)
    report = {
        "models": args.models,
        "method": args.method,
        "align": args.align,
        "options": {
            k: opts[k] if k in opts else getattr(args, k)
            for k in (
                "weights",
                "alpha",
                "fisher",
                "normalize",
                "scale",
                "density",
                "drop",
                "transport",
                "epsilon",
                "circuits",
                "refit",
                "ridge",
                "seed",
                "max_examples",
                "batch_size",
                "descent_steps",
            )
        },
        "data": args.data,
        "base": args.base,
        "alignment": alignment,
        "seconds": timings,
        "notes": notes,
    }
    # The report is written with the checkpoint, in one atomic step: never one alone (so
    # the saving's seconds are not in it).
    tic = time.perf_counter()
    save(
        out, config, merged, source=args.models[0], extra_files={"merge.json": report_json(report)}
    )
    saving = time.perf_counter() - tic
    show_notes(notes)
    steps = [f"descent steps: {args.descent_steps}"] if args.descent_steps else []
    steps += [s for s, on in (("circuits", args.circuits), ("refit", args.refit)) if on]
    print(
        f"merged {len(params)} models ({', '.join([args.method, *steps])}, aligned: "
        f"{args.align}) in "
        f"{sum(timings.values()) + saving:.1f}s (saving {saving:.1f}s); wrote {out}"
    )
    return 0


def _merge(args, opts, spec, model, aligned, stats, base, key, batches):
    """``(merged params, the models it merged)``: OT fusion merges the models it moved."""
    w = opts["weights"]
    m = args.method
    if m == "average":
        return merge.average(aligned, w), aligned
    if m == "fisher":
        return merge.fisher(aligned, stats, weights=w, normalize=args.normalize), aligned
    if m == "regmean":
        return merge.regmean(aligned, stats, alpha=args.alpha, weights=w), aligned
    if m == "task-arithmetic":
        return merge.task_arithmetic(base, aligned, scale=args.scale), aligned
    if m == "ties":
        return merge.ties(base, aligned, density=args.density, scale=args.scale), aligned
    if m == "dare":
        return merge.dare(base, aligned, key=key, drop=args.drop, scale=args.scale), aligned
    moved = [aligned[0]]
    for i, p in enumerate(aligned[1:], start=1):
        cross = merge.cross_statistics(model, aligned[0], p, batches(i)) if m == "ot-acts" else None
        fused = merge.ot_fusion(
            spec, aligned[0], p, mode=m[3:], cross=cross, transport=args.transport,
            epsilon=args.epsilon,
        )  # fmt: skip
        moved.append(fused.moved)
    return merge.average(moved, w), moved
