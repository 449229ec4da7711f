"""rotjax: align and merge transformers in JAX/Flax through their parameter symmetries."""

import importlib

__all__ = ["data", "hf", "match", "merge", "models", "symmetry", "train", "tree"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Each subpackage on first use (PEP 562), so `import rotjax; rotjax.merge.average(...)`
    # works: importing the package itself imports no JAX, so the command line's signal
    # handlers come first (`rotjax._launch`)
    if name in __all__:
        return importlib.import_module(f"rotjax.{name}")
    raise AttributeError(f"module 'rotjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
