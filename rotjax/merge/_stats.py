"""Statistics from data, computed once and reused: input Grams of every dense kernel (RegMean)
and the diagonal Fisher of every parameter (Fisher merging).

A statistics pytree is a plain dict keyed by the spec's ``"/"`` paths::

    {"gram": {kernel path: Xᵀ X / n  (*layers, in, in)},   "tokens": {kernel path: n (*layers)},
     "fisher": {param path: F  (param shape)},             "examples": number of examples}

Grams are per-row means (a row: one real token, or one example for layers that see one vector
per example, such as the pooler), Fishers per-example means; the counts give the sums back
(``mean * count``), so statistics of several passes or datasets combine exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rotjax import symmetry as sym
from rotjax._atomic import write_whole
from rotjax._keys import check_key
from rotjax.data import IGNORE_LABEL, check_labels
from rotjax.match._checks import check_concrete, few, non_finite
from rotjax.merge._capture import capture
from rotjax.merge._methods import _input_axes
from rotjax.models import model_family
from rotjax.tree import from_dict, to_dict, wide

KINDS = ("gram", "fisher")
FISHERS = ("exact", "sampled", "empirical")
_KINDS = "rotjax.statistics.kinds"  # the safetensors metadata naming the kinds held by path
_HIGHEST = jax.lax.Precision.HIGHEST


def _no_classes(config) -> str | None:
    """Why ``config``'s outputs are not the logits of a softmax over 2 or more classes, which
    the Fisher and the merges' prediction loss read (None if they are: a classifier, a causal
    LM's vocabulary; or a module without a rotjax config). One class (a regression head) has
    a constant log-softmax: every Fisher 0, every prediction loss 0."""
    task = getattr(config, "task", "")
    if task is None:
        return "config.task is None"
    n = getattr(config, "num_labels", None)
    if task != "causal_lm" and isinstance(n, int) and n < 2:
        return f"num_labels={n}: a softmax over one class (a regression head?)"
    return None


def statistics(
    model: nn.Module,
    params: Any,
    batches: Iterable[Any],
    kinds: Sequence[str] | str = KINDS,
    *,
    include_padding: bool = False,
    fisher: str | None = None,
    samples: int = 1,
    key: jax.Array | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Input Grams and diagonal Fishers of ``model`` at ``params`` over ``batches``, one pass.

    Args:
      model: a rotjax model (``rotjax.models.family(config).Model(config)``), or your own
        Flax module with a ``config`` whose class names its `rotjax.models.Family` as
        ``rotjax_family``.
      params: its params (any sharding: the per-batch program is jitted, sums reduce across
        devices, results come back with the statistics' natural replicated sharding).
      batches: an iterable of batches, each a tuple of positional ``model.apply`` arguments
        (``(pixel_values,)``, ``(input_ids, attention_mask)``) or a dict of named arrays
        (Hugging Face names, e.g. ``input_ids``, ``attention_mask``, ``pixel_values``, raw
        ``images``), with ``labels`` for the empirical Fisher. Images are channels last,
        ``(N, H, W, C)``, as the model takes them (Hugging Face's ``pixel_values``, and
        ``rotjax merge --data``'s, are channels first: ``x.transpose(0, 2, 3, 1)``).
      kinds: ``"gram"`` and/or ``"fisher"`` (a sequence, or one name).
      include_padding: count padded tokens in the Grams too (what the original RegMean code
        does); by default only real tokens (attention mask) count. Two differences from that
        code's forward hooks remain either way: a DeBERTa's query and key Grams hold its
        tokens only, not the relative-position embeddings the shared projections also read
        (2 x position buckets more rows a pass there), and a decoder's sequence classifier
        (``score``) reads the last real token of each example, as its prediction does
        (transformers applies it to every token, and hooks see them all).
      fisher: ``"exact"``: ``F = E_x Σ_y p(y|x) (∇ log p(y|x))²``, the expectation over the
        model's predictive distribution, one backward pass per class (per token and class for
        token classification: the exact Fisher of a factorised output is the sum over tokens);
        ``"sampled"``: the same expectation estimated without bias from ``samples`` draws
        ``y ~ p(y|x)`` (all tokens at once: one backward pass per draw; needs ``key``);
        ``"empirical"``: ``(∇ log p(y_true|x))²`` with the batch's ``labels`` (one per
        example, or per token for token classification and causal language models; for the
        latter the label at position t is the token the logits of position t predict, i.e.
        ``input_ids`` shifted left, not ``input_ids`` as transformers' models take them).
        None (the default): ``"exact"``, except for a causal language model, whose exact
        Fisher takes a backward pass per token and vocabulary entry (32k x 128 per example of
        a Llama-sized model): there it must be named (``"sampled"`` is what ``rotjax merge``
        takes). The exact and sampled Fishers read every real token (attention mask),
        labels or not; the empirical one the labelled ones (not `rotjax.data.IGNORE_LABEL`).
        The mean is over the examples that count: those with a real token (and a label, for
        the empirical Fisher), so a batch's filler examples (all mask 0) change nothing.
      samples: draws per example for ``fisher="sampled"``.
      key: for ``fisher="sampled"``.
      progress: show a progress bar (tqdm, on stderr).

    Per-example gradients are taken by ``vmap`` over the batch (memory: batch size x params).

    Returns:
      The statistics dict described in the module docstring (``"gram"``/``"tokens"`` and/or
      ``"fisher"``/``"examples"``).

    Raises:
      ValueError: unknown kinds or Fisher variant (none named for a causal LM's Fisher), no
        batches (an empty batch is skipped), missing labels or key, labels of another shape
        than the model's outputs or outside its classes for the empirical Fisher (the others
        do not read them; batch and shapes named), no example that counts (no token that
        counts, for the Grams), a Fisher of a model without a classification head of 2 or
        more classes, or statistics with NaN or Inf (paths named: NaN or Inf in the batches,
        or inputs whose squares overflow).
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)  # "fisher": not its letters
    if not kinds or (unknown := sorted(set(kinds) - set(KINDS))):
        got = f"unknown statistics kinds {unknown}" if kinds else "no statistics kinds"
        raise ValueError(f"{got}; choose from {list(KINDS)}")
    config = getattr(model, "config", None)
    if fisher is None and "fisher" in kinds and getattr(config, "task", "") == "causal_lm":
        vocab = getattr(config, "vocab_size", "V")
        raise ValueError(
            "the exact Fisher of a causal language model takes one backward pass per token "
            f"and vocabulary entry ({vocab} a token here): name the variant, "
            "fisher='sampled' with a key (one pass per draw), fisher='empirical' with labels, "
            "or fisher='exact' to insist; or compute kinds=('gram',) only"
        )
    fisher = "exact" if fisher is None else fisher
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if "fisher" in kinds and fisher == "sampled":
        check_key(key, "fisher='sampled' needs a key: key")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    fam = model_family(model)
    check_concrete({"params": params}, "it loops over the batches")
    check_fits(model, fam, {"params": params})
    if "fisher" in kinds and (why := _no_classes(model.config)):
        raise ValueError(f"the Fisher needs a classification head ({why})")
    step = _batch_step(model, tuple(kinds), include_padding, fisher, samples)
    total: dict[str, Any] | None = None
    outputs: dict[tuple, tuple] = {}  # the model's output shape by input shapes
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="statistics", unit="batch", leave=False)
    for i, batch in enumerate(batches):
        inputs, labels = _split(fam, batch)
        if inputs[0].shape[0] == 0:
            continue  # an empty batch adds nothing (and has no example to trace)
        if "fisher" not in kinds or fisher != "empirical":
            labels = None  # only the empirical Fisher reads them
        elif labels is None:
            raise ValueError("fisher='empirical' needs batches with 'labels'")
        else:
            _check_labels(model, params, inputs, labels, i, outputs)
        k = jax.random.fold_in(key, i) if key is not None else jax.random.key(0)
        part = step(params, inputs, labels, k)
        total = part if total is None else _add(total, part)
    if total is None:
        raise ValueError("statistics: no batches (or only empty ones)")
    if "fisher" in total and not float(total["examples"]) > 0:
        why = "a label that is not ignored" if fisher == "empirical" else "a real token"
        raise ValueError(f"statistics: the Fisher of no example (none has {why})")
    if "gram" in total:
        counts = jax.tree.map(jnp.max, total["tokens"])  # (per layer when scanned)
        if not float(jax.tree.reduce(jnp.maximum, counts, 0.0)) > 0:
            raise ValueError("statistics: the Grams of no token (every token is padding)")
    out = _means(total)
    _check_finite("statistics", out)
    return out


def _check_labels(model, params, inputs, labels, i, outputs) -> None:
    """ValueError unless batch ``i``'s labels are one per output row (per example, or per token
    for token-level heads: a (B,) label was broadcast to every token), each a class in
    ``[0, classes)`` or `IGNORE_LABEL` (any other value would count its example with a zero
    gradient), integers as `rotjax.data.check_labels` asks everywhere. ``outputs``: the
    models' output shapes by input shapes, filled here (one abstract trace per shape)."""
    sig = tuple(None if x is None else np.shape(x) for x in inputs)
    if sig not in outputs:
        apply = functools.partial(model.apply, {"params": params})
        outputs[sig] = jax.eval_shape(apply, *inputs).shape
    *rows, classes = outputs[sig]
    if np.shape(labels) != tuple(rows):
        raise ValueError(
            f"batch {i}: labels of shape {np.shape(labels)}, where the model's outputs "
            f"{outputs[sig]} need {tuple(rows)} (a label per example, or per token)"
        )
    check_labels(labels, f"batch {i}", classes, all_ignored_ok=True)


