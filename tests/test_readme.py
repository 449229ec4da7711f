"""The README's Python examples run as written (those that need no checkpoint on disk)."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "path/to/checkpoint" not in b]
    assert len(runnable) >= 3
    namespace: dict = {}
    prelude = runnable.pop(0)
    exec(compile(prelude, "README:models", "exec"), namespace)
    for i, block in enumerate(runnable):
        if "params_a" in block:  # two models: a planted pair made from the README's model
            setup = (
                "spec = bert.symmetry_spec(cfg)\n"
                "params_a = params\n"
                "params_b = sym.apply(spec, params, sym.sample(spec, jax.random.key(7)))\n"
                "p0, p1, p2 = params_a, params_b, params_a\n"
            )
            exec(setup, namespace)
        exec(compile(block, f"README:{i}", "exec"), namespace)
