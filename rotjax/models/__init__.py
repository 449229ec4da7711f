"""Flax Linen models with explicit attention head axes, their symmetry specs, and the registry.

``family(config)`` is the one answer to "which model is this config for?"::

    f = rotjax.models.family(cfg)
    model = f.Model(cfg)
    params = model.init(key, *f.example_inputs(cfg))["params"]
    spec = f.symmetry_spec(cfg)
"""

from __future__ import annotations

from typing import Any

from rotjax.models import bert, deberta, llama, vit
from rotjax.models._family import Family
from rotjax.models._layers import check_fields, check_ids, class_ids, token_tables
from rotjax.models._layout import stack_layers, unstack_layers
from rotjax.models._pretrained import with_pretrained

FAMILIES: tuple[Family, ...] = (bert.FAMILY, vit.FAMILY, llama.FAMILY, deberta.FAMILY)
"""Every registered model family."""


def family(config: Any) -> Family:
    """The `Family` of a model config (``bert.Config``, ``vit.Config``, ...).

    Raises:
      TypeError: ``config`` is not the config of a registered family.
    """
    for f in FAMILIES:
        if type(config) is f.Config:
            return f
    known = ", ".join(f"{f.name}.Config" for f in FAMILIES)
    raise TypeError(f"not a rotjax model config: {type(config).__name__} (known: {known})")


def family_of_model_type(model_type: str) -> Family:
    """The `Family` covering a Hugging Face ``model_type`` (``"bert"``, ``"roberta"``, ...).

    Raises:
      ValueError: no registered family covers it.
    """
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {known}")


__all__ = [
    "FAMILIES",
    "Family",
    "bert",
    "check_fields",
    "check_ids",
    "class_ids",
    "deberta",
    "family",
    "family_of_model_type",
    "llama",
    "stack_layers",
    "token_tables",
    "unstack_layers",
    "vit",
    "with_pretrained",
]
