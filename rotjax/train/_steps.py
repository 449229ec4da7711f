"""The train state and the pure train/eval steps of classification models."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from rotjax._keys import check_key
from rotjax.models import family, token_tables
from rotjax.train import _metrics

Batch = Mapping[str, jax.Array]
InputsFn = Callable[[Batch], tuple[Any, ...]]
AugmentFn = Callable[[Batch, jax.Array], Batch]


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step; a pytree, saved whole.

    Attributes:
        step: ``int32`` scalar, the number of updates done.
        params: The model params.
        opt_state: The optimizer state.
        rng: Raw ``uint32`` key data (``jax.random.key_data``) of the run's base key (raw
            data because checkpoints store plain arrays); step ``t`` draws its randomness from
            ``fold_in(key, t)``, so a resumed run replays it.
        rng_impl: Name of the key's PRNG implementation (static, e.g. ``"threefry2x32"``).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    rng_impl: str = flax.struct.field(pytree_node=False, default="threefry2x32")

    @property
    def key(self) -> jax.Array:
        """The base key as a typed ``jax.random.key``."""
        return jax.random.wrap_key_data(self.rng, impl=self.rng_impl)


def create_train_state(
    params: Any, tx: optax.GradientTransformation, *, key: jax.Array
) -> TrainState:
    """A fresh `TrainState` at step 0 (``params`` is not copied and not modified).

    Args:
        params: Initial params.
        tx: The optimizer.
        key: The run's base key (a typed ``jax.random.key`` of any implementation, or raw
            default-implementation ``uint32`` key data) for dropout and augmentation.

    Raises:
      ValueError: a ``key`` that is not one key (an int, None, a batch of keys: refused by
        JAX inside `fit`'s jitted step, after the workdir's files were written).
    """
    check_key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    # One compiled program rather than one eager op per moment leaf.
    opt_state = jax.jit(tx.init)(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(key),
        rng_impl=str(jax.random.key_impl(key)),
    )


class Steps(NamedTuple):
    """The pure step functions of a task; jit them (`rotjax.train.fit` does, with shardings).

    Attributes:
        train_step: ``(state, batch) -> (state, metrics)``; metrics are batch means
            ``loss``, ``accuracy`` plus ``grad_norm`` and (with a schedule) ``learning_rate``.
        eval_step: ``(params, batch) -> metrics``, summable statistics
            (`rotjax.train.batch_metrics`) to reduce with `rotjax.train.summarize`.
        num_classes: The model's classes, when known: `rotjax.train.fit` and ``evaluate``
            refuse labels outside them (other than `rotjax.data.IGNORE_LABEL`).
        token_tables: ``{input name: rows of its embedding table}`` of the model, when
            known (`rotjax.models.token_tables`): ``fit`` and ``evaluate`` refuse ids outside
            them, which inside the jitted steps wrap (negative) or give NaN (past the end).
    """

    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[Any, Batch], dict[str, jax.Array]]
    num_classes: int | None = None
    token_tables: Mapping[str, int] | None = None


def tables(model: nn.Module) -> dict[str, int] | None:
    """`rotjax.models.token_tables` of a rotjax model's config, or None for a module
    without one."""
    config = getattr(model, "config", None)
    return None if config is None else token_tables(config)


def num_classes(model: nn.Module) -> int | None:
    """The classes of a rotjax model's classification head (its config's ``num_labels``), or
    None for a module without such a config."""
    n = getattr(getattr(model, "config", None), "num_labels", None)
    return n if isinstance(n, int) else None


def default_inputs(model: nn.Module) -> InputsFn:
    """The batch -> positional model inputs adapter of a rotjax model: its family's
    ``batch_inputs`` (`rotjax.models.family`)."""
    return family(model.config).batch_inputs


def classification_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    inputs: InputsFn | None = None,
    augment: AugmentFn | None = None,
    learning_rate: optax.Schedule | None = None,
) -> Steps:
    """Train and eval steps for sequence, image or token classification.

    The loss is the mean softmax cross entropy over labels that are not `IGNORE_LABEL`
    (``batch["labels"]`` of shape ``logits.shape[:-1]``): ``(B,)`` for sequence/image and
    ``(B, T)`` for token classification. Train steps run the model with
    ``deterministic=False`` and a ``"dropout"`` rng ``split(fold_in(state.key, step))[1]``.

    Args:
        model: A Flax module called as ``model.apply({"params": p}, *inputs(batch),
            deterministic=..., rngs=...)`` returning logits.
        tx: The optimizer.
        inputs: ``batch -> positional model inputs``; default `default_inputs(model)`.
        augment: Optional ``(batch, key) -> batch`` applied in the train step only (jittable).
        learning_rate: The schedule of ``tx``, only to report ``learning_rate`` in metrics.

    Returns:
        `Steps` of pure functions.
    """
    inputs = default_inputs(model) if inputs is None else inputs

    def logits_of(params, batch, *, deterministic, rngs=None):
        return model.apply(
            {"params": params}, *inputs(batch), deterministic=deterministic, rngs=rngs
        )

    def train_step(state: TrainState, batch: Batch):
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
        if augment is not None:
            batch = augment(batch, aug_key)

        def loss_fn(params):
            logits = logits_of(params, batch, deterministic=False, rngs={"dropout": dropout_key})
            loss, _ = _metrics.cross_entropy(logits, batch["labels"])
            return loss, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = _metrics.batch_metrics(logits, batch["labels"])
        metrics = {
            "loss": loss,
            "accuracy": stats["correct"] / jnp.maximum(stats["count"], 1.0),
            "count": stats["count"],  # the labels the loss is over (tokens vary per batch)
            "grad_norm": optax.global_norm(grads),
        }
        if learning_rate is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return Steps(train_step, eval_step(model, inputs=inputs), num_classes(model), tables(model))


def eval_step(model: nn.Module, *, inputs: InputsFn | None = None) -> Callable:
    """The pure ``(params, batch) -> summable metrics`` of a classification model in inference
    mode (`rotjax.train.batch_metrics`; reduce with `rotjax.train.summarize`)."""
    inputs = default_inputs(model) if inputs is None else inputs

    def step(params: Any, batch: Batch):
        logits = model.apply({"params": params}, *inputs(batch), deterministic=True)
        return _metrics.batch_metrics(logits, batch["labels"])

    return step
