"""``rotjax align ANCHOR MODEL --out DIR``: align MODEL to ANCHOR, write it as a checkpoint."""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import jax

from rotjax import hf, match
from rotjax.cli._common import (
    CLIError,
    check_finite,
    checked_out_dir,
    load_models,
    pooler_note,
    progress,
    reason,
    report_json,
    save,
    show_notes,
)
from rotjax.match._align import absent_blocks

EPILOG = """\
groups (--solve):
  rotation  per-head orthogonal R on query/key and on value/output (the paper's Thm. 4.1)
  scale     per-head rescaling Q*a, K/a and V*a, O/a (closed form, paper Eq. 11-12)
  ffn       permutation of the FFN hidden units of every layer (and of pooler units)
  heads     permutation of whole heads within a layer (beyond the paper)
  query_heads  grouped-query attention: permutation of the query heads inside each key-value
            head's group (beyond the paper)
  residual  one permutation of the residual stream (beyond the paper; coordinate descent)
  stream    an orthogonal rotation of the residual stream (pre-norm models such as ViT, put
            in canonical form first: norms folded into the layers that read them, the stream
            centred; the written model is that form, a standard checkpoint, aligned to the
            anchor's canonical form: compare or merge it with that form, not with ANCHOR_DIR's
            stored weights; `rotjax merge --align all` does both)
  all       every block the model has (those it lacks are noted); paper: rotation,scale,ffn
The default, rotation,scale,ffn, is the paper's method. The aligned model computes exactly
what MODEL_DIR computes; only its weights move closer to ANCHOR_DIR's. (A bare encoder's
hidden states are its output: residual and stream give them in ANCHOR_DIR's basis, the same
vectors permuted or rotated; its pooler output never moves.)

examples:
  rotjax inspect ./my-bert
  rotjax align ./bert-a ./bert-b --out ./bert-b-aligned
  rotjax align ./bert-a ./bert-b --out ./b2 --solve rotation,scale,ffn,heads,residual
"""


def add_arguments(a, *, blocks, positive_int, layer_list, seed) -> None:
    a.add_argument("anchor", help="checkpoint to align to (model A)")
    a.add_argument("model", help="checkpoint to align (model B); left unchanged")
    a.add_argument("--out", required=True, help="new directory for the aligned model + report")
    a.add_argument(
        "--solve",
        type=blocks,
        default=match.PAPER,
        help=f"comma-separated blocks, or all (default paper: {','.join(match.PAPER)})",
    )
    a.add_argument("--layers", type=layer_list, help="comma-separated layer indices (all)")
    a.add_argument(
        "--solver", choices=match.SOLVERS, default="scipy", help="assignment solver (default scipy)"
    )
    a.add_argument(
        "--residual-init",
        choices=match.RESIDUAL_INITS,
        help="with residual or stream (independent)",
    )
    a.add_argument("--max-sweeps", type=positive_int, help="coordinate-descent sweeps (auto)")
    a.add_argument("--seed", type=seed, default=0, help="block order of later sweeps")
    a.add_argument("--quiet", action="store_true", help="no progress bar")


def _layer_of(path: str) -> str:
    m = re.search(r"layer_(\d+)", path)
    return f"layer_{m.group(1)}" if m else "global"


