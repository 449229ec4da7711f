"""The one test of integer and real options (`rotjax._numbers`) that every option check uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import match, merge
from rotjax._numbers import is_int, is_number
from rotjax.data import IGNORE_LABEL, check_labels
from rotjax.data._text import check_options
from rotjax.merge._loss import check_memory
from rotjax.merge._straight import _check_descent


@pytest.mark.parametrize("x", [3, 0, -2, np.int64(3), np.uint8(3), 2**64 + 7])
def test_python_and_numpy_ints_of_any_size_are_ints(x):
    assert is_int(x) and is_int(x, arrays=True) and is_number(x, "iuf")


@pytest.mark.parametrize(
    "x",
    [
        *(True, np.bool_(True), np.array(True), 3.0, np.float32(3), 1j, "3", None),
        *(np.array(3.0), np.array([3]), [3], (3,), [1, [2]]),
    ],
)
def test_bools_floats_strings_and_arrays_of_one_are_not_ints(x):
    assert not is_int(x) and not is_int(x, arrays=True)


def test_zero_d_arrays_are_ints_only_where_stored_as_ints():
    """0-d arrays (an element of ``jnp.arange``) are ints for the checks that then store
    ``int(x)`` (``arrays=True``: align's options and anchor, align_by_activations' sweeps), and
    not elsewhere: kept as they are they reach JSON records, dict keys and ``seed < 2**32``."""
    for x in (np.array(3), jnp.asarray(3), jnp.arange(3)[1]):
        assert is_int(x, arrays=True) and not is_int(x)
    assert is_number(jnp.asarray(0.5), "iuf", arrays=True) and not is_number(
        jnp.asarray(0.5), "iuf"
    )


def test_reals_and_traced_values():
    assert is_number(0.5, "iuf") and is_number(np.float32(0.5), "iuf") and not is_number(0.5)
    assert not is_number(True, "iuf") and not is_number(1j, "iuf")
    seen = []  # options decide what is computed: a traced value is none (and no crash)
    jax.jit(lambda x: seen.append((is_int(x, arrays=True), is_number(x, "iuf"))) or x)(3)
    assert seen == [(False, False)]


def test_the_option_checks_agree():
    """align took max_sweeps=np.array(3), which align_by_activations refused; wordnet's limit
    refused numpy ints, which every other data option took."""
    for n in (3, np.int64(3), np.array(3), jnp.asarray(3)):
        assert match.Options(max_sweeps=n).max_sweeps == 3
        with pytest.raises(TypeError, match="NoneType has no config"):  # past the options
            merge.align_by_activations(None, None, None, None, [], max_sweeps=n)
    for n in (3, np.int64(3)):
        _check_descent(n, every=n, sweeps=n)
        check_memory(n)
        check_options(("noun.animal",), max_length=8, max_per_class=n, limit=n)
    _check_descent(3, learning_rate=np.float32(0.1))
    for bad in (True, np.array([3])):
        with pytest.raises(ValueError, match=r"max_sweeps must be"):
            match.Options(max_sweeps=bad)
        with pytest.raises(ValueError, match=r"max_sweeps must be an int >= 0"):
            merge.align_by_activations(None, None, None, None, [], max_sweeps=bad)
    for bad in (True, np.array(3)):
        with pytest.raises(ValueError, match=r"steps must be an integer >= 0, got"):
            _check_descent(bad)
        with pytest.raises(ValueError, match=r"limit must be None or a positive int"):
            check_options(("noun.animal",), max_length=8, max_per_class=None, limit=bad)
    with pytest.raises(ValueError, match=r"memory must be an integer >= 0 \(bytes\)"):
        check_memory(np.array(3.0))


def test_one_label_check_for_training_statistics_and_the_command_line():
    """`rotjax.data.check_labels`: integer classes in [0, n) or IGNORE_LABEL; all ignored is
    refused unless ``all_ignored_ok`` (one batch of many may have none)."""
    check_labels(np.array([0, 2, IGNORE_LABEL]), "y", 3)
    check_labels(np.array([7]), "y")  # no class count: any class id >= 0
    for bad, msg in (
        (np.array([0.0, 1.0]), r"y: labels must be integer class ids, got dtype float64"),
        (np.array([True]), r"y: labels must be integer class ids, got dtype bool"),
        (np.array([0, 3, -1]), r"y: 2 label\(s\) outside the classes \[0, 3\) .* \[-1, 3\]"),
        (np.full(2, IGNORE_LABEL), r"y: every label is IGNORE_LABEL"),
    ):
        with pytest.raises(ValueError, match=msg):
            check_labels(bad, "y", 3)
    check_labels(np.full(2, IGNORE_LABEL), "y", 3, all_ignored_ok=True)
