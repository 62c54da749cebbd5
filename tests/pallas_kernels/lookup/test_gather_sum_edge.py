"""gather_sum edge cases: out-of-range indices, checked modes, dispatch, fuzzed sizes."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lookup import gather_sum
from tests.pallas_kernels.lookup.test_gather_sum import (
    IMPLS,
    _check_against_reference,
    _inputs,
    _vjp,
)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_out_of_range_indices_are_dropped_when_unchecked(impl, key):
    n, j, r, d = 12, 3, 5, 16
    k1, k2 = jax.random.split(key)
    idx, w, tab = _inputs(k1, n, j, r, d, jnp.float32)
    idx = idx.at[0, 0].set(r).at[3, 2].set(-1).at[7, 1].set(10 * r)
    kw = IMPLS.get(impl, dict(implementation="reference"))
    fn = jax.jit(functools.partial(gather_sum, check_indices=False, **kw))
    dy = jax.random.normal(k2, (n, d), jnp.float32)
    y, (dw, dtab) = _vjp(fn, idx, w, tab, dy)
    # Expected: the same call with those terms' weights zeroed and indices made valid.
    keep = (idx >= 0) & (idx < r)
    w0 = jnp.where(keep, w, 0.0)
    y_exp = gather_sum(jnp.where(keep, idx, 0), w0, tab, implementation="reference")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_exp), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(jnp.where(keep, 0.0, dw)).max()) == 0.0


def test_traced_indices_are_not_checked():
    """Under jit the values are unknown: no error, the bad term is dropped."""
    idx = jnp.array([[0, 7]], jnp.int32)
    w = jnp.ones((1, 2), jnp.float32)
    tab = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    y = jax.jit(functools.partial(gather_sum, implementation="xla"))(idx, w, tab)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(tab[0, :1]))


def test_checkify_mode_reports_out_of_range():
    from jax.experimental import checkify

    idx = jnp.array([[0, 7]], jnp.int32)
    w = jnp.ones((1, 2), jnp.float32)
    tab = jnp.ones((2, 3, 4), jnp.float32)
    f = checkify.checkify(
        jax.jit(functools.partial(gather_sum, implementation="xla", check_indices="checkify"))
    )
    err, _ = f(idx, w, tab)
    assert "indices must lie in [0, 3)" in err.get()
    err, _ = f(jnp.zeros((1, 2), jnp.int32), w, tab)
    assert err.get() is None


def test_default_implementation_on_cpu_is_xla(key):
    idx, w, tab = _inputs(key, 9, 2, 4, 8, jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(gather_sum(idx, w, tab)),
        np.asarray(gather_sum(idx, w, tab, implementation="xla")),
    )


_SIZES = dict(
    n=st.integers(1, 40),
    j=st.integers(1, 5),
    r=st.integers(1, 9),
    d=st.integers(1, 70),
    platform=st.sampled_from(["gpu", "tpu"]),
    seed=st.integers(0, 2**16),
)
_FUZZ = dict(
    deadline=None, derandomize=True, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)


@hypothesis.settings(max_examples=3, **_FUZZ)
@hypothesis.given(**_SIZES)
def test_fuzz_awkward_sizes(n, j, r, d, platform, seed):
    _fuzz_case(n, j, r, d, platform, seed)


@pytest.mark.slow
@hypothesis.settings(max_examples=40, **_FUZZ)
@hypothesis.given(**_SIZES)
def test_fuzz_awkward_sizes_long(n, j, r, d, platform, seed):
    _fuzz_case(n, j, r, d, platform, seed)


def _fuzz_case(n, j, r, d, platform, seed):
    key = jax.random.key(seed)
    k1, k2 = jax.random.split(key)
    idx, w, tab = _inputs(k1, n, j, r, d, jnp.float32)
    _check_against_reference(f"pallas_{platform}", idx, w, tab, k2)
