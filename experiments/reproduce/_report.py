"""``report.md`` and the figures, from the results JSON only (so every number in the report
is one of the JSON's): the tables, the five claims with their numbers and verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments import plots
from experiments.reproduce import _language, _vision
from rotjax._atomic import write_whole

CLAIMS = {
    "a": (
        "Matching lowers the merged model's test loss (the paper measures the loss barrier) "
        "for every fusion method."
    ),
    "b": "Attention matching matters most for Fisher and RegMean merging.",
    "c": "Early layers matter more than late ones.",
    "d": "Matching costs seconds, a small fraction of computing Fisher statistics.",
    "e": "Rescaling adds little.",
}


def mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0: the spread of these pairs or seeds, not
    an estimate of the population's, which with 3 pairs is 1.22x larger)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def fixed(x: float, digits: int = 1, sign: str = "") -> str:
    """``x`` to ``digits`` decimals, never "-0.0" (a tiny negative rounds to 0)."""
    return f"{round(x, digits) + 0.0:{sign}.{digits}f}"


def pm(values, scale=100.0, digits=1) -> str:
    """``mean ± std`` of ``values`` times ``scale``; the mean alone for a single value (one
    seed or pair has no spread to show)."""
    m, s = mean_std(values)
    if len(values) == 1:
        return fixed(scale * m, digits)
    return f"{fixed(scale * m, digits)} ± {fixed(scale * s, digits)}"


def percent(ratio: float) -> str:
    """A ratio in percent: two significant digits below 10% (0.034, 1.2), whole above (12, 150)."""
    return f"{100 * ratio:.2g}" if 100 * ratio < 10 else f"{100 * ratio:.0f}"


def vision_table(vision) -> list[str]:
    pairs = vision["pairs"]
    lines = [
        "| method | " + " | ".join(_vision.TABLE2) + " |",
        "|---" * (1 + len(_vision.TABLE2)) + "|",
    ]
    for m in _vision.METHODS:
        cells = [pm([p["merges"][f"{a} | {m}"]["accuracy"] for p in pairs]) for a in _vision.TABLE2]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    ends = {p[ab]: p["endpoints"][ab]["accuracy"] for p in pairs for ab in ("a", "b")}
    lines.append(
        f"\nEndpoints (the {len(ends)} models merged): {pm(list(ends.values()))}% test accuracy."
    )
    return lines


def language_table(language, task) -> list[str]:
    rows = language[task]
    metric = "accuracy" if task == "sequence" else "entity F1"
    a, b = (m.rsplit("-s", 1)[0].removeprefix("minilm-") for m in rows[0]["models"][:2])
    lines = [
        f"| model ({metric}, %) | {a} test | {b} test | mean |",
        "|---|---:|---:|---:|",
    ]
    for ref in ("a", "b", "multitask"):
        r = [x["references"][ref] for x in rows]
        lines.append(
            f"| reference: {ref} | {pm([x['domains'][0] for x in r])} | "
            f"{pm([x['domains'][1] for x in r])} | {pm([x['mean'] for x in r])} |"
        )
    for m in _language.METHODS:
        for al in _language.ALIGNMENTS:
            r = [x["merges"][f"{al} | {m}"] for x in rows]
            lines.append(
                f"| {m}, {al} | {pm([x['domains'][0] for x in r])} | "
                f"{pm([x['domains'][1] for x in r])} | {pm([x['mean'] for x in r])} |"
            )
    return lines


def claims(vision, language) -> dict[str, dict[str, Any]]:
    """Each claim's measured numbers and verdict (vision pairs; means over pairs)."""
    pairs = vision["pairs"]
    avg = lambda key, what="accuracy": float(np.mean([p["merges"][key][what] for p in pairs]))
    out = {}
    loss = {m: (avg(f"none | {m}", "loss"), avg(f"paper | {m}", "loss")) for m in _vision.METHODS}
    out["a"] = {
        "numbers": {m: {"none": x, "paper": y} for m, (x, y) in loss.items()},
        "holds": all(y < x for x, y in loss.values()),
    }
    drops = {
        m: {
            "without attention matching": avg(f"paper | {m}") - avg(f"paper - attention | {m}"),
            "without FFN matching": avg(f"paper | {m}") - avg(f"paper - ffn | {m}"),
        }
        for m in ("average", "fisher", "regmean")
    }
    out["b"] = {
        "numbers": {"accuracy lost": drops},
        "holds": all(
            drops[m]["without attention matching"] > drops[m]["without FFN matching"]
            for m in ("fisher", "regmean")
        ),
    }
    if all("layers" in p for p in pairs):
        n = max(int(k.split()[1]) for k in pairs[0]["layers"] if k.startswith("head"))
        half = max(1, n // 2)
        heads = [p["layers"][f"head {half}"] for p in pairs]
        tails = [p["layers"][f"tail {half}"] for p in pairs]
        out["c"] = {
            "numbers": {
                f"first {half} layers matched": float(np.mean(heads)),
                f"last {half} layers matched": float(np.mean(tails)),
                "first minus last, per pair": [h - t for h, t in zip(heads, tails, strict=True)],
            },
            # in every pair, not only on average: the means differ by less than their spread
            "holds": all(h > t for h, t in zip(heads, tails, strict=True)),
        }
    rt = {k: float(np.mean([p["runtime"][k] for p in pairs])) for k in pairs[0]["runtime"]}
    ratio = {k: rt["matching (paper)"] / rt[f"{k} statistics"] for k in ("fisher", "gram")}
    out["d"] = {
        "numbers": {
            **rt,
            "matching / Fisher statistics": ratio["fisher"],
            "matching / Gram statistics": ratio["gram"],
        },
        "holds": rt["matching (paper)"] < 10 and ratio["fisher"] < 0.25,
    }
    diff = {
        m: avg(f"paper | {m}") - avg(f"paper - rescale | {m}")
        for m in ("average", "fisher", "regmean")
    }
    out["e"] = {
        "numbers": {"accuracy from rescaling": diff},
        "holds": all(abs(d) < 0.01 for d in diff.values()),
    }
    return out


def figures(vision, out: Path) -> dict[str, str]:
    pairs = vision["pairs"]
    files = {}
    series = {
        m: [
            np.mean([p["merges"][f"{a} | {m}"]["accuracy"] for p in pairs])
            for a in _vision.ABLATION
        ]
        for m in ("average", "fisher", "regmean")
    }
    errors = {
        m: [
            np.std([p["merges"][f"{a} | {m}"]["accuracy"] for p in pairs]) for a in _vision.ABLATION
        ]
        for m in series
    }
    files["fig3"] = plots.bars(
        out / "fig3_ablation.png",
        _vision.ABLATION,
        series,
        errors=errors,
        ylabel="merged test accuracy",
        title="Fig. 3 analogue: matching ablation (ViT pairs, mean ± std)",
    ).name
    frac = {
        n: [np.mean([p["distance"][n][1] / p["distance"][n][0] for p in pairs])]
        for n in _vision.DISTANCES
    }
    files["fig4"] = plots.bars(
        out / "fig4_distance.png",
        ["distance after / before"],
        frac,
        ylabel="fraction of the squared distance left",
        title="Fig. 4 analogue: distance to the anchor (ViT pairs)",
    ).name
    names = list(pairs[0]["curves"])
    lam = pairs[0]["curves"][names[0]]["lambdas"]
    mean_curve = lambda name, k: np.mean([p["curves"][name]["metrics"][k] for p in pairs], axis=0)
    acc = {n: mean_curve(n, "accuracy") for n in names}
    loss = {n: mean_curve(n, "loss") for n in names}
    files["fig5"] = plots.lines(
        out / "fig5_paths.png",
        lam,
        acc,
        xlabel="λ (0 = A, 1 = B)",
        ylabel="test accuracy",
        title="Fig. 5 analogue: the linear path (mean over ViT pairs)",
        panels={"test loss": loss},
    ).name
    if all("layers" in p for p in pairs):
        n = sum(1 for k in pairs[0]["layers"] if k.startswith("layer "))
        single = {
            "one layer matched": [
                np.mean([p["layers"][f"layer {i}"] for p in pairs]) for i in range(n)
            ]
        }
        cum = {
            "first k layers": [
                np.mean([p["layers"][f"head {k}"] for p in pairs]) for k in range(1, n + 1)
            ],
            "last k layers": [
                np.mean([p["layers"][f"tail {k}"] for p in pairs]) for k in range(1, n + 1)
            ],
        }
        files["fig6"] = plots.lines(
            out / "fig6_layers.png",
            list(range(n)),
            single,
            xlabel="layer i (a) / k - 1 (b)",
            ylabel="average-merge accuracy, layer i matched",
            title="Fig. 6 analogue: matching layer by layer (paper's groups)",
            panels={"accuracy, k layers matched (b)": cum},
        ).name
    return files


def claim_text(key: str, v: dict[str, Any]) -> str:
    """One sentence of the claim's numbers."""
    n = v["numbers"]
    pt = lambda x: fixed(100 * x, sign="+")
    if key == "a":
        parts = [f"{m} {x['none']:.3f} → {x['paper']:.3f}" for m, x in n.items()]
        return (
            "test loss of the merged model, without → with the paper's matching (holds if lower "
            "for every method): " + ", ".join(parts)
        )
    if key == "b":
        lost = n["accuracy lost"]
        parts = [
            f"{m} {pt(x['without attention matching'])} / {pt(x['without FFN matching'])}"
            for m, x in lost.items()
        ]
        return (
            "accuracy lost (points) without attention / without FFN matching (holds if "
            "attention's loss is the larger for Fisher and RegMean): " + ", ".join(parts)
        )
    if key == "c":
        *means, per_pair = n.items()
        text = "; ".join(f"{k}: {100 * x:.1f}% (average merge)" for k, x in means)
        diffs = ", ".join(fixed(100 * x, sign="+") for x in per_pair[1])
        return f"{text}; first minus last, per pair (points; holds if all > 0): {diffs}"
    if key == "d":
        return (
            f"matching (paper) {n['matching (paper)']:.2f} s, (all) {n['matching (all)']:.2f} s; "
            f"Fisher statistics {n['fisher statistics']:.2f} s (matching is "
            f"{percent(n['matching / Fisher statistics'])}% of it), Gram statistics "
            f"{n['gram statistics']:.2f} s ({percent(n['matching / Gram statistics'])}%); "
            f"fine-tuning {n['fine-tuning']:.0f} s (holds if matching takes under 10 s and "
            "under 25% of the Fisher statistics)"
        )
    parts = [f"{m} {pt(x)}" for m, x in n["accuracy from rescaling"].items()]
    return (
        "accuracy from rescaling (points, paper's matching with vs without it; holds if under "
        "1 point for each method): " + ", ".join(parts)
    )


def runtime_table(vision) -> list[str]:
    """Table 3: seconds per pair (statistics of both models, matching, both fine-tunings)."""
    pairs = vision["pairs"]
    keys = list(pairs[0]["runtime"])
    lines = ["| pair | " + " | ".join(keys) + " |", "|---" + "|---:" * len(keys) + "|"]
    for p in pairs:
        name = f"{p['a'].removeprefix('vit-')} + {p['b'].rsplit('-', 1)[-1]}"
        lines.append(f"| {name} | " + " | ".join(f"{p['runtime'][k]:.2f}" for k in keys) + " |")
    means = [f"{mean_std([p['runtime'][k] for p in pairs])[0]:.2f}" for k in keys]
    lines.append("| mean | " + " | ".join(means) + " |")
    return lines


def barrier_table(vision) -> list[str]:
    """Fig. 5's numbers: the barrier (largest rise of loss / drop of accuracy above the line
    between the endpoints) along the linear path, per alignment."""
    pairs = vision["pairs"]
    labels = list(pairs[0]["curves"])
    lines = ["| path A → aligned B | alignment(s) | loss barrier | accuracy barrier (points) |"]
    lines.append("|---|---|---:|---:|")
    for label in labels:
        curves = [p["curves"][label] for p in pairs]
        used = ", ".join(sorted({c["alignment"] for c in curves}))
        loss = pm([c["barrier"]["loss"] for c in curves], scale=1.0, digits=3)
        acc = pm([c["barrier"]["accuracy"] for c in curves])
        lines.append(f"| {label} | {used} | {loss} | {acc} |")
    return lines


def language_distances(language, task) -> str:
    """How far matching moves B towards A for the fine-tunes: squared distance before -> after
    and the fraction removed, each a mean over the seeds (as Fig. 4's bars are over pairs)."""
    rows = language[task]
    parts = []
    for name in rows[0]["distance"]:
        before, after = (float(np.mean([x["distance"][name][i] for x in rows])) for i in (0, 1))
        less = np.mean([1 - x["distance"][name][1] / x["distance"][name][0] for x in rows])
        parts.append(f"{name} {before:.2f} → {after:.2f} ({fixed(100 * less)}% less)")
    return "Squared distance of B to A, before → after matching: " + ", ".join(parts) + "."


def environments(results: dict) -> str:
    """Which packages and machine computed each part (recorded since 2026-12-05)."""

    def one(env):
        if not env:
            return "not recorded"
        packages = ", ".join(f"{k} {env[k]}" for k in ("jax", "flax", "optax", "numpy"))
        machine = f"{env['backend']} ({env['cpus']} cores, {env['machine']})"
        return f"{packages}, Python {env['python']}, {machine}"

    return (
        "Computed with: "
        + "; ".join(f"{part}: {one(r.get('environment'))}" for part, r in results.items())
        + "."
    )


def language_lines(language, used) -> list[str]:
    """The language part's section: Table 1 for each task, with the commits of its replicates."""
    lines = []
    replicates = [r for t in ("sequence", "token") for r in language[t]]
    commits = sorted({r.get("commit") for r in replicates} - {None})
    if commits:
        lines += [
            "Language replicates computed by the code of commit(s) "
            + ", ".join(commits)
            + " (each replicate is kept across code changes: remove "
            "`results/language.json` and `results/language/` to recompute them).",
            "",
        ]
    for task in ("sequence", "token"):
        seeds = len(language[task])
        texts = used("eval_texts")
        lines += [
            f"## Table 1 analogue: MiniLM, {task} classification ({seeds} seed(s), mean ± std)",
            "",
            f"On {f'the first {texts}' if texts else 'all the'} test texts of each domain.",
            "",
            *language_table(language, task),
            "",
            language_distances(language, task),
            "",
        ]
    return lines


def vision_lines(vision, used, figures_dir: Path) -> tuple[list[str], dict]:
    """The vision part's section (Table 2, the figures, Fig. 5's barriers, Table 3, the
    claims) and the claims' numbers and verdicts."""
    figures_ = figures(vision, figures_dir)
    n = len(vision["pairs"])
    n_test = used("test_images")
    lines = [
        f"## Table 2 analogue: ViTs on Fashion-MNIST ({n} pair(s)), merged test accuracy (%)",
        "",
        f"On {f'the first {n_test}' if n_test else 'all'} test images.",
        "",
        *vision_table(vision),
        "",
    ]
    for name, file in figures_.items():
        lines += [f"![{name}](figures/{file})", ""]
        if name == "fig4":
            lines += [
                "Each bar: B's squared distance to A after the alignment over the distance "
                "before it, in the same form (for the stream rotation's variants, both "
                "models' canonical form); mean over the pairs.",
                "",
            ]
        if name == "fig5":
            images = min(used("curve_images"), n_test or used("curve_images"))
            lines += [
                f"The path at {used('curve_points')} values of λ, on the first {images} test "
                "images.",
                "",
                *barrier_table(vision),
                "",
            ]
    lines += ["## Table 3 analogue: runtime (seconds)", "", *runtime_table(vision), ""]
    verdicts = claims(vision, None)
    lines += ["## The claims", ""]
    for k, text in CLAIMS.items():
        if k in verdicts:
            verdict = "Holds here." if verdicts[k]["holds"] else "Does not hold here."
            lines += [f"**({k}) {text}** {verdict} {claim_text(k, verdicts[k])}.", ""]
    return lines, verdicts


def took(part: str, r: dict) -> str:
    """How long computing a part's results took, by which code, and whether they are stale."""
    text = f"{part} {r['seconds'] / 60:.1f} min"
    if part == "language" and r.get("reused"):
        n = len(r["sequence"]) + len(r["token"])
        text += f" ({r['reused']} of its {n} replicates kept from earlier runs)"
        if r.get("older_code"):  # (replicates of before 2026-12-07 record no code: counted)
            text += f" (**{r['older_code']} computed by older code**, not rerun)"
    if r.get("commit"):
        text += f" (code of commit {r['commit']})"
    if r.get("stale"):
        text += " (**stale**: not rerun since its code, settings or models changed)"
    return text


def write(settings, out: Path, results: dict) -> Path:
    """``OUT/report.md`` (and ``OUT/figures``, ``OUT/results/claims.json``, removed when
    there are no vision results) from ``results``. A stale part kept in an older layout (a
    table cell this code shows and it lacks) is left out, with a line saying so."""
    flag = "" if settings.mode == "full" else f" --{settings.mode}"
    lines = [
        "# rotjax: the paper's claims, re-measured in miniature",
        "",
        f"Mode `{settings.mode}` (`python -m experiments.reproduce{flag}`); computing the "
        f"results took {', '.join(took(p, r) for p, r in results.items())} (training "
        "included where the models were not cached yet). Every number below is in "
        "`results/*.json`; ± is the population standard deviation (ddof 0) over the pairs or "
        "seeds.",
        "",
        environments(results),
        "",
    ]
    verdicts = None
    for part in (p for p in ("language", "vision") if p in results):  # Table 1 first
        r = results[part]
        # Its own settings (recorded with its results since 2026-12-05), else today's.
        used = lambda name, r=r: r.get("settings", {}).get(name, getattr(settings, name))
        try:
            if part == "language":
                lines += language_lines(r, used)
            else:
                section, verdicts = vision_lines(r, used, out / "figures")
                lines += section
        except KeyError as e:
            if not r.get("stale"):
                raise
            lines += [
                f"## {part}: not shown",
                "",
                f"Its kept results (commit {r.get('commit')}) lack {e}, which this report "
                f"shows: rerun `python -m experiments.reproduce{flag} --parts {part}`.",
                "",
            ]
    claims_file = out / "results" / "claims.json"
    if verdicts is None:
        claims_file.unlink(missing_ok=True)
    else:
        write_whole(claims_file, json.dumps(verdicts, indent=1, default=float))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
