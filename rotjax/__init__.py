"""rotjax: align and merge transformers in JAX/Flax through their parameter symmetries."""

from rotjax import symmetry

__all__ = ["symmetry"]
__version__ = "0.1.0"
