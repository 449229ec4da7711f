"""The `rotjax` command line on tiny checkpoints written by the test: align, merge (every
method), inspect, and every bad input exiting 2 with one message, writing nothing."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import stat
import sys
import traceback
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import rel_err
from helpers import CONFIGS, compiled, inputs

from rotjax import cli, hf, match, merge
from rotjax import symmetry as sym
from rotjax.cli import _merge
from rotjax.cli._common import CLIError
from rotjax.models import family
from rotjax.tree import to_dict

CONFIG = CONFIGS["bert-h3d4-l2"]
VIT = CONFIGS["vit-h3d4-l2"]


def _metadata(directory, *, labels=("neg", "pos", "mixed")):
    """Give a checkpoint what real ones carry: label names, problem_type, tokenizer and
    sentence-transformers files."""
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    config["problem_type"] = "single_label_classification"
    config["my_field"] = [1, 2]
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modules.json").write_text('[{"idx": 0, "path": "", "type": "x"}]')
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (directory / "vocab.txt").write_text("[PAD]\n")
    (directory / "onnx").mkdir()
    (directory / "onnx" / "model.onnx").write_bytes(b"stale weights")


@pytest.fixture
def checkpoints(tmp_path, key):
    c = compiled(CONFIG)
    a = c.init(key, 0.3)
    g = sym.sample(c.spec, jax.random.fold_in(key, 1))
    b = c.apply(a, g)
    hf.save(tmp_path / "a", CONFIG, a)
    hf.save(tmp_path / "b", CONFIG, b)
    _metadata(tmp_path / "b")
    ids, mask = inputs(CONFIG, key, batch=8)
    np.savez(tmp_path / "data.npz", input_ids=np.asarray(ids), attention_mask=np.asarray(mask))
    return tmp_path, a


def _fails(argv, capsys, *messages, code=2):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("rotjax"), err
    for m in messages:
        assert m in err, err
    return err


def test_align_recovers_a_planted_transform_and_keeps_metadata(checkpoints, capsys):
    tmp, a = checkpoints
    out = tmp / "out"
    argv = ["align", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--solve", " rotation, scale ,ffn,heads,residual"]) == 0
    _, aligned = hf.load(out)
    assert rel_err(aligned, a) <= 1e-5
    report = json.loads((out / "alignment.json").read_text())
    assert {k: report[k] for k in ("solver", "residual_init", "max_sweeps", "seed")} == {
        "solver": "scipy", "residual_init": "independent", "max_sweeps": None, "seed": 0,
    }  # fmt: skip
    d = report["distance"]
    assert d["all"]["after"] <= 1e-8 * d["all"]["before"]
    assert d["touched"]["before"] == pytest.approx(d["all"]["before"], rel=1e-6)
    assert set(report["per_layer"]) == {"layer_0", "layer_1", "global"}
    assert "encoder/layer_0/attention/qk_rotation" in report["per_group"]
    printed = capsys.readouterr().out
    assert "squared distance to anchor, all parameters:" in printed
    # Metadata of the source: config fields, label names, every non-weight file.
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos", "2": "mixed"}
    assert config["problem_type"] == "single_label_classification" and config["my_field"] == [1, 2]
    for f in ("modules.json", "1_Pooling/config.json", "vocab.txt"):
        assert (out / f).read_bytes() == (tmp / "b" / f).read_bytes(), f
    assert not (out / "onnx").exists()  # weights of the unaligned model: not copied
    # --solve all: every block this model has (as `merge --align all`), those it lacks noted;
    # paper: the default. Either alone: with other blocks it is no block's name.
    out = tmp / "all"
    argv = ["align", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--solve", "all"]) == 0
    assert rel_err(hf.load(out)[1], a) <= 1e-5
    solved = ["rotation", "scale", "ffn", "heads", "residual"]
    assert json.loads((out / "alignment.json").read_text())["solve"] == solved
    note = "--solve all: rotation,scale,ffn,heads,residual (no query_heads,stream)"
    assert note in capsys.readouterr().err
    assert cli.main([*argv[:4], str(tmp / "paper"), *argv[5:], "--solve", "paper"]) == 0
    solve = json.loads((tmp / "paper" / "alignment.json").read_text())["solve"]
    assert solve == list(match.PAPER)
    _fails([*argv, "--solve", "all,heads"], capsys, "unknown blocks ['all']")


def test_align_of_the_stream_says_it_aligns_canonical_forms(tmp_path, key, capsys):
    """``--solve ...,stream`` aligns the two models' canonical forms: the written model is B's
    (here A's: nothing to move), its distances are to A's canonical form, and a note says so
    (the distances looked like distances to the anchor as stored)."""
    config = CONFIGS["vit-h3d4-l2"]
    a = compiled(config).init(key, 0.3)
    hf.save(tmp_path / "a", config, a)
    out = tmp_path / "out"
    argv = ["align", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--solve", "rotation,scale,ffn,stream"]) == 0
    assert "the distances are to the anchor's canonical form" in capsys.readouterr().err
    canon = sym.canonicalize(family(config).stream_spec(config), a)
    assert rel_err(hf.load(out)[1], canon) <= 1e-6
    # Merged with the anchor as stored (no stream alignment): noted; --align all: not needed.
    note = "model 1 (merged): aligned to the anchor's canonical form (its alignment.json)"
    merge_argv = ["merge", str(tmp_path / "a"), str(out), "--quiet", "--out"]
    for align, noted in (("none", True), ("paper", True), ("all", False)):
        target = tmp_path / f"merged-{align}"
        assert cli.main([*merge_argv, str(target), "--align", align]) == 0
        assert (note in capsys.readouterr().err) == noted, align


def test_written_files_follow_the_umask(checkpoints):
    tmp, _ = checkpoints
    old = os.umask(0o027)
    try:
        assert (
            cli.main(["align", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "o"), "--quiet"])
            == 0
        )
    finally:
        os.umask(old)
    for f in ("model.safetensors", "config.json", "alignment.json", "vocab.txt"):
        assert stat.S_IMODE((tmp / "o" / f).stat().st_mode) == 0o640, f


@pytest.mark.parametrize(
    "method",
    ["average", "fisher", "regmean", "task-arithmetic", "ties", "dare", "ot-acts", "ot-wts"],
)
def test_merge_every_method(method, checkpoints, capsys):
    tmp, a = checkpoints
    out = tmp / f"m-{method}"
    argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--method", method]
    argv += ["--align", "all", "--quiet"]
    if method in ("fisher", "regmean", "ot-acts"):  # the others read no data: refused
        argv += ["--data", str(tmp / "data.npz")]
    if method in ("task-arithmetic", "ties", "dare"):
        # Fine-tunes of one base share its basis: here A and A itself, base A.
        argv[2] = str(tmp / "a")
        argv += ["--base", str(tmp / "a"), "--scale", "0.5"]
    else:
        argv += ["--weights", "1,3"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    config, merged = hf.load(out)
    report = json.loads((out / "merge.json").read_text())
    assert report["method"] == method and set(report["seconds"]) >= {"align", "statistics", "merge"}
    assert report["options"]["weights"] == (None if "--base" in argv else [1.0, 3.0])
    assert report["options"]["seed"] == 0  # (read by the alignment)
    reads = "--data" in argv  # the data options recorded only where data was read
    assert (report["options"]["batch_size"] is None) == (not reads)
    assert (report["options"]["max_examples"] is None) == (not reads)
    # B is A moved by a symmetry: aligned, it is A, and every merge of A with A is A (the
    # task-vector merges: A with itself, base A: zero task vectors).
    assert rel_err(merged, a) <= 1e-5, method
    assert config == CONFIG


def test_merge_aligns_from_activations(checkpoints, capsys):
    tmp, a = checkpoints
    out = tmp / "acts"
    argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--align", "activations"]
    argv += ["--data", str(tmp / "data.npz"), "--quiet"]
    assert cli.main([*argv, "--descent-steps", "3"]) == 0
    # B is A moved by a symmetry element: no step beats the exact alignment (the merge
    # predicts as A, the least cross-entropy to A's predictions), which is kept
    assert rel_err(hf.load(out)[1], a) <= 1e-5
    out_text = capsys.readouterr().out
    assert "merged 2 models (average, descent steps: 3, aligned: activations)" in out_text
    report = json.loads((out / "merge.json").read_text())
    (chosen,) = report["alignment"]
    assert chosen["prediction_loss"] and chosen["start"] in ("activations", "weights")
    # the options that shape the data's use are recorded (8 rows, under the 1000 kept)
    options = {k: report["options"][k] for k in ("max_examples", "batch_size", "descent_steps")}
    assert options == {"max_examples": 1000, "batch_size": 32, "descent_steps": 3}
    assert not any("--max-examples" in n for n in report["notes"])
    losses = [*chosen["prediction_loss"], chosen["prediction_loss_weights_start"]]
    assert all(np.isfinite(losses)), chosen
    # B unaligned (A moved by a symmetry element) is a candidate too, and a worse one.
    assert chosen["prediction_loss_unaligned"] > min(losses), chosen
    descent = chosen["straight_through"]
    assert [s for s, _ in descent["losses"]] == [0, 3] and descent["step"] == 0, descent
    assert descent["losses"][0][1] == pytest.approx(min(losses), rel=1e-5)
    # The model's alignment time is all of it (it was its last align call's, a fraction).
    assert 0.9 * report["seconds"]["align"] <= chosen["seconds"] <= report["seconds"]["align"]
    argv[argv.index("activations")] = "all"
    assert cli.main([*argv[:4], str(tmp / "refused"), *argv[5:], "--descent-steps", "3"]) == 2
    assert "--descent-steps applies to --align activations only" in capsys.readouterr().err
    assert not (tmp / "refused").exists()


def test_merge_fisher_normalize_reaches_the_merge(checkpoints, capsys, monkeypatch):
    """--normalize (the Fisher paper's code's default) reaches `merge.fisher`, and merge.json
    records it; off by default; refused for other methods. (It had no flag.)"""
    tmp, _ = checkpoints
    seen, fisher = [], merge.fisher
    monkeypatch.setattr(
        merge, "fisher", lambda *a, **k: seen.append(k["normalize"]) or fisher(*a, **k)
    )
    argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--method", "fisher", "--quiet"]
    argv += ["--align", "none", "--data", str(tmp / "data.npz")]
    for flag, want in ((["--normalize"], True), ([], False)):
        out = tmp / f"fisher-{want}"
        assert cli.main([*argv, "--out", str(out), *flag]) == 0, capsys.readouterr().err
        assert json.loads((out / "merge.json").read_text())["options"]["normalize"] is want
    assert seen == [True, False]
    capsys.readouterr()  # (the merges' notes)
    plain = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "n"), "--normalize"]
    _fails(plain, capsys, "--normalize does not apply to --method average (only to fisher)")


def test_merge_sinkhorn_takes_epsilon(checkpoints, capsys):
    """--epsilon reaches Sinkhorn's transport (it had no flag: the library's advice on a
    transport that did not converge, "try a larger epsilon", could not be followed). B is A
    aligned, so a sharp transport keeps A nearly and a blunt one mixes its units."""
    tmp, a = checkpoints
    far = {}
    for eps in (0.01, 10.0, None):  # None: the default, recorded as the value used
        out = tmp / f"sinkhorn-{eps}"
        argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--method", "ot-wts"]
        argv += ["--align", "all", "--transport", "sinkhorn", "--quiet"]
        assert cli.main([*argv, *(["--epsilon", str(eps)] if eps else [])]) == 0
        used = json.loads((out / "merge.json").read_text())["options"]["epsilon"]
        assert used == (eps or merge.SINKHORN_EPSILON["wts"]) and merge.SINKHORN_EPSILON["wts"]
        far[eps] = rel_err(hf.load(out)[1], a)
    assert far[0.01] < 0.1 < far[10.0], far


@pytest.mark.parametrize("method", ["average", "ot-wts"])
def test_merge_with_circuits(method, checkpoints, key, capsys):
    """--circuits after a method: B is A moved by a symmetry, so the merge of A with aligned B
    computes A's function (the heads refactored: other params)."""
    tmp, a = checkpoints
    out = tmp / f"circuits-{method}"
    argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--method", method]
    assert cli.main([*argv, "--align", "all", "--circuits", "--quiet"]) == 0
    assert f"merged 2 models ({method}, circuits, aligned: all)" in capsys.readouterr().out
    c = compiled(CONFIG)
    merged = hf.load(out)[1]
    x = inputs(CONFIG, key)
    assert rel_err(c.forward(merged, x), c.forward(a, x)) <= 1e-5
    assert rel_err(merged, a) > 1e-3  # refactored heads
    assert json.loads((out / "merge.json").read_text())["options"]["circuits"] is True


