"""The `rotjax` command line on tiny checkpoints written by the test."""

import dataclasses
import json

import jax
import pytest
from conftest import rel_err
from helpers import CONFIGS, compiled

from rotjax import cli, hf, match
from rotjax import symmetry as sym

CONFIG = CONFIGS["bert-h3d4-l2"]


@pytest.fixture
def checkpoints(tmp_path, key):
    c = compiled(CONFIG)
    a = c.init(key, 0.3)
    g = sym.sample(c.spec, jax.random.fold_in(key, 1))
    b = c.apply(a, g)
    hf.save(tmp_path / "a", CONFIG, a)
    hf.save(tmp_path / "b", CONFIG, b)
    return tmp_path, a


def test_align_recovers_a_planted_transform(checkpoints, capsys):
    tmp, a = checkpoints
    out = tmp / "out"
    argv = ["align", str(tmp / "a"), str(tmp / "b"), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--solve", ",".join(match.ALL)]) == 0
    _, aligned = hf.load(out)
    assert rel_err(aligned, a) <= 1e-5
    report = json.loads((out / "alignment.json").read_text())
    d = report["distance"]
    assert d["all"]["after"] <= 1e-8 * d["all"]["before"]
    assert d["touched"]["before"] == pytest.approx(d["all"]["before"], rel=1e-6)
    assert set(report["per_layer"]) == {"layer_0", "layer_1", "global"}
    assert "encoder/layer_0/attention/qk_rotation" in report["per_group"]
    printed = capsys.readouterr().out
    assert "squared distance to anchor, all parameters:" in printed
    assert "those the solved groups act on:" in printed


def test_inspect(checkpoints, capsys):
    tmp, _ = checkpoints
    assert cli.main(["inspect", str(tmp / "a")]) == 0
    text = capsys.readouterr().out
    assert "qk_rotation  orth  x2" in text and "heads 3 x 4" in text


def _fails(argv, capsys, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rotjax ") and message in err[-1], err


def test_bad_inputs_fail_cleanly_and_write_nothing(checkpoints, capsys, tmp_path):
    tmp, _ = checkpoints
    out = tmp / "out"
    a, b = str(tmp / "a"), str(tmp / "b")
    _fails(["align", str(tmp / "missing"), b, "--out", str(out), "--quiet"], capsys, "missing")
    assert not out.exists()

    other = dataclasses.replace(CONFIG, num_attention_heads=4)
    hf.save(tmp / "other", other, compiled(other).init(jax.random.key(0), 0.3))
    _fails(["align", a, str(tmp / "other"), "--out", str(out), "--quiet"], capsys, "differ")
    assert not out.exists()

    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp / "a" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(
        (tmp / "a" / "model.safetensors").read_bytes()[:100]
    )
    _fails(
        ["align", a, str(corrupt), "--out", str(out), "--quiet"],
        capsys,
        "model.safetensors is not a readable safetensors file",
    )
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["align", a, b, "--out", str(out), "--quiet"], capsys, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    _fails(["align", a, b, "--out", str(tmp / "o2"), "--solve", "spin"], capsys, "unknown blocks")
    assert not (tmp / "o2").exists()


def test_help_explains_the_groups(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["align", "--help"])
    assert e.value.code == 0
    assert "rotation  per-head orthogonal" in capsys.readouterr().out
