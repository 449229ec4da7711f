"""Orbax checkpoints of the whole `TrainState` (params, optimizer state, step, rng)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rotjax.tree import to_dict


def checkpoint_manager(
    directory: str | os.PathLike[str],
    *,
    save_every: int | None = None,
    keep: int | None = 2,
) -> ocp.CheckpointManager:
    """An ``ocp.CheckpointManager`` saving every ``save_every`` steps, keeping the last ``keep``.

    Args:
        directory: Checkpoint directory (created if missing); use an absolute path.
        save_every: Period in steps of `save_checkpoint` without ``force``; ``None`` saves only
            when forced (e.g. at the end of a run).
        keep: Number of checkpoints kept (the latest ones); ``None`` keeps all.

    Returns:
        The manager; ``close()`` it when done (it writes asynchronously).
    """
    if save_every is not None and save_every < 1:
        raise ValueError(f"save_every must be None or >= 1, got {save_every}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be None or >= 1, got {keep}")
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # a save cut short leaves a temporary directory, else kept until that step is saved
        cleanup_tmp_directories=True,
        # Explicit: orbax's default policy also saves the first step it is asked about when no
        # checkpoint exists yet, which contradicts "None saves only when forced".
        save_decision_policy=(
            policies.FixedIntervalPolicy(save_every)
            if save_every is not None
            else policies.SpecificStepsPolicy(steps=())
        ),
        max_to_keep=keep,
        create=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        # named up front, so a new manager reads a saved state's metadata before restoring it
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def save_checkpoint(
    manager: ocp.CheckpointManager, state: Any, *, step: int | None = None, force: bool = False
) -> bool:
    """Saves ``state`` if its step is due (or ``force``) and not saved yet.

    Args:
        manager: The checkpoint manager.
        state: A state with a ``step`` field.
        step: ``state.step`` if the caller knows it (saves a device-to-host sync per call).
        force: Save even off the period.

    Returns:
        Whether a save started.
    """
    step = int(jax.device_get(state.step)) if step is None else step
    if not (force or manager.should_save(step)) or step in manager.all_steps():
        return False
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    like: Any,
    *,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> Any | None:
    """The state saved at ``step`` (default: the latest), or ``None`` when there is none.

    Args:
        manager: The checkpoint manager.
        like: A state of the same structure, shapes and dtypes (its values are not used).
        step: Step to restore; ``None`` for the latest.
        sharding: Sharding of every restored array; default: each leaf of ``like``'s own.

    Returns:
        A new state, or ``None`` if the directory holds no checkpoint.

    Raises:
        ValueError: If the checkpoint's arrays are not ``like``'s (by path, shape and
            floating dtype): every difference named, before anything is read.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    _check_fits(manager, step, like)

    def abstract(x):
        s = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    target = jax.tree.map(abstract, like)
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def _shapes(tree: Any) -> dict[str, tuple]:
    """``{"params/encoder/.../kernel": (shape, float dtype or None)}`` of a state or of
    orbax's metadata tree (which spells fields and tuple entries as dict keys: `rotjax.tree`
    paths name them alike). Floating dtypes only: orbax casts a saved array to the state's
    dtype (float32 moments into a bfloat16 state, silently rounded), while integer and key
    leaves may be stored under another dtype than they are held."""
    floating = lambda x: (
        str(x.dtype) if jnp.issubdtype(getattr(x, "dtype", int), jnp.floating) else None
    )
    return {p: (tuple(getattr(x, "shape", ())), floating(x)) for p, x in to_dict(tree).items()}


def _check_fits(manager: ocp.CheckpointManager, step: int, like: Any) -> None:
    stored = getattr(manager.item_metadata(step), "tree", None)
    if stored is None:  # no metadata (older layouts): orbax's own checks apply
        return
    have, want = _shapes(stored), _shapes(like)

    def difference(p):
        if p not in have:
            return "not in the checkpoint"
        if p not in want:
            return "not in the state"
        (shape, dtype), (state_shape, state_dtype) = have[p], want[p]
        if shape != state_shape:
            return f"checkpoint {shape}, state {state_shape}"
        return f"checkpoint {dtype}, state {state_dtype}"

    # in the state's order, then what only the checkpoint holds
    problems = [f"{p}: {difference(p)}" for p in {**want, **have} if have.get(p) != want.get(p)]
    if problems:
        raise ValueError(
            f"the checkpoint of step {step} in {manager.directory} does not fit the state "
            f"({len(problems)} arrays differ):\n" + "\n".join(problems)
        )
