"""Group-Rational KAN and the Padé activation unit: the rational formula, group sharing, the
initialisations (identity exact, GELU / SiLU within the stated fit error) and the
variance-preserving kernel init; one test per error message."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jaxlayers import core
from jaxlayers.projections import kat
from tests import tolerances
from tests._asserts import assert_rel_close

# Max |F - activation| of the stored fits on [-4, 4] (module docstring: GELU 2.5e-3 "abs_sum",
# 3.4e-3 "sum_abs"; SiLU 1.3e-5), with a little headroom for float32 evaluation.
FIT_TOL = {"gelu": 4e-3, "silu": 2e-5}


def _gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _silu(x):
    return x / (1 + np.exp(-x))


def _naive_rational(x, a, b, denominator):
    p = sum(a[j] * x**j for j in range(len(a)))
    if denominator == "abs_sum":
        q = 1 + np.abs(sum(b[k - 1] * x**k for k in range(1, len(b) + 1)))
    else:
        q = 1 + sum(abs(b[k - 1]) * np.abs(x) ** k for k in range(1, len(b) + 1))
    return p / q


@pytest.mark.parametrize("denominator", kat.DENOMINATORS)
def test_group_rational_layer_matches_formula(denominator):
    rng = np.random.default_rng(3)
    cfg = kat.Config(d_in=12, d_out=5, num_groups=3, denominator=denominator, init="identity")
    params = {
        "numerator": rng.standard_normal((3, 6)) * 0.5,
        "denominator": rng.standard_normal((3, 4)) * 0.5,
        "kernel": rng.standard_normal((12, 5)) / math.sqrt(12),
        "bias": rng.standard_normal(5),
    }
    x = rng.standard_normal((2, 4, 12)) * 1.5
    want_f = np.empty_like(x)
    for c in range(12):  # channel c uses group c // 4
        g = c // 4
        want_f[..., c] = _naive_rational(
            x[..., c], params["numerator"][g], params["denominator"][g], denominator
        )
    want = want_f @ params["kernel"] + params["bias"]
    jparams = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    jx = jnp.asarray(x, jnp.float32)
    assert_rel_close(kat.group_rational(jparams, jx, cfg), want_f, tolerances.forward(jnp.float32))
    assert_rel_close(kat.apply(jparams, jx, cfg), want, tolerances.forward(jnp.float32))


@pytest.mark.parametrize("init", ["gelu", "silu"])
@pytest.mark.parametrize("denominator", kat.DENOMINATORS)
def test_init_approximates_activation(init, denominator, key):
    x = np.linspace(-4.0, 4.0, 800, dtype=np.float32)
    want = _gelu(x.astype(np.float64)) if init == "gelu" else _silu(x.astype(np.float64))
    cfg = kat.Config(d_in=8, d_out=3, num_groups=2, init=init, denominator=denominator)
    f = kat.group_rational(kat.init(key, cfg), jnp.asarray(x.reshape(-1, 8)), cfg)
    assert np.max(np.abs(np.asarray(f).reshape(-1) - want)) <= FIT_TOL[init]
    pcfg = kat.PadeConfig(init=init, denominator=denominator)
    g = kat.pade_apply(core.init(key, pcfg), jnp.asarray(x), pcfg)
    assert np.max(np.abs(np.asarray(g) - want)) <= FIT_TOL[init]


def test_identity_init_is_exact(key):
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 8)) * 3, jnp.float32)
    cfg = kat.Config(d_in=8, d_out=4, num_groups=4, init="identity")
    np.testing.assert_array_equal(kat.group_rational(kat.init(key, cfg), x, cfg), x)
    pcfg = kat.PadeConfig(init="identity")
    np.testing.assert_array_equal(kat.pade_apply(core.init(key, pcfg), x, pcfg), x)


def test_variance_preserving_kernel_init(key):
    assert kat.variance_gain("identity", 5, 4, "abs_sum") == 1.0
    gain = kat.variance_gain("gelu", 5, 4, "abs_sum")
    # E[GELU(x)^2] = 0.4252 for x ~ N(0, 1): the fit should give nearly the same gain.
    assert abs(gain - 1 / 0.42522) < 0.01
    cfg = kat.Config(d_in=256, d_out=256, num_groups=8, init="gelu", use_bias=False)
    params = kat.init(key, cfg)
    assert abs(float(jnp.var(params["kernel"])) * 256 / gain - 1) < 0.05
    x = jnp.asarray(np.random.default_rng(5).standard_normal((512, 256)), jnp.float32)
    y = kat.apply(params, x, cfg)
    assert abs(float(jnp.var(y)) - 1.0) < 0.1


def test_fit_rational_reproduces_stored_fit():
    a, b = kat.fit_rational("gelu", 5, 4, "abs_sum")
    stored_a, stored_b = kat.FITTED[("abs_sum", "gelu")]
    x = np.linspace(-4, 4, 2001)
    err_new = np.max(np.abs(_naive_rational(x, a, b, "abs_sum") - _gelu(x)))
    err_old = np.max(np.abs(_naive_rational(x, stored_a, stored_b, "abs_sum") - _gelu(x)))
    assert err_new <= err_old * 1.01 + 1e-9
    np.testing.assert_allclose(np.concatenate([a, b]), stored_a + stored_b, atol=1e-6)


def test_other_degrees_are_fitted_on_demand(key):
    cfg = kat.PadeConfig(num_degree=4, den_degree=3, init="silu")
    params = core.init(key, cfg)
    assert params["numerator"].shape == (5,) and params["denominator"].shape == (3,)
    x = np.linspace(-3, 3, 61, dtype=np.float32)
    err = np.abs(np.asarray(kat.pade_apply(params, jnp.asarray(x), cfg)) - _silu(x))
    assert err.max() < 1e-3


def test_coefficients_learn(key):
    cfg = kat.Config(d_in=8, d_out=4, num_groups=2)
    params = kat.init(key, cfg)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 8)), jnp.float32)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(kat.apply(p, x, cfg))))(params)
    for name in ("numerator", "denominator"):
        assert np.all(np.asarray(jnp.abs(grads[name]).sum(-1)) > 0), name


# ------------------------------------------------------------------------------ bad input


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


def test_groups_divide_d_in():
    with _raises(ValueError, "d_in=10 must be divisible by num_groups=4"):
        kat.Config(d_in=10, d_out=4, num_groups=4)


def test_sizes_positive():
    with _raises(ValueError, "d_in and d_out must be positive; got d_in=8, d_out=0"):
        kat.Config(d_in=8, d_out=0, num_groups=2)


def test_degrees_at_least_one():
    with _raises(ValueError, "num_degree and den_degree must be >= 1; got num_degree=5, "):
        kat.PadeConfig(den_degree=0)


def test_init_choice():
    with _raises(ValueError, f"init must be one of {kat.INITS}; got 'tanh'"):
        kat.Config(d_in=8, d_out=4, num_groups=2, init="tanh")


def test_denominator_choice():
    with _raises(ValueError, f"denominator must be one of {kat.DENOMINATORS}; got 'plain'"):
        kat.PadeConfig(denominator="plain")


def test_wrong_input_width():
    cfg = kat.Config(d_in=8, d_out=4, num_groups=2)
    params = jax.eval_shape(lambda: kat.init(jax.random.key(0), cfg))
    with _raises(ValueError, "x.shape[-1] (d_in) must be 8; got 6 (shape (2, 6))"):
        jax.eval_shape(lambda p, x: kat.apply(p, x, cfg), params, jnp.zeros((2, 6)))


def test_pade_rejects_integer_input():
    cfg = kat.PadeConfig()
    params = jax.eval_shape(lambda: core.init(jax.random.key(0), cfg))
    with _raises(TypeError, "x must have a floating dtype (float32, bfloat16, ...); got int32"):
        jax.eval_shape(lambda p, x: kat.pade_apply(p, x, cfg), params, jnp.zeros((3,), jnp.int32))