def test_refit_pads_token_files_with_the_pad_token():
    """``--refit``'s files of different lengths go together padded at the end: ids by the
    model's pad token (a LLaMA-style classifier reads the last token that is not it; padding
    by 0 made a real token of it), masks and token types by 0."""
    short = {"input_ids": np.array([[5, 6]]), "attention_mask": np.array([[1, 1]])}
    long = {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.array([[1, 1, 1]])}
    for pad, want in ((7, 7), (None, 0)):
        got = _merge._together([short, long], pad)
        np.testing.assert_array_equal(got["input_ids"], [[5, 6, want], [1, 2, 3]])
        np.testing.assert_array_equal(got["attention_mask"], [[1, 1, 0], [1, 1, 1]])
    typed = {**long, "token_type_ids": np.array([[1, 1, 1]])}
    got = _merge._together([short, typed], 7)
    np.testing.assert_array_equal(got["token_type_ids"], [[0, 0, 0], [1, 1, 1]])


def test_merge_with_refit(checkpoints, key, capsys):
    """--refit after a merge, on per-model --data (their union): B is A moved by a symmetry, so
    after alignment every layer's target is A's and the refit keeps A's function (to 1e-2:
    the float32 least squares on this tiny random post-norm BERT's ill-conditioned Grams; over
    560 random seeds the logits moved by 1.2e-4 in the median, 1e-3 at the 99th percentile, at
    most 2.3e-3 (ROTJAX_SEED=478, all of it in the row with padding), with a long tail: the
    earlier bound of 1e-3 failed 6 of them; an unaligned merge is off by O(1)). A second file
    of the same texts padded to a longer length serves as well (before, the two lengths could
    not be read together)."""
    tmp, a = checkpoints
    c = compiled(CONFIG)
    x = inputs(CONFIG, key)
    files = np.load(tmp / "data.npz")
    np.savez(tmp / "padded.npz", **{k: np.pad(v, ((0, 0), (0, 8))) for k, v in files.items()})
    for second in ("data.npz", "padded.npz"):
        out = tmp / f"refit-{second}"
        data = ["--data", str(tmp / "data.npz"), "--data", str(tmp / second)]
        argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(out), *data, "--refit"]
        assert cli.main([*argv, "--align", "all", "--quiet"]) == 0
        merged = hf.load(out)[1]
        assert rel_err(c.forward(merged, x), c.forward(a, x)) <= 1e-2
        report = json.loads((out / "merge.json").read_text())
        assert report["options"]["refit"] is True and report["options"]["ridge"] == 1e-4
        assert "merged 2 models (average, refit, aligned: all)" in capsys.readouterr().out


# Per family: the config, and lines that `rotjax inspect` must print for it.
TOKEN_FAMILIES = {
    "llama": (
        "llama-k2g2d6-l2-seq",
        [
            "qk_rotation     orth  x2   size 2 heads x SO(2)^3",
            "vo_rotation     orth  x2   size 2 heads x O(6)",
            "query_heads     hperm x2   size 2 heads x S_2",
        ],
    ),
    "deberta": (
        "deberta-v3-h3d5-l2-seq",
        ["deberta-v2 (sequence_classification)", "qk_rotation  orth  x2   size 3 heads x O(5)"],
    ),
}


