"""``report.md`` and the figures, from the results JSON only (so every number in the report
is one of the JSON's): the tables, the five claims with their numbers and verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments import plots
from experiments.reproduce import _language, _vision

CLAIMS = {
    "a": "Matching lowers the loss of the merged model (the barrier) for every fusion method.",
    "b": "Attention matching matters most for Fisher and RegMean merging.",
    "c": "Early layers matter more than late ones.",
    "d": "Matching costs seconds, a small fraction of computing Fisher statistics.",
    "e": "Rescaling adds little.",
}


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def pm(values, scale=100.0, digits=1) -> str:
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


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
        head = float(np.mean([p["layers"][f"head {half}"] for p in pairs]))
        tail = float(np.mean([p["layers"][f"tail {half}"] for p in pairs]))
        out["c"] = {
            "numbers": {f"first {half} layers matched": head, f"last {half} layers matched": tail},
            "holds": head > tail,
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
            panels={"k layers matched (b)": cum},
        ).name
    return files


def claim_text(key: str, v: dict[str, Any]) -> str:
    """One sentence of the claim's numbers."""
    n = v["numbers"]
    pt = lambda x: f"{100 * x:+.1f}"
    if key == "a":
        parts = [f"{m} {x['none']:.3f} → {x['paper']:.3f}" for m, x in n.items()]
        return "test loss of the merged model, without → with the paper's matching: " + ", ".join(
            parts
        )
    if key == "b":
        lost = n["accuracy lost"]
        parts = [
            f"{m} {pt(x['without attention matching'])} / {pt(x['without FFN matching'])}"
            for m, x in lost.items()
        ]
        return "accuracy lost (points) without attention / without FFN matching: " + ", ".join(
            parts
        )
    if key == "c":
        return "; ".join(f"{k}: {100 * x:.1f}% (average merge)" for k, x in n.items())
    if key == "d":
        return (
            f"matching (paper) {n['matching (paper)']:.2f} s, (all) {n['matching (all)']:.2f} s; "
            f"Fisher statistics {n['fisher statistics']:.2f} s (matching is "
            f"{100 * n['matching / Fisher statistics']:.1f}% of it), Gram statistics "
            f"{n['gram statistics']:.2f} s ({100 * n['matching / Gram statistics']:.0f}%); "
            f"fine-tuning {n['fine-tuning']:.0f} s"
        )
    parts = [f"{m} {pt(x)}" for m, x in n["accuracy from rescaling"].items()]
    return "accuracy from rescaling (points, paper's matching with vs without it): " + ", ".join(
        parts
    )
