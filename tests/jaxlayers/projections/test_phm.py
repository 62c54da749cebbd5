"""PHM: the kernel equals the explicit Kronecker sum sum_s kron(A_s, S_s); n = 1 is a Dense;
the init keeps the Dense (1/d_in) scale; one test per error message."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, dense
from jaxlayers.projections import phm
from tests import tolerances
from tests._asserts import assert_rel_close


@pytest.mark.parametrize("n", [2, 4], ids=lambda n: f"n={n}")
def test_matches_explicit_kronecker_sum(n):
    cfg = phm.Config(d_in=4 * n, d_out=3 * n, n=n)
    rng = np.random.default_rng(n)
    rules = rng.standard_normal((n, n, n))
    weights = rng.standard_normal((n, 4, 3))
    bias = rng.standard_normal(3 * n)
    w = sum(np.kron(rules[s], weights[s]) for s in range(n))
    x = rng.standard_normal((2, 3, 4 * n))
    params = {
        "rules": jnp.asarray(rules, jnp.float32),
        "weights": jnp.asarray(weights, jnp.float32),
        "bias": jnp.asarray(bias, jnp.float32),
    }
    assert_rel_close(
        phm.kronecker_weight(params["rules"], params["weights"]), w, tolerances.forward(jnp.float32)
    )
    out = phm.apply(params, jnp.asarray(x, jnp.float32), cfg)
    assert_rel_close(out, x @ w + bias, tolerances.forward(jnp.float32))


def test_n1_is_dense():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((6, 5)).astype(np.float32)
    params = {
        "rules": jnp.ones((1, 1, 1)),
        "weights": jnp.asarray(kernel[None]),
        "bias": jnp.zeros(5),
    }
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    d_params = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(5)}
    np.testing.assert_allclose(
        phm.apply(params, x, phm.Config(d_in=6, d_out=5, n=1)),
        dense.apply(d_params, x, dense.Config(d_in=6, d_out=5)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_parameter_count_and_init_scale(key):
    cfg = phm.Config(d_in=64, d_out=64, n=4, use_bias=False)
    params = phm.init(key, cfg)
    assert core.count_params(params) == 4**3 + 64 * 64 // 4
    w = phm.kronecker_weight(params["rules"], params["weights"])
    assert abs(float(jnp.var(w)) * 64 - 1.0) < 0.25


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


def test_d_in_divisible_by_n():
    with _raises(ValueError, "d_in=6 must be divisible by n=4"):
        phm.Config(d_in=6, d_out=8, n=4)


def test_d_out_divisible_by_n():
    with _raises(ValueError, "d_out=6 must be divisible by n=4"):
        phm.Config(d_in=8, d_out=6, n=4)


def test_n_positive():
    with _raises(ValueError, "n must be positive; got 0"):
        phm.Config(d_in=8, d_out=8, n=0)


def test_wrong_input_width():
    cfg = phm.Config(d_in=8, d_out=8, n=2)
    params = jax.eval_shape(lambda: phm.init(jax.random.key(0), cfg))
    with _raises(ValueError, "x.shape[-1] (d_in) must be 8; got 4 (shape (4,))"):
        jax.eval_shape(lambda p, x: phm.apply(p, x, cfg), params, jnp.zeros((4,)))