@pytest.mark.parametrize(
    ("family", "method", "align"),
    [
        ("llama", "regmean", "all"),
        ("deberta", "regmean", "all"),
        ("deberta", "average", "activations"),
    ],
)
def test_token_checkpoints_align_merge_and_inspect(family, method, align, tmp_path, key, capsys):
    """Grouped-query RoPE decoders (canonical form, stream rotation included) and disentangled
    attention (position projections and relative embeddings included) through the CLI: B is A
    moved by a symmetry; merged after alignment it computes A's function. (DeBERTa from
    activations: the shared query/key layers project the relative embeddings without a second
    call, so what merge captures from them is their tokens' only.)"""
    name, lines = TOKEN_FAMILIES[family]
    config = CONFIGS[name]
    c = compiled(config)
    a = c.init(key, 0.3)
    b = c.apply(a, sym.sample(c.spec, jax.random.fold_in(key, 1)))
    hf.save(tmp_path / "a", config, a)
    hf.save(tmp_path / "b", config, b)
    ids, mask = (np.asarray(x) for x in inputs(config, key, batch=8))
    # Their tokenizers give token_type_ids although the models have no token types.
    types = np.ones_like(ids)
    np.savez(tmp_path / "typed.npz", input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = tmp_path / "merged"
    argv = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet"]
    argv += ["--method", method, "--align", align, "--data"]
    # A text pair's token types (1s): ignored, as transformers' DeBERTa without token types
    # and LLaMA ignore them, with a note for DeBERTa (LLaMA does not name them as an input).
    assert cli.main([*argv, str(tmp_path / "typed.npz")]) == 0
    err = capsys.readouterr().err
    assert ("token_type_ids ignored (the model has no token types" in err) == (family == "deberta")
    assert ("ignored ['token_type_ids']" in err) == (family == "llama"), err
    loaded, merged = hf.load(out)
    assert loaded == config
    x = inputs(config, jax.random.fold_in(key, 2))
    assert rel_err(c.forward(merged, x), c.forward(a, x)) <= 1e-5
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for line in lines:
        assert line in text, text


def test_merge_fisher_of_a_causal_lm(tmp_path, key, capsys):
    """A causal LM's Fisher is sampled by default (its exact one would sum over the vocabulary
    at every token), and its labels are taken as transformers takes them (the input ids, which
    the model shifts): position t's label becomes token t + 1."""
    config = dataclasses.replace(CONFIGS["llama-k2g2d6-l2-seq"], task="causal_lm")
    c = compiled(config)
    hf.save(tmp_path / "a", config, c.init(key, 0.3))
    hf.save(tmp_path / "b", config, c.init(jax.random.fold_in(key, 1), 0.3))
    ids, mask = (np.asarray(x) for x in inputs(config, key, batch=4))
    labels = np.where(mask, ids, -100)
    path = tmp_path / "data.npz"
    np.savez(path, input_ids=ids, attention_mask=mask, labels=labels, atention_mask=mask)
    out = tmp_path / "merged"
    argv = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--method", "fisher", "--align", "none", "--data", str(path)]) == 0
    assert "ignored ['atention_mask']" in capsys.readouterr().err  # a typo is not silent
    assert json.loads((out / "merge.json").read_text())["options"]["fisher"] == "sampled"
    read = _merge.read_data(str(path), config, 1000, need_labels=True)
    shifted = np.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    np.testing.assert_array_equal(read["labels"], shifted)
    assert (read["labels"] != -100).sum() == mask[:, 1:].sum() > 0
    # Unsigned token ids (a tokenizer's uint16 output) shift too (-100 overflowed them).
    np.savez(path, input_ids=ids, labels=ids.astype(np.uint16))
    read = _merge.read_data(str(path), config, 1000, need_labels=True)
    np.testing.assert_array_equal(read["labels"][:, :-1], ids[:, 1:])
    assert (read["labels"][:, -1] == -100).all()
    # One token per text: no next token to predict, so no label (it merged as the average).
    np.savez(path, input_ids=ids[:, :1], labels=ids[:, :1])
    with pytest.raises(
        ValueError, match=r"every label is -100 \(ignored\) after the shift to next"
    ):
        _merge.read_data(str(path), config, 1000, need_labels=True)
    # Labels a method does not read are said to be unread (they were dropped silently).
    notes = []
    _merge.read_data(str(path), config, 1000, notes=notes)
    assert f"--data {path}: labels not read (only --fisher empirical reads them)" in notes
    # A file that is no .npz at all (numpy guessed pickled data and suggested loading it)
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"not a readable .npz \(neither a zip of arrays nor"):
        _merge.read_data(str(path), config, 1000)


