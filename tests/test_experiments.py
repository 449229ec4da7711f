"""Every entry point of `experiments/` runs end to end on its smallest setting (seconds each).

These check the drivers, not the numbers: the measured runs live in the README and in the
JSON files the drivers write.
"""

import json
import shutil

import pytest
from helpers import init, refuses_before_any_work

from rotjax import hf, train
from rotjax.data import DataSourceError
from rotjax.models import vit

# A tiny Fashion-MNIST-shaped ViT: the drivers end to end in seconds.
TINY_VIT = vit.Config(
    image_size=28, patch_size=7, num_channels=1, hidden_size=8, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=16, num_labels=10, task="image_classification",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_test_jax_config(monkeypatch):
    # The drivers enable the persistent compilation cache with their own settings; the tests'
    # (conftest) stay in force.
    monkeypatch.setattr(train, "enable_compilation_cache", lambda *a, **k: None)


@pytest.mark.parametrize("config", ["vit_fashion_mnist", "minilm_wordnet_glosses"])
def test_train(config, tmp_path, capsys):
    from experiments import train as T

    T.main(["--config", config, "--workdir", str(tmp_path), "--smoke", "--no-progress"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_steps"] == 2 and 0 <= summary["test"]["accuracy"] <= 1
    config_, params = hf.load(tmp_path / "hf")
    assert config_.num_labels == (10 if config.startswith("vit") else 16)
    assert '"test"' in capsys.readouterr().out
    if config.startswith("vit"):  # the same command again: a finished run, nothing to train
        T.main(["--config", config, "--workdir", str(tmp_path), "--smoke", "--no-progress"])
        again = json.loads((tmp_path / "summary.json").read_text())
        assert again["resumed_from"] == 2
        assert again["final_train_loss"] == summary["final_train_loss"] is not None


def test_make_pairs(tmp_path, capsys):
    from experiments import make_pairs

    argv = ["--smoke", "--runs", "vit", "--num-seeds", "2", "--out", str(tmp_path)]
    make_pairs.main([*argv, "--no-progress"])
    report = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["vit-fashion_mnist-s0", "vit-fashion_mnist-s1"]
    assert report["pairs"] == [["seeds", "vit-fashion_mnist-s0", "vit-fashion_mnist-s1"]]
    assert "| vit-fashion_mnist-s1 |" in (tmp_path / "summary.md").read_text()
    # --runs that matches no run is refused, the summary kept (it was replaced by an empty one)
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(SystemExit) as exit_:
        make_pairs.main([*argv[:2], "bogus", *argv[3:]])
    assert exit_.value.code == 2 and "--runs 'bogus' matches no run" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == before


def test_demo(tmp_path, capsys, monkeypatch):
    from experiments import demo

    monkeypatch.setenv("ROTJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROTJAX_JAX_CACHE", str(tmp_path / "jax"))  # part 1's subprocess
    # Part 1 runs in a subprocess beside part 2 (which trains the models meanwhile), part 2's
    # output (its training's progress bars too) held until part 1 is done.
    demo.main(["--workdir", str(tmp_path), "--solve", "rotation,scale", "--smoke"])
    out, err = capsys.readouterr()
    order = ["== 1. The symmetry", "aligned copy vs copy", "== 2. Fusion", "training demo-vit-s0"]
    order += ["merged test accuracy"]
    assert [out.find(s) for s in order] == sorted(out.find(s) for s in order), out
    assert out.find(order[0]) >= 0 and "demo done" in out
    assert "step/s" in err  # the training's bars, released
    again = ["--workdir", str(tmp_path / "again"), "--smoke", "--part", "fusion"]
    demo.main([*again, "--descent-steps", "2"])
    out = capsys.readouterr().out
    assert "aligned copy" not in out and "training demo" not in out  # the models cached
    # the straight-through row, and its path
    assert "\n  straight-through " in out and "2 steps of descent" in out
    assert out.count("straight-through loss barrier") == 1
    report = json.loads((tmp_path / "aligned" / "alignment.json").read_text())
    assert report["distance"]["all"]["after"] < report["distance"]["all"]["before"]
    assert (tmp_path / "interpolation.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cache" / "demo-smoke" / "demo-vit-s1" / "summary.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--solve", "rotation,spin"], "--solve: unknown blocks ['spin']"),
        (["--workdir", "FILE"], "is a file, not a directory"),
        (["--descent-steps", "-1"], "--descent-steps must be >= 0, got -1"),
        (["--descent-steps", "5", "--part", "symmetry"], "applies to the fusion part"),
        (["--part", "symmetry"], "--smoke applies to the fusion part"),  # (it was ignored)
        (["--part", "fusion", "--solve", "rotation"], "--solve applies to the symmetry part"),
    ],
)
def test_demo_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    from experiments import demo

    refuses_before_any_work(
        lambda a: demo.main(["--smoke", *a]), argv, message, tmp_path, capsys, monkeypatch
    )