def run(args) -> int:
    out = checked_out_dir(args.out, [args.anchor, args.model])
    named = {("all",): match.ALL, ("paper",): match.PAPER}
    solve = named.get(args.solve, args.solve)
    if args.residual_init is not None and not {"residual", "stream"} & set(solve):
        raise CLIError("--residual-init applies only when --solve includes residual or stream")
    options = match.Options(
        solve=solve,
        layers=args.layers,
        solver=args.solver,
        residual_init=args.residual_init or match.Options.residual_init,
        max_sweeps=args.max_sweeps,
        key=jax.random.key(args.seed),
    )
    with progress(4, "rotjax align", args.quiet) as bar:
        tic = time.perf_counter()
        bar.set_postfix_str("loading")
        (config, config_b), (a, b), notes = load_models(
            [("anchor", args.anchor), ("model", args.model)], copied=1
        )
        spec, (a, b), more = match.prepare(config, [a, b], stream="stream" in options.solve)
        notes += more
        if args.solve == ("all",):  # every block the model has a group for
            lacks = absent_blocks(spec, match.ALL)
            has = tuple(n for n in match.ALL if n not in lacks)
            notes.append(
                f"--solve all: {','.join(has)}" + (f" (no {','.join(lacks)})" * bool(lacks))
            )
            options = dataclasses.replace(options, solve=has)
        if more and more[0].startswith("models in canonical form"):
            notes.append(
                "the distances are to the anchor's canonical form, and the written model is "
                "aligned to it, not to the anchor's stored weights (compare or merge it with "
                "rotjax.symmetry.canonicalize(family(config).stream_spec(config), anchor))"
            )
        if none := absent_blocks(spec, options.solve):
            why = "".join(f"; {m}" for m in more if m.startswith("no stream rotation"))
            raise CLIError(
                f"--solve {','.join(none)}: this {config.model_type} model has no such groups"
                f"{why} (`rotjax inspect` lists its groups)"
            )
        moved = [n for n in ("residual", "stream") if n in options.solve]
        if moved and (weights := hf.module_weights(args.model)):
            notes.append(
                f"{', '.join(map(str, weights))}: sentence-transformers module weights, copied "
                f"as they are; they read the residual stream, which --solve {','.join(moved)} "
                "moves to the anchor's basis (take the anchor's module files instead)"
            )
        bar.update(2)
        load_seconds = time.perf_counter() - tic
        bar.set_postfix_str(f"aligning {','.join(options.solve)}")
        try:
            res = match.align(spec, a, b, **vars(options))
        except ValueError as e:
            raise CLIError(reason(e)) from None
        check_finite(res.params, "the aligned model")
        bar.update()
        bar.set_postfix_str("writing")
        notes += pooler_note(config_b)
        report, per_layer = _report(args, options, res, notes, load_seconds)
        # The report is written with the checkpoint, in one atomic step: never one alone.
        save(
            out,
            config_b,  # B's own training-only fields (dropout...), which may differ from A's
            res.params,
            source=args.model,
            extra_files={"alignment.json": report_json(report)},
        )
        bar.update()
    show_notes(notes)
    d = res.diagnostics
    print(
        f"squared distance to anchor, all parameters: {d.distance_before:.6g} -> "
        f"{d.distance_after:.6g} ({_less(d.distance_before, d.distance_after)}); those the "
        f"solved groups act on: {d.touched_before:.6g} -> {d.touched_after:.6g} "
        f"({_less(d.touched_before, d.touched_after)})"
    )
    print(f"aligned in {d.seconds['total']:.2f}s ({d.sweeps} sweep(s)); wrote {out}")
    for layer, v in sorted(per_layer.items(), key=lambda kv: (len(kv[0]), kv[0])):
        print(f"  {layer:10s} {v[0]:12.6g} -> {v[1]:12.6g}")
    return 0


def _report(args, options, res, notes, load_seconds):
    d = res.diagnostics
    per_layer: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for path, (before, after) in d.params.items():
        per_layer[_layer_of(path)][0] += before
        per_layer[_layer_of(path)][1] += after
    report = {
        "anchor": str(args.anchor),
        "model": str(args.model),
        "solve": list(options.solve),
        "layers": options.layers,
        "solver": options.solver,
        "residual_init": options.residual_init,
        "max_sweeps": options.max_sweeps,
        "seed": args.seed,
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
        "seconds": {**d.seconds, "load": load_seconds},
        "notes": notes,
    }
    return report, per_layer


def _less(before: float, after: float) -> str:
    if not before:
        return "nothing to align" if not after else "from 0"
    return f"{100 * (1 - after / before):.1f}% less"
