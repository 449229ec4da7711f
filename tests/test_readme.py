"""The README's Python examples run as written (those that need no checkpoint on disk)."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).parent.parent / "README.md"

# Run in a fresh interpreter, as a reader would: with the jax settings of a plain session, and
# apart from the test worker's compiled programs (XLA:CPU crashed compiling the statistics
# example late in a full test worker, never alone).
RUNNER = """
import pathlib, re, sys
text = pathlib.Path(sys.argv[1]).read_text()
blocks = re.findall(r"```python\\n(.*?)```", text, re.S)
blocks = [b for b in blocks if "path/to/checkpoint" not in b]
assert len(blocks) >= 3, len(blocks)
namespace = {}
exec(compile(blocks.pop(0), "README:models", "exec"), namespace)
for i, block in enumerate(blocks):
    if "params_a" in block:  # two models: a planted pair made from the README's model
        setup = (
            "spec = bert.symmetry_spec(cfg)\\n"
            "params_a = params\\n"
            "params_b = sym.apply(spec, params, sym.sample(spec, jax.random.key(7)))\\n"
            "p0, p1, p2 = params_a, params_b, params_a\\n"
        )
        exec(setup, namespace)
    exec(compile(block, f"README:{i}", "exec"), namespace)
print(f"ran {len(blocks) + 1} blocks")
"""


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len([b for b in blocks if "path/to/checkpoint" not in b]) >= 3
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(README)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().startswith("ran ")
