"""Train the model pairs that rotjax aligns and merges, in one command.

* ViTs from scratch on Fashion-MNIST, seeds ``0 .. N-1`` (pairs: same data, different seeds).
* all-MiniLM-L6-v2 fine-tunes: one per WordNet dataset (glosses, examples; shared 16-class
  label space) with seed 0, plus seeds ``1 .. N-1`` on the glosses (pairs: same pretrained
  start, different datasets; and same dataset, different head seeds and batch orders).

Every run is an `experiments.train.train_and_evaluate` run in ``OUT/<run>/`` (checkpoints,
``metrics.jsonl``, the final model as a Hugging Face checkpoint in ``hf/``); finished runs
of the same config are skipped, runs of another config (an edited preset) trained afresh, and
interrupted runs resume from their checkpoints.
``OUT/summary.json`` and ``OUT/summary.md`` tabulate runs and pairs.

Usage::

    python -m experiments.make_pairs --quick            # ~10 minutes on a 2-core CPU
    python -m experiments.make_pairs --out runs/pairs   # full mode (hours on a CPU)

Full mode, measured on the 2-core CPU (seed 0, machine shared with other jobs):

* ViT, 10 epochs of batch 128 (4680 steps), no augmentation: test accuracy 88.12%, macro-F1
  0.881, 33 min (2.9 steps/s). The same run with flips and shifts underfits: 86.96%, 61 min on a
  busier machine. Eval accuracy by step: 82.7% (1000), 85.5% (2000), 87.5% (3000), 88.1% (4000).
* MiniLM (batch 32, 48 tokens, AdamW 1e-4, seed 0), measured on the idle machine:
  glosses, 2 epochs (1322 steps): test accuracy 80.05%, macro-F1 0.765 (majority baseline
  7.6%), 33 min; examples, 3 epochs (1395 steps): test accuracy 46.34%, macro-F1 0.409
  (majority 12.6%), 36 min. Eval accuracy by step: glosses 73.9% (500), 77.9% (1000);
  examples 40.5% (500), 41.8% (1000). Example sentences name their class far less directly
  than definitions do, hence the lower ceiling.

``--quick`` (measured: 8 min 23 s for the 5 runs) trains on subsets with a short schedule:
numbers that check the pipeline, not the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from experiments import train as T
from rotjax import train
from rotjax.cli._main import _positive_int as positive_int  # the CLI's count type


def plan(
    num_seeds: int, *, quick: bool, smoke: bool = False
) -> tuple[list[T.Config], list[tuple[str, str, str]]]:
    """The runs and the pairs ``(kind, run a, run b)`` of a make_pairs invocation."""
    runs = [T.vit_fashion_mnist(name=f"vit-fashion_mnist-s{s}", seed=s) for s in range(num_seeds)]
    runs.append(T.minilm_wordnet("wordnet_glosses", name="minilm-glosses-s0", seed=0))
    runs.append(T.minilm_wordnet("wordnet_examples", name="minilm-examples-s0", seed=0))
    runs += [
        T.minilm_wordnet("wordnet_glosses", name=f"minilm-glosses-s{s}", seed=s)
        for s in range(1, num_seeds)
    ]
    if quick:
        runs = [T.quick(c) for c in runs]
    if smoke:
        runs = [T.smoke(c) for c in runs]
    pairs = [
        ("seeds", "vit-fashion_mnist-s0", f"vit-fashion_mnist-s{s}") for s in range(1, num_seeds)
    ]
    pairs.append(("datasets", "minilm-glosses-s0", "minilm-examples-s0"))
    pairs += [("seeds", "minilm-glosses-s0", f"minilm-glosses-s{s}") for s in range(1, num_seeds)]
    return runs, pairs


def markdown(summaries: list[dict], pairs: list[tuple[str, str, str]], total: float) -> str:
    lines = [
        "| run | dataset | seed | steps | train ex. | test ex. | test acc | macro-F1 | "
        "majority | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        t = s["test"]
        lines.append(
            f"| {s['name']} | {s['dataset']} | {s['seed']} | {s['num_steps']} | "
            f"{s['train_examples']} | {t['count']} | {t['accuracy']:.4f} | {t['macro_f1']:.4f} | "
            f"{s['majority_baseline']:.4f} | {s['wall_seconds']:.0f} |"
        )
    lines += ["", "| pair | a | b |", "|---|---|---|"]
    lines += [f"| {kind} | {a} | {b} |" for kind, a, b in pairs]
    lines += ["", f"Total wall time: {total:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Train ViT and MiniLM pairs for alignment.")
    p.add_argument("--out", help="default runs/pairs (-quick, -smoke in those modes)")
    p.add_argument("--quick", action="store_true", help="subsets and short schedules (~10 min)")
    p.add_argument("--smoke", action="store_true", help="two steps per run (a pipeline check)")
    p.add_argument("--runs", default="", help="only the runs whose name contains this")
    p.add_argument(
        "--num-seeds", type=positive_int, default=2, help="ViT seeds and MiniLM glosses seeds"
    )
    p.add_argument("--force", action="store_true", help="retrain runs that have a summary")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    train.enable_compilation_cache()
    mode = "-smoke" if args.smoke else "-quick" if args.quick else ""
    out = Path(args.out or f"runs/pairs{mode}")  # by default never full mode's directory
    runs, pairs = plan(args.num_seeds, quick=args.quick, smoke=args.smoke)
    if not (chosen := [r for r in runs if args.runs in r.name]):  # (an empty summary replaced
        # the one in --out)
        p.error(f"--runs {args.runs!r} matches no run: {sorted(r.name for r in runs)}")
    runs = chosen
    out.mkdir(parents=True, exist_ok=True)
    names = {r.name for r in runs}
    pairs = [p for p in pairs if p[1] in names and p[2] in names]
    begin = time.perf_counter()
    summaries = []
    for config in runs:
        done = T.finished(config, out / config.name)
        if done is not None and not args.force:
            summaries.append(done)
            print(f"{config.name}: done before, skipped")
            continue
        if args.force and (out / config.name).exists():
            shutil.rmtree(out / config.name)
        print(f"{config.name}: training ({dataclasses.asdict(config)['num_epochs']} epochs)")
        # a run of another config (an edited preset) is trained afresh
        s = T.cached(config, out / config.name, progress=not args.no_progress)
        print(
            f"{config.name}: test accuracy {s['test']['accuracy']:.4f}, macro-F1 "
            f"{s['test']['macro_f1']:.4f} (majority {s['majority_baseline']:.4f}), "
            f"{s['wall_seconds']:.0f} s"
        )
        summaries.append(s)
    total = time.perf_counter() - begin
    report = {
        "quick": args.quick,
        "smoke": args.smoke,
        "runs": summaries,
        "pairs": pairs,
        "wall_seconds": total,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(summaries, pairs, total)
    (out / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
