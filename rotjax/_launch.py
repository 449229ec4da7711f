"""The ``rotjax`` console script's (and ``python -m rotjax.cli``'s) first step, before JAX
is imported.

Importing the command line (JAX, Flax, transformers) takes seconds. A SIGINT or SIGTERM then,
with Python's own handlers, printed a traceback from inside the imports or, arriving in one
of XLA's garbage-collection callbacks, was printed as ignored, and the command went on to
write its output and exit 0. Here the signal is only recorded while the imports run; once
they are done, the command exits as it does for an interrupt later on (one line, 130 /
143, nothing written).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def start(module: str = "rotjax.cli._main"):
    """Imports ``module`` with SIGINT and SIGTERM recorded, not raised; the module, or the
    number of the first signal that arrived meanwhile. The previous handlers come back
    either way."""
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in SIGNALS}
    try:
        loaded = importlib.import_module(module)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return pending[0] if pending else loaded


def entry() -> None:
    """The ``rotjax`` console script and ``python -m rotjax.cli``: `rotjax.cli.entry` after
    `start`."""
    started = start()
    if isinstance(started, int):
        print(
            f"rotjax: interrupted ({signal.Signals(started).name}) while starting; nothing written",
            file=sys.stderr,
        )
        sys.stderr.flush()
        os._exit(128 + started)
    started.entry()
