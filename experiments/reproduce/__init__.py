"""Re-measure the paper's claims in miniature on real offline data, and write a report.

    python -m experiments.reproduce [--quick | --smoke] [--out DIR] [--parts vision,language]
    python -m experiments.reproduce --report-only [--out DIR]   # re-render, compute nothing

Writes ``DIR/report.md`` (tables, figures, each claim with its number and a verdict), every
figure as PNG and every number as JSON (``DIR/results/*.json``); trained models are cached in
``DIR/models`` (training runs with Hugging Face checkpoints), and a part's results are reused
when its settings and models have not changed, so a rerun only recomputes what changed (the
language part keeps each replicate's merges too: a run cut short resumes there). With
``--parts``, a part not run is reported from its last results in ``DIR/results`` (of the same
mode); the report names the commit of the code that computed each part, and the packages'
versions and the machine (recorded beside the results, not in their key).

Modes: ``full`` (default; ViTs of ~88% from 3 seeds, MiniLM fine-tunes from 3 seeds; on 2 CPU
cores ~5 hours of training, then 2-3 hours of analysis: the README's Results give the times),
``--quick`` (the same pipeline on short runs and subsets, <= 15 minutes from nothing),
``--smoke`` (seconds: two ViTs of two steps, vision only; for the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from experiments import train as T
from experiments.reproduce import _language, _report, _vision
from experiments.reproduce._models import Settings, part_configs, read_results, results_key
from rotjax import train
from rotjax._atomic import write_whole

PARTS = {"vision": _vision.run, "language": _language.run}


# The experiments' modules a part's results depend on (the others: other experiments, and
# the report's rendering, `_report` and `experiments.plots`, which read results, never make them).
PIPELINE = ("__init__.py", "train.py", "fusion.py", "pairs.py", "reproduce/_models.py")
PIPELINE += ("reproduce/_language.py", "reproduce/_vision.py", "reproduce/__init__.py")


def _code() -> str:
    """The code a part's results depend on: rotjax and the experiments' `PIPELINE`, read once
    when a run starts (`main`: an edit during the run, before a later part, is not what that
    part ran)."""
    root = Path(__file__).resolve().parents[2]
    files = sorted(root.glob("rotjax/**/*.py")) + [root / "experiments" / f for f in PIPELINE]
    return "".join(f.read_text() for f in files)


def _key(settings: Settings, part: str, out: Path, code: str) -> str:
    """What a part's results depend on: the settings (but which parts run), the ``code``
    (`_code`) and the summaries of the part's models in ``out`` that `train.cached` would keep
    (a model of other settings or older data, e.g. token ids of another tokenizer, counts as
    not trained: its part is recomputed after training it afresh, not reused)."""
    models = []
    for config in part_configs(settings, part):
        run = out / "models" / config.name
        kept = T.finished(config, run) is not None
        models.append((run / "summary.json").read_text() if kept else f"{config.name}: none")
    return results_key(settings, code, label=part, after="".join(models))


def _commit() -> str | None:
    """The code's git commit (``+dirty`` with uncommitted changes), None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "--", "rotjax", "experiments").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _environment() -> dict:
    """What computed a part's results besides the code: the numerical packages' versions and
    the machine (recorded beside the results, not part of their key)."""
    import flax
    import jax
    import numpy
    import optax

    return {
        "python": platform.python_version(),
        **{m.__name__: m.__version__ for m in (jax, flax, optax, numpy)},
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def _last(out: Path, part: str) -> dict | None:
    """A part's last results in ``OUT/results``, None if absent or cut short by a crash."""
    return read_results(out / "results" / f"{part}.json")


MODE_FILE = "mode.txt"  # the mode of the runs in an output directory, written before them


def _modes(out: Path) -> set[str]:
    """The modes of the reproductions in ``out``: its `MODE_FILE`'s and its results'."""
    modes = {(_last(out, part) or {}).get("mode") for part in PARTS}
    with contextlib.suppress(FileNotFoundError):
        modes.add((out / MODE_FILE).read_text().strip())
    return modes - {None}


def run_part(settings: Settings, part: str, out: Path, log, code: str, commit: str | None) -> dict:
    """A part's results, reused when its key is unchanged; ``code`` (`_code`) and ``commit``
    (`_commit`) as read when the run started."""
    path = out / "results" / f"{part}.json"
    old = _last(out, part)
    if old is not None and old.get("key") == _key(settings, part, out, code):
        log(f"{part}: results unchanged, reused ({path})")
        return old
    tic = time.perf_counter()
    results = PARTS[part](settings, out, log, code=code, commit=commit)
    # The key after training (the models' summaries are part of it), of the code at the start.
    seconds = time.perf_counter() - tic
    keys = {"key": _key(settings, part, out, code), "mode": settings.mode, "commit": commit}
    recorded = dataclasses.asdict(dataclasses.replace(settings, parts=()))
    results = {**keys, "seconds": seconds, "environment": _environment(), **results}
    results["settings"] = recorded  # what the report says they were measured on
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(results, indent=1, default=float) + "\n")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short runs and subsets (<= 15 min)")
    mode.add_argument("--smoke", action="store_true", help="seconds: a pipeline check")
    p.add_argument("--out", help="output directory (default runs/reproduce[-quick])")
    p.add_argument("--parts", help="comma-separated: vision, language (default: the mode's)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the kept results of every part, computing nothing",
    )
    args = p.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    parts = None
    if args.parts is not None:
        parts = tuple(dict.fromkeys(s.strip() for s in args.parts.split(",") if s.strip()))
        if not parts or set(parts) - PARTS.keys():
            p.error(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
    if args.report_only and parts is not None:
        p.error("--report-only reports every part with kept results: drop --parts")
    settings = Settings.of(name, parts)
    out = Path(args.out or ("runs/reproduce" if name == "full" else f"runs/reproduce-{name}"))
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a directory")
    kept = [part for part in PARTS if (_last(out, part) or {}).get("mode") == settings.mode]
    if args.report_only and not kept:  # checked before anything is written
        p.error(f"--report-only: no {name}-mode results in {out / 'results'} to report")
    # Another mode's models share this mode's run names, and `train.cached` deletes a run of
    # another config to train it afresh: hours of full-mode training lost to a quick run.
    if not args.report_only and (others := _modes(out) - {name}):
        p.error(
            f"--out {out} holds a reproduction in {' and '.join(sorted(others))} mode, whose "
            f"models a {name}-mode run would delete and retrain: give another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        (out / MODE_FILE).write_text(name + "\n")
    train.enable_compilation_cache()
    tic = time.perf_counter()
    log = lambda text: print(text, file=sys.stderr, flush=True)
    code, commit = _code(), _commit()  # what this process runs: every part keyed by it
    run = () if args.report_only else settings.parts
    results = {part: run_part(settings, part, out, log, code, commit) for part in run}
    for part in PARTS.keys() - results.keys():  # not run now: its last results, if any
        last = _last(out, part)
        if last is not None and last.get("mode") == settings.mode:
            # Shown, but marked when the code, the settings or the models changed since.
            stale = last.get("key") != _key(settings, part, out, code)
            note = "; its code, settings or models changed since: marked stale" if stale else ""
            commit = last.get("commit")
            log(f"{part}: not run; the report shows its last results (commit {commit}{note})")
            results[part] = {**last, "stale": stale}
    results = {part: results[part] for part in PARTS if part in results}
    report = _report.write(settings, out, results)
    print(f"wrote {report} ({time.perf_counter() - tic:.0f} s)")
