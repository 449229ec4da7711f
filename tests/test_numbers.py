"""The one test of integer and real options (`rotjax._numbers`) that every option check uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax._numbers import is_int, is_number
from rotjax.merge._loss import check_memory
from rotjax.merge._straight import _check_descent


@pytest.mark.parametrize(
    "x", [3, 0, -2, np.int64(3), np.uint8(3), np.array(3), jnp.asarray(3), jnp.arange(3)[1]]
)
def test_integers_of_every_flavour_are_ints(x):
    assert is_int(x) and is_number(x, "iuf")


@pytest.mark.parametrize(
    "x",
    [
        *(True, np.bool_(True), np.array(True), 3.0, np.float32(3), np.array(3.0), 1j, "3"),
        *(None, np.array([3]), [3], (3,), np.array([[3]])),
    ],
)
def test_bools_floats_strings_and_arrays_of_one_are_not_ints(x):
    assert not is_int(x)


def test_reals_and_traced_values():
    assert is_number(0.5, "iuf") and is_number(np.float32(0.5), "iuf")
    assert is_number(jnp.asarray(0.5), "iuf") and not is_number(0.5)
    assert not is_number(True, "iuf") and not is_number(1j, "iuf")
    # Options decide what is computed: a traced value is no option (and no crash)
    seen = []
    jax.jit(lambda x: seen.append((is_int(x), is_number(x, "iuf"))) or x)(3)
    assert seen == [(False, False)]


def test_the_checks_that_refused_numpy_flavours_take_them():
    """align took max_sweeps=np.array(3); the descent's options and the memory budget took
    numpy ints but refused 0-d arrays (numbers.Integral): one rule now, and bools refused."""
    for n in (3, np.int64(3), np.array(3), jnp.asarray(3)):
        _check_descent(n, every=n, sweeps=n)
        check_memory(n)
    _check_descent(3, learning_rate=np.float32(0.1))
    with pytest.raises(ValueError, match="steps must be an integer >= 0, got True"):
        _check_descent(True)
    with pytest.raises(ValueError, match=r"memory must be an integer >= 0 \(bytes\)"):
        check_memory(np.array(3.0))
