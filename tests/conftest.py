"""Strict numerics for every test: float32 matmuls at full precision, no silent rank promotion.

The CPU is split into 8 devices (before any backend starts), so sharded code paths run for
real; unsharded work stays on device 0. Random inputs are drawn afresh on every run; a failing
test reports its seed, and `ROTJAX_SEED=<seed> pytest ...` replays it.
"""

import importlib.util
import mmap
import os
import re
import secrets
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models compile far longer than they run, so the tests compile for speed of compilation
# (the same programs; each flag is left alone when XLA_FLAGS sets it):
# - LLVM's optimisation passes off: tests/test_merge.py from 14.1 to 9.8 CPU-minutes
#   (2026-12-02; some compute-bound tests ran up to 2x slower);
# - XLA:CPU's older loop emitters instead of its MLIR fusion emitters: a one-op program
#   compiled in 11 ms instead of 28, tests/test_symmetry.py cold in 40 s instead of 61, the
#   whole suite cold in 537 s instead of 760-846 (2026-12-05), and the slowest
#   compute-bound tests no slower;
# - one LLVM module a program, not split for parallel code generation (two workers share the
#   two cores anyway): a tiny model's gradient program compiled in 0.84 s instead of 1.05,
#   tests/test_symmetry.py and test_stream.py cold in 66 s instead of 75.
COMPILE_FLAGS = {
    "xla_backend_optimization_level": "0",
    "xla_cpu_use_fusion_emitters": "false",
    "xla_cpu_parallel_codegen_split_count": "1",
}


def _known_to_xla(flags):
    """The flags this jaxlib's XLA names (XLA aborts the process on an unknown flag, and a
    newer jaxlib may drop one of these: the tests then compile slower, not crash): those
    whose name is in its shared libraries (0.3 s; once, the workers inherit XLA_FLAGS)."""
    if not flags:
        return set()
    root = Path(importlib.util.find_spec("jaxlib").origin).parent
    known = set()
    for lib in (lib for lib in sorted(root.glob("*.so")) if lib.stat().st_size):
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            known |= {flag for flag in flags if m.find(flag.encode()) >= 0}
    return known


missing = [
    f for f in COMPILE_FLAGS if not re.search(rf"--{f}(=|\s|$)", os.environ.get("XLA_FLAGS", ""))
]
for flag in sorted(_known_to_xla(missing)):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --{flag}={COMPILE_FLAGS[flag]}".strip()
    )

# The suite runs on the CPU, split into 8 devices, also on a GPU or TPU host (where the
# default platform would give one or a few accelerators and other rounding: the stated
# tolerances are float32's on XLA:CPU); its subprocesses (the command line) too. A
# JAX_PLATFORMS set by hand wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

NUM_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rotjax.train import enable_compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")
# XLA's CPU compiler takes ~70 ms a program on this machine; keep compiled programs between
# runs and share them between the two pytest-xdist workers, which compile many of the same
# tiny models' programs: one directory for both, and no XLA cache directories (JAX puts their
# path, inside the cache directory, into every key, so two directories never share an entry).
# The suite's tests, cache empty, took 676 s instead of 793 with a directory per worker
# (2026-12-06, one run each). No size limit: JAX's lock would scan the directory on every
# write. A worker that reads an entry the other is still writing finds it truncated, warns and
# compiles again (tests/test_train.py::test_a_truncated_compilation_cache_entry_is_compiled_again).
jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
enable_compilation_cache(
    os.path.join(
        os.environ.get("ROTJAX_JAX_CACHE")
        or os.path.join(os.path.dirname(__file__), "..", ".jax_cache"),
        "tests",
    ),
    min_compile_seconds=0.0,
    min_entry_bytes=0,
    max_bytes=None,
)


# `make test` hands whole files to its two workers (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder`; xdist's default orders them by their number of tests): the longest
# first, so that the short ones fill in at the end instead of a long one running alone. Seconds
# per file on 2026-12-06 (2 workers, compilation cache empty, 772 s in all, this order): merge
# 402, experiments 245, match 220, train 135, cli 114, reproduce 66, stream 66, data 64,
# symmetry 40, hf 39; the rest under 35 (in xdist's default order, experiments and reproduce
# came last). Not quite by those seconds: with experiments second, beside merge from the
# start, its tests took 35-85% longer (pure-Python tests 6-7%) and the clean-clone suite 990 s
# (one run, 2026-12-06, also the first after `make setup`'s --no-compile), against 681-791 s
# in this order before.
LONGEST_FIRST = (
    "test_merge.py",
    "test_match.py",
    "test_experiments.py",
    "test_train.py",
    "test_cli.py",
    "test_reproduce.py",
    "test_stream.py",
    "test_symmetry.py",
    "test_data.py",
    "test_readme.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture
def seed(request):
    value = int(os.environ.get("ROTJAX_SEED", secrets.randbits(31)))
    request.node.rotjax_seed = value
    return value


@pytest.fixture
def key(seed):
    return jax.random.key(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and hasattr(item, "rotjax_seed"):
        report.sections.append(("rotjax seed", f"ROTJAX_SEED={item.rotjax_seed}"))
    return report


def rel_err(a, b):
    """max|a - b| / max|b| over arrays or matching pytrees of arrays: the tolerance measure
    used throughout the tests."""

    def flat(t):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])

    a, b = flat(a), flat(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the compiled programs of a test file once it is done (they come back from the
    persistent cache when needed): a worker that kept every program of the suite crashed
    inside XLA:CPU's compiler late in the run, likely out of memory mappings (65530 here)."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest_s_directory(tmp_path_factory):
    """Temporary files that libraries make in-process and never remove (tfds's
    ``DatasetInfo.initialize_from_bucket`` leaves an empty ``/tmp/tmp*tfds`` directory per
    dataset it reads, five per run of test_data) go under pytest's base temp, which pytest
    prunes, instead of the machine's /tmp."""
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = old
