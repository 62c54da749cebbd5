"""Activations against their formulas (numpy / math, float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import activations, core
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
    "golu": lambda x: x * np.exp(-np.exp(-x)),
    "atlu": lambda x: x * (np.arctan(x) / np.pi + 0.5),
    "helu": lambda x: np.maximum(x, 0.0),
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


# ----------------------------------------------------------------------------------------------
# GoLU, ATLU, HeLU
# ----------------------------------------------------------------------------------------------


def test_golu_grad_finite_far_in_negative_tail():
    xs = jnp.asarray([-100.0, -88.0, -30.0, 0.0, 3.0, 50.0], jnp.float32)
    g = jax.vmap(jax.grad(activations.golu))(xs)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(g[:3], 0.0, atol=1e-30)  # the true derivative underflows to 0
    # elsewhere it is d/dx x exp(-exp(-x)) = g + x e^-x g
    x = np.asarray(xs[3:], np.float64)
    gomp = np.exp(-np.exp(-x))
    np.testing.assert_allclose(g[3:], gomp + x * np.exp(-x) * gomp, rtol=1e-5)
    # and plain autodiff of the formula would be nan there, which is why the custom rule exists
    naive = jax.grad(lambda v: v * jnp.exp(-jnp.exp(-v)))(jnp.float32(-100.0))
    assert not np.isfinite(float(naive))


def test_golu_grad_matches_autodiff_in_range(key):
    x = jnp.asarray(_x(key, (64,)), jnp.float32)
    got = jax.grad(lambda v: jnp.sum(activations.golu(v)))(x)
    want = jax.grad(lambda v: jnp.sum(v * jnp.exp(-jnp.exp(-v))))(x)
    assert_rel_close(got, want, tolerances.grad(jnp.float32))


def test_helu_forward_relu_backward_shifted():
    x = jnp.asarray([-1.0, -0.06, -0.04, -0.01, 0.0, 0.5], jnp.float32)
    np.testing.assert_array_equal(activations.helu(x), activations.relu(x))
    g = jax.grad(lambda v: jnp.sum(activations.helu(v)))(x)
    np.testing.assert_array_equal(g, [0, 0, 1, 1, 1, 1])
    g2 = jax.grad(lambda v: jnp.sum(activations.helu(v, 0.5)))(x)
    np.testing.assert_array_equal(g2, [0, 1, 1, 1, 1, 1])


# ----------------------------------------------------------------------------------------------
# Layers with params: apply == formula; gradients reach the params
# ----------------------------------------------------------------------------------------------


def _gate(name, x):
    if name == "atan":
        return np.arctan(x) / np.pi + 0.5
    if name == "gelu":
        return 0.5 * (1 + _erf(x / np.sqrt(2.0)))
    return _sigmoid(x)


def _velu_naive(x, lam, a=1.0, b1=1.0, b2=0.5, g=0.1, mu=0.5, eps=1e-3):
    inner = np.arctan(b1 * x) + np.arcsin(np.clip(b2 * x, -1 + 1e-6, 1 - 1e-6))
    s = np.clip(1 + g * np.tanh(mu * np.sqrt(x.var(-1, keepdims=True) + eps)), 0.5, 2.0)
    return lam * x * _sigmoid(a * inner) * s


def _poly_relu_naive(x, w, b):
    r = np.maximum(x, 0)
    return sum(w[i] * r ** (i + 1) for i in range(len(w))) + b


def _poly_norm_naive(x, w, b, eps=1e-6):
    out = b + np.zeros_like(x)
    for i in range(len(w)):
        z = x ** (i + 1)
        out = out + w[i] * z / np.sqrt(np.mean(z**2, -1, keepdims=True) + eps)
    return out


LAYER_CASES = {
    "swish": (
        activations.SwishConfig(dim=12),
        lambda x, p: x * _sigmoid(p["beta"] * x),
    ),
    "swish_shared": (
        activations.SwishConfig(),
        lambda x, p: x * _sigmoid(p["beta"] * x),
    ),
    "prelu": (
        activations.PReLUConfig(dim=12),
        lambda x, p: np.where(x >= 0, x, p["slope"] * x),
    ),
    **{
        f"x{gate}": (
            activations.ExpandedGatingConfig(gate=gate),
            lambda x, p, gate=gate: x * ((1 + 2 * p["alpha"]) * _gate(gate, x) - p["alpha"]),
        )
        for gate in ("atan", "gelu", "silu")
    },
    "velu": (activations.VeLUConfig(), lambda x, p: _velu_naive(x, p["scale"])),
    "poly_relu": (
        activations.PolyReLUConfig(order=3),
        lambda x, p: _poly_relu_naive(x, p["weight"], p["bias"]),
    ),
    "poly_norm": (
        activations.PolyNormConfig(order=3),
        lambda x, p: _poly_norm_naive(x, p["weight"], p["bias"]),
    ),
}


def _random_params(rng, cfg):
    specs = core.param_specs(cfg)
    return {
        k: jnp.asarray(0.5 + 0.4 * rng.standard_normal(s.shape), jnp.float32)
        for k, s in specs.items()
    }


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_matches_formula_and_has_param_grads(key, name):
    cfg, naive = LAYER_CASES[name]
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    params = _random_params(rng, cfg)
    x = 2.0 * rng.standard_normal((3, 5, 12))
    y = core.apply(params, jnp.asarray(x, jnp.float32), cfg)
    assert y.dtype == jnp.float32
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    assert_rel_close(y, naive(x, p64), tolerances.forward(jnp.float32))
    grads = jax.grad(lambda p: jnp.sum(core.apply(p, jnp.asarray(x, jnp.float32), cfg) ** 2))(
        params
    )
    for k, g in grads.items():
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), k


def test_layer_defaults_start_at_plain_units(key):
    """Default init: learnable swish == SiLU, xATLU (alpha=0) == ATLU, PReLU slope 0.25."""
    x = jnp.asarray(_x(key, (4, 16)), jnp.float32)
    for cfg, want in [
        (activations.SwishConfig(dim=16), activations.silu(x)),
        (activations.ExpandedGatingConfig(gate="atan"), activations.atlu(x)),
        (activations.ExpandedGatingConfig(gate="silu"), activations.silu(x)),
        (activations.PReLUConfig(), jnp.where(x >= 0, x, 0.25 * x)),
    ]:
        y = core.apply(core.init(key, cfg), x, cfg)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)


def test_velu_ot_penalty():
    y = jnp.asarray(np.random.default_rng(0).normal(0.5, 2.0, 4096), jnp.float32)
    want = float(jnp.mean(y)) ** 2 + (float(jnp.std(y)) - 1.0) ** 2
    np.testing.assert_allclose(activations.velu_ot_penalty(y), want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Stochastic activations: random in training (explicit key), deterministic at eval
# ----------------------------------------------------------------------------------------------


def test_stochastic_train_mixes_with_key_and_eval_is_deterministic(key):
    x = jnp.asarray(_x(key, (8, 256)), jnp.float32)
    cfg = activations.StochasticConfig(p=0.3)
    fn = jax.jit(lambda x, k: activations.stochastic_apply({}, x, cfg, key=k, train=True))
    y = np.asarray(fn(x, key))
    relu, silu = np.asarray(activations.relu(x)), np.asarray(activations.silu(x))
    is_silu = np.isclose(y, silu, rtol=1e-6) & ~np.isclose(y, relu, rtol=1e-6)
    assert np.all(np.isclose(y, relu) | np.isclose(y, silu))
    frac = is_silu.sum() / (~np.isclose(relu, silu)).sum()
    assert 0.25 < frac < 0.35, frac
    np.testing.assert_array_equal(fn(x, key), y)  # same key, same draw
    assert not np.array_equal(fn(x, jax.random.fold_in(key, 1)), y)
    # eval: the base activation, no key needed
    np.testing.assert_array_equal(activations.stochastic_apply({}, x, cfg), relu)
    cfg2 = activations.StochasticConfig(eval_activation="silu")
    np.testing.assert_array_equal(activations.stochastic_apply({}, x, cfg2), silu)


def test_stochastic_per_call_draw(key):
    x = jnp.asarray(_x(key, (4, 64)), jnp.float32)
    cfg = activations.StochasticConfig(per_element=False)
    outs = {
        "relu" if np.array_equal(y, activations.relu(x)) else "silu"
        for y in (
            activations.stochastic_apply({}, x, cfg, key=jax.random.fold_in(key, i), train=True)
            for i in range(12)
        )
        if np.array_equal(y, activations.relu(x)) or np.array_equal(y, activations.silu(x))
    }
    assert outs == {"relu", "silu"}


# ----------------------------------------------------------------------------------------------
# Errors: one per message
# ----------------------------------------------------------------------------------------------


def test_error_stochastic_train_without_key():
    with pytest.raises(ValueError, match=r"key must be a PRNG key when train=True; got None"):
        activations.stochastic_apply(
            {}, jnp.ones((2, 3)), activations.StochasticConfig(), train=True
        )


def test_error_bad_gate():
    with pytest.raises(
        ValueError, match=r"gate must be one of \('atan', 'gelu', 'silu'\); got 'tanh'"
    ):
        activations.ExpandedGatingConfig(gate="tanh")


def test_error_probability_range():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]; got p=1.5"):
        activations.StochasticConfig(p=1.5)


def test_error_poly_order():
    with pytest.raises(ValueError, match=r"order must be >= 1; got order=0"):
        activations.PolyReLUConfig(order=0)


def test_error_channel_dim():
    with pytest.raises(
        ValueError, match=r"dim must be positive or None \(shared scalar\); got dim=0"
    ):
        activations.PReLUConfig(dim=0)


def test_error_channel_mismatch():
    cfg = activations.PReLUConfig(dim=8)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(dim\) must be 8; got 6"):
        activations.prelu_apply(core.init(jax.random.key(0), cfg), jnp.ones((2, 6)), cfg)


def test_error_unknown_activation_name():
    with pytest.raises(ValueError, match=r"activation must be one of .*; got 'nope'"):
        activations.StochasticConfig(alt="nope")


def test_registered_as_activations():
    for name in (
        "swish",
        "prelu",
        "expanded_gating",
        "velu",
        "poly_relu",
        "poly_norm",
        "stochastic_activation",
    ):
        assert core.layer_fns(name).kind == "activation"
