"""Time the statistics that merging needs against the alignment (the paper's Table 3 claim:
matching costs a small fraction of computing Fisher / RegMean statistics).

For a MiniLM-size BERT (all-MiniLM-L6-v2 with a 16-class head; 1000 WordNet glosses of 48
tokens) and the Fashion-MNIST ViT (1000 training images), on a pair (A, and A moved by a random
symmetry element plus 1% noise): the wall time of `merge.statistics` for the Grams (RegMean),
the exact Fisher and the sampled Fisher (one draw), `merge.cross_statistics` (activations), and
`match.align` with the paper's groups and with all groups; each after a first call that
compiles, best of ``--repeats``. Then each merging method on (A, aligned B): its first call
(compilation included, from the persistent cache when it holds the program) and its best warm
call. Results in ``results/merge.json``.

    python -m experiments.benchmarks.merge [--smoke] [--examples 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import numpy as np

from experiments.benchmarks import RESULTS, SMOKE_RESULTS, results_dir
from rotjax import data, hf, match, merge, train
from rotjax import symmetry as sym
from rotjax.cli._main import _positive_int as positive_int  # the CLI's count type
from rotjax.models import family


def timed(fn, repeats, first=False):
    """Best of ``repeats`` calls after a first one that compiles; with ``first``, also the
    first call's seconds (compilation included; from the persistent compilation cache when
    it holds the programs)."""
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    cold = time.perf_counter() - tic
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - tic)
    return {"first": cold, "warm": best} if first else best


def setups(smoke: bool, examples: int):
    """``(name, config, params, inputs, batch size)`` of each benchmarked model."""
    from experiments.train import VIT_FASHION_MNIST

    vit = dataclasses.replace(VIT_FASHION_MNIST, num_labels=10)
    images = data.fashion_mnist().train.images[:examples]
    if smoke:
        vit = dataclasses.replace(vit, num_hidden_layers=1, hidden_size=16, intermediate_size=32)
        images = images[:16]
    yield "vit", vit, family(vit).init(vit, jax.random.key(0)), {"images": images}, 50
    if smoke:
        return
    config, params = hf.load_for_task(
        data.minilm_dir(), task="sequence_classification", num_labels=16, key=jax.random.key(0)
    )
    glosses = data.wordnet_glosses(max_length=48).train
    texts = {
        "input_ids": glosses.input_ids[:examples],
        "attention_mask": glosses.attention_mask[:examples],
    }
    yield "minilm", config, params, texts, 25


def run(name, config, a, arrays, batch_size, repeats):
    fam = family(config)
    model, spec = fam.Model(config), fam.symmetry_spec(config)
    key = jax.random.key(1)
    b = sym.apply(spec, a, sym.sample(spec, key))
    leaves, treedef = jax.tree.flatten(b)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        x + 0.01 * np.std(x) * jax.random.normal(k, x.shape)
        for x, k in zip(leaves, keys, strict=True)
    ]
    b = jax.tree.unflatten(treedef, noisy)
    batches = list(data.batches(arrays, batch_size))
    row = {"model": name, "examples": len(next(iter(arrays.values()))), "batch_size": batch_size}
    row["seconds"] = {
        "gram": timed(lambda: merge.statistics(model, a, batches, ("gram",)), repeats),
        "fisher_exact": timed(lambda: merge.statistics(model, a, batches, ("fisher",)), repeats),
        "fisher_sampled": timed(
            lambda: merge.statistics(model, a, batches, ("fisher",), fisher="sampled", key=key),
            repeats,
        ),
        "activations": timed(lambda: merge.cross_statistics(model, a, b, batches), repeats),
        "align_paper": timed(lambda: match.align(spec, a, b).params, repeats),
        "align_all": timed(
            lambda: match.align(spec, a, b, solve=match.ALL, key=key).params, repeats
        ),
    }
    # The merges themselves, on (A, aligned B) and their statistics; the task-vector methods
    # relative to a third point (A, each tensor shifted by 1% of its std) standing in for
    # the base model: the timings do not depend on where it lies.
    pa = match.align(spec, a, b, solve=match.ALL, key=key).params
    stats = [
        merge.statistics(model, p, batches, ("gram", "fisher"), fisher="sampled", key=key)
        for p in (a, pa)
    ]
    base = jax.tree.map(lambda x: x + 0.01 * np.std(x), a)
    merges = {
        "average": lambda: merge.average([a, pa]),
        "fisher": lambda: merge.fisher([a, pa], stats),
        "regmean": lambda: merge.regmean([a, pa], stats),
        "task_arithmetic": lambda: merge.task_arithmetic(base, [a, pa], scale=0.5),
        "ties": lambda: merge.ties(base, [a, pa]),
        "dare": lambda: merge.dare(base, [a, pa], key=key),
        "ot_wts": lambda: merge.ot_fusion(spec, a, pa, mode="wts").params,
        "refit": lambda: merge.refit(model, merge.average([a, pa]), [a, pa], batches),
    }
    row["merge_seconds"] = {k: timed(f, repeats, first=True) for k, f in merges.items()}
    s = row["seconds"]
    row["align_paper_over"] = {k: s["align_paper"] / s[k] for k in ("gram", "fisher_exact")}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny ViT and 16 images")
    p.add_argument("--examples", type=positive_int, default=1000)
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--out", help=f"default {RESULTS} ({SMOKE_RESULTS} with --smoke)")
    args = p.parse_args(argv)
    train.enable_compilation_cache()
    rows = []
    for name, config, params, arrays, bs in setups(args.smoke, args.examples):
        row = run(name, config, params, arrays, bs, 1 if args.smoke else args.repeats)
        rows.append(row)
        s = row["seconds"]
        print(
            f"{name:7s} {row['examples']} inputs: Grams {s['gram']:.1f}s, Fisher exact "
            f"{s['fisher_exact']:.1f}s (sampled {s['fisher_sampled']:.1f}s), activations "
            f"{s['activations']:.1f}s | align paper {s['align_paper']:.2f}s, all "
            f"{s['align_all']:.2f}s | paper/Grams {row['align_paper_over']['gram']:.2f}, "
            f"paper/Fisher {row['align_paper_over']['fisher_exact']:.3f}",
            flush=True,
        )
        print(
            "        merges (first call / warm): "
            + ", ".join(
                f"{k} {v['first']:.2f} / {v['warm']:.2f}s" for k, v in row["merge_seconds"].items()
            ),
            flush=True,
        )
    out = results_dir(args.out, args.smoke)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "devices": jax.device_count(),
        "machine": platform.machine(),
        "compilation_cache": jax.config.jax_compilation_cache_dir,
    }
    (out / "merge.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / 'merge.json'}")


if __name__ == "__main__":
    main()
