"""Process setup: multi-host initialisation and the persistent compilation cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax

DISTRIBUTED_ENV = "ROTJAX_DISTRIBUTED"
COMPILATION_CACHE_ENV = "ROTJAX_JAX_CACHE"


def enable_compilation_cache(
    directory: str | os.PathLike[str] | None = None,
    *,
    min_compile_seconds: float = 0.5,
    min_entry_bytes: int | None = None,
    max_bytes: int | None = 4 << 30,
) -> Path:
    """Keep compiled XLA programs on disk, shared between runs and processes.

    XLA's CPU compiler takes ~70 ms to seconds a program; runs of the same shapes (seeds,
    datasets, test workers) then compile once. The cache is keyed by the program itself, so a
    stale entry is never used. This sets process-wide JAX options: call it from an
    application's entry point, not from library code.

    Args:
      directory: the cache directory; default ``$ROTJAX_JAX_CACHE``, else ``.jax_cache``.
      min_compile_seconds: cache only programs that took at least this long to compile.
      min_entry_bytes: cache only entries of at least this size (None: JAX's default).
      max_bytes: the cache's size limit (least recently used entries go first). A limit also
        makes JAX lock the directory around every read and write: without one, a process can
        read an entry another is still writing, which JAX (0.10) finds cut short and compiles
        again, with a warning. Each write then scans the directory, so processes that cache
        thousands of small programs (the test workers) may pass None: no limit, no lock.

    Returns:
      The absolute cache directory.
    """
    directory = Path(directory or os.environ.get(COMPILATION_CACHE_ENV) or ".jax_cache").absolute()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_compilation_cache_max_size", -1 if max_bytes is None else max_bytes)
    # Entries written without a limit have no access-time file, on which JAX's eviction fails
    # (every later write is dropped with a warning): give them one.
    if max_bytes is not None and directory.is_dir():
        now = time.time_ns().to_bytes(8, "little")
        for entry in directory.glob("*-cache"):
            atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
            if not atime.exists():
                atime.write_bytes(now)
    if min_entry_bytes is not None:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", min_entry_bytes)
    return directory


def initialize_distributed(
    *,
    enabled: bool | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` for a multi-process run, when enabled.

    Must run before any other JAX call. On TPU pods, SLURM and Open MPI clusters JAX finds the
    coordinator, the process count and the process id by itself; elsewhere pass them (or set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).

    Args:
        enabled: Whether to initialize; ``None`` reads ``ROTJAX_DISTRIBUTED`` (``1`` / ``true``).
        coordinator_address: ``host:port`` of process 0.
        num_processes: Number of processes.
        process_id: This process's id.

    Returns:
        Whether ``jax.distributed.initialize`` was called.
    """
    if enabled is None:
        enabled = os.environ.get(DISTRIBUTED_ENV, "").lower() in ("1", "true", "yes")
    if not enabled:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True
