"""`python -m experiments.reproduce` on its smallest setting: the report, its figures, its JSON."""

import json
from pathlib import Path

import jax
import pytest
from helpers import refuses_before_any_work

from rotjax import match, train


@pytest.fixture(autouse=True)
def _keep_test_jax_config(monkeypatch):
    monkeypatch.setattr(train, "enable_compilation_cache", lambda *a, **k: None)


def test_language_replicates_are_kept_and_resumed(tmp_path, monkeypatch):
    """The language part keeps each (task, seed)'s merges: a run cut short resumes at the first
    replicate not done, later code reuses them (naming the commit that computed each), and
    other models or replicate settings recompute them (fine-tunes and merges faked here: the
    keys and files are what is tested)."""
    import dataclasses

    from experiments.reproduce import _language, _models

    settings = dataclasses.replace(_models.Settings.of("quick"), language_seeds=(0, 1))
    monkeypatch.setattr(_language, "trained", lambda s, out, n, seed: {"name": f"{n}-s{seed}"})
    done, stop = [], [None]

    every = {f"{a} | {m}": {} for a in _language.ALIGNMENTS for m in _language.METHODS}

    def merges(settings, task, names, seed, summaries, log):
        if (task, seed) == stop[0]:
            raise KeyboardInterrupt
        done.append((task, seed))
        return {"seed": seed, "task": task, "score": 0.5 + seed, "merges": every}

    monkeypatch.setattr(_language, "_seed", merges)
    run = lambda code, s=settings: _language.run(
        s, tmp_path, lambda _: None, code=code, commit=code
    )
    stop[0] = ("token", 1)
    with pytest.raises(KeyboardInterrupt):
        run("v1")
    assert done == [("sequence", 0), ("sequence", 1), ("token", 0)]
    stop[0], done[:] = None, []
    results = run("v1")
    assert done == [("token", 1)] and results["reused"] == 3  # the three kept, reused
    assert all(r["seconds"] >= 0 for r in results["sequence"] + results["token"])
    assert [r["score"] for r in results["token"]] == [0.5, 1.5]
    assert sorted(p.name for p in (tmp_path / "results" / "language").iterdir()) == [
        "sequence-s0.json",
        "sequence-s1.json",
        "token-s0.json",
        "token-s1.json",
    ]
    assert [r["commit"] for r in results["sequence"] + results["token"]] == ["v1"] * 4
    done[:] = []
    later = run("v2")
    assert later["token"][0]["commit"] == "v1" and not done  # later code: kept, and said
    assert results["older_code"] == 0 and later["older_code"] == 4
    from experiments.reproduce import _report

    assert "(**4 computed by older code**, not rerun)" in _report.took(
        "language", {**later, "seconds": 60}
    )
    run("v2", dataclasses.replace(settings, descent_steps=3))  # a vision setting: kept
    assert not done
    run("v2", dataclasses.replace(settings, eval_texts=7))  # fewer test texts: all again
    assert len(done) == 4
    trained = lambda s, out, n, seed: {"name": f"{n}-s{seed}", "retrained": True}
    monkeypatch.setattr(_language, "trained", trained)
    done[:] = []
    assert run("v3", dataclasses.replace(settings, eval_texts=7))["token"][1]["commit"] == "v3"
    assert len(done) == 4  # other models: all again
    # The same models elsewhere (a moved output directory): kept.
    moved = lambda s, out, n, seed: trained(s, out, n, seed) | {"workdir": "/x", "hf": "/x/hf"}
    monkeypatch.setattr(_language, "trained", moved)
    done[:] = []
    assert run("v3", dataclasses.replace(settings, eval_texts=7))["reused"] == 4 and not done
    # A replicate lacking a merge this code computes (a method added, a file truncated by
    # hand) is recomputed, alone; a fix that raises REPLICATE_VERSION recomputes them all.
    path = tmp_path / "results" / "language" / "token-s1.json"
    kept = json.loads(path.read_text())
    del kept["result"]["merges"]["all | regmean"]
    path.write_text(json.dumps(kept))
    assert run("v4", dataclasses.replace(settings, eval_texts=7))["reused"] == 3
    assert done == [("token", 1)]
    monkeypatch.setattr(_language, "REPLICATE_VERSION", _language.REPLICATE_VERSION + 1)
    done[:] = []
    assert run("v5", dataclasses.replace(settings, eval_texts=7))["reused"] == 0
    assert len(done) == 4


