"""`make demo`: what rotjax is for, in two parts.

1. **The symmetry** (seconds): the real all-MiniLM-L6-v2, moved by a random element of its
   whole symmetry group plus 1% noise, is aligned back onto the original by ``rotjax align``;
   its sentence embeddings are unchanged by the move (same function), and the aligned copy's
   weights land back on the original's.
2. **Fusion**: two small ViTs trained from different seeds on Fashion-MNIST (trained once,
   cached under ``$ROTJAX_CACHE``), merged by every method (refit included) with and without
   alignment: a table of test accuracies, the loss barrier along the linear path, the times,
   and a plot of the paths (``interpolation.png``).

The two parts run side by side (part 1 in a subprocess, its output first); ``--part`` runs one.

    python -m experiments.demo [--workdir DIR] [--smoke] [--part {both,symmetry,fusion}]
        [--descent-steps N]

``--descent-steps N`` adds a row: the activation alignment refined by N steps of
straight-through descent (`rotjax.merge.align_straight_through`; 0.25-0.3 s a step on this
CPU, so not in the default run, whose cached time is about a minute); fusion part only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import fusion, plots
from experiments import train as T
from experiments.pairs import image_sets
from rotjax import cli, data, hf, merge, train
from rotjax import symmetry as sym
from rotjax.models import family

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The quick brown fox jumps over the lazy dog.",
    "Transformers compute similar functions with very different weights.",
    "Rotating the query and key projections leaves attention unchanged.",
    "It rained all day, so the match was postponed.",
]
# A 4-layer version of the project's Fashion-MNIST ViT, one epoch: ~2 minutes of training.
DEMO_VIT = dataclasses.replace(T.VIT_FASHION_MNIST, num_hidden_layers=4)
ALIGNMENTS = ("none", "paper", "all + stream", "activations")
METHODS = ("average", "fisher", "regmean", "ot-acts", "refit")
# The data-free alignment with the stream (and the activation variant's data-free candidate)
# stopped after 10 coordinate-descent sweeps, not `match.align`'s 50: on the demo pair the
# objective is within 0.3% of its 50-sweep value by then (92.1 vs 91.9) and the average's
# accuracy the same within a point or two (67.1% vs 65.5%), at a fifth of the sweeps
# (2026-12-04).
MAX_SWEEPS = 10


@functools.partial(jax.jit, static_argnums=0)
def _embed(config, params, input_ids, attention_mask):
    out = family(config).Model(config).apply({"params": params}, input_ids, attention_mask)
    mask = attention_mask[..., None].astype(jnp.float32)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def embed(config, params, batch):
    """Mean-pooled, unit-normalised sentence embeddings (one program for the three models)."""
    return np.asarray(_embed(config, params, batch["input_ids"], batch["attention_mask"]))


def symmetry_part(work: Path, solve: str, seed: int = 0) -> None:
    print("== 1. The symmetry: a scrambled all-MiniLM-L6-v2, aligned back ==\n", flush=True)
    minilm = data.minilm_dir()
    config, params = hf.load(minilm)
    spec = family(config).symmetry_spec(config)
    key = jax.random.key(seed)
    g = sym.sample(spec, key)
    copy = sym.apply(spec, params, g)
    leaves, treedef = jax.tree.flatten(copy)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    noisy = [
        x + 0.01 * jnp.std(x) * jax.random.normal(k, x.shape)
        for k, x in zip(keys, leaves, strict=True)
    ]
    copy = jax.tree.unflatten(treedef, noisy)
    hf.save(work / "copy", config, copy, source=minilm, overwrite=True)
    shutil.rmtree(work / "aligned", ignore_errors=True)
    print(f"$ rotjax align {minilm} {work / 'copy'} --out {work / 'aligned'} --solve {solve}")
    if cli.main(
        ["align", str(minilm), str(work / "copy"), "--out", str(work / "aligned"), "--solve", solve]
    ):
        raise SystemExit("rotjax align failed")
    _, aligned = hf.load(work / "aligned")
    batch = data.tokenize(SENTENCES, max_length=32, tokenizer_dir=minilm)
    e_orig, e_copy, e_aligned = (embed(config, p, batch) for p in (params, copy, aligned))
    print("\nsentence embeddings (5 real sentences, unit-normalised), max |difference|:")
    print(f"  copy         vs original   {np.abs(e_copy - e_orig).max():.4f}  (permuted basis)")
    print(f"  aligned copy vs original   {np.abs(e_aligned - e_orig).max():.4f}")
    # Their cosine similarities, which no basis of the stream changes (the alignment may move
    # the copy's stream or not, depending on --solve).
    same = np.abs(e_aligned @ e_aligned.T - e_copy @ e_copy.T).max()
    print(f"  aligned copy vs copy       {same:.2e}  (same function: sentence similarities)\n")


def train_vits(cache: Path, smoke: bool) -> tuple[list, float]:
    """The two ViTs' run summaries (trained first if not cached) and the seconds of training."""
    summaries, seconds = [], 0.0
    for seed in (0, 1):
        config = T.Config(
            name=f"demo-vit-s{seed}", model="vit", dataset="fashion_mnist", seed=seed,
            vit_config=DEMO_VIT, num_epochs=1.0, warmup_fraction=0.1, checkpoint_every=None,
        )  # fmt: skip
        if smoke:  # a 1-layer, 16-wide ViT: seconds
            tiny = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32)
            config = T.smoke(
                dataclasses.replace(config, vit_config=dataclasses.replace(DEMO_VIT, **tiny))
            )
        workdir = cache / ("demo-smoke" if smoke else "demo") / config.name
        if T.finished(config, workdir) is None:
            print(f"training {config.name} (once; cached in {workdir})", flush=True)
        tic = time.perf_counter()
        summaries.append(T.cached(config, workdir, progress=True))
        seconds += time.perf_counter() - tic
    return summaries, seconds


