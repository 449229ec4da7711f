"""Flax Linen models with explicit attention head axes, and their symmetry specs."""

from rotjax.models import bert, vit

__all__ = ["bert", "vit"]
