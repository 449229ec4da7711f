"""The README's Python examples run as written, pasted in order into one session (those that
need no checkpoint on disk): a block that reuses a name another block redefined fails here."""

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
namespace = {}  # pasted in order, as a reader would, with nothing of the test's own
for i, block in enumerate(blocks):
    exec(compile(block, f"README:{i}", "exec"), namespace)
print(f"ran {len(blocks)} blocks")
"""


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len([b for b in blocks if "path/to/checkpoint" not in b]) >= 3
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(README)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().startswith("ran ")
