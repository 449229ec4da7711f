"""The candidates `merge.align_by_activations` chooses among (and a few more), on every pair
of image ViTs (Fashion-MNIST by default): how well each matches the activations, how its
average scores by the prediction loss (the function's criterion), on training images the
statistics did not use and on the test set.

    python -m experiments.activation_start DIR [DIR ...] [--max-sweeps 6] [--images N]
        [--dataset fashion_mnist] [--held-out 2000] [--descent-steps 0] [--out DIR]

Per pair, A and B in canonical form as for the reproduction's ``activations``
(`fusion.ALIGNMENTS`): the activation start (`merge.activation_init` of the cross-moments of
1000 training images of the reproduction's shuffle), weight matching from it for 1, ...,
``--max-sweeps`` sweeps (at least `align_by_activations`' own number, so that its choice is
among them) and to convergence, weight matching from its own data-free start, and B unaligned;
with ``--descent-steps N``, also `align_by_activations`' choice refined by N steps of
straight-through descent (a reference: neither rule below picks it). For each: the prediction
loss of the average on the 1000 images, its accuracy on the next ``--held-out`` training images
(held out from the statistics, not from the models' training, which saw every training image:
labelled, but not the test set; 2000, or as many as the split has) and on the test
set, and the mean correlation of A's and aligned B's features on the 1000 images (those the
start was fitted to), per kind of dense-layer input (``stream``: the normalised stream that the
queries, keys, values and FFN read; ``ffn``: the FFN units; ``heads``: the heads' outputs;
``final``: the classifier's input). Then the test accuracy of the candidate that each rule
picks: ``least loss``, `align_by_activations`' own choice (among its candidates only: the
start, 1 to its default ``max_sweeps`` sweeps from it (up to the first that converges), the
data-free one and B unaligned, in that order, a later one kept only if better by more than
float32 rounding or, predicting alike, nearer A in weights); ``best held-out``, the best
accuracy on the held-out images among the other candidates.

Writes ``OUT/activation_start.json`` and prints one table per pair and the rules' means.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import fusion
from experiments.pairs import (
    TEST_IMAGES,
    check_checkpoints,
    check_image_shape,
    check_images,
    image_sets,
)
from rotjax import data, match, merge, train
from rotjax.merge._select import _chosen

# The dense layers whose inputs each kind of feature is (the project's ViT's paths).
KINDS = {
    "stream": ("attention/query/kernel", "ffn/intermediate/kernel"),
    "ffn": ("ffn/output/kernel",),
    "heads": ("attention/out/kernel",),
    "final": ("classifier/kernel",),
}
RULES = ("least loss", "best held-out")
UNLABELED = 1000  # training images the start and the candidates' loss read
# align_by_activations' own sweeps from the start, the most its candidates have
LIBRARY_SWEEPS = inspect.signature(merge.align_by_activations).parameters["max_sweeps"].default


def candidates(
    pair, unlabeled, *, max_sweeps: int, key, descent_steps: int = 0
) -> dict[str, match.Alignment]:
    """The alignments `align_by_activations` chooses among, and more sweeps, by name; with
    ``descent_steps``, last, its choice refined by that many straight-through steps (a
    reference: no rule picks it)."""
    bs = fusion.batches(unlabeled)
    cross = merge.cross_statistics(pair.model, pair.a, pair.b, bs)
    start = merge.activation_init(pair.spec, cross, params=(pair.a, pair.b))
    opts = dict(solve=match.ALL, key=key)
    out = {"start": match.align(pair.spec, pair.a, pair.b, solve=(), init=start)}
    for s in range(1, max(max_sweeps, LIBRARY_SWEEPS) + 1):  # the library's candidates too
        out[f"start + {s}"] = match.align(
            pair.spec, pair.a, pair.b, max_sweeps=s, init=start, **opts
        )
    out["start, converged"] = match.align(pair.spec, pair.a, pair.b, init=start, **opts)
    out["data-free"] = match.align(pair.spec, pair.a, pair.b, **opts)
    out["none"] = match.align(pair.spec, pair.a, pair.b, solve=())
    if descent_steps:
        out[_descent(descent_steps)] = merge.align_by_activations(
            pair.model, pair.spec, pair.a, pair.b, bs, key=key, steps=descent_steps
        )[0]
    return out


def _descent(steps: int) -> str:
    return f"straight-through ({steps} steps)"


def matched_correlation(pair, params_b, unlabeled) -> dict[str, float]:
    """Mean Pearson correlation of A's feature i with B's feature i, per kind (`KINDS`)."""
    cross = merge.cross_statistics(pair.model, pair.a, params_b, fusion.batches(unlabeled))
    diag = {p: jnp.diagonal(c, axis1=-2, axis2=-1) for p, c in merge.correlations(cross).items()}
    return {
        kind: float(jnp.mean(jnp.stack([d.mean() for p, d in diag.items() if p.endswith(ends)])))
        for kind, ends in KINDS.items()
    }


def run(
    dirs,
    *,
    images=10_000,
    unlabeled=UNLABELED,
    held_out=2000,
    max_sweeps=6,
    descent_steps=0,
    dataset="fashion_mnist",
    splits=None,
    log=print,
):
    test, stats, select = image_sets(images, unlabeled, held_out, dataset=dataset, splits=splits)
    key = jax.random.key(0)
    out = []
    for dir_a, dir_b in itertools.combinations(dirs, 2):
        pair = fusion.load_pair(dir_a, dir_b).canonical()
        loss = merge.prediction_loss(pair.model, [pair.a, pair.b], fusion.batches(stats))
        on_test, on_select = (fusion.evaluator(pair.model, x) for x in (test, select))
        rows = {}
        found = candidates(pair, stats, max_sweeps=max_sweeps, key=key, descent_steps=descent_steps)
        for name, res in found.items():
            avg = merge.average([pair.a, res.params])
            rows[name] = {
                "loss": float(loss(avg)),
                "held-out": float(on_select(avg)["accuracy"]),
                "test": float(on_test(avg)["accuracy"]),
                "sweeps": 0 if name in ("start", "none") else int(res.diagnostics.sweeps),
                "distance": float(res.diagnostics.distance_after),  # ‖A - g·B‖²
                "correlation": matched_correlation(pair, res.params, stats),
            }
        picks = {
            "least loss": _least_loss(rows),
            "best held-out": max(
                (n for n in rows if n != _descent(descent_steps)),
                key=lambda n: rows[n]["held-out"],
            ),
        }
        out.append({"a": str(dir_a), "b": str(dir_b), "candidates": rows, "picks": picks})
        log("\n".join(_table(out[-1])))
    return {"pairs": out, "dataset": dataset, "held_out": held_out}


def _least_loss(rows) -> str:
    """The candidate `align_by_activations` keeps: its own, in its order, by its rule."""
    best = None
    for s in range(LIBRARY_SWEEPS + 1):
        name = f"start + {s}" if s else "start"
        best = _chosen(best, rows[name]["loss"], rows[name]["distance"], name)
        if s and rows[name]["sweeps"] < s:  # converged: the library offers no more
            break
    for name in ("data-free", "none"):
        best = _chosen(best, rows[name]["loss"], rows[name]["distance"], name)
    return best[2]


def _table(pair) -> list[str]:
    kinds = list(KINDS)
    lines = [
        f"{pair['a']} + {pair['b']}",
        "| candidate | loss | held-out % | test % | " + " | ".join(kinds) + " |",
        "|---" * (4 + len(kinds)) + "|",
    ]
    for name, r in pair["candidates"].items():
        corr = " | ".join(f"{r['correlation'][k]:.3f}" for k in kinds)
        lines.append(
            f"| {name} | {r['loss']:.3f} | {100 * r['held-out']:.1f} | {100 * r['test']:.1f} "
            f"| {corr} |"
        )
    lines.append("picks: " + ", ".join(f"{rule}: {name}" for rule, name in pair["picks"].items()))
    return lines


def summary(results) -> list[str]:
    """Test accuracy (%) of each rule's pick, mean ± std (ddof 0) over the pairs, per pair."""
    lines = []
    for rule in RULES:
        x = 100 * np.array([p["candidates"][p["picks"][rule]]["test"] for p in results["pairs"]])
        each = ", ".join(f"{v:.1f}" for v in x)
        lines.append(f"{rule}: {x.mean():.1f} ± {x.std():.1f}% ({each})")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="Hugging Face ViT checkpoints (at least 2)")
    p.add_argument(
        "--max-sweeps",
        type=int,
        default=6,
        help=f"sweeps from the start (at least align_by_activations' {LIBRARY_SWEEPS})",
    )
    p.add_argument("--dataset", choices=sorted(TEST_IMAGES), default="fashion_mnist")
    p.add_argument("--images", type=int, help="test images (default: the whole split)")
    p.add_argument(
        "--held-out",
        type=int,
        help="labelled training images after the 1000 unlabeled ones (default: up to 2000)",
    )
    p.add_argument(
        "--descent-steps",
        type=int,
        default=0,
        help="also the choice refined by this many straight-through steps (a reference row)",
    )
    p.add_argument("--out", default="runs/activation-start")
    args = p.parse_args(argv)
    if args.images is None:
        args.images = TEST_IMAGES[args.dataset]
    check_images(p, args.images, args.dataset)
    check_checkpoints(p, args.dirs)
    check_image_shape(p, args.dirs, args.dataset)  # (an 8x8 ViT failed after the data loaded)
    splits = getattr(data, args.dataset)()  # (read once: `run` takes them)
    spare = len(splits.train.labels) - UNLABELED
    if args.held_out is None:
        args.held_out = min(2000, spare)
    if not 1 <= args.held_out <= spare:  # (a slice past the end is cut silently)
        p.error(f"--held-out must be in [1, {spare}] ({args.dataset}'s training split), got "
                f"{args.held_out}")  # fmt: skip
    for flag in ("max_sweeps", "descent_steps"):
        if (value := getattr(args, flag)) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    train.enable_compilation_cache()
    results = run(
        args.dirs,
        images=args.images,
        held_out=args.held_out,
        max_sweeps=args.max_sweeps,
        descent_steps=args.descent_steps,
        dataset=args.dataset,
        splits=splits,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "activation_start.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(summary(results)))
    print(f"wrote {out / 'activation_start.json'}")


if __name__ == "__main__":
    main()
