"""The ``rotjax`` command: align Hugging Face checkpoints, inspect their symmetries.

This module is the application layer: the only place in the package that prints (to stdout
for results, stderr for progress and errors).

    rotjax inspect DIR
    rotjax align ANCHOR_DIR MODEL_DIR --out DIR [--solve rotation,scale,ffn] [--layers 0,1]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import tqdm

from rotjax import hf, match
from rotjax import symmetry as sym
from rotjax.models import family
from rotjax.tree import flatten

EPILOG = """\
groups (--solve):
  rotation  per-head orthogonal R on query/key and on value/output (the paper's Thm. 4.1)
  scale     per-head rescaling Q*a, K/a and V*a, O/a (closed form, paper Eq. 11-12)
  ffn       permutation of the FFN hidden units of every layer (and of pooler units)
  heads     permutation of whole heads within a layer (beyond the paper)
  residual  one permutation of the residual stream (beyond the paper; coordinate descent)
The default, rotation,scale,ffn, is the paper's method. The aligned model computes exactly
what MODEL_DIR computes; only its weights move closer to ANCHOR_DIR's.

examples:
  rotjax inspect ./my-bert
  rotjax align ./bert-a ./bert-b --out ./bert-b-aligned
  rotjax align ./bert-a ./bert-b --out ./b2 --solve rotation,scale,ffn,heads,residual
"""


def _spec(config):
    return family(config).symmetry_spec(config)


def inspect(args) -> int:
    config, params = hf.load(args.dir)
    spec = _spec(config)
    kind = f"{config.model_type} ({config.task or 'encoder'})"
    paths, leaves, _ = flatten(params)
    print(f"{args.dir}: {kind}")
    print(
        f"  layers {config.num_hidden_layers}, hidden {config.hidden_size}, heads "
        f"{config.num_attention_heads} x {config.head_dim}, ffn {config.intermediate_size}"
    )
    print(f"  parameters {sum(x.size for x in leaves):,} in {len(paths)} tensors")
    roles = collections.Counter(g.role for g in spec.groups.values())
    print("  symmetry groups:")
    for role in sym.ROLES:
        groups = [g for g in spec.groups.values() if g.role == role]
        if groups:
            g = groups[0]
            size = (
                f"{g.size}"
                if g.kind == "perm"
                else f"{g.size} heads" + (f" x O({g.dim})" if g.kind == "orth" else "")
            )
            print(f"    {role:12s} {g.kind:5s} x{roles[role]:<3d} size {size}")
    dof = sum(
        math.lgamma(g.size + 1) / math.log(10) * math.prod(g.batch)
        for g in spec.groups.values()
        if g.kind == "perm"
    )
    cont = sum(
        math.prod(g.batch) * g.size * (g.dim * (g.dim - 1) // 2 if g.kind == "orth" else 1)
        for g in spec.groups.values()
        if g.kind != "perm"
    )
    print(f"  continuous dimensions {cont:,}; discrete elements 10^{dof:,.0f}")
    return 0


def _layer_of(path: str) -> str:
    m = re.search(r"layer_(\d+)", path)
    return f"layer_{m.group(1)}" if m else "global"


def align(args) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty")
    solve = tuple(s for s in args.solve.split(",") if s)
    layers = None if args.layers is None else [int(i) for i in args.layers.split(",") if i]
    with tqdm.tqdm(total=4, desc="rotjax align", file=sys.stderr, disable=args.quiet) as steps:
        res, load_seconds, save_seconds = _align_steps(args, out, solve, layers, steps)
    _report(args, out, solve, layers, res, load_seconds, save_seconds)
    return 0


def _align_steps(args, out, solve, layers, steps):
    tic = time.perf_counter()
    steps.set_postfix_str("loading anchor")
    a_config, a_params = hf.load(args.anchor)
    steps.update()
    steps.set_postfix_str("loading model")
    b_config, b_params = hf.load(args.model)
    steps.update()
    if a_config != b_config:
        diff = {
            k: (v, getattr(b_config, k))
            for k, v in vars(a_config).items()
            if getattr(b_config, k) != v
        }
        raise ValueError(f"architectures differ (anchor vs model): {diff}")
    load_seconds = time.perf_counter() - tic
    steps.set_postfix_str(f"aligning {','.join(solve)}")
    res = match.align(
        _spec(a_config),
        a_params,
        b_params,
        solve=solve,
        layers=layers,
        solver=args.solver,
        residual_init=args.residual_init,
        max_sweeps=args.max_sweeps,
        key=jax.random.key(args.seed),
    )
    steps.update()
    steps.set_postfix_str("writing")
    tic = time.perf_counter()
    has_tokenizer = any((Path(args.model) / f).is_file() for f in hf.TOKENIZER_FILES)
    hf.save(out, b_config, res.params, tokenizer_from=args.model if has_tokenizer else None)
    steps.update()
    return res, load_seconds, time.perf_counter() - tic


def _report(args, out, solve, layers, res, load_seconds, save_seconds):
    d = res.diagnostics
    per_layer: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for path, (before, after) in d.params.items():
        per_layer[_layer_of(path)][0] += before
        per_layer[_layer_of(path)][1] += after
    report = {
        "anchor": str(args.anchor),
        "model": str(args.model),
        "solve": list(solve),
        "layers": layers,
        # Squared distances to the anchor, summed over every parameter ("all") and over the
        # parameters some solved group acts on ("touched"; the others cannot move).
        "distance": {
            "all": {"before": d.distance_before, "after": d.distance_after},
            "touched": {"before": d.touched_before, "after": d.touched_after},
        },
        "per_layer": {k: {"before": v[0], "after": v[1]} for k, v in sorted(per_layer.items())},
        "per_group": {g: {"before": b, "after": a} for g, (b, a) in sorted(d.groups.items())},
        "history": d.history,
        "sweeps": d.sweeps,
        "seconds": {**d.seconds, "load": load_seconds, "save": save_seconds},
    }
    (out / "alignment.json").write_text(json.dumps(report, indent=2))
    print(
        f"squared distance to anchor, all parameters: {d.distance_before:.6g} -> "
        f"{d.distance_after:.6g} ({_less(d.distance_before, d.distance_after)}); those the "
        f"solved groups act on: {d.touched_before:.6g} -> {d.touched_after:.6g} "
        f"({_less(d.touched_before, d.touched_after)})"
    )
    print(f"aligned in {d.seconds['total']:.2f}s ({d.sweeps} sweep(s)); wrote {out}")
    for layer, v in sorted(per_layer.items(), key=lambda kv: (len(kv[0]), kv[0])):
        print(f"  {layer:10s} {v[0]:12.6g} -> {v[1]:12.6g}")


def _less(before: float, after: float) -> str:
    return f"{100 * (1 - after / max(before, 1e-30)):.1f}% less"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rotjax",
        description="Align transformer checkpoints through their parameter symmetries.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="architecture, symmetry groups and parameter counts")
    i.add_argument("dir", help="Hugging Face checkpoint directory (config.json + weights)")
    i.set_defaults(run=inspect)
    a = sub.add_parser(
        "align",
        help="align MODEL_DIR to ANCHOR_DIR and write it as a Hugging Face checkpoint",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("anchor", help="checkpoint to align to (model A)")
    a.add_argument("model", help="checkpoint to align (model B); left unchanged")
    a.add_argument("--out", required=True, help="new directory for the aligned model + report")
    a.add_argument("--solve", default=",".join(match.PAPER), help="comma-separated groups")
    a.add_argument("--layers", help="comma-separated layer indices (default: all)")
    a.add_argument("--solver", choices=match.SOLVERS, default="scipy", help="assignment solver")
    a.add_argument("--residual-init", choices=("independent", "identity"), default="independent")
    a.add_argument("--max-sweeps", type=int, help="coordinate-descent sweeps (default: auto)")
    a.add_argument("--seed", type=int, default=0, help="block order of later sweeps")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(run=align)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, ImportError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rotjax {args.command}: error: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
