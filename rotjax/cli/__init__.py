"""The ``rotjax`` command: inspect, align and merge Hugging Face checkpoints.

This package is the application layer: the only place in rotjax that prints (results to
stdout; progress, notes and errors to stderr). Exit status: 0 done, 2 bad input (one message
naming the input and the problem; nothing written), 130 / 143 interrupted by SIGINT / SIGTERM
(temporary files removed). With ``ROTJAX_TRACEBACK=1`` in the environment, an error that
would exit 2 is raised with its traceback instead (the library reports bad input as
``ValueError`` / ``TypeError``, as a bug would).

    rotjax inspect DIR
    rotjax align ANCHOR_DIR MODEL_DIR --out DIR [--solve rotation,scale,ffn] [--layers 0,1]
    rotjax merge A B [C ...] --out DIR --method regmean --align all --data inputs.npz
"""

import importlib

__all__ = ["TRACEBACK_ENV", "blocks", "entry", "main", "parser"]


def __getattr__(name: str):
    # from `_main` on first use (PEP 562): the command line imports JAX, Flax and
    # transformers (seconds), and `python -m rotjax.cli` imports this package before its
    # `__main__`, which imports them under `rotjax._launch`'s signal handling, as the
    # `rotjax` console script does
    if name in __all__:
        return getattr(importlib.import_module("rotjax.cli._main"), name)
    raise AttributeError(f"module 'rotjax.cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
