"""The model registry: one `Family` record per architecture, looked up by config type.

Everything outside `rotjax.models` that needs to know "which model is this config for?" (the
command line, `rotjax.hf`, training, merging, experiments) asks `family(config)`; nothing else
inspects config types. A new family is one file in `rotjax/models/` defining its ``FAMILY``,
listed in `FAMILIES`, plus its Hugging Face mapping in `rotjax.hf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from rotjax.symmetry import Spec


@dataclasses.dataclass(frozen=True)
class Family:
    """What the rest of rotjax knows about one model family.

    Attributes:
      name: ``"bert"`` (BERT and RoBERTa), ``"vit"``, ``"llama"`` or ``"deberta"``.
      Config: the config dataclass (Hugging Face field names).
      Model: the Flax module class; ``Model(config)`` builds the model.
      symmetry_spec: ``config -> Spec`` of ``Model(config)``'s params.
      example_inputs: ``(config, batch_size=1) -> tuple`` of positional ``Model.apply``
        arguments (small, deterministic arrays: for ``init``, shapes and smoke runs).
      batch_inputs: ``batch -> tuple`` of positional ``Model.apply`` arguments from a dict of
        named arrays (``input_ids``/``attention_mask``/``token_type_ids``; ``pixel_values``
        NHWC or raw ``images``).
      token_mask: ``positional inputs -> (batch, tokens) mask or None``: which tokens are real
        (the attention mask), for statistics that must skip padding.
      input_names: Hugging Face names of the positional inputs, in order.
      model_types: the Hugging Face ``model_type`` values the family covers.
      pre_norm: whether every read of the residual stream goes through a norm (pre-LN blocks
        and a final norm), which is what residual-stream rotations need: the families with a
        ``stream_spec``, which sets it (given, it must agree).
      stream_spec: ``config -> rotjax.symmetry.StreamSpec`` of pre-norm families (None for
        post-norm ones): what `rotjax.symmetry.canonicalize` needs, after which
        ``symmetry_spec(config, stream_rotation=True)`` holds a rotation of the stream.
      training_fields: config fields that shape neither the params nor the function at
        inference (dropout rates, the init scale, the params layout): two models that differ
        only in these can be aligned and merged.
      inert: regexes (``re.search`` over ``"/"`` param paths) of params the function does not
        depend on at all, whose gradient is zero but for rounding noise: BERT's and ViT's
        attention key biases (``q·(k + b)`` adds ``q·b`` to every score of a query, which the
        softmax ignores). Not DeBERTa's when its position-to-content term reads the key (with
        ``pos_att_type`` c2p only its key bias is inert too, but not listed: one regex per
        family, not per config) nor a RoPE model's (the bias is rotated by position).
        Training freezes them (`rotjax.train.optimizer`'s ``frozen``).
    """

    name: str
    Config: type
    Model: type[nn.Module]
    symmetry_spec: Callable[[Any], Spec]
    example_inputs: Callable[..., tuple[jax.Array, ...]]
    batch_inputs: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    token_mask: Callable[[tuple[Any, ...]], Any]
    input_names: tuple[str, ...]
    model_types: tuple[str, ...]
    pre_norm: bool | None = None
    stream_spec: Callable[[Any], Any] | None = None
    training_fields: tuple[str, ...] = ()
    inert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        has_stream = self.stream_spec is not None
        if self.pre_norm is not None and self.pre_norm != has_stream:
            raise ValueError(
                f"Family {self.name!r}: pre_norm={self.pre_norm} but stream_spec is "
                f"{'set' if has_stream else 'None'}: pre-norm families are those with one"
            )
        object.__setattr__(self, "pre_norm", has_stream)  # (frozen: set once, here)

    def param_shapes(self, config: Any, inputs: tuple | None = None) -> Any:
        """The params structure of ``Model(config)`` as ``jax.ShapeDtypeStruct`` leaves (traced
        with `jax.eval_shape`: nothing computed or compiled), on ``inputs`` (positional model
        inputs; default `example_inputs`), so a ``ValueError`` says they do not fit the model."""
        model = self.Model(config)
        x = self.example_inputs(config) if inputs is None else inputs
        return jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *x)["params"]

    def init(self, config: Any, key: jax.Array) -> Any:
        """Freshly initialised params of ``Model(config)`` (one compiled program)."""
        model = self.Model(config)
        x = self.example_inputs(config)
        return jax.jit(lambda key, *x: model.init(key, *x)["params"])(key, *x)
