"""The linear path between two image ViTs after each alignment: test loss and accuracy at
every λ, each path's barrier and midpoint, as a plot and JSON. With the default alignments and
Fashion-MNIST it is the figure of the README's residual-stream section: none, the paper's
groups, permutations (heads, FFN units, the stream) and rotations (the stream rotation on top).

    python -m experiments.paths DIR_A DIR_B [--align none,paper,all,"all + stream"]
        [--dataset fashion_mnist] [--images 2000] [--points 11] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from experiments import fusion, plots
from experiments.pairs import (
    TEST_IMAGES,
    check_checkpoints,
    check_image_shape,
    check_images,
    image_sets,
)
from rotjax import merge, train


def paths(
    dir_a, dir_b, alignments, *, images=2000, points=11, unlabeled=1000, dataset="fashion_mnist"
) -> dict:
    """``{alignment: {"lambdas", "metrics", "barrier", "seconds", "distance"}}`` on the first
    ``images`` test images of `rotjax.data`'s ``dataset``; activation starts read the first
    ``unlabeled`` training images of a fixed shuffle."""
    pair = fusion.load_pair(dir_a, dir_b)
    test, stats, _ = image_sets(images, unlabeled, dataset=dataset)
    evaluate = fusion.evaluator(pair.model, test)
    metrics = lambda p: {k: v for k, v in evaluate(p).items() if k in ("loss", "accuracy")}
    variants = fusion.align_variants(pair, alignments, stats, key=jax.random.key(0))
    out = {}
    for name, v in variants.items():
        c = merge.curve(metrics, v["pair"].a, v["pair"].b, np.linspace(0.0, 1.0, points))
        out[name] = {
            "lambdas": c.lambdas.tolist(),
            "metrics": {k: x.tolist() for k, x in c.metrics.items()},
            "barrier": c.barrier,
            "seconds": v["seconds"],
            "distance": v["distance"],
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--align", default="none,paper,all,all + stream")
    p.add_argument("--dataset", choices=sorted(TEST_IMAGES), default="fashion_mnist")
    p.add_argument(
        "--images", type=int, help="test images per point (default: 2000, or the whole split)"
    )
    p.add_argument("--points", type=int, default=11, help="λ values from 0 to 1 (odd: 0.5 in)")
    p.add_argument("--out", default="runs/paths")
    args = p.parse_args(argv)
    if args.points < 3 or args.points % 2 == 0:  # the printed midpoint is λ = 0.5
        p.error(f"--points must be odd and >= 3, got {args.points}")
    if args.images is None:
        args.images = min(2000, TEST_IMAGES[args.dataset])
    check_images(p, args.images, args.dataset)
    check_checkpoints(p, [args.dir_a, args.dir_b])
    # (an 8x8 ViT failed after the data loaded)
    check_image_shape(p, [args.dir_a, args.dir_b], args.dataset)
    alignments = [a.strip() for a in args.align.split(",")]
    unknown = sorted(set(alignments) - set(fusion.ALIGNMENTS))
    if unknown:
        p.error(f"unknown alignments {unknown}; known: {sorted(fusion.ALIGNMENTS)}")
    train.enable_compilation_cache()
    result = paths(
        args.dir_a,
        args.dir_b,
        alignments,
        images=args.images,
        points=args.points,
        dataset=args.dataset,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paths.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    lam = next(iter(result.values()))["lambdas"]
    png = plots.lines(
        out / "paths.png", lam, {n: r["metrics"]["accuracy"] for n, r in result.items()},
        xlabel="λ (0 = A, 1 = aligned B)", ylabel="test accuracy",
        title=f"The linear path between two ViTs ({args.images} {args.dataset} test images)",
        panels={"test loss": {n: r["metrics"]["loss"] for n, r in result.items()}},
    )  # fmt: skip
    mid = len(lam) // 2
    for name, r in result.items():
        print(
            f"{name:14s} loss barrier {r['barrier']['loss']:.3f}, midpoint accuracy "
            f"{100 * r['metrics']['accuracy'][mid]:.1f}%, aligned in {r['seconds']:.1f} s"
        )
    print(f"wrote {png} and {out / 'paths.json'}")


if __name__ == "__main__":
    main()