def test_merge_bad_inputs(checkpoints, capsys, tmp_path):
    tmp, a = checkpoints
    out = tmp / "bad"
    A, B = str(tmp / "a"), str(tmp / "b")
    base = ["merge", A, B, "--out", str(out), "--quiet"]
    _fails([*base, "--method", "regmean"], capsys, "--method regmean needs --data")
    _fails([*base, "--method", "ties"], capsys, "needs --base")
    _fails([*base, "--method", "dare", "--base", A, "--circuits"], capsys, "--circuits does not")
    _fails([*base, "--refit"], capsys, "--refit needs --data")
    ties = [*base, "--method", "ties", "--base", A, "--refit", "--data", str(tmp / "data.npz")]
    _fails(ties, capsys, "--refit does not")
    refit = [*base, "--refit", "--data", str(tmp / "data.npz")]
    _fails([*refit, "--ridge", "-1"], capsys, "--ridge must be a number in [0, 1e8]")
    # A method's options given to another are refused, not silently ignored.
    _fails([*base, "--ridge", "1"], capsys, "--ridge does not apply without --refit")
    _fails([*base, "--alpha", "0.5"], capsys, "--alpha does not apply to --method average")
    # A value starting with "-" is taken for an option by argparse: say how to write it (the
    # message said only that the value was missing), and the value is then checked as any
    _fails(
        [*base, "--weights", "-1,2"],
        capsys,
        "(a value that starts with '-' is written --weights=VALUE)",
    )
    _fails([*base, "--weights=-1,2"], capsys, "--weights: ")
    dare = [*base, "--method", "dare", "--base", A]
    _fails([*dare, "--density", "0.5"], capsys, "--density does not apply to --method dare")
    _fails([*base, "--transport", "sinkhorn"], capsys, "(only to ot-acts, ot-wts)")
    ot = [*base, "--method", "ot-wts"]
    for wrong in (ot, base):  # (another method: not told to add a --transport it refuses)
        _fails([*wrong, "--epsilon", "0.1"], capsys, "--epsilon applies only to --method ot-ac")
    _fails([*ot, "--transport", "sinkhorn", "--epsilon", "0"], capsys, "--epsilon must be a")
    _fails([*dare, "--drop", "1"], capsys, "--drop must be in [0, 1), got 1.0")
    _fails([*base, "--weights", "1,x"], capsys, "--weights must be comma-separated numbers")
    _fails([*base, "--weights", ""], capsys, "--weights must be comma-separated numbers")
    _fails([*base, "--max-examples", "5"], capsys, "--max-examples does not apply")
    # The Fisher of a softmax over one class is 0 (a plain average, silently); a regression or
    # multi-label head's outputs are not a softmax's.
    one = dataclasses.replace(CONFIG, num_labels=1)
    hf.save(tmp / "one", one, compiled(one).init(jax.random.key(0), 0.3))
    for kind in ("regression", "multi_label_classification"):
        shutil.copytree(tmp / "a", tmp / kind)
        config = json.loads((tmp / kind / "config.json").read_text())
        (tmp / kind / "config.json").write_text(json.dumps({**config, "problem_type": kind}))
    data_npz = ["--method", "fisher", "--data", str(tmp / "data.npz"), "--out", str(out)]
    for anchor, why in (
        ("one", "num_labels=1"),
        *((k, f"problem_type {k}") for k in ("regression", "multi_label_classification")),
    ):
        other = str(tmp / anchor)  # (two models of one problem_type: their Fisher refused)
        _fails(["merge", str(tmp / anchor), other, *data_npz, "--quiet"], capsys, why)
    # Heads of different problem_types are read by different losses: refused in any order
    # (the Fisher check read the anchor's alone); so is the activation alignment's choice by
    # softmax agreement for heads that are not softmax.
    for pair in ((A, str(tmp / "regression")), (str(tmp / "regression"), A)):
        _fails(["merge", *pair, "--out", str(out), "--quiet"], capsys, "problem_type differs")
    # One output without problem_type: nothing to choose by, so the activation start is refined
    # by weight matching, with a note (it was refused only when problem_type said regression).
    # The same model twice is merged, and said to count twice.
    one = ["merge", str(tmp / "one"), f"{tmp / 'one'}/", "--align", "activations"]
    assert cli.main([*one, "--data", str(tmp / "data.npz"), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    notes = json.loads((out / "merge.json").read_text())["notes"]
    assert any("num_labels=1" in n and "weight matching to convergence" in n for n in notes)
    assert f"model 1 (merged): {tmp / 'one'}/ is model 0 (anchor) again; it counts twice" in notes
    shutil.rmtree(out)
    # The descent's loss is the agreement of softmax predictions: refused up front, naming the
    # option (the library's check named its own argument, `steps`)
    _fails(
        [*one, "--descent-steps", "2", "--data", str(tmp / "data.npz"), "--out", str(out)],
        capsys,
        "--descent-steps needs models with a softmax classification head (num_labels=1",
    )
    multi = ["merge", *[str(tmp / "multi_label_classification")] * 2, "--out", str(out)]
    _fails(
        [*multi, "--quiet", "--align", "activations", "--data", str(tmp / "data.npz")],
        capsys,
        "chooses by the agreement of softmax predictions",
        "problem_type multi_label_classification",
    )
    _fails([*base, "--batch-size", "5"], capsys, "--batch-size does not apply")
    _fails([*base, "--weights", "1,2,3"], capsys, "--weights has 3 values for 2 models")
    np.savez(tmp / "wrong.npz", pixel_values=np.zeros((2, 3, 8, 8), np.float32))
    _fails(
        [*base, "--method", "fisher", "--data", str(tmp / "wrong.npz")],
        capsys,
        "missing ['input_ids']",
    )
    np.savez(tmp / "big.npz", input_ids=np.full((2, 4), 10_000, np.int32))
    _fails([*base, "--method", "fisher", "--data", str(tmp / "big.npz")], capsys, "outside [0, 50)")
    _fails([*base, "--method", "regmean", "--data", A], capsys, "--data", "not a readable .npz")
    # Data no step reads is refused (it was read, checked, listed in merge.json and unused).
    _fails(
        [*base, "--method", "ot-wts", "--data", str(tmp / "data.npz")],
        capsys,
        "--data is not read by --method ot-wts with --align paper",
    )
    _fails(["merge", A, B, "--out", "", "--quiet"], capsys, "--out is empty")  # (was ".")
    # A seed no step reads is refused (it was recorded in merge.json and unused).
    _fails(
        [*base, "--align", "none", "--seed", "3"],
        capsys,
        "--seed is not read by --method average with --align none",
    )
    # A seed beyond jax.random.key's int64: exit 2 naming it (a traceback before).
    _fails([*base, "--seed", str(2**63)], capsys, f"{2**63} is not in [0, 2^63)")
    _fails(["align", A, B, "--out", str(out), "--seed", "-1"], capsys, "-1 is not in [0, 2^63)")
    # Broken or wrong files and bad values: one line naming the file and the problem.
    ids = np.ones((2, 4), np.int32)
    (tmp / "empty.npz").write_bytes(b"")
    (tmp / "cut.npz").write_bytes((tmp / "data.npz").read_bytes()[:100])
    np.save(tmp / "one.npy", ids)
    np.savez(tmp / "scalar.npz", input_ids=np.int32(3))
    np.savez(tmp / "no_tokens.npz", input_ids=ids[:, :0])
    np.savez(tmp / "mask2.npz", input_ids=ids, attention_mask=2 * ids)
    np.savez(tmp / "mask0.npz", input_ids=ids, attention_mask=ids * [[1], [0]])
    np.savez(tmp / "float_types.npz", input_ids=ids, token_type_ids=ids * 0.5)
    np.savez(tmp / "label9.npz", input_ids=ids, labels=np.array([0, 9]))
    np.savez(tmp / "label_float.npz", input_ids=ids, labels=np.array([0.0, 0.5]))
    np.savez(tmp / "label_none.npz", input_ids=ids, labels=np.array([-100, -100]))
    np.savez(tmp / "label_missing.npz", input_ids=ids)
    long = np.ones((2, CONFIG.max_position_embeddings + 1), np.int32)
    np.savez(tmp / "long.npz", input_ids=long)
    fisher = [*base, "--method", "fisher", "--fisher", "empirical", "--data"]
    for name, message in [
        ("empty.npz", "not a readable .npz"),
        ("cut.npz", "not a readable .npz"),
        ("one.npy", "not a readable .npz"),
        ("scalar.npz", "['input_ids'] are scalars"),
        ("no_tokens.npz", "input_ids must be integers (N, T), T >= 1"),
        ("mask2.npz", "attention_mask must hold 0 and 1 only"),
        ("mask0.npz", "rows [1] have no real token"),
        ("long.npz", f"input_ids has {long.shape[1]} tokens; this model takes at most"),
        ("float_types.npz", "token_type_ids must be integers"),
        ("label9.npz", "labels: 1 label(s) outside the classes [0, 3) and not IGNORE_LABEL"),
        ("label_float.npz", "labels must be integers of shape (2,)"),
        # (the empirical Fisher of no example: 0 everywhere, the plain average, silently)
        ("label_none.npz", "every label is -100 (ignored)"),
        ("label_missing.npz", "missing ['labels'] (--fisher empirical reads them)"),
    ]:
        method = fisher if name.startswith("label") else [*base, "--method", "regmean", "--data"]
        err = _fails([*method, str(tmp / name)], capsys, f"--data {tmp / name}: {message}")
        assert "\n" not in err, err
    # Big-endian labels (an .npz written elsewhere) are read like native ones (they reached
    # the statistics' jit as they were, which refused them after the alignment)
    np.savez(tmp / "label_be.npz", input_ids=ids, labels=np.array([0, 2], ">i8"))
    assert cli.main([*fisher, str(tmp / "label_be.npz")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    shutil.rmtree(out)
    _fails([*base, "--base", A], capsys, "--base does not apply to --method average")
    # A missing file is named with its option
    nosuch = str(tmp / "nosuch.npz")
    _fails([*base, "--method", "regmean", "--data", nosuch], capsys, f"--data {nosuch} does not")
    _fails([*dare, "--base", nosuch], capsys, f"--base {nosuch} does not exist")
    # An --out that is a symbolic link (to an empty directory) would be replaced by the
    # checkpoint, not written through: refused.
    (tmp / "target").mkdir()
    (tmp / "link").symlink_to(tmp / "target")
    _fails(["merge", A, B, "--out", str(tmp / "link"), "--quiet"], capsys, "is a symbolic link")
    assert (tmp / "link").is_symlink() and not any((tmp / "target").iterdir())
    # Classifiers whose classes are named differently: the same row is not the same class.
    for name, classes in (("named_a", "neg neu pos"), ("named_b", "pos neu neg")):
        shutil.copytree(tmp / "a", tmp / name)
        config = json.loads((tmp / name / "config.json").read_text())
        config["id2label"] = dict(enumerate(classes.split()))
        config["label2id"] = {c: i for i, c in enumerate(classes.split())}
        (tmp / name / "config.json").write_text(json.dumps(config))
    named = ["merge", str(tmp / "named_a"), str(tmp / "named_b"), "--out", str(out), "--quiet"]
    _fails(named, capsys, "label names differ", "{0: 'neg', 1: 'neu', 2: 'pos'} vs {0: 'pos'")
    # Aligning them averages nothing: allowed.
    named[0] = "align"
    assert cli.main(named) == 0, capsys.readouterr().err
    shutil.rmtree(out)
    # An anchor with transformers' default names (LABEL_i) against named classes: nothing to
    # compare, and the merge keeps the anchor's names: a note says both (it was silent)
    assert cli.main(["merge", A, str(tmp / "named_b"), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    notes = json.loads((out / "merge.json").read_text())["notes"]
    assert any("names its classes" in n and "keeps model 0 (anchor)'s names" in n for n in notes)
    shutil.rmtree(out)
    _fails([*base, "--method", "ties", "--base", A, "--scale", "nan"], capsys, "--scale must be")
    _fails(
        ["merge", A, B, "--out", str(tmp / "a" / "inner"), "--quiet"], capsys, "inside the input"
    )
    assert not (tmp / "a" / "inner").exists()
    # A model with NaN: refused, naming the model and the path.
    c = compiled(CONFIG)
    nan = to_dict(a)
    nan["classifier/bias"] = nan["classifier/bias"].at[0].set(np.nan)
    from rotjax.tree import from_dict

    hf.save(tmp / "nan", CONFIG, from_dict(nan))
    err = _fails(["merge", A, str(tmp / "nan"), "--out", str(out), "--quiet"], capsys, "non-finite")
    assert "model 1 (merged)" in err and "classifier/bias" in err and "\n" not in err
    # Different families: refused up front (was an AttributeError traceback).
    hf.save(tmp / "vit", VIT, compiled(VIT).init(jax.random.key(0), 0.3))
    _fails(
        ["merge", A, str(tmp / "vit"), "--out", str(out), "--quiet"], capsys, "different families"
    )
    _fails(
        ["align", A, str(tmp / "vit"), "--out", str(out), "--quiet"], capsys, "different families"
    )
    # A run of experiments.train given for its checkpoint (run/hf): the error says where it is.
    run = tmp / "run"
    shutil.copytree(tmp / "vit", run / "hf")
    (run / "config.json").write_text('{"name": "vit-fashion_mnist-s0", "model": "vit"}')
    hint = f"({run / 'hf'} holds a checkpoint: give that)"
    _fails(["merge", str(run), str(tmp / "vit"), "--out", str(out), "--quiet"], capsys, hint)
    # Raw pixels: integers are refused; floats far outside a normalised range merge, noted.
    vit = ["merge", str(tmp / "vit"), str(tmp / "vit"), "--quiet", "--method", "regmean"]
    size = (2, VIT.num_channels, VIT.image_size, VIT.image_size)
    raw = np.random.default_rng(0).integers(0, 256, size)
    np.savez(tmp / "raw.npz", pixel_values=raw.astype(np.uint8))
    _fails([*vit, "--out", str(out), "--data", str(tmp / "raw.npz")], capsys, "raw pixels?")
    np.savez(tmp / "nhwc.npz", pixel_values=np.zeros((2, *size[2:], size[1]), np.float32))
    _fails([*vit, "--out", str(out), "--data", str(tmp / "nhwc.npz")], capsys, "channels last?")
    np.savez(tmp / "huge.npz", pixel_values=np.full(size, 1e39))  # float64: inf in float32
    _fails([*vit, "--out", str(out), "--data", str(tmp / "huge.npz")], capsys, "overflow float32")
    # Finite pixels whose squares overflow: the Grams' file named (internal names before).
    np.savez(tmp / "large.npz", pixel_values=np.full(size, 3e38, np.float32))
    err = _fails([*vit, "--out", str(out), "--data", str(tmp / "large.npz")], capsys, "non-finite")
    assert "the statistics of model 0 (anchor) on --data" in err and "large.npz" in err
    np.savez(tmp / "raw.npz", pixel_values=raw.astype(np.float32), meta=np.int32(1))
    assert cli.main([*vit, "--out", str(tmp / "noted"), "--data", str(tmp / "raw.npz")]) == 0
    assert "ignored ['meta']" in (tmp / "noted" / "merge.json").read_text()  # a scalar unread
    assert "pixel_values reach 255" in capsys.readouterr().err
    assert "pixel_values reach 255" in (tmp / "noted" / "merge.json").read_text()
    # Rows beyond --max-examples and a file without attention_mask whose ids hold the pad
    # token are noted (every token then counts as real).
    ids = np.array(inputs(CONFIG, jax.random.key(1), batch=8)[0])
    ids[:, -2:] = CONFIG.pad_token_id
    np.savez(tmp / "nomask.npz", input_ids=ids)
    argv = ["merge", A, B, "--method", "regmean", "--data", str(tmp / "nomask.npz")]
    assert cli.main([*argv, "--max-examples", "4", "--out", str(tmp / "noted2"), "--quiet"]) == 0
    assert "no attention_mask" in capsys.readouterr().err
    notes = json.loads((tmp / "noted2" / "merge.json").read_text())["notes"]
    pads = int((ids[:4] == CONFIG.pad_token_id).sum())
    assert any(n.endswith("its first 4 of 8 rows used (--max-examples)") for n in notes), notes
    assert any(f"the pad token (id {CONFIG.pad_token_id}) at {pads} positions" in n for n in notes)
    # Image classifiers whose classes are named differently are refused like text ones.
    named = {"cat dog": None, "dog cat": None}
    for i, classes in enumerate(named):
        labels = dict(enumerate(classes.split() + [f"c{j}" for j in range(2, VIT.num_labels)]))
        hf.save(tmp / f"vit{i}", VIT, compiled(VIT).init(jax.random.key(i), 0.3), id2label=labels)
        named[classes] = str(tmp / f"vit{i}")
    _fails(["merge", *named.values(), "--out", str(out), "--quiet"], capsys, "label names differ")
    assert not out.exists()
    del c


def test_inspect_and_version(checkpoints, capsys):
    tmp, _ = checkpoints
    assert cli.main(["inspect", str(tmp / "a")]) == 0
    text = capsys.readouterr().out
    assert "qk_rotation  orth  x2" in text and "heads 3 x 4" in text
    assert "ffn          perm  x3   size 12, 20" in text  # every distinct size: FFN and pooler
    # The stream rotation `align --solve stream` solves is listed where the family has one,
    # else why not (it was listed nowhere, while align's refusal pointed to inspect)
    assert "(no stream rotation: bert is post-norm" in text and "stream_rotation" not in text
    hf.save(tmp / "vit", VIT, compiled(VIT).init(jax.random.key(0), 0.3))
    assert cli.main(["inspect", str(tmp / "vit")]) == 0
    text = capsys.readouterr().out
    assert "stream_rotation rot   x1   size O(11)" in text and "no stream rotation" not in text
    assert "    ffn             perm  x2   size 24\n" in text  # one column (it was 3 narrower)
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("rotjax 0.")


def test_unreadable_files_of_the_copied_input_are_refused_before_any_work(
    checkpoints, capsys, monkeypatch
):
    """The files a command copies from an input (merge: model 0's, align: the model's) must
    be readable: an unreadable file failed when saving, after all the work, naming no input.
    An unreadable folder it would copy is a note (it was left out of the checkpoint, silently);
    a hidden one is never copied, and no reason to fail (a review: a .git/objects that could
    not be read failed the merge). (Denied by patched `open` and `os.scandir`, which `os.walk`
    reads folders with: the tests run as root.)"""
    from rotjax.hf import _files, _save

    tmp, _ = checkpoints
    out = tmp / "new" / "out"
    merge = ["merge", str(tmp / "b"), str(tmp / "a"), "--align", "none", "--quiet"]
    align = ["align", str(tmp / "a"), str(tmp / "b"), "--quiet"]

    def denied(name, real):
        def call(path, *args, **kwargs):
            if Path(path).name == name:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    with monkeypatch.context() as m:
        m.setattr(_save, "open", denied("vocab.txt", open), raising=False)
        _fails([*merge, "--out", str(out)], capsys, "model 0 (anchor)", "Permission denied")
        _fails([*align, "--out", str(out)], capsys, "model (", "vocab.txt")
    assert not (tmp / "new").exists()
    (tmp / "b" / ".git" / "objects").mkdir(parents=True)
    with monkeypatch.context() as m:
        m.setattr(os, "scandir", denied("1_Pooling", denied("objects", os.scandir)))
        assert cli.main([*merge, "--out", str(tmp / "merged")]) == 0
        err = capsys.readouterr().err
        assert "note: model 0 (anchor): " in err and "1_Pooling cannot be read" in err, err
        assert "not copied" in err and "objects" not in err and "Warning" not in err, err
        assert cli.main([*align, "--out", str(tmp / "aligned")]) == 0
        assert "note: model: " in capsys.readouterr().err
    assert (tmp / "b" / "modules.json").exists() and not (tmp / "merged" / "1_Pooling").exists()
    with monkeypatch.context() as m:  # a weights file: "No such file or directory", said
        m.setattr(_files, "open", denied("model.safetensors", open), raising=False)
        _fails([*merge, "--out", str(out)], capsys, "model 0 (anchor)", "Permission denied")


def test_bad_inputs_fail_cleanly_and_write_nothing(checkpoints, capsys):
    tmp, _ = checkpoints
    out = tmp / "out"
    a, b = str(tmp / "a"), str(tmp / "b")
    align = lambda *extra: ["align", a, b, "--out", str(out), "--quiet", *extra]
    _fails(["align", str(tmp / "missing"), b, "--out", str(out), "--quiet"], capsys, "missing")
    # Groups this (post-norm, multi-head) BERT does not have: refused, not silently skipped.
    _fails(
        align("--solve", "rotation,stream,query_heads"),
        capsys,
        "--solve stream,query_heads: this bert model has no such groups; no stream rotation: "
        "bert is post-norm",
    )
    other = dataclasses.replace(CONFIG, num_attention_heads=4)
    hf.save(tmp / "other", other, compiled(other).init(jax.random.key(0), 0.3))
    _fails(
        ["align", a, str(tmp / "other"), "--out", str(out)],
        capsys,
        "architectures differ",
        "num_attention_heads: 3 vs 4",
    )

    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp / "a" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(
        (tmp / "a" / "model.safetensors").read_bytes()[:100]
    )
    _fails(
        ["align", a, str(corrupt), "--out", str(out)],
        capsys,
        "model (",
        "not a readable safetensors file",
    )
    # Multi-line reasons are printed whole: every offending tensor of a mismatched checkpoint.
    bad = tmp / "badshape"
    bad.mkdir()
    (bad / "config.json").write_text((tmp / "a" / "config.json").read_text())
    import safetensors.numpy

    t = safetensors.numpy.load_file(str(tmp / "a" / "model.safetensors"))
    t["bert.pooler.dense.bias"] = np.zeros(5, np.float32)
    del t["classifier.bias"]
    safetensors.numpy.save_file(t, str(bad / "model.safetensors"))
    _fails(
        ["align", a, str(bad), "--out", str(out)],
        capsys,
        "missing:    classifier.bias",
        "wrong shape: bert.pooler.dense.bias",
    )

    _fails(align("--layers", "5"), capsys, "layers=[5]", "out of range (the model has layers 0..1)")
    _fails(align("--layers", "-1"), capsys, "-1 is not a layer index")
    _fails(align("--layers", "a"), capsys, "'a' is not a layer index")
    _fails(align("--layers", "0,1,0"), capsys, "layer 0 given twice")  # (recorded twice)
    _fails(align("--max-sweeps", "-3"), capsys, "-3 is not >= 1")
    _fails(align("--solve", "spin"), capsys, "unknown blocks ['spin']")
    # options that nothing would read, an --out inside an input or holding the working
    # directory: refused before any work
    _fails(align("--residual-init", "identity"), capsys, "--residual-init applies only when")
    inner = tmp / "b" / "aligned"
    _fails(["align", a, b, "--out", str(inner)], capsys, "is inside the input")
    assert not inner.exists()
    # ... also through a folder of the input linked from elsewhere (B's tree gained a model)
    (tmp / "shared").mkdir()
    (tmp / "b" / "tokenizer").symlink_to(tmp / "shared")
    _fails(["align", a, b, "--out", str(tmp / "shared" / "x")], capsys, "is inside the input")
    assert not (tmp / "shared" / "x").exists()
    (tmp / "b" / "tokenizer").unlink()
    out.mkdir()  # empty: it would do as --out, but not as the working directory
    with contextlib.chdir(out):
        _fails(["align", a, b, "--out", "."], capsys, "--out . is the working directory")
    out.rmdir()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(align(), capsys, "not an empty directory")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # An unwritable --out is found before loading anything (the missing model is not reached).
    file = tmp / "file.txt"
    file.write_text("")
    err = _fails(["align", a, str(tmp / "missing"), "--out", str(file / "sub")], capsys, "--out")
    assert "not writable" in err and "missing" not in err.split("--out")[0]


def test_training_only_config_fields_are_reported_not_refused(checkpoints, capsys):
    from safetensors.numpy import load_file, save_file

    tmp, _ = checkpoints
    config = json.loads((tmp / "b" / "config.json").read_text())
    # (config.json's dtype is not the weights': they say float32, and no note was the truth)
    config.update(hidden_dropout_prob=0.3, initializer_range=0.05, dtype="float16")
    (tmp / "b" / "config.json").write_text(json.dumps(config))
    out = tmp / "o"
    assert cli.main(["align", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--quiet"]) == 0
    notes = json.loads((out / "alignment.json").read_text())["notes"]
    # the values in the order of the models named (they came anchor first)
    assert "model differs from anchor in hidden_dropout_prob (0.3 vs 0.1), which only " in str(
        notes
    )
    assert not any("its weights" in n for n in notes)
    assert "note: model differs from anchor in initializer_range" in capsys.readouterr().err
    # The dtype notes say what the tensors are stored in (whatever config.json says)
    weights = tmp / "b" / "model.safetensors"
    f32 = load_file(weights)
    save_file({k: v.astype(jax.numpy.bfloat16) for k, v in f32.items()}, weights)
    assert cli.main(["align", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "o16")]) == 0
    notes = json.loads((tmp / "o16" / "alignment.json").read_text())["notes"]
    assert "model: its weights are bfloat16; rotjax computes in float32 and writes" in str(notes)
    assert not any(n.startswith("anchor: its weights") for n in notes)  # float32
    save_file({k: v.astype(np.float64) for k, v in f32.items()}, weights)
    assert cli.main(["align", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "o64")]) == 0
    err = capsys.readouterr().err
    assert "float64; rotjax computes in float32 and writes float32 (a checkpoint half its" in err
    # inspect writes nothing, and says no more than the dtype (it said "writes float32")
    assert cli.main(["inspect", str(tmp / "b")]) == 0
    printed = capsys.readouterr().out
    assert "note: checkpoint: its weights are float64; rotjax computes in float32\n" in printed
    save_file(f32, weights)
    (tmp / "b" / "config.json").write_text(json.dumps(config))
    written = json.loads((out / "config.json").read_text())  # B's, not the anchor's
    assert (written["hidden_dropout_prob"], written["initializer_range"]) == (0.3, 0.05)
    # A sentence-transformers Dense module of B's reads B's stream: moving it is said.
    (tmp / "b" / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "2_Dense"}]))
    (tmp / "b" / "2_Dense").mkdir()
    (tmp / "b" / "2_Dense" / "model.safetensors").write_bytes(b"")
    for solve, said in (("ffn", False), ("ffn,residual", True)):
        argv = ["align", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / solve), "--quiet"]
        assert cli.main([*argv, "--solve", solve]) == 0
        notes = json.loads((tmp / solve / "alignment.json").read_text())["notes"]
        assert said == any("2_Dense/model.safetensors: sentence-transformers" in n for n in notes)
        assert (tmp / solve / "2_Dense" / "model.safetensors").is_file()


def test_float64_weights_beyond_float32s_range_are_named_as_such(checkpoints, capsys):
    """A float64 checkpoint holding 1e300 has no NaN or Inf; rotjax's float32 copy would
    (`hf.load` refuses it, naming the tensor)."""
    from safetensors.numpy import load_file, save_file

    tmp, _ = checkpoints
    shutil.copytree(tmp / "b", tmp / "b64")
    tensors = {
        k: v.astype(np.float64) for k, v in load_file(tmp / "b" / "model.safetensors").items()
    }
    name = next(k for k in tensors if k.startswith("classifier"))
    tensors[name].flat[0] = 1e300
    save_file(tensors, tmp / "b64" / "model.safetensors")
    config = json.loads((tmp / "b" / "config.json").read_text())  # as transformers saves it
    (tmp / "b64" / "config.json").write_text(json.dumps({**config, "dtype": "float64"}))
    argv = ["merge", str(tmp / "a"), str(tmp / "b64"), "--out", str(tmp / "m"), "--quiet"]
    err = _fails(argv, capsys, "finite values beyond float32's range (3.4e38)")
    assert f"{name}  float64, |x| up to 1e+300" in err and not (tmp / "m").exists()


def test_align_of_bare_encoders_keeps_their_outputs(tmp_path, capsys):
    """Two bare encoders with a pooler, saved with different id2label (as encoders taken from
    fine-tuned classifiers are): refused as different architectures before. Aligned by the
    paper's method, B's pooler output and hidden states are unchanged (its pooler was
    permuted as FFN units)."""
    bare = CONFIGS["bert-encoder-pooler"]
    pb = compiled(bare).init(jax.random.key(1), 0.3)
    hf.save(tmp_path / "a", bare, compiled(bare).init(jax.random.key(0), 0.3))
    hf.save(tmp_path / "b", dataclasses.replace(bare, num_labels=3), pb)
    out = tmp_path / "o"
    assert cli.main(["align", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "model differs from anchor in num_labels (3 vs 2), which a model without a head" in err
    assert "pooler" not in err  # (it has one)
    _, p = hf.load(out)
    x = inputs(bare, jax.random.key(2))
    got, want = (compiled(bare).forward(q, x) for q in (p, pb))
    assert rel_err(got.pooler_output, want.pooler_output) <= 1e-5
    assert rel_err(got.last_hidden_state, want.last_hidden_state) <= 1e-5
    assert rel_err(p, pb) > 0.1  # (moved)


@pytest.mark.parametrize("command", ["align", "merge"])
def test_a_base_model_without_pooler_is_noted(command, tmp_path, capsys):
    """A pretraining checkpoint's encoder is written as a base model without a pooler, which
    transformers' BertModel / ViTModel would draw at random (config.json cannot say)."""
    for config in (dataclasses.replace(CONFIG, task=None), dataclasses.replace(VIT, task=None)):
        params = compiled(config).init(jax.random.key(0), 0.3)
        dirs = [tmp_path / config.model_type / n for n in ("a", "b")]
        for d in dirs:
            hf.save(d, config, params)
        out = tmp_path / config.model_type / "o"
        assert cli.main([command, *map(str, dirs), "--out", str(out)]) == 0
        err = capsys.readouterr().err
        note = "base model has no pooler: load it with from_pretrained(DIR, add_pooling_layer"
        assert f"the written {config.model_type} {note}" in err
        report = json.loads(
            (out / f"{'alignment' if command == 'align' else 'merge'}.json").read_text()
        )
        assert any(note in n for n in report["notes"])


def test_an_empty_mount_point_as_out_is_refused_up_front(checkpoints, capsys, monkeypatch):
    """An empty mount point passed the --out check, then the rename onto it failed (EBUSY)
    after all the work."""
    tmp, _ = checkpoints
    (tmp / "mnt").mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == tmp / "mnt" or real(p))
    argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "mnt"), "--quiet"]
    _fails(argv, capsys, "is a mount point; name a new directory inside it")
    assert not any((tmp / "mnt").iterdir())


def test_wrongly_typed_config_is_one_clear_error(checkpoints, capsys):
    tmp, _ = checkpoints
    for value in ('"12"', "null"):
        text = (
            (tmp / "a" / "config.json")
            .read_text()
            .replace('"hidden_size": 12', f'"hidden_size": {value}')
        )
        (tmp / "b" / "config.json").write_text(text)
        _fails(
            ["align", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "o")],
            capsys,
            "config field hidden_size must be an int",
        )
    # A ViT's config.json has pooler_output_size, which was compared with the mistyped
    # hidden_size first and blamed
    hf.save(tmp / "vit_typed", VIT, compiled(VIT).init(jax.random.key(0), 0.3))
    config = json.loads((tmp / "vit_typed" / "config.json").read_text())
    assert config["pooler_output_size"] == config["hidden_size"]
    (tmp / "vit_typed" / "config.json").write_text(json.dumps({**config, "hidden_size": "12"}))
    _fails(
        ["align", str(tmp / "vit_typed"), str(tmp / "vit_typed"), "--out", str(tmp / "o")],
        capsys,
        "config field hidden_size must be an int",
    )
    # Fields read as mappings (a list of labels was accepted, then crashed the save).
    config = json.loads((tmp / "a" / "config.json").read_text())
    for field, value in (("id2label", ["neg", "pos", "mixed"]), ("rope_scaling", "linear")):
        (tmp / "b" / "config.json").write_text(json.dumps({**config, field: value}))
        _fails(
            ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "o")],
            capsys,
            f"config.json: {field} must be a JSON object (or null), got",
        )
    assert not (tmp / "o").exists()


