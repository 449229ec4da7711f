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
    """The `Family` of a model config (``bert.Config``, ``vit.Config``, ...), or of your own
    model's: a config class names its family with a class attribute ``rotjax_family``, a
    `Family` whose ``Config`` is that class (no registry to change: every function that runs
    a model, such as `rotjax.merge.statistics` or `refit`, then runs yours).

    Raises:
      TypeError: ``config`` is neither a registered family's config nor names its own.
    """
    for f in FAMILIES:
        if type(config) is f.Config:
            return f
    own = getattr(type(config), "rotjax_family", None)
    if isinstance(own, Family) and own.Config is type(config):
        return own
    if own is not None:  # (a subclass inherits its parent's: the parent's model, not its own)
        raise TypeError(
            f"{type(config).__name__}.rotjax_family is not the Family of {type(config).__name__}"
            f" (its Config is {getattr(own, 'Config', type(own)).__name__}): give the class one "
            "of its own"
        )
    known = ", ".join(f"{f.name}.Config" for f in FAMILIES)
    raise TypeError(
        f"not a rotjax model config: {type(config).__name__} (known: {known}; a config of "
        "your own model names its Family as the class attribute rotjax_family)"
    )


def model_family(model: Any) -> Family:
    """The `Family` of a Flax module built from a config (``Model(config)``), as `family`.

    Raises:
      TypeError: ``model`` has no ``config``, or one of no known family.
    """
    try:
        config = model.config
    except AttributeError:  # (Flax's own message spoke of setup())
        raise TypeError(
            f"{type(model).__name__} has no config: functions that run a model need a module "
            "built from a config whose Family rotjax knows (a rotjax model, or your own module "
            "with a config field whose class names its Family as rotjax_family)"
        ) from None
    return family(config)


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
    "model_family",
    "stack_layers",
    "token_tables",
    "unstack_layers",
    "vit",
    "with_pretrained",
]