# Whole-tree programs: leaf by leaf, each small op would compile and dispatch on its own.
_add = jax.jit(functools.partial(jax.tree.map, jnp.add))


@jax.jit
def _means(total):
    """The sums of every batch divided by their counts (tokens, examples)."""
    out: dict[str, Any] = {}
    if "gram" in total:
        n = total["tokens"]
        out["gram"] = {p: g / _bcast(n[p], g) for p, g in total["gram"].items()}
        out["tokens"] = n
    if "fisher" in total:
        out["fisher"] = {p: f / total["examples"] for p, f in to_dict(total["fisher"]).items()}
        out["examples"] = total["examples"]
    return out


def _bcast(n, g):
    n = jnp.maximum(n, 1.0)
    return n.reshape(n.shape + (1,) * (g.ndim - n.ndim))


def check_fits(model: nn.Module, fam, named: dict[str, Any]) -> None:
    """ValueError unless every params tree of ``named`` (``{"params": tree}``) has the paths
    and shapes of ``model``'s (both named; Flax's own errors spoke of scopes)."""
    spec = fam.symmetry_spec(model.config)
    for what, params in named.items():
        sym.validate(spec, params, what=what)


def _split(fam, batch):
    """``(positional inputs, labels or None)`` of a batch (tuple or dict of named arrays; an
    input or labels given as a nested list is an array: it failed on ``.shape``, or in vmap
    for labels; other pytrees, e.g. a custom model's dict input, are passed as they are)."""
    if isinstance(batch, str) or hasattr(batch, "ndim"):  # one batch given for the batches
        got = "a str (a dict's key?)" if isinstance(batch, str) else "one array"
        raise TypeError(
            f"a batch is {got}: batches must be an iterable of batches, each a tuple of "
            "positional model inputs or a dict of named arrays (one batch: wrap it in a list)"
        )
    if isinstance(batch, Mapping):  # absent inputs stay None in their place
        try:
            inputs, labels = fam.batch_inputs(batch), batch.get("labels")
        except KeyError as e:  # (a bare KeyError 'input_ids')
            raise ValueError(f"a batch lacks {e.args[0]!r} (it has {sorted(batch)})") from None
    else:
        inputs, labels = batch, None
    return tuple(_array(x) for x in inputs), _array(labels)


