"""The vision experiments: ViTs trained from different seeds on Fashion-MNIST, every pair
merged by every method after every alignment (Table 2), the matching ablation (Fig. 3), the
distances to the anchor (Fig. 4), the linear paths (Fig. 5), matching layer by layer (Fig. 6)
and the runtimes (Table 3)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax
import numpy as np

from experiments import fusion
from experiments.pairs import image_sets
from experiments.reproduce._models import Settings, trained
from rotjax import match, merge

TABLE2 = ("none", "paper", "all", "all + stream", "activations", "straight-through")
METHODS = ("average", "fisher", "regmean", "ot-acts", "ot-wts")
ABLATION = ("none", "paper", "paper - attention", "paper - ffn", "paper - rescale")
DISTANCES = ("ffn only", "paper", "all", "all + stream", "activations", "straight-through")


def run(settings: Settings, out, log, code: str = "", commit: str | None = None) -> dict:
    # (``code``, ``commit``: unused; `experiments.reproduce` keys this part whole)
    models = [trained(settings, out, "vit_fashion_mnist", s) for s in settings.vision_seeds]
    # Choices (which alignment is "rotjax's best") are made on training images the statistics
    # did not use, never on the test set.
    test, unlabeled, select = image_sets(
        settings.test_images, settings.stats_examples, settings.curve_images
    )
    curve_data = {k: v[: settings.curve_images] for k, v in test.items()}
    pairs = []
    for a, b in itertools.combinations(range(len(models)), 2):
        log(f"vision: pair {models[a]['name']} + {models[b]['name']}")
        sets = (test, unlabeled, select, curve_data)
        pairs.append(_pair(settings, models[a], models[b], *sets, log))
    return {"models": models, "pairs": pairs}


def _pair(settings, summary_a, summary_b, test, unlabeled, select, curve_data, log):
    pair = fusion.load_pair(summary_a["hf"], summary_b["hf"])
    evaluate = fusion.evaluator(pair.model, test)
    key = jax.random.key(0)
    out: dict[str, Any] = {"a": summary_a["name"], "b": summary_b["name"]}
    out["endpoints"] = {"a": evaluate(pair.a), "b": evaluate(pair.b)}
    names = list(dict.fromkeys([*TABLE2, *ABLATION, *DISTANCES]))
    steps = {**fusion.ALIGNMENTS["straight-through"], "steps": settings.descent_steps}
    variants = fusion.align_variants(
        pair,
        names,
        unlabeled,
        key=key,
        options={"straight-through": steps},
        max_sweeps=settings.max_sweeps,
    )
    out["align_seconds"] = {n: v["seconds"] for n, v in variants.items()}
    out["distance"] = {n: v["distance"] for n, v in variants.items() if v["distance"]}
    rows = {}
    for name in names:
        methods = METHODS if name in TABLE2 else ("average", "fisher", "regmean")
        if name not in TABLE2 and name not in ABLATION:
            continue
        for method in methods:
            params, seconds = fusion.merged(
                variants[name]["pair"], method, stats_data=unlabeled, key=key
            )
            rows[f"{name} | {method}"] = {**evaluate(params), "seconds": seconds}
        log(
            f"  {name}: "
            + ", ".join(f"{m} {rows[f'{name} | {m}']['accuracy']:.3f}" for m in methods)
        )
    out["merges"] = rows
    on_select = fusion.evaluator(pair.model, select)
    candidates = {
        n: on_select(merge.average([variants[n]["pair"].a, variants[n]["pair"].b]))["accuracy"]
        for n in ("all", "all + stream", "activations", "straight-through")
    }
    best = max(candidates, key=candidates.get)
    out["best_alignment"] = {"name": best, "selection accuracy": candidates}
    labels = {"none": "none", "paper": "paper", "rotjax's best": best}
    out["curves"] = _curves(settings, pair, variants, labels, curve_data)
    if settings.layer_study:
        out["layers"] = _layers(pair, evaluate, key)
    out["runtime"] = _runtime(
        pair, unlabeled, summary_a, summary_b, key=key, max_sweeps=settings.max_sweeps
    )
    return out


def _curves(settings, pair, variants, labels, curve_data):
    """Loss and accuracy along the linear path A -> aligned B, for each labelled variant."""
    evaluate = fusion.evaluator(pair.model, curve_data)
    metrics = lambda x: {k: v for k, v in evaluate(x).items() if k in ("loss", "accuracy")}
    lambdas = np.linspace(0.0, 1.0, settings.curve_points)
    out = {}
    for label, name in labels.items():
        p = variants[name]["pair"]
        c = merge.curve(metrics, p.a, p.b, lambdas)
        out[label] = {
            "alignment": name,
            "lambdas": c.lambdas.tolist(),
            "metrics": {k: v.tolist() for k, v in c.metrics.items()},
            "barrier": c.barrier,
        }
    return out


def _layers(pair, evaluate, key):
    """The paper's matching (one pass, as Table 2's) on one layer, on the first k layers
    (head) and the last k (tail); simple average and RegMean need no statistics per variant
    beyond the Grams."""
    n = pair.config.num_hidden_layers
    subsets = {f"layer {i}": [i] for i in range(n)}
    subsets |= {f"head {k}": list(range(k)) for k in range(1, n + 1)}
    subsets |= {f"tail {k}": list(range(n - k, n)) for k in range(1, n + 1)}
    out = {}
    for name, layers in subsets.items():
        opts = dict(layers=layers, key=key)
        aligned = match.align(pair.spec, pair.a, pair.b, **opts).params
        out[name] = evaluate(merge.average([pair.a, aligned]))["accuracy"]
    return out


def _runtime(pair, unlabeled, summary_a, summary_b, *, key, max_sweeps):
    """Seconds: matching (paper, all; the options of the merged alignments) against Fisher and
    RegMean statistics of both models (after a first call that compiles) and their
    fine-tuning (`experiments.train.train_seconds`)."""
    seconds = {}
    for kind, size in (("gram", 50), ("fisher", 25)):
        batches = fusion.batches(unlabeled, size)
        # Compiled first: the step for full batches and for a short last one, and the sum of
        # two batches' results (one batch alone left both of those to the timed calls)
        warm = [*batches[:2], batches[-1]]
        jax.block_until_ready(merge.statistics(pair.model, pair.a, warm, (kind,)))
        tic = time.perf_counter()
        for p in (pair.a, pair.b):
            jax.block_until_ready(merge.statistics(pair.model, p, batches, (kind,)))
        seconds[f"{kind} statistics"] = time.perf_counter() - tic
    for name in ("paper", "all"):
        solve = fusion.ALIGNMENTS[name]["solve"]
        opts = dict(solve=solve, key=key, max_sweeps=fusion.sweep_cap(solve, max_sweeps))
        jax.block_until_ready(match.align(pair.spec, pair.a, pair.b, **opts).params)  # compile
        tic = time.perf_counter()
        jax.block_until_ready(match.align(pair.spec, pair.a, pair.b, **opts).params)
        seconds[f"matching ({name})"] = time.perf_counter() - tic
    seconds["fine-tuning"] = sum(
        s.get("train_seconds", s["wall_seconds"]) for s in (summary_a, summary_b)
    )
    return seconds
