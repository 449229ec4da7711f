"""`python -m experiments.reproduce` on its smallest setting: the report, its figures, its JSON."""

import json
from pathlib import Path

import jax
import pytest
from helpers import refuses_before_any_work

from rotjax import train


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

    def merges(settings, task, names, seed, summaries, log):
        if (task, seed) == stop[0]:
            raise KeyboardInterrupt
        done.append((task, seed))
        return {"seed": seed, "task": task, "score": 0.5 + seed}

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
    assert done == [("token", 1)]  # the three kept, reused
    assert [r["score"] for r in results["token"]] == [0.5, 1.5]
    assert sorted(p.name for p in (tmp_path / "results" / "language").iterdir()) == [
        "sequence-s0.json",
        "sequence-s1.json",
        "token-s0.json",
        "token-s1.json",
    ]
    assert [r["commit"] for r in results["sequence"] + results["token"]] == ["v1"] * 4
    done[:] = []
    assert run("v2")["token"][0]["commit"] == "v1" and not done  # later code: kept
    run("v2", dataclasses.replace(settings, descent_steps=3))  # a vision setting: kept
    assert not done
    run("v2", dataclasses.replace(settings, eval_texts=7))  # fewer test texts: all again
    assert len(done) == 4
    trained = lambda s, out, n, seed: {"name": f"{n}-s{seed}", "retrained": True}
    monkeypatch.setattr(_language, "trained", trained)
    done[:] = []
    assert run("v3", dataclasses.replace(settings, eval_texts=7))["token"][1]["commit"] == "v3"
    assert len(done) == 4  # other models: all again


def test_reproduce(tmp_path):
    """The smallest reproduction: it writes the report, its figures and its JSON, and the
    report's numbers are the JSON's."""
    from experiments import reproduce
    from experiments.reproduce import _report, _vision

    reproduce.main(["--smoke", "--out", str(tmp_path)])
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
    env = vision["environment"]  # provenance beside the key: packages and machine
    assert env["jax"] == jax.__version__ and env["cpus"] >= 1
    assert f"vision: jax {jax.__version__}, flax " in report
    # A part not run is reported from its last results of the same mode, with their commit.
    committed = Path(reproduce.__file__).parent / "report" / "results" / "language.json"
    language = json.loads(committed.read_text()) | {"mode": "smoke", "commit": "abc1234"}
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
    language["mode"] = "full"  # another mode's results are never mixed in
    (tmp_path / "results" / "language.json").write_text(json.dumps(language))
    reproduce.main(["--smoke", "--out", str(tmp_path)])
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
