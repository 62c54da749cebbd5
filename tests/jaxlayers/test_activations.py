"""Activations against their formulas (numpy / math, float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import activations
from tests import tolerances
from tests._asserts import assert_rel_close

_erf = np.vectorize(math.erf)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


NAIVE = {
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: (
        0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    ),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "relu": lambda x: np.maximum(x, 0.0),
    "relu2": lambda x: np.maximum(x, 0.0) ** 2,
    "identity": lambda x: x,
}


def _x(key, shape=(3, 50)):
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    return 3.0 * rng.standard_normal(shape)


def test_names():
    assert activations.NAMES == tuple(NAIVE)


@pytest.mark.parametrize("name", list(NAIVE))
def test_matches_formula(key, name):
    x = _x(key)
    fn = activations.get(name)
    y = jax.jit(fn)(jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.float32
    assert_rel_close(y, NAIVE[name](x), tolerances.forward(jnp.float32))


@pytest.mark.parametrize("name", ["gelu", "silu", "relu2"])
def test_bf16_keeps_dtype(key, name):
    x = _x(key)
    y = activations.get(name)(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    assert_rel_close(y, NAIVE[name](x_rounded), tolerances.forward(jnp.bfloat16))


def test_exact_and_tanh_gelu_differ():
    x = jnp.asarray([-3.0, -1.0, 1.5], jnp.float32)
    diff = np.abs(np.asarray(activations.gelu(x) - activations.gelu_tanh(x)))
    assert diff.max() > 1e-5


def test_swish_beta_is_learnable(key):
    x = _x(key, (40,))
    xj = jnp.asarray(x, jnp.float32)
    beta = 1.7
    assert_rel_close(activations.swish(xj, beta), x * _sigmoid(beta * x), 1e-5)
    np.testing.assert_array_equal(activations.swish(xj), activations.silu(xj))
    # d/dbeta sum(x * sigmoid(beta x)) = sum(x^2 s (1 - s))
    g = jax.grad(lambda b: jnp.sum(activations.swish(xj, b)))(jnp.float32(beta))
    s = _sigmoid(beta * x)
    assert_rel_close(g, np.sum(x**2 * s * (1 - s)), tolerances.grad(jnp.float32))
    # a per-channel beta array broadcasts
    betas = jnp.linspace(0.5, 2.0, 40, dtype=jnp.float32)
    assert_rel_close(activations.swish(xj, betas), x * _sigmoid(np.asarray(betas) * x), 1e-5)


def test_relu2_grad(key):
    x = _x(key, (30,))
    g = jax.grad(lambda v: jnp.sum(activations.relu2(v)))(jnp.asarray(x, jnp.float32))
    assert_rel_close(g, 2 * np.maximum(x, 0), tolerances.grad(jnp.float32))
