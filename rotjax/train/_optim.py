"""The optimizer: AdamW with a warmup-then-decay learning rate, masked weight decay, clipping."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from rotjax.tree import flatten

NO_DECAY_PATTERNS = (r"(^|/)bias$", r"(^|/)[^/]*norm[^/]*/[^/]+$")
"""Regexes (``re.search``, case-insensitive) over ``"/"`` param paths that get no weight decay:
every bias, and every param of a normalization module (any path component containing
``norm``: ``LayerNorm``, ``attention_norm``, ``layernorm_before``, ...)."""

DECAYS = ("cosine", "linear", "constant")


def learning_rate_schedule(
    *,
    peak_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    end_value: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak_value`` over ``warmup_steps``, then a decay to
    ``end_value`` at ``total_steps``.

    With ``w = warmup_steps``, ``T = total_steps`` and ``t`` the step::

        lr(t) = peak * t / w                                    for t < w
        lr(t) = end + (peak - end) * (1 + cos(pi * s)) / 2      "cosine", s = (t - w) / (T - w)
        lr(t) = peak + (end - peak) * s                          "linear"
        lr(t) = peak                                             "constant"

    (``w = T`` leaves no decay: the rate is the peak at step ``T``, ``end`` from ``T + 1``.)

    Args:
        peak_value: Learning rate at the end of the warmup.
        total_steps: Step at which the decay reaches ``end_value`` (it stays there after).
        warmup_steps: Steps of linear warmup, in ``[0, total_steps]``.
        decay: One of ``DECAYS``.
        end_value: Final learning rate.

    Returns:
        An optax schedule ``step -> learning rate``.

    Raises:
        ValueError: On an unknown ``decay`` or inconsistent step counts.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
            f"total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay == "cosine" and peak_value:
        alpha = end_value / peak_value
        after = optax.cosine_decay_schedule(peak_value, decay_steps, alpha=alpha)
    elif decay == "cosine":  # optax's alpha is relative to the peak: end + (0 - end)·cosine
        shift = optax.cosine_decay_schedule(-end_value, decay_steps)
        after = lambda step: end_value + shift(step)
    elif decay == "linear":
        after = optax.linear_schedule(peak_value, end_value, decay_steps)
    else:
        after = optax.constant_schedule(peak_value)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def weight_decay_mask(
    params: Any, *, exclude: Sequence[str] = NO_DECAY_PATTERNS, invert: bool = False
) -> Any:
    """The pytree of bools, shaped like ``params``, that is ``True`` where weight decay applies.

    Args:
        params: A params pytree (or one of ``jax.ShapeDtypeStruct``).
        exclude: Regexes over ``"/"``-joined param paths (``re.search``, case-insensitive);
            a matching param gets no weight decay.

        invert: ``True`` where a pattern matches instead.

    Returns:
        A new pytree of Python bools with the structure of ``params``.
    """
    patterns = [re.compile(p, re.IGNORECASE) for p in exclude]
    paths, _, treedef = flatten(params)
    decayed = [any(p.search(path) for p in patterns) == invert for path in paths]
    return jax.tree.unflatten(treedef, decayed)


def optimizer(
    *,
    learning_rate: float | optax.Schedule,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    exclude_from_decay: Sequence[str] = NO_DECAY_PATTERNS,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after global-norm gradient clipping.

    The update of a param ``θ`` with clipped gradient ``g`` is
    ``-lr(t) * (m̂ / (sqrt(v̂) + eps) + weight_decay * mask * θ)`` with Adam's bias-corrected
    moments ``m̂, v̂`` and ``mask`` from :func:`weight_decay_mask` (no decay on biases and
    normalization params). Clipping rescales ``g`` by ``min(1, max_grad_norm / ||g||)``.

    Args:
        learning_rate: A constant or a schedule, e.g. :func:`learning_rate_schedule`.
        weight_decay: Decoupled weight decay coefficient.
        max_grad_norm: Global-norm clipping threshold; ``None`` disables clipping.
        b1: Adam's first-moment decay.
        b2: Adam's second-moment decay.
        eps: Adam's denominator epsilon.
        exclude_from_decay: Param path regexes exempt from weight decay.
        frozen: Param path regexes whose gradient is set to zero first and which take no weight
            decay (so they never move and count nowhere, clipping included), e.g.
            ``rotjax.models.family(config).inert``: params the loss does not depend on, whose
            computed gradient is rounding noise that Adam would normalise into steps of ±lr
            with signs set by the summation order (a sharded run would drift from the
            single-device one by up to 1e-5 for nothing).

    Returns:
        An ``optax.GradientTransformation``.
    """
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be None or > 0, got {max_grad_norm}")
    frozen = tuple(frozen)
    patterns = tuple(exclude_from_decay) + frozen  # a frozen param takes no decay either
    adamw = optax.adamw(
        learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=lambda params: weight_decay_mask(params, exclude=patterns),
    )
    steps = [
        optax.masked(
            optax.set_to_zero(), lambda p: weight_decay_mask(p, exclude=frozen, invert=True)
        )
    ]
    if max_grad_norm is not None:
        steps.append(optax.clip_by_global_norm(max_grad_norm))
    return optax.chain(*steps, adamw)