def _array(x):
    return np.asarray(x) if isinstance(x, list) else x


def _inputs(fam, batches: Iterable[Any]) -> list[tuple]:
    """The positional inputs of every batch with an example: an empty batch adds nothing
    (and a ViT cannot trace zero images)."""
    return [x for x in (_split(fam, b)[0] for b in batches) if np.shape(x[0])[0]]


def _check_finite(what: str, tree: Any) -> None:
    """ValueError naming the paths of ``tree`` (statistics, moments) with a NaN or an Inf."""
    if bad := non_finite(to_dict(tree)):
        raise ValueError(
            f"{what}: non-finite values (NaN or Inf) in {few(bad)}: the batches hold NaN or "
            "Inf, or values whose products overflow float32"
        )


@functools.cache
def _batch_step(model, kinds, include_padding, fisher, samples):
    """The jitted ``(params, inputs, labels, key) -> sums`` of one batch."""
    fam = model_family(model)

    def step(params, inputs, labels, key):
        mask = None if include_padding else fam.token_mask(inputs)
        out = {}
        if "gram" in kinds:

            def gram(rows, w):
                g = jnp.matmul((rows * w[:, None]).T, rows, precision=_HIGHEST)
                return {"gram": g, "tokens": jnp.sum(w)}

            _, cap = capture(model, params, inputs, gram, mask=mask)
            out["gram"] = {p: v["gram"] for p, v in cap.items()}
            out["tokens"] = {p: v["tokens"] for p, v in cap.items()}
        if "fisher" in kinds:
            real = fam.token_mask(inputs)
            flat = to_dict(params)
            tables = _lookup_tables(model, params, tuple(_one(x) for x in inputs))
            rest = {p: x for p, x in flat.items() if p not in tables}
            fixed = {p: flat[p] for p in tables}
            dense, rows, ids, counted = jax.vmap(
                functools.partial(_example_fisher, model, rest, fixed, tables, fisher, samples),
            )(inputs, real, labels, jax.random.split(key, inputs[0].shape[0]))
            fishers = {p: jnp.sum(f, axis=0) for p, f in dense.items()}
            for p, r in rows.items():  # every example's rows into the table, one scatter
                table = jnp.zeros(fixed[p].shape, r.dtype)
                fishers[p] = table.at[ids[p].reshape(-1)].add(r.reshape(-1, r.shape[-1]))
            out["fisher"] = from_dict(fishers)
            out["examples"] = jnp.sum(counted, dtype=jnp.float32)
        return out

    return jax.jit(step)


