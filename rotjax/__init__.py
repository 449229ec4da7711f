"""rotjax: align and merge transformers in JAX/Flax through their parameter symmetries."""

from rotjax import match, symmetry

__all__ = ["match", "symmetry"]
__version__ = "0.1.0"