def fusion_part(cache: Path, work: Path, smoke: bool, descent_steps: int = 0) -> None:
    print("== 2. Fusion: two ViTs from different seeds on Fashion-MNIST ==\n", flush=True)
    (a, b), trained = train_vits(cache, smoke)
    pair = fusion.load_pair(a["hf"], b["hf"])
    # A, B, 20 merges and 6 new points of the paths evaluated, ~0.45 s each on 2 cores; 250
    # unlabeled images for the statistics, the activation start and refit: with 500 the table
    # was the same within 3 points (refit 76-78%, RegMean 56-71% either way; 2026-12-03) and
    # those steps took twice as long.
    test, unlabeled, _ = image_sets(256 if smoke else 1000, 32 if smoke else 250)
    evaluate = fusion.evaluator(pair.model, test)
    metrics = lambda p: {k: v for k, v in evaluate(p).items() if k in ("loss", "accuracy")}
    ends = metrics(pair.a), metrics(pair.b)
    print(
        f"A {a['name']}: {100 * ends[0]['accuracy']:.1f}%   "
        f"B {b['name']}: {100 * ends[1]['accuracy']:.1f}%"
    )
    tic = time.perf_counter()
    alignments = ALIGNMENTS + (("straight-through",) if descent_steps else ())
    steps = {**fusion.ALIGNMENTS["straight-through"], "steps": descent_steps}
    variants = fusion.align_variants(
        pair,
        alignments,
        unlabeled,
        key=jax.random.key(0),
        options={"straight-through": steps},
        max_sweeps=MAX_SWEEPS,
    )
    # Fisher from one sampled label per image: unbiased, and 10x cheaper than the exact
    # expectation over the 10 classes (the reproduction's vision tables use the exact one).
    rows = fusion.merge_rows(
        variants, METHODS, evaluate, stats_data=unlabeled, fisher_kind="sampled",
        key=jax.random.key(0), reuse_statistics=True,  # A's, for every alignment of B
    )  # fmt: skip
    merged_seconds = time.perf_counter() - tic
    print(
        f"\nmerged test accuracy (%), {len(test['labels'])} test images "
        f"(statistics: {len(unlabeled['images'])} unlabeled training images; Fisher sampled;\n"
        "refit: the average, every dense layer refitted by least squares on those images):"
    )
    w = max(14, *map(len, alignments))
    print(f"  {'alignment':{w}s}" + "".join(f"{m:>10s}" for m in METHODS) + f"{'align s':>10s}")
    for name in alignments:
        cells = [
            next(r for r in rows if r["alignment"] == name and r["method"] == m) for m in METHODS
        ]
        line = "".join(f"{100 * c['accuracy']:10.1f}" for c in cells)
        print(f"  {name:{w}s}{line}{variants[name]['seconds']:10.1f}")
    print(
        "  (align s: compilation included, the first alignment paying most of it; activations'\n"
        f"  includes its data-free candidate, the all + stream alignment: {MAX_SWEEPS} sweeps"
        + (
            f";\n  straight-through: activations, then {descent_steps} steps of descent)"
            if descent_steps
            else ")"
        )
    )
    lambdas = np.linspace(0, 1, 3 if smoke else 5)
    names = ("none", "all + stream", "activations")[: 2 if smoke else 3]
    names += ("straight-through",) if descent_steps else ()

    def path(name):
        # Measured already: the ends (an aligned pair computes A's and B's functions) and the
        # midpoint (the same params as the average's row).
        row = next(r for r in rows if r["alignment"] == name and r["method"] == "average")
        known = {0.0: ends[0], 0.5: {k: row[k] for k in ends[0]}, 1.0: ends[1]}
        p = variants[name]["pair"]
        return merge.curve(metrics, p.a, p.b, lambdas, known=known)

    curves = {n: path(n) for n in names}
    print(f"\nalong the linear path A -> B (aligned), on {len(test['labels'])} test images:")
    for name, c in curves.items():
        print(
            f"  {name:{w}s} loss barrier {c.barrier['loss']:.3f}, midpoint accuracy "
            f"{100 * c.metrics['accuracy'][len(lambdas) // 2]:.1f}%"
        )
    png = plots.lines(
        work / "interpolation.png", lambdas, {n: c.metrics["accuracy"] for n, c in curves.items()},
        xlabel="λ (0 = A, 1 = B)", ylabel="test accuracy", title="Two ViTs, the linear path",
        panels={"test loss": {n: c.metrics["loss"] for n, c in curves.items()}},
    )  # fmt: skip
    print(
        f"\ntimes: training {trained:.0f} s (0 when cached), aligning + merging + evaluating "
        f"{merged_seconds:.0f} s; plot: {png}"
    )