def test_sigterm_while_saving_cleans_up(checkpoints, capsys, monkeypatch):
    """A real SIGTERM arrives while the weights are written: the temporary directory goes,
    the command exits 143 with one line."""
    tmp, _ = checkpoints
    import safetensors.numpy

    real = safetensors.numpy.save_file

    def save_file(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    before = set(tmp.iterdir())
    out = tmp / "new1" / "new2" / "o"
    err = _fails(
        ["align", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--quiet"],
        capsys,
        "interrupted (SIGTERM); nothing written",
        code=143,
    )
    assert len(err.splitlines()) == 1
    # no output, no hidden temporary directory, no parent directory made for them
    assert set(tmp.iterdir()) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are restored
    # the signal once the checkpoint is written: it is whole, and said to be
    from rotjax.cli import _align

    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    monkeypatch.setattr(_align, "show_notes", lambda notes: os.kill(os.getpid(), signal.SIGTERM))
    _fails(
        ["align", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "o"), "--quiet"],
        capsys,
        f"interrupted (SIGTERM); {tmp / 'o'} written whole before it",
        code=143,
    )
    assert hf.load(tmp / "o")[0] == hf.load(tmp / "b")[0]


def test_the_console_script_exits_at_once_after_an_interrupt(monkeypatch):
    """After an interrupt the script leaves by ``os._exit`` (the interpreter's shutdown with
    XLA's threads still running crashed, status 139, in about 1 run in 3); else by sys.exit."""
    from rotjax.cli import _main

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    for code in (130, 143):
        monkeypatch.setattr(_main, "main", lambda code=code: code)
        with pytest.raises(SystemExit):  # (os._exit replaced: it goes on to sys.exit)
            cli.entry()
    assert exits == [130, 143]
    monkeypatch.setattr(_main, "main", lambda: 2)
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 2 and exits == [130, 143]


def test_help_explains_the_groups_and_methods(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["align", "--help"])
    assert e.value.code == 0
    assert "rotation  per-head orthogonal" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    assert "regmean          per dense kernel" in capsys.readouterr().out
    assert match.PAPER == ("rotation", "scale", "ffn")
    err = _fails(["merge", "a", "b", "--out", "o", "--bogus", "1"], capsys)  # before any work
    assert err == "rotjax merge: error: unrecognized arguments: --bogus 1 (see rotjax merge --help)"


def test_merge_vits_in_canonical_form(tmp_path, key, capsys):
    """ViTs are pre-norm: `--align all` merges them in canonical form, with the stream's
    rotation solved, and writes a standard ViT that computes A's function."""
    c = compiled(VIT)
    a = c.init(key, 0.3)
    b = c.apply(a, sym.sample(c.spec, jax.random.fold_in(key, 1)))
    hf.save(tmp_path / "a", VIT, a)
    hf.save(tmp_path / "b", VIT, b)
    out = tmp_path / "m"
    argv = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--align", "all"]) == 0
    assert "canonical form" in capsys.readouterr().err
    _, merged = hf.load(out)
    x = inputs(VIT, key)
    assert rel_err(c.forward(merged, x), c.forward(a, x)) <= 1e-5
    assert rel_err(merged, a) > 1e-3  # the canonical form's weights, not A's


def test_task_vectors_move_with_the_alignment(tmp_path, key):
    """Fine-tunes of one base share its basis; aligning B moves B's task vector, not B alone:
    the merge is ``θ_base + s (τ_A + g·(θ_B - θ_base))`` for the alignment g of B."""
    c = compiled(CONFIG)
    base = c.init(key, 0.3)
    a, b = (
        jax.tree.map(lambda x, k=k: x + 0.1 * jax.random.normal(k, x.shape), base)
        for k in jax.random.split(jax.random.fold_in(key, 1))
    )
    for name, p in (("base", base), ("a", a), ("b", b)):
        hf.save(tmp_path / name, CONFIG, p)
    out = tmp_path / "m"
    argv = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet"]
    argv += ["--method", "task-arithmetic", "--base", str(tmp_path / "base"), "--scale", "0.5"]
    assert cli.main([*argv, "--align", "paper"]) == 0
    g = match.align(c.spec, a, b, key=jax.random.key(0)).transform
    moved = jax.tree.map(lambda x, y: x - y, c.apply(b, g), c.apply(base, g))
    want = jax.tree.map(lambda t, x, m: t + 0.5 * ((x - t) + m), base, a, moved)
    assert rel_err(hf.load(out)[1], want) <= 1e-5
    assert (
        rel_err(want, jax.tree.map(lambda t, x, y: t + 0.5 * ((x - t) + (y - t)), base, a, b))
        > 1e-3
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_imports_run_is_kept_for_after_them(signum, tmp_path, monkeypatch):
    """`rotjax._launch.start` imports the command line with the signals recorded, not raised:
    Python's own SIGINT handler raised inside the imports (a traceback) or inside XLA's
    garbage-collection callbacks, where the error was printed as ignored and the command went
    on and wrote its output."""
    from rotjax import _launch

    name = f"signalled_import_{int(signum)}"
    (tmp_path / f"{name}.py").write_text(f"import os\nos.kill(os.getpid(), {int(signum)})\n")
    monkeypatch.syspath_prepend(tmp_path)
    before = signal.getsignal(signum)
    assert _launch.start(name) == signum  # the import finished, the signal kept
    assert sys.modules.pop(name).__file__ == str(tmp_path / f"{name}.py")
    assert signal.getsignal(signum) == before
    assert _launch.start() is sys.modules["rotjax.cli._main"]
    for name in cli.__all__:  # what `rotjax.cli` offers (the demo reads `blocks`) is `_main`'s
        assert getattr(cli, name) is getattr(_launch.start(), name)


def test_import_rotjax_reaches_every_subpackage_and_imports_no_jax():
    """`import rotjax` alone imports no JAX (the command line's signal handlers come first), and
    every public subpackage is then an attribute (`rotjax.merge` was an AttributeError)."""
    import subprocess

    names = ["data", "hf", "match", "merge", "models", "symmetry", "train", "tree"]
    code = (
        "import sys, rotjax; assert 'jax' not in sys.modules, 'jax imported'; "
        f"print([getattr(rotjax, n).__name__ for n in {names!r}], sorted(rotjax.__all__))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == str([f"rotjax.{n}" for n in names]) + " " + str(names)
    assert not hasattr(__import__("rotjax"), "no_such_part")


@pytest.mark.parametrize("command", ["script", "module", "package"])
def test_an_interrupt_while_starting_exits_with_one_line(command, checkpoints):
    """The console script, ``python -m rotjax.cli`` or ``python -m rotjax`` (which did not
    exist), interrupted while it imports (here
    after 0.5 s; its imports take seconds): one line, exit 130, nothing written (before
    `rotjax._launch` it went on and merged, or printed a traceback; ``python -m`` imported
    the command line with the package, before its ``__main__``, until `rotjax.cli` became
    lazy)."""
    import subprocess
    import time

    tmp, _ = checkpoints
    script = Path(sys.executable).with_name("rotjax")
    module = {"module": ["-m", "rotjax.cli"], "package": ["-m", "rotjax"]}
    start = [script] if command == "script" else [sys.executable, *module[command]]
    argv = [*start, "merge", tmp / "a", tmp / "b", "--out", tmp / f"m-{command}", "--quiet"]
    run = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted (SIGINT)" in err, err
    assert not (tmp / f"m-{command}").exists()


def test_an_out_name_too_long_for_the_file_system_is_refused_before_any_work(
    checkpoints, capsys, monkeypatch
):
    """`hf.save` writes the checkpoint beside --out under a name 18 bytes longer: a name the
    file system takes (238-255 bytes) failed only there, after all the work."""
    tmp, a = checkpoints
    monkeypatch.setattr(_merge, "load_models", None)  # (any work would fail otherwise)
    for name, message in [("b" * 238, "use a name of at most 237 bytes"), ("b" * 300, "300 bytes")]:
        for out in (tmp / name, tmp / "new" / name):
            argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--quiet"]
            _fails(argv, capsys, "--out", message)
            assert not (tmp / "new").exists()
    with pytest.raises(ValueError, match="use a name of at most 237 bytes"):
        hf.save(tmp / ("c" * 240), CONFIG, a)
    assert sorted(p.name for p in tmp.iterdir()) == ["a", "b", "data.npz"]
    out = tmp / ("d" * 237)  # the longest name that fits
    assert hf.save(out, CONFIG, a) == out and (out / "config.json").is_file()


def test_out_of_memory_is_one_line_and_writes_nothing(checkpoints, capsys, monkeypatch):
    """Memory running out (numpy's MemoryError, XLA's RESOURCE_EXHAUSTED) is one line; any
    other runtime failure keeps its traceback (a bug to report)."""
    tmp, _ = checkpoints
    argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "m"), "--quiet"]
    for error in (MemoryError(), jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: 8 GiB")):

        def load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(_merge, "load_models", load)
        err = _fails(argv, capsys, "out of memory; lower --batch-size or --max-examples")
        assert "\n" not in err and not (tmp / "m").exists()
    for error in (ZeroDivisionError(), jax.errors.JaxRuntimeError("INTERNAL: a bug")):

        def load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(_merge, "load_models", load)
        with pytest.raises(type(error)):
            cli.main(argv)


def test_errors_keep_their_traceback_when_asked(checkpoints, capsys, monkeypatch):
    """The library reports bad input as ValueError or TypeError, as a bug would: with
    ROTJAX_TRACEBACK=1 the error that exits 2 is raised instead, traceback and all."""
    tmp, _ = checkpoints
    argv = ["merge", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "m"), "--quiet"]
    for error in (ValueError("a bug or bad input"), TypeError("a bug")):

        def load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(_merge, "load_models", load)
        monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
        assert "\n" not in _fails(argv, capsys, f"rotjax merge: error: {error}")
        monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
        with pytest.raises(type(error), match=str(error)):
            cli.main(argv)
        assert not (tmp / "m").exists()
    monkeypatch.setenv(cli.TRACEBACK_ENV, "0")
    _fails(argv, capsys, "rotjax merge: error: a bug")
    assert cli.TRACEBACK_ENV in cli.parser().format_help()
    # An error the command line rewords to name its input keeps the one it reports, whose
    # traceback shows where it was raised.
    monkeypatch.undo()
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")

    def load(directory):
        raise TypeError("deep inside hf.load")

    monkeypatch.setattr(hf, "load", load)
    with pytest.raises(CLIError, match=r"model 0 \(anchor\).*deep inside hf\.load") as raised:
        cli.main(argv)
    assert isinstance(raised.value.__context__, TypeError)
    assert not raised.value.__suppress_context__
    shown = "".join(traceback.format_exception(raised.value))
    assert 'raise TypeError("deep inside hf.load")' in shown and "During handling" in shown
    assert not (tmp / "m").exists()