def _one(x):
    """One example of a batched input (None stays None), with its batch axis of 1."""
    return None if x is None else x[:1]


def _embed_path(module: nn.Module) -> str:
    return "/".join(module.scope.path) + "/embedding"


def _lookup_tables(model, params, inputs) -> dict[str, int]:
    """The ``nn.Embed`` tables that the forward pass (of one example: ``inputs`` with a batch
    axis of 1) only reads by lookup, once (never by ``attend``, as a tied output layer does):
    ``{param path: rows it reads}``. Their Fisher comes from the gradients of the looked-up
    rows (`_example_fisher`), never from a gradient the size of the table."""
    calls: dict[str, list] = {}

    def record(next_fun, args, kwargs, context):
        # (Flax intercepts `setup` too: every table would seem to be called twice.)
        if isinstance(context.module, nn.Embed) and context.method_name != "setup":
            calls.setdefault(_embed_path(context.module), []).append(
                (context.method_name, args[0].shape if args else None)
            )
        return next_fun(*args, **kwargs)

    def run():
        with nn.intercept_methods(record):
            model.apply({"params": params}, *inputs)

    jax.eval_shape(run)
    return {
        p: math.prod(c[0][1]) for p, c in calls.items() if len(c) == 1 and c[0][0] == "__call__"
    }