def test_the_results_key_reads_the_code_the_pipeline_imports():
    """Every experiments module the pipeline imports (at the top or inside a function) is in
    the code its results are keyed by (`_code`), but the report's rendering: an edit of the
    pipeline marks results stale, one of the demo does not."""
    import ast

    from experiments import reproduce

    root = Path(reproduce.__file__).resolve().parents[1]
    rendering = {"reproduce/_report.py", "plots.py"}

    def imported(file):
        for node in ast.walk(ast.parse((root / file).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments"):
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in (n for n in names if n.startswith("experiments.")):
                tail = name.split(".")[1:]
                for f in ("/".join(tail) + ".py", "/".join([*tail, "__init__.py"])):
                    if (root / f).is_file():
                        yield f

    for file in reproduce.PIPELINE:
        assert set(imported(file)) <= set(reproduce.PIPELINE) | rendering, file
    assert "reproduce/_vision.py" in set(imported("reproduce/__init__.py"))  # it sees imports
    assert "demo.py" not in reproduce.PIPELINE


def test_reproduce(tmp_path, monkeypatch):
    """The smallest reproduction: it writes the report, its figures and its JSON, and the
    report's numbers are the JSON's."""
    from experiments import reproduce
    from experiments.reproduce import _report, _vision

    align, calls = match.align, []
    recorded = lambda *a, **kw: calls.append(kw) or align(*a, **kw)
    monkeypatch.setattr(match, "align", recorded)
    reproduce.main(["--smoke", "--out", str(tmp_path)])
    monkeypatch.undo()
    # Smoke mode caps the sweeps (2); the paper's single pass is never given the cap (with
    # it, Fig. 6 and Table 3 swept twice where Table 2's paper column swept once).
    single = [kw for kw in calls if not {"residual", "stream"} & set(kw.get("solve", match.PAPER))]
    assert single and all(kw.get("max_sweeps") is None for kw in single)
    report = (tmp_path / "report.md").read_text()
    vision = json.loads((tmp_path / "results" / "vision.json").read_text())
    claims = json.loads((tmp_path / "results" / "claims.json").read_text())
    for name in ("fig3_ablation", "fig4_distance", "fig5_paths", "fig6_layers"):
        png = tmp_path / "figures" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"figures/{name}.png" in report
    pairs = vision["pairs"]
    for method in _vision.METHODS:  # every Table 2 cell, recomputed from the JSON
        cells = [
            _report.pm([p["merges"][f"{a} | {method}"]["accuracy"] for p in pairs])
            for a in _vision.TABLE2
        ]
        assert f"| {method} | " + " | ".join(cells) + " |" in report
    n = max(int(k.split()[1]) for k in pairs[0]["layers"] if k.startswith("head"))
    for p in pairs:  # Fig. 6's matching of every layer is Table 2's one-pass paper column
        assert p["layers"][f"head {n}"] == p["merges"]["paper | average"]["accuracy"]
    for line in [*_report.runtime_table(vision), *_report.barrier_table(vision)]:
        assert line in report  # Table 3 and Fig. 5's barriers, rendered from the JSON
    curves = [p["curves"]["none"]["barrier"]["loss"] for p in pairs]
    assert f"| none | none | {_report.pm(curves, scale=1.0, digits=3)} |" in report
    for key, claim in claims.items():
        verdict = "Holds here." if claim["holds"] else "Does not hold here."
        assert f"**({key}) {_report.CLAIMS[key]}** {verdict}" in report
    # A rerun with nothing changed reuses the results.
    mtime = (tmp_path / "results" / "vision.json").stat().st_mtime
    reproduce.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "results" / "vision.json").stat().st_mtime == mtime
    assert vision["mode"] == "smoke" and "commit" in vision
    # Models `train.cached` would train afresh (older data, e.g. another tokenizer's token ids;
    # faked here) do not key the results they computed: the part is computed again.
    settings, code = reproduce.Settings.of("smoke"), reproduce._code()
    assert vision["key"] == reproduce._key(settings, "vision", tmp_path, code)
    monkeypatch.setattr(reproduce.T, "data_version", lambda config: "other data")
    assert vision["key"] != reproduce._key(settings, "vision", tmp_path, code)
    monkeypatch.undo()
    env = vision["environment"]  # provenance beside the key: packages and machine
    assert env["jax"] == jax.__version__ and env["cpus"] >= 1
    assert f"vision: jax {jax.__version__}, flax " in report
    # A part not run is reported from its last results of the same mode, with their commit.
    committed = Path(reproduce.__file__).parent / "report" / "results" / "language.json"
    language = json.loads(committed.read_text()) | {"mode": "smoke", "commit": "abc1234"}
    language.pop("environment", None)  # as results from before it was recorded
    (tmp_path / "results" / "language.json").write_text(json.dumps(language))
    reproduce.main(["--smoke", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "results" / "vision.json").stat().st_mtime == mtime
    assert "language" in report and "(code of commit abc1234)" in report
    assert "language: not recorded" in report  # results from before the environment was
    for line in _report.language_table(language, "sequence"):
        assert line in report
    # ... marked stale: its key is not of this code (and settings and models).
    assert "abc1234) (**stale**" in report and report.count("**stale**") == 1
    settings = reproduce.Settings.of("smoke", None)
    language["key"] = reproduce._key(settings, "language", tmp_path, reproduce._code())
    (tmp_path / "results" / "language.json").write_text(json.dumps(language))
    reproduce.main(["--smoke", "--out", str(tmp_path)])
    assert "stale" not in (tmp_path / "report.md").read_text()
    language["mode"] = "full"  # another mode's results are never mixed in (nor run beside)
    (tmp_path / "results" / "language.json").write_text(json.dumps(language))
    reproduce.main(["--smoke", "--out", str(tmp_path), "--report-only"])
    assert "abc1234" not in (tmp_path / "report.md").read_text()
    # --report-only: the report rewritten from the kept results, nothing computed; the
    # settings a part was measured under are those it recorded, not today's.
    vision["settings"]["test_images"] = 99
    (tmp_path / "results" / "vision.json").write_text(json.dumps(vision))
    mtime = (tmp_path / "results" / "vision.json").stat().st_mtime
    (tmp_path / "report.md").unlink()
    reproduce.main(["--smoke", "--out", str(tmp_path), "--report-only"])
    assert "On the first 99 test images." in (tmp_path / "report.md").read_text()
    assert (tmp_path / "results" / "vision.json").stat().st_mtime == mtime
    # A stale part kept in an older layout (a merge the report shows is missing) is left out,
    # saying so; without vision results there are no claims (claims.json removed).
    language |= {"mode": "smoke", "key": "older"}
    del language["sequence"][0]["merges"]["all | regmean"]
    (tmp_path / "results" / "language.json").write_text(json.dumps(language))
    (tmp_path / "results" / "vision.json").unlink()
    reproduce.main(["--smoke", "--out", str(tmp_path), "--report-only"])
    report = (tmp_path / "report.md").read_text()
    assert "## language: not shown" in report and "lack 'all | regmean'" in report
    assert "Table 2" not in report and not (tmp_path / "results" / "claims.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parts", "vision,sound"], "--parts 'vision,sound': choose from vision, language"),
        (["--parts", ","], "choose from vision, language"),
        (["--out", "FILE"], "is a file, not a directory"),
        (["--report-only"], "--report-only: no smoke-mode results in"),
        (["--report-only", "--parts", "vision"], "--report-only reports every part"),
    ],
)
def test_reproduce_refuses_bad_arguments_before_any_work(
    argv, message, tmp_path, capsys, monkeypatch
):
    from experiments import reproduce

    refuses_before_any_work(
        lambda a: reproduce.main(["--smoke", *a]), argv, message, tmp_path, capsys, monkeypatch
    )


def test_reproduce_refuses_an_out_of_another_mode(tmp_path, capsys):
    """Every mode names its runs alike, and `train.cached` deletes a run of another config to
    retrain it: a smoke or quick run in a full reproduction's directory threw away its models."""
    from experiments import reproduce

    model = tmp_path / "models" / "vit-fashion_mnist-s0" / "summary.json"
    model.parent.mkdir(parents=True)
    model.write_text("{}")
    for marker in ("mode.txt", "results/language.json"):
        written = tmp_path / marker
        written.parent.mkdir(exist_ok=True)
        written.write_text("full\n" if marker == "mode.txt" else json.dumps({"mode": "full"}))
        with pytest.raises(SystemExit) as e:
            reproduce.main(["--smoke", "--out", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {tmp_path} holds a reproduction in full mode, whose models" in err
        assert model.read_text() == "{}"
        written.unlink()