class _Held(io.TextIOBase):
    """A text stream that holds what is written to it until `release`, then writes through."""

    def __init__(self, out):
        self.out, self.held, self.released = out, [], False
        self.lock = threading.Lock()

    def write(self, text):
        with self.lock:
            if self.released:
                return self.out.write(text)
            self.held.append(text)
            return len(text)

    def flush(self):
        with self.lock:
            if self.released:
                self.out.flush()

    def release(self):
        with self.lock:
            self.out.write("".join(self.held))
            self.out.flush()
            self.held.clear()
            self.released = True


def both_parts(work: Path, solve: str, smoke: bool, descent_steps: int = 0) -> None:
    """Part 1 in a subprocess while part 2 runs here: on 2 cores a cached run keeps ~1.4 of
    them busy (tracing and small programs), and the two processes share no GIL. Part 1's
    output is shown as it comes; part 2's, its progress bars (stderr) included, is held until
    part 1 is done. A fresh run's training starts at once, beside part 1."""
    out = sys.stdout
    cmd = [sys.executable, "-m", "experiments.demo", "--part", "symmetry"]
    cmd += ["--workdir", str(work), "--solve", solve]
    root = Path(__file__).resolve().parents[1]
    # Its lines as they are printed; on the CPU, wherever part 2 runs: a GPU's memory is taken
    # by the first process, a TPU's device by one process only.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    held, held_err = _Held(out), _Held(sys.stderr)

    def relay():
        with proc.stdout:
            for line in proc.stdout:
                out.write(line)
                out.flush()
        proc.wait()
        held.release()
        held_err.release()

    thread = threading.Thread(target=relay, name="demo part 1", daemon=True)
    thread.start()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held_err):
            fusion_part(data.default_cache_dir(), work, smoke, descent_steps)
    except BaseException:
        proc.kill()
        raise
    finally:
        thread.join()
    if proc.returncode:
        raise SystemExit(f"the symmetry part failed (exit status {proc.returncode})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the checkpoints and the plot here")
    parser.add_argument(
        "--solve", type=cli.blocks, default="rotation,scale,ffn,heads,residual",
        help="the groups the symmetry part solves (comma-separated)",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="the fusion part on 1-layer models, trained for seconds (part 1 is the real MiniLM)",
    )  # fmt: skip
    parser.add_argument(
        "--part", choices=("both", "symmetry", "fusion"), default="both",
        help="run one part only (both: side by side, part 1 in a subprocess)",
    )  # fmt: skip
    parser.add_argument(
        "--descent-steps", type=int, default=0, metavar="N",
        help="add the activation alignment refined by N steps of straight-through descent",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.workdir and Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        parser.error(f"--workdir {args.workdir} is a file, not a directory")
    if args.descent_steps < 0:
        parser.error(f"--descent-steps must be >= 0, got {args.descent_steps}")
    if args.descent_steps and args.part == "symmetry":
        parser.error("--descent-steps applies to the fusion part: not with --part symmetry")
    if args.part == "fusion" and args.solve != cli.blocks(parser.get_default("solve")):
        parser.error("--solve applies to the symmetry part: not with --part fusion")
    if args.smoke and args.part == "symmetry":
        parser.error("--smoke applies to the fusion part: not with --part symmetry")
    # Every program cached, however quick to compile: a cached demo is ~500 small programs.
    train.enable_compilation_cache(min_compile_seconds=0.0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rotjax-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    solve = ",".join(args.solve)
    if args.part == "symmetry":
        symmetry_part(work, solve)
        return
    if args.part == "fusion":
        fusion_part(data.default_cache_dir(), work, args.smoke, args.descent_steps)
    else:
        both_parts(work, solve, args.smoke, args.descent_steps)
    print(f"\ndemo done in {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