def _example_fisher(model, rest, fixed, tables, fisher, samples, inputs, real, labels, key):
    """The diagonal Fisher of one example (``inputs`` without their batch axis):
    ``(dense, rows, ids, counted)`` with ``dense`` the Fisher of every param but the lookup
    tables ``fixed``, and for each table the Fisher of the rows the example reads, ``rows[p]``
    ``(n, D)`` for the table rows ``ids[p]`` ``(n,)``; ``counted``: whether the example counts
    (a real token, and for the empirical Fisher a label that is not `IGNORE_LABEL`: a batch's
    filler example, all mask 0, adds nothing and is not counted).

    A table's gradient is ``Σ_t e_(id_t) g_tᵀ``, ``g_t`` the gradient of the looked-up row t:
    row r's squared gradient is ``(Σ_(t: id_t = r) g_t)²``, which ``w_t (Σ_(t': id_t' = id_t)
    g_t')²`` with ``w_t = 1 / #{t': id_t' = id_t}`` spreads over the positions reading r. So
    the gradients are taken with respect to the looked-up rows (a zero shift added to them),
    never materialising a table-sized gradient per example and class."""
    shifts = {}  # param path -> looked-up ids, filled at trace time

    def log_probs(dense, deltas):
        def shift(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                path = _embed_path(context.module)
                if path in deltas:
                    shifts[path] = args[0].reshape(-1)
                    out = out + deltas[path].reshape(out.shape).astype(out.dtype)
            return out

        p = from_dict({**dense, **fixed})
        with nn.intercept_methods(shift):
            logits = model.apply({"params": p}, *(None if x is None else x[None] for x in inputs))
        return jax.nn.log_softmax(wide(logits[0]))  # (C,) or (T, C), float64 for float64

    zeros = {p: wide(jnp.zeros((n, fixed[p].shape[-1]), fixed[p].dtype)) for p, n in tables.items()}
    logp, vjp = jax.vjp(log_probs, rest, zeros)
    ids = dict(shifts)
    same = {p: (i[:, None] == i[None, :]).astype(jnp.float32) for p, i in ids.items()}
    probs = jax.lax.stop_gradient(jnp.exp(logp))
    valid = jnp.ones(logp.shape[:-1], jnp.float32)
    if real is not None:  # real tokens only, and examples with one
        valid = (real if logp.ndim == 2 else jnp.any(real)).astype(jnp.float32)
    counted = jnp.any(valid > 0)  # (the empirical Fisher's: a label too)

    def square(cot):
        g_dense, g_rows = jax.tree.map(wide, vjp(cot))
        rows = {}
        for p, g in g_rows.items():  # (Σ over the positions reading the same row)², spread
            h = jnp.matmul(same[p], g, precision=_HIGHEST)
            rows[p] = h * h / jnp.sum(same[p], axis=1, keepdims=True)
        return {p: g * g for p, g in g_dense.items()}, rows

    zero = jax.tree.map(lambda x: wide(jnp.zeros_like(x)), (rest, zeros))
    add = lambda acc, f, w=1.0: jax.tree.map(lambda a, b: a + w * b, acc, f)

    if fisher == "empirical":
        y = labels if logp.ndim == 2 else labels.reshape(())
        ok = valid * (y != IGNORE_LABEL)
        cot = jax.nn.one_hot(jnp.where(y == IGNORE_LABEL, 0, y), logp.shape[-1], dtype=logp.dtype)
        cot = cot * ok[..., None]
        return (*square(cot), ids, jnp.any(ok > 0))
    if fisher == "sampled":

        def draw(acc, k):
            y = jax.random.categorical(k, logp)
            cot = jax.nn.one_hot(y, logp.shape[-1], dtype=logp.dtype) * valid[..., None]
            return add(acc, square(cot), 1.0 / samples), None

        fs = jax.lax.scan(draw, zero, jax.random.split(key, samples))[0]
        return (*fs, ids, counted)

    # exact: Σ_(t, c) p_tc (∇ log p_tc)², one backward pass per (token, class).
    flat_p, flat_valid = probs.reshape(-1), jnp.broadcast_to(valid[..., None], probs.shape)

    def one(acc, i):
        cot = jax.nn.one_hot(i, flat_p.size, dtype=logp.dtype).reshape(logp.shape)
        return add(acc, square(cot), flat_p[i] * flat_valid.reshape(-1)[i]), None

    return (*jax.lax.scan(one, zero, jnp.arange(flat_p.size))[0], ids, counted)


# ---------------------------------------------------------------------------------------------
# Acting on statistics with a symmetry element; saving and loading.


def gram_spec(spec: sym.Spec, grams: Mapping[str, Any]) -> tuple[sym.Spec, dict[str, tuple]]:
    """The spec under which the Grams (unflattened) transform, and each one's unflattened
    shape: ``G`` of kernel ``p`` with input axes ``in`` is ``(*batch, *in, *in)``, and each group
    acting on an input axis of ``p`` acts on both copies (a scale with the opposite power: the
    activations scale inversely to the kernel's input axis)."""
    params, shapes = {}, {}
    for path, g in grams.items():
        _known(spec, path, "a Gram")
        kernel = spec.params[path]
        b, n_in = _input_axes(path, kernel, np.shape(g))
        in_shape = kernel.shape[b : b + n_in]
        actions = []
        for a in kernel.actions:
            if all(b <= ax < b + n_in for ax in a.axes):
                power = -a.power if spec.groups[a.group].kind == "scale" else a.power
                actions.append(sym.Action(a.group, a.axes, power))
                shifted = tuple(ax + n_in for ax in a.axes)
                actions.append(sym.Action(a.group, shifted, power))
        shapes[path] = (*kernel.shape[:b], *in_shape, *in_shape)
        params[path] = sym.ParamSpec(shapes[path], tuple(actions))
    return sym.Spec(spec.group_items, tuple(sorted(params.items()))), shapes


def _known(spec: sym.Spec, path: str, what: str) -> None:
    if path not in spec.params:
        raise ValueError(f"{path}: {what} of a param the spec does not have")


def transform_statistics(
    spec: sym.Spec, stats: Mapping[str, Any], transform: Mapping[str, jax.Array]
) -> dict[str, Any]:
    """The statistics of ``apply(spec, params, transform)`` from those of ``params``.

    Grams are exact: activations move with the stream, head and unit permutations, the head
    rotations and scales, so ``G' = Pᵀ G P``, ``Rᵀ G R``, ``a² G`` on the acted axes. Diagonal
    Fishers are exact under permutations and scales (``F' = F a^(-2 power)``); under a rotation
    the diagonal of the rotated Fisher needs the off-diagonal terms, which a diagonal Fisher does
    not have: the result is the diagonal of the rotated *diagonal* Fisher, ``Σ_i F_i R_ij²`` (an
    approximation; recompute the Fisher on the aligned model to be exact).

    Raises:
      ValueError: a statistic of a param the spec does not have, or that does not fit it (path
        and shapes named).
    """
    unknown = sorted(set(stats) - {*KINDS, "tokens", "examples"})
    if unknown:  # (a misspelled kind came back untransformed)
        raise ValueError(f"unknown statistics {unknown}: kinds are {list(KINDS)}")
    transform = sym.check_transform(spec, transform)  # (as arrays: lists too)
    out = dict(stats)
    if "gram" in stats:
        gspec, shapes = gram_spec(spec, stats["gram"])
        grams = {p: g.reshape(shapes[p]) for p, g in stats["gram"].items()}
        moved = sym.apply(gspec, from_dict(grams), transform, check_form=False)
        out["gram"] = {p: x.reshape(stats["gram"][p].shape) for p, x in to_dict(moved).items()}
    if "fisher" in stats:
        squared = {}
        for name, el in transform.items():
            kind = spec.groups[name].kind
            squared[name] = (
                el * el if kind in ("orth", "rot") else el**-2.0 if kind == "scale" else el
            )
        for p, f in stats["fisher"].items():
            _known(spec, p, "a Fisher")
            if np.shape(f) != spec.params[p].shape:
                raise ValueError(
                    f"{p}: a Fisher of shape {np.shape(f)} for a param of shape "
                    f"{spec.params[p].shape}"
                )
        fspec = sym.Spec(
            spec.group_items, tuple((p, spec.params[p]) for p in sorted(stats["fisher"]))
        )
        out["fisher"] = to_dict(
            sym.apply(fspec, from_dict(stats["fisher"]), squared, check_form=False)
        )
    return out


def save_statistics(path: str | os.PathLike[str], stats: Mapping[str, Any]) -> Path:
    """Write statistics as one safetensors file (``kind/param path`` names; counts included;
    the kinds held by path in its metadata, so an empty one comes back too), whole or not at
    all (`rotjax._atomic.write_whole`: an existing file is replaced only by a complete one).

    Raises:
      TypeError: a statistic that is no array (a nested dict, as `cross_statistics`' are),
        before anything is written.
    """
    from safetensors.numpy import save

    flat = {}
    for kind, value in stats.items():
        if isinstance(value, Mapping):
            flat.update({f"{kind}/{p}": np.asarray(x) for p, x in value.items()})
        else:
            flat[kind] = np.asarray(value)
    if bad := [k for k, x in flat.items() if x.dtype == object]:
        raise TypeError(f"statistics that are no arrays (a nested dict?): {bad}")
    keyed = sorted(k for k, v in stats.items() if isinstance(v, Mapping))
    # (np.ascontiguousarray would make a count's shape () (1,))
    contiguous = {k: np.require(v, requirements="C") for k, v in flat.items()}
    data = save(contiguous, metadata={_KINDS: json.dumps(keyed)})  # before any directory
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, data)
    return path


def load_statistics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read statistics written by `save_statistics` (as jax arrays)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        keyed = json.loads((f.metadata() or {}).get(_KINDS, "[]"))
    out: dict[str, Any] = {kind: {} for kind in keyed}
    for name, x in load_file(str(path)).items():
        kind, _, p = name.partition("/")
        if p:
            out.setdefault(kind, {})[p] = jnp.asarray(x)
        else:
            out[kind] = jnp.asarray(x)
    return out
