"""Merged test accuracy of every pair of image-classification ViTs, per alignment and method,
with the mean and spread over the pairs: Table 2 of `experiments.reproduce` without its
ablations and curves, for any set of checkpoints, any methods (``circuits`` and ``refit``
included) and any of `rotjax.data`'s image datasets (Fashion-MNIST by default).

    python -m experiments.pairs DIR [DIR ...] [--align "all + stream,activations"]
        [--methods average,circuits] [--dataset fashion_mnist] [--images N]
        [--descent-steps 300] [--out DIR]

Writes ``OUT/pairs.json`` (every cell of every pair) and prints the table. Activation starts
and statistics read 1000 training images of a fixed shuffle (the reproduction's).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import jax
import numpy as np

from experiments import fusion
from rotjax import data, train


def image_sets(
    images: int, unlabeled: int, held_out: int = 0, *, dataset: str = "fashion_mnist", splits=None
) -> tuple[dict, ...]:
    """``(test, unlabeled, held_out)`` arrays of `rotjax.data`'s ``dataset`` (one of
    ``TEST_IMAGES``; ``splits``: its splits, if already loaded): the first ``images`` test
    images with labels; from the reproduction's fixed shuffle of the training set (numpy seed
    0), its first ``unlabeled`` images (no labels) and the next ``held_out`` with labels."""
    splits = splits or getattr(data, dataset)()
    test = {k: v[:images] for k, v in splits.test.arrays().items()}
    order = np.random.default_rng(0).permutation(len(splits.train.labels))
    stats = {"images": splits.train.images[order[:unlabeled]]}
    pick = order[unlabeled : unlabeled + held_out]
    return test, stats, {k: v[pick] for k, v in splits.train.arrays().items()}


# The image datasets of `rotjax.data` with a fixed test split: its size, and the images' shape.
TEST_IMAGES = {
    "fashion_mnist": 10_000,
    "mnist_sample": data.MNIST_SAMPLE_TEST_SIZE,
    "digits": data.DIGITS_TEST_SIZE,
}
IMAGE_SHAPES = {"fashion_mnist": (28, 28, 1), "mnist_sample": (28, 28, 1), "digits": (8, 8, 1)}


def check_images(
    parser: argparse.ArgumentParser, images: int, dataset: str = "fashion_mnist"
) -> None:
    """Exit through ``parser`` unless ``images`` test images of ``dataset`` can be had (a slice
    of the test split took -5 for 9,995 and 20000 for 10,000, silently)."""
    n = TEST_IMAGES[dataset]
    if not 1 <= images <= n:
        parser.error(f"--images must be in [1, {n}] (the test split), got {images}")


def check_image_shape(parser: argparse.ArgumentParser, dirs, dataset: str) -> None:
    """Exit through ``parser`` unless every checkpoint of ``dirs`` takes ``dataset``'s images
    (a ViT of 28x28 images failed on 8x8 digits inside its patch embedding)."""
    h, w, c = IMAGE_SHAPES[dataset]
    for d in dirs:
        config = json.loads((Path(d) / "config.json").read_text())
        got = (config.get("image_size"), config.get("image_size"), config.get("num_channels"))
        if got != (h, w, c):
            parser.error(
                f"{d} takes {got[0]}x{got[1]}x{got[2]} images; {dataset}'s are {h}x{w}x{c}"
            )


def check_checkpoints(parser: argparse.ArgumentParser, dirs) -> None:
    """Exit through ``parser`` (status 2, one line) unless ``dirs`` are 2 or more checkpoint
    directories (each with a ``config.json``), before any work."""
    if len(dirs) < 2:
        parser.error("give at least 2 checkpoints")
    if missing := [d for d in dirs if not (Path(d) / "config.json").is_file()]:
        parser.error(f"not checkpoint directories (no config.json): {', '.join(missing)}")


def pairs(
    dirs,
    alignments,
    methods,
    *,
    images=10_000,
    unlabeled=1000,
    descent_steps=None,
    dataset="fashion_mnist",
    log=print,
) -> dict:
    """``{"endpoints": {dir: accuracy}, "pairs": [{"a", "b", alignment: {method: accuracy},
    "align_seconds": {alignment: seconds}}], "descent_steps": ..., "dataset": ...}``;
    ``descent_steps`` (None: `fusion.ALIGNMENTS`' 300) are the straight-through alignment's."""
    test, stats, _ = image_sets(images, unlabeled, dataset=dataset)
    st = fusion.ALIGNMENTS["straight-through"]
    steps = st["steps"] if descent_steps is None else descent_steps
    options = {"straight-through": {**st, "steps": steps}}
    out = {"endpoints": {}, "pairs": [], "descent_steps": steps, "dataset": dataset}
    for dir_a, dir_b in itertools.combinations(dirs, 2):
        pair = fusion.load_pair(dir_a, dir_b)
        evaluate = fusion.evaluator(pair.model, test)
        acc = functools.partial(_accuracy, evaluate)
        for d, p in ((dir_a, pair.a), (dir_b, pair.b)):
            out["endpoints"].setdefault(str(d), acc(p))
        row = {"a": str(dir_a), "b": str(dir_b)}
        variants = fusion.align_variants(
            pair, alignments, stats, key=jax.random.key(0), options=options
        )
        for name, v in variants.items():
            row[name] = {m: acc(fusion.merged(v["pair"], m, stats_data=stats)[0]) for m in methods}
            row.setdefault("align_seconds", {})[name] = v["seconds"]
            log(f"{Path(dir_a).parent.name} + {Path(dir_b).parent.name}, {name}: {row[name]}")
        out["pairs"].append(row)
    return out


def _accuracy(evaluate, params) -> float:
    return float(evaluate(params)["accuracy"])


def table(results, alignments, methods) -> list[str]:
    """Markdown rows: mean ± std (%) over the pairs, one row per method."""
    lines = ["| method | " + " | ".join(alignments) + " |", "|---" * (len(alignments) + 1) + "|"]
    for m in methods:
        cells = []
        for a in alignments:
            x = 100 * np.array([p[a][m] for p in results["pairs"]])
            cells.append(f"{x.mean():.1f} ± {x.std():.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="Hugging Face ViT checkpoints (at least 2)")
    p.add_argument("--align", default="all + stream,activations")
    p.add_argument("--methods", default="average,circuits")
    p.add_argument("--dataset", choices=sorted(TEST_IMAGES), default="fashion_mnist")
    p.add_argument("--images", type=int, default=None, help="test images (all of the split's)")
    p.add_argument("--out", default="runs/pairs")
    p.add_argument("--descent-steps", type=int, default=None, help="straight-through's steps (300)")
    args = p.parse_args(argv)
    if args.descent_steps is not None and args.descent_steps < 1:
        p.error(f"--descent-steps must be >= 1, got {args.descent_steps}")
    alignments = [a.strip() for a in args.align.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    if unknown := sorted(set(alignments) - set(fusion.ALIGNMENTS)):
        p.error(f"unknown alignments {unknown}; known: {sorted(fusion.ALIGNMENTS)}")
    if unknown := sorted(set(methods) - set(fusion.METHODS)):
        p.error(f"unknown methods {unknown}; known: {list(fusion.METHODS)}")
    images = TEST_IMAGES[args.dataset] if args.images is None else args.images
    check_images(p, images, args.dataset)
    check_checkpoints(p, args.dirs)
    check_image_shape(p, args.dirs, args.dataset)
    train.enable_compilation_cache()
    results = pairs(
        args.dirs,
        alignments,
        methods,
        images=images,
        descent_steps=args.descent_steps,
        dataset=args.dataset,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(json.dumps(results, indent=1) + "\n")
    ends = 100 * np.array(list(results["endpoints"].values()))
    print(f"endpoints: {ends.mean():.1f} ± {ends.std():.1f}% ({len(ends)} models)")
    print("\n".join(table(results, alignments, methods)))
    print(f"wrote {out / 'pairs.json'}")


if __name__ == "__main__":
    main()