def test_align_benchmark(tmp_path, monkeypatch):
    from experiments.benchmarks import align

    # A smoke run writes beside the committed results, not over them (they were its default)
    monkeypatch.chdir(tmp_path)
    align.main(["--smoke"])
    rows = json.loads((tmp_path / "runs/benchmarks-smoke/align.json").read_text())["rows"]
    assert [(r["shape"], r["regime"]) for r in rows] == [
        ("tiny", "related"),
        ("tiny", "independent"),
    ]
    assert all(r["paper"]["seconds"] > 0 and r["floor"]["total"] > 0 for r in rows)


def test_train_throughput_benchmark(tmp_path, capsys):
    pytest.importorskip("torch")
    from experiments.benchmarks import train_throughput

    out = tmp_path / "throughput.json"
    # Bad counts and model names are refused before any work (0 steps ran the default, 0
    # rounds failed after compiling, and any name but bert ran the ViT under that name)
    for bad, message in (
        (["--steps", "0"], "--steps: 0 is not >= 1"),
        (["--rounds", "-1"], "--rounds: -1 is not >= 1"),
        (["--models", "bert,vti"], "--models: ['vti'] not among bert, vit"),
    ):
        with pytest.raises(SystemExit) as exit_:
            train_throughput.main([*bad, "--out", str(out)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
    train_throughput.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["results"]] == ["bert", "vit"]
    assert all(r["step"]["ratio"] > 0 for r in report["results"])
    (core,) = report["attention"]
    assert set(core["ms"]["forward_backward"]) == {"rotjax", "torch", "torch_sdpa"}


def test_merge_benchmark(tmp_path):
    from experiments.benchmarks import merge

    merge.main(["--smoke", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "merge.json").read_text())["rows"]
    assert row["model"] == "vit" and set(row["seconds"]) >= {"gram", "fisher_exact", "align_all"}
    assert all(v > 0 for v in row["seconds"].values())
    assert set(row["merge_seconds"]) == {
        "average",
        "fisher",
        "regmean",
        "task_arithmetic",
        "ties",
        "dare",
        "ot_wts",
        "refit",
    }
    assert all(v["warm"] > 0 for v in row["merge_seconds"].values())


def test_train_refuses_a_workdir_of_another_config(tmp_path, capsys, monkeypatch):
    from experiments import train as T

    base = ["--config", "vit_fashion_mnist", "--workdir", str(tmp_path), "--smoke", "--no-progress"]
    T.main([*base, "--set", "dataset=digits"])  # 8x8 images: the ViT takes the data's size
    config, _ = hf.load(tmp_path / "hf")
    assert (config.image_size, config.num_channels) == (8, 1)
    before = (tmp_path / "summary.json").read_text()
    assert json.loads(before)["name"] == "vit-digits-s0"  # named for its data (not fashion_mnist)
    with pytest.raises(SystemExit, match=r"another config \(.*seed: 0 -> 1"):
        T.main([*base, "--set", "dataset=digits", "--seed", "1"])
    assert (tmp_path / "summary.json").read_text() == before  # nothing rewritten
    T.main([*base, "--set", "dataset=digits", "--seed", "1", "--allow-config-change"])
    # the same config, but the data's version changed since the run started: not resumed
    same = [*base, "--set", "dataset=digits", "--seed", "1"]
    with monkeypatch.context() as m:
        m.setattr(T, "data_version", lambda c: "newer")
        with pytest.raises(SystemExit, match=r"other training data \(data version None, now"):
            T.main(same)
        T.main([*same, "--allow-config-change"])
    assert json.loads((tmp_path / "data.json").read_text()) == {"data_version": "newer"}
    new = [*base[:2], "--workdir", str(tmp_path / "new")]
    with pytest.raises(SystemExit, match="config field batch_size must be an int, got 'abc'"):
        T.main([*new, "--set", "batch_size=abc"])
    # Values out of range too, before any workdir exists (config.json and data.json were
    # written first, and the run failed in the schedule or in fit)
    for bad, message in (
        ("num_epochs=0", "num_epochs must be a finite number > 0, got 0"),
        ("warmup_fraction=2.0", r"warmup_fraction must be a finite number in \[0.0, 1.0\]"),
        ("checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
        ("decay='step'", "decay must be one of"),
        ("learning_rate=-1.0", "learning_rate must be a finite number >= 0"),
        ("seed=-1", "seed must be >= 0, got -1"),  # (refused at the first batch: a workdir)
    ):
        with pytest.raises(SystemExit, match=message):
            T.main([*new, "--set", bad])
    assert not (tmp_path / "new").exists()

    # A dataset not installed: one line, no traceback (DataSourceError is an OSError)
    def missing(*args, **kwargs):
        raise DataSourceError("Fashion-MNIST directory /x does not exist. apt-get")

    with monkeypatch.context() as m:
        m.setattr(T, "load_data", missing)
        with pytest.raises(SystemExit, match=r"experiments\.train: error: Fashion-MNIST directory"):
            T.main(new)
    assert not (tmp_path / "new").exists()  # (config.json and data.json were written first)
    # A seed set by --set names the run (it was named for --seed's default: ...-s0)
    seen = []
    summary = lambda config, *a, **k: (
        seen.append(config) or dict.fromkeys(("name", "test", "majority_baseline"))
    )
    monkeypatch.setattr(T, "train_and_evaluate", summary)
    T.main([*new, "--set", "seed=3"])
    T.main([*new, "--set", "dataset=digits", "--set", "seed=3"])
    assert [(c.name, c.seed) for c in seen] == [("vit-fashion_mnist-s3", 3), ("vit-digits-s3", 3)]


def test_cached_runs_are_reused_or_trained_afresh(tmp_path, monkeypatch):
    import dataclasses

    from experiments import train as T

    tiny = dataclasses.replace(T.VIT_FASHION_MNIST, num_hidden_layers=1, hidden_size=16)
    config = T.smoke(T.Config(name="v", model="vit", dataset="digits", vit_config=tiny))
    run = tmp_path / "v"
    assert T.finished(config, run) is None
    first = T.cached(config, run)
    assert T.cached(config, run)["wall_seconds"] == first["wall_seconds"]  # reused
    metrics = [json.loads(x) for x in (run / train.METRICS_FILE).read_text().splitlines()]
    periods = [r["steps"] / r["steps_per_second"] for r in metrics if r["split"] == "train"]
    assert first["train_seconds"] == pytest.approx(sum(periods)) and periods
    other = dataclasses.replace(config, learning_rate=2 * config.learning_rate)
    assert T.finished(other, run) is None
    second = T.cached(other, run)  # an edited preset: trained afresh, not refused or reused
    assert second["wall_seconds"] != first["wall_seconds"]
    assert json.loads((run / "config.json").read_text())["learning_rate"] == other.learning_rate
    assert T.finished(other, run)["wall_seconds"] == second["wall_seconds"]
    # A finished run of older data (another data_version): trained afresh, not reused.
    monkeypatch.setattr(T, "data_version", lambda c: "newer")
    assert T.finished(other, run) is None
    second = T.cached(other, run)
    assert second["data_version"] == "newer"
    assert T.finished(other, run)["wall_seconds"] == second["wall_seconds"]
    monkeypatch.undo()
    second = T.cached(other, run)  # (back to this data's version)
    # An unfinished run of older data: trained afresh, not resumed on today's data.
    (run / "summary.json").unlink()
    (run / T.DATA_FILE).write_text(json.dumps({"data_version": "older"}))
    assert T.cached(other, run)["resumed_from"] is None
    (run / "summary.json").unlink()  # (of today's data: resumed)
    assert T.cached(other, run)["resumed_from"] is not None
    (run / "summary.json").unlink()  # (of unknown data, begun before data.json: resumed)
    (run / T.DATA_FILE).unlink()
    assert T.cached(other, run)["resumed_from"] is not None
    (run / "summary.json").unlink()
    (run / T.DATA_FILE).write_text("{")  # damaged: refused by name, not a bare traceback
    with pytest.raises(ValueError, match=r"data\.json is not a run's data version"):
        T.cached(other, run)
    (run / T.DATA_FILE).unlink()
    second = T.cached(other, run)
    # An unfinished run begun with batches cut otherwise (trim): trained afresh, not refused.
    (run / "summary.json").unlink()
    order = json.loads((run / train.BATCHES_FILE).read_text())
    assert order["trim"] is None is second["trim"]  # images: not cut
    (run / train.BATCHES_FILE).write_text(json.dumps({**order, "trim": 8}))
    assert T.cached(other, run)["resumed_from"] is None
    second = json.loads((run / "summary.json").read_text())
    # A run predating a field (its default) is the same run; older logs without "steps".
    saved = json.loads((run / "config.json").read_text())
    del saved["keep_checkpoints"], saved["vit_config"]["qkv_bias"]
    (run / "config.json").write_text(json.dumps(saved))
    assert T.finished(other, run)["wall_seconds"] == second["wall_seconds"]
    lines = [json.loads(x) for x in (run / train.METRICS_FILE).read_text().splitlines()]
    for r in lines:
        r.pop("steps", None)
    (run / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert T.train_seconds(run / "old.jsonl") == pytest.approx(second["train_seconds"])
    # Not a training run: refused, not deleted.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="is not a training run"):
        T.cached(config, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    (run / "config.json").unlink()  # checkpoints of unknown settings: not resumed
    (run / train.CHECKPOINT_DIR).mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=r"holds checkpoints but no config\.json"):
        T.cached(config, run)


def test_paths(tmp_path, capsys):
    """Two tiny random Fashion-MNIST ViTs: every path ends at A and at aligned B (same function
    as B), and the JSON holds what the plot shows."""
    import jax
    import numpy as np

    from experiments import paths

    for i, name in enumerate("ab"):
        hf.save(tmp_path / name, TINY_VIT, init(TINY_VIT, jax.random.key(i))[1])
    out = tmp_path / "out"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--images", "64", "--points", "3"]
    paths.main([*argv, "--out", str(out)])
    result = json.loads((out / "paths.json").read_text())
    assert list(result) == ["none", "paper", "all", "all + stream"]
    ends = {n: (r["metrics"]["loss"][0], r["metrics"]["loss"][-1]) for n, r in result.items()}
    for name, (start, end) in ends.items():  # alignment moves B within its symmetry orbit
        np.testing.assert_allclose([start, end], ends["none"], rtol=1e-4, err_msg=name)
    assert (out / "paths.png").read_bytes()[:4] == b"\x89PNG"
    assert "all + stream   loss barrier" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        paths.main([*argv, "--align", "none,bogus"])
    assert "unknown alignments ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no λ = 0.5 among 4 points
        paths.main([*argv, "--points", "4"])
    assert "--points must be odd and >= 3, got 4" in capsys.readouterr().err


def test_pairs(tmp_path, capsys):
    """Every pair of three tiny ViTs, C being A moved by a random symmetry element: aligned,
    A and C merge into A by every method (the same accuracy), and the table is the JSON's."""
    import jax

    from experiments import pairs
    from rotjax import symmetry as sym
    from rotjax.models import family

    config = TINY_VIT
    fam = family(config)
    a, b = (fam.init(config, jax.random.key(i)) for i in range(2))
    spec = fam.symmetry_spec(config)
    c = sym.apply(spec, a, sym.sample(spec, jax.random.key(7)))
    dirs = [str(tmp_path / n) for n in "abc"]
    for d, p in zip(dirs, (a, b, c), strict=True):
        hf.save(d, config, p)
    out = tmp_path / "out"
    argv = [*dirs, "--images", "64", "--align", "none,all + stream", "--methods"]
    pairs.main([*argv, "average,circuits", "--out", str(out)])
    result = json.loads((out / "pairs.json").read_text())
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [
        (dirs[0], dirs[1]), (dirs[0], dirs[2]), (dirs[1], dirs[2])
    ]  # fmt: skip
    assert set(result["pairs"][0]["align_seconds"]) == {"none", "all + stream"}
    a_c = result["pairs"][1]["all + stream"]
    assert a_c == {
        "average": result["endpoints"][dirs[0]],
        "circuits": result["endpoints"][dirs[0]],
    }
    printed = capsys.readouterr().out
    for line in pairs.table(result, ["none", "all + stream"], ["average", "circuits"]):
        assert line in printed
    with pytest.raises(SystemExit):
        pairs.main([*argv, "bogus"])
    assert "unknown methods ['bogus']" in capsys.readouterr().err
    assert result["descent_steps"] == 300  # the straight-through alignment's default
    # The descent's steps: A and C (exactly aligned at the start, the best kept) merge into A.
    argv = [dirs[0], dirs[2], "--images", "64", "--align", "straight-through", "--methods"]
    pairs.main([*argv, "average", "--descent-steps", "2", "--out", str(tmp_path / "st")])
    st = json.loads((tmp_path / "st" / "pairs.json").read_text())
    assert st["descent_steps"] == 2
    assert st["pairs"][0]["straight-through"] == {"average": result["endpoints"][dirs[0]]}
    with pytest.raises(SystemExit):
        pairs.main([*argv, "average", "--descent-steps", "0"])
    assert "--descent-steps must be >= 1, got 0" in capsys.readouterr().err
    # Test images beyond the split's, or none: -5 evaluated 9,995 of them, silently.
    for images in ("-5", "0", "20000"):
        with pytest.raises(SystemExit):
            pairs.main([*argv[:3], images, *argv[4:], "average"])
        assert f"--images must be in [1, 10000] (the test split), got {images}" in (
            capsys.readouterr().err
        )
    # Another of rotjax.data's image datasets: its own test split, and images the models take.
    argv = [dirs[0], dirs[2], "--align", "all + stream", "--methods", "average"]
    pairs.main([*argv, "--dataset", "mnist_sample", "--out", str(tmp_path / "mnist")])
    mnist = json.loads((tmp_path / "mnist" / "pairs.json").read_text())
    assert mnist["dataset"] == "mnist_sample" and mnist["pairs"][0]["all + stream"] == {
        "average": mnist["endpoints"][dirs[0]]
    }
    with pytest.raises(SystemExit):
        pairs.main([*argv, "--dataset", "mnist_sample", "--images", "1001"])
    assert "--images must be in [1, 1000] (the test split), got 1001" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 28x28 ViTs on 8x8 digits: refused before any work
        pairs.main([*argv, "--dataset", "digits", "--out", str(tmp_path / "digits")])
    assert "takes 28x28x1 images; digits's are 8x8x1" in capsys.readouterr().err
    assert not (tmp_path / "digits").exists()


def test_paths_and_activation_start_refuse_checkpoints_of_other_images(tmp_path, capsys):
    """Both read Fashion-MNIST by default: a ViT of 8x8 images is refused before any work (it
    failed inside the model, after the data was loaded); ``--dataset digits`` takes it."""
    import dataclasses

    import jax

    from experiments import activation_start, paths
    from rotjax.models import family

    config = dataclasses.replace(TINY_VIT, image_size=8, patch_size=4)
    d = str(tmp_path / "digits")
    hf.save(d, config, family(config).init(config, jax.random.key(0)))
    for main in (paths.main, activation_start.main):
        with pytest.raises(SystemExit):
            main([d, d, "--out", str(tmp_path / "out")])
        assert "takes 8x8x1 images; fashion_mnist's are 28x28x1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # digits' 1437 training images: 437 after the unlabeled
        activation_start.main([d, d, "--dataset", "digits", "--held-out", "438"])
    assert "--held-out must be in [1, 437] (digits's training split), got 438" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()
    out = tmp_path / "digits-paths"
    paths.main([d, d, "--dataset", "digits", "--align", "none", "--points", "3", "--out", str(out)])
    # A with itself: one loss all along the path, on digits' whole test split (360 images)
    assert len({*json.loads((out / "paths.json").read_text())["none"]["metrics"]["loss"]}) == 1


def test_merge_rows_reuse_statistics(monkeypatch):
    """With ``reuse_statistics`` each model's statistics are computed once (A's, shared by
    every alignment of B) and the rows are the same as computed afresh for each."""
    import jax
    import numpy as np

    from experiments import fusion
    from rotjax import merge
    from rotjax.models import family

    config = TINY_VIT
    fam = family(config)
    pair = fusion.Pair(config, *(fam.init(config, jax.random.key(i)) for i in range(2)))
    images = np.random.default_rng(0).uniform(size=(20, 28, 28, 1)).astype(np.float32)
    unlabeled = {"images": images}
    test = {"images": images, "labels": np.arange(20) % 10}
    variants = fusion.align_variants(pair, ["none", "paper"], unlabeled)
    calls = []
    statistics = merge.statistics
    monkeypatch.setattr(merge, "statistics", lambda *a, **k: calls.append(1) or statistics(*a, **k))
    run = lambda reuse: fusion.merge_rows(
        variants, ["fisher", "regmean"], fusion.evaluator(pair.model, test),
        stats_data=unlabeled, reuse_statistics=reuse,
    )  # fmt: skip
    fresh = run(False)
    assert len(calls) == 8  # 2 variants x 2 methods x 2 models
    calls.clear()
    reused = run(True)
    assert len(calls) == 6  # A's once per method
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(reused) == drop(fresh)


def _tiny_vit_pair():
    """Two random tiny ViTs as a `fusion.Pair`, and 8 unlabeled random images."""
    import jax
    import numpy as np

    from experiments import fusion
    from rotjax.models import family

    fam = family(TINY_VIT)
    pair = fusion.Pair(TINY_VIT, *(fam.init(TINY_VIT, jax.random.key(i)) for i in range(2)))
    images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    return pair, {"images": images}


def test_align_variants_caps_only_the_iterating_alignments(monkeypatch):
    """``max_sweeps`` caps the alignments that iterate (the stream solved), the activation
    variant's data-free candidate included (reused, not redone uncapped); the paper's single
    pass stays one pass."""
    import jax
    import numpy as np

    from experiments import fusion
    from rotjax import match

    pair, unlabeled = _tiny_vit_pair()
    calls = []
    align = match.align
    monkeypatch.setattr(
        match,
        "align",
        lambda *a, **k: (
            calls.append((tuple(k.get("solve", ())), k.get("max_sweeps"))) or align(*a, **k)
        ),
    )
    variants = fusion.align_variants(
        pair, ["paper", "all + stream", "activations"], unlabeled, max_sweeps=2
    )
    assert calls[0] == (match.PAPER, None)  # align's default for it: one pass
    assert calls[1] == (match.ALL, 2)
    # the activation variant's candidates start from the activations (init): none of them
    # is an uncapped data-free alignment
    assert (match.ALL, None) not in calls
    canonical = pair.canonical()
    expected = align(canonical.spec, canonical.a, canonical.b, solve=match.ALL, max_sweeps=2)
    got = variants["all + stream"]["pair"].b
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_array_equal(x, y)
    # The canonical form is computed once and its seconds counted in every variant in it
    # (each variant's time is what it costs alone; the first one paid for it).
    import time

    real = fusion.Pair.canonical
    monkeypatch.setattr(fusion.Pair, "canonical", lambda self: time.sleep(0.5) or real(self))
    timed = fusion.align_variants(pair, ["activations", "all + stream"], unlabeled, max_sweeps=2)
    assert all(timed[n]["seconds"] >= 0.5 for n in timed), timed


def test_straight_through_variant_descends_from_the_activation_variant(monkeypatch):
    """A straight-through variant after an activation variant of the same options descends
    from its alignment (computed once, not twice): the result is `align_straight_through`
    from it, and its seconds count both."""
    import jax
    import numpy as np

    from experiments import fusion
    from rotjax import merge

    pair, unlabeled = _tiny_vit_pair()
    calls = []
    by_activations = merge.align_by_activations
    monkeypatch.setattr(
        merge,
        "align_by_activations",
        lambda *a, **k: calls.append(k) or by_activations(*a, **k),
    )
    key = jax.random.key(1)
    steps = {**fusion.ALIGNMENTS["straight-through"], "steps": 3}
    names = ["all + stream", "activations", "straight-through"]
    options = {"straight-through": steps}
    variants = fusion.align_variants(pair, names, unlabeled, key=key, options=options)
    assert len(calls) == 1 and "steps" not in calls[0]
    canonical = pair.canonical()
    start = variants["activations"]["pair"].b
    act = fusion.align_variants(pair, ["activations"], unlabeled, key=key)["activations"]
    want, _ = merge.align_straight_through(
        canonical.model, canonical.spec, canonical.a, canonical.b, fusion.batches(unlabeled),
        init=merge.align_by_activations(
            canonical.model, canonical.spec, canonical.a, canonical.b,
            fusion.batches(unlabeled), key=key,
        )[0], key=key, steps=3,
    )  # fmt: skip
    got = variants["straight-through"]["pair"].b
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(act["pair"].b), strict=True):
        np.testing.assert_array_equal(x, y)
    seconds = {n: v["seconds"] for n, v in variants.items()}
    assert seconds["straight-through"] > seconds["activations"] > 0


@pytest.mark.parametrize(
    "descent, message",
    [({"steps": -1}, "steps must be an integer >= 0"), ({"learning_rate": 0.0}, "learning_rate")],
)
def test_align_variants_checks_the_descent_before_any_work(descent, message, monkeypatch):
    """A straight-through variant's bad options are refused before the other variants'
    alignments run (they take minutes on real models)."""
    from experiments import fusion
    from rotjax import match, merge

    def no_work(*args, **kwargs):
        raise AssertionError("an alignment ran before the options were checked")

    monkeypatch.setattr(match, "align", no_work)
    monkeypatch.setattr(merge, "align_by_activations", no_work)
    pair, unlabeled = _tiny_vit_pair()
    bad = {**fusion.ALIGNMENTS["straight-through"], **descent}
    with pytest.raises(ValueError, match=message):
        fusion.align_variants(pair, ["all", "activations", "bad"], unlabeled, options={"bad": bad})


def test_multitask_limits_are_exact():
    """Each source gets its share of an odd limit, the total the limit itself."""
    from experiments import train as T

    data = T.load_data(T.minilm_wordnet("wordnet_multitask", train_limit=33, eval_limit=5))
    assert len(data["train"]["labels"]) == 33 and len(data["test"]["labels"]) == 5


def test_text_data_version_changes_with_the_tokenizer(tmp_path, monkeypatch):
    """A text run's data version holds a digest of the tokenizer's files, so that a run whose
    token ids came from another tokenizer is trained afresh, not reused, and of the WordNet
    files' sizes."""
    from experiments import train as T
    from rotjax.data import _tokenize

    config = T.minilm_wordnet("wordnet_glosses")
    tags = T.minilm_wordnet("supersense_nouns")
    before = T.data_version(config)
    assert before != T.data_version(tags) and T.data_version(T.vit_fashion_mnist()) is None
    (tmp_path / "m").mkdir()  # the files `tokenizer_stamp` reads, not the weights
    for name in ("tokenizer.json", *_tokenize.PAD_CONFIG_FILES):
        if (_tokenize.minilm_dir() / name).is_file():
            shutil.copy(_tokenize.minilm_dir() / name, tmp_path / "m" / name)
    monkeypatch.setattr(_tokenize, "minilm_dir", lambda: tmp_path / "m")
    assert T.data_version(config) == before  # the same files: the same version
    tokenizer = tmp_path / "m" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes() + b"\n")  # another file, the same tokens
    assert T.data_version(config) != before
    assert T.data_version(config).startswith(before.rsplit("-", 1)[0])  # only the digest moved
    # And of the WordNet files' sizes: another release of the database is other data.
    from rotjax.data import _wordnet

    now = T.data_version(config)
    (tmp_path / "wn").mkdir()
    for pos in ("noun", "verb", "adj", "adv"):
        shutil.copy(_wordnet.pos_file(_wordnet.WORDNET_DIR, pos), tmp_path / "wn")
    monkeypatch.setattr(_wordnet, "WORDNET_DIR", tmp_path / "wn")
    assert T.data_version(config) == now  # the same sizes (other files, other times)
    with open(_wordnet.pos_file(tmp_path / "wn", "verb"), "a") as f:
        f.write("\n")
    assert T.data_version(config) != now


def test_text_scoring_sorts_by_length_and_cuts_each_batch(key):
    """experiments' evaluator and predictor score token data sorted by length, each batch cut
    to its longest text: the metrics of the uncut data (sums in another order: 1e-6), the
    predictions in the data's own order."""
    import dataclasses

    import numpy as np
    from helpers import CONFIGS

    from experiments import fusion

    config = CONFIGS["bert-h5d2-l1-token"]  # 12 positions, 4 classes
    model, params = init(config, key, scale=0.3)
    rng = np.random.default_rng(0)
    mask = (np.arange(12) < rng.integers(1, 13, (50, 1))).astype(np.int32)
    labels = np.where(mask > 0, rng.integers(0, 4, (50, 12)), train.IGNORE_LABEL)
    arrays = {"input_ids": rng.integers(1, 40, (50, 12)) * mask, "attention_mask": mask}
    arrays["labels"] = labels.astype(np.int32)
    got = fusion.predictor(model, arrays, cap=8)(params)
    want = train.predictor(model, batch_size=8)(params, arrays)
    np.testing.assert_array_equal(got[mask > 0], want[mask > 0])
    assert (got[mask == 0] == train.IGNORE_LABEL).mean() > 0.25  # cut: widths 8 and 12
    cut = fusion.evaluator(model, arrays, cap=8)(params)
    whole = train.evaluator(model, arrays, batch_size=8)(params)
    assert cut["count"] == whole["count"] and cut["accuracy"] == whole["accuracy"]
    assert cut["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    seq = dataclasses.replace(config, task="sequence_classification")
    model, params = init(seq, key, scale=0.3)
    sequences = {**arrays, "labels": rng.integers(0, 4, 50).astype(np.int32)}
    got = fusion.predictor(model, sequences, cap=8)(params)
    np.testing.assert_array_equal(got, train.predictor(model, batch_size=8)(params, sequences))


def test_activation_start(tmp_path, capsys):
    """Every candidate on a tiny pair, C being A moved by a random symmetry element: the
    activation start finds A again (each feature matched to itself, correlation 1; its average
    scores as A), and the summary is the JSON's."""
    import jax

    from experiments import activation_start
    from rotjax import symmetry as sym
    from rotjax.models import family

    fam = family(TINY_VIT)
    a = fam.init(TINY_VIT, jax.random.key(0))
    spec = fam.symmetry_spec(TINY_VIT)
    c = sym.apply(spec, a, sym.sample(spec, jax.random.key(7)))
    dirs = [str(tmp_path / n) for n in "ac"]
    for d, p in zip(dirs, (a, c), strict=True):
        hf.save(d, TINY_VIT, p)
    out = tmp_path / "out"
    argv = ["--images", "64", "--max-sweeps", "1", "--descent-steps", "2", "--out", str(out)]
    activation_start.main([*dirs, *argv])
    result = json.loads((out / "activation_start.json").read_text())
    (pair,) = result["pairs"]
    rows = pair["candidates"]
    descent = "straight-through (2 steps)"
    # --max-sweeps 1 still builds every candidate of the library's (its rule picks among them)
    sweeps = [f"start + {s}" for s in range(1, activation_start.LIBRARY_SWEEPS + 1)]
    assert activation_start.LIBRARY_SWEEPS > 1
    assert list(rows) == ["start", *sweeps, "start, converged", "data-free", "none", descent]
    assert rows["start"]["sweeps"] == rows["none"]["sweeps"] == 0
    for kind, value in rows["start"]["correlation"].items():
        assert value == pytest.approx(1.0, abs=1e-4), kind
    assert rows["none"]["correlation"]["ffn"] < 0.9  # unaligned: C's units in another order
    # Both starts give A back: the same merge, whose loss is below the unaligned average's.
    assert rows["start"]["loss"] == pytest.approx(rows["data-free"]["loss"], rel=1e-5)
    assert rows["start"]["loss"] < rows["none"]["loss"]
    # The library's rule (of equal losses, the nearest A in weights): its own choice.
    from experiments import fusion
    from experiments.pairs import image_sets
    from rotjax import merge

    p = fusion.load_pair(*dirs).canonical()
    batches = fusion.batches(image_sets(64, 1000)[1])
    _, info = merge.align_by_activations(p.model, p.spec, p.a, p.b, batches, key=jax.random.key(0))
    s = info["sweeps"]
    want = {"weights": "data-free", "identity": "none"}.get(info["start"])
    assert pair["picks"]["least loss"] == (want or (f"start + {s}" if s else "start")), info
    assert pair["picks"]["least loss"] != "start"  # (no scales solved: farther from A)
    printed = capsys.readouterr().out
    for line in activation_start.summary(result):
        assert line in printed
    missing = str(tmp_path / "missing")
    for bad in (
        [dirs[0]],
        [*dirs, "--max-sweeps", "-1"],
        [*dirs, "--descent-steps", "-1"],
        [dirs[0], missing],
    ):
        with pytest.raises(SystemExit) as exit_:
            activation_start.main([*bad, "--out", str(tmp_path / "bad")])
        assert exit_.value.code == 2
    assert f"not checkpoint directories (no config.json): {missing}" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
