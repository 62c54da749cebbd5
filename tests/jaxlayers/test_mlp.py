"""MLP and the GLU family against numpy formulas; param tree; jit, grad, bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, mlp
from tests import tolerances
from tests._asserts import assert_rel_close

_erf = np.vectorize(math.erf)
ACT = {
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "relu2": lambda x: np.maximum(x, 0.0) ** 2,
    "identity": lambda x: x,
}


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _params(rng, cfg):
    def leaf(spec):
        if len(spec.shape) == 2:
            return jnp.asarray(
                rng.standard_normal(spec.shape) / np.sqrt(spec.shape[0]), jnp.float32
            )
        return jnp.asarray(0.5 * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(leaf, mlp.param_specs(cfg), is_leaf=lambda s: isinstance(s, core.ParamSpec))


def _naive(params, x, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)

    def lin(name, v):
        out = v @ p[name]["kernel"]
        return out + p[name]["bias"] if "bias" in p[name] else out

    act = ACT[cfg.activation]
    h = act(lin("gate", x)) * lin("up", x) if cfg.variant == "glu" else act(lin("up", x))
    return lin("down", h)


CASES = {
    "mlp-gelu": mlp.Config(d_model=16, d_hidden=40),
    "mlp-relu2-bias": mlp.Config(d_model=16, d_hidden=40, activation="relu2", use_bias=True),
    "swiglu": mlp.swiglu(16, 40),
    "geglu": mlp.geglu(16, 40),
    "reglu-bias": mlp.reglu(16, 40, use_bias=True),
    "bilinear": mlp.bilinear(16, 40),
}


def test_constructors():
    assert (mlp.swiglu(4, 8).activation, mlp.swiglu(4, 8).variant) == ("silu", "glu")
    assert mlp.geglu(4, 8).activation == "gelu"
    assert mlp.reglu(4, 8).activation == "relu"
    assert mlp.bilinear(4, 8).activation == "identity"
    assert mlp.swiglu(4, 8, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_param_tree_and_axes(key):
    cfg = mlp.swiglu(8, 24, use_bias=True)
    params = jax.eval_shape(lambda k: mlp.init(k, cfg), key)
    assert jax.tree.map(lambda a: a.shape, params) == {
        "up": {"kernel": (8, 24), "bias": (24,)},
        "gate": {"kernel": (8, 24), "bias": (24,)},
        "down": {"kernel": (24, 8), "bias": (8,)},
    }
    axes = core.logical_axes(mlp.param_specs(cfg))
    assert axes["up"] == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}
    assert axes["gate"]["kernel"] == ("embed", "mlp")
    assert axes["down"] == {"kernel": ("mlp", "embed"), "bias": ("embed",)}
    assert set(mlp.param_specs(mlp.Config(d_model=8, d_hidden=24))) == {"up", "down"}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_naive(key, name):
    cfg = CASES[name]
    rng = _rng(key)
    params = _params(rng, cfg)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    y = jax.jit(mlp.apply, static_argnums=2)(params, x, cfg)
    assert y.shape == x.shape
    assert_rel_close(y, _naive(params, x, cfg), tolerances.forward(jnp.float32))


def test_grad_and_bf16(key):
    cfg = CASES["swiglu"]
    rng = _rng(key)
    params = _params(rng, cfg)
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)

    def loss(p, c):
        return jnp.sum(mlp.apply(p, x, c).astype(jnp.float32) * r)

    @jax.jit
    def run(p):
        return (
            mlp.apply(p, x, cfg.replace(dtype=jnp.bfloat16)),
            jax.grad(loss)(p, cfg),
            jax.grad(loss)(p, cfg.replace(dtype=jnp.bfloat16)),
        )

    y16, g32, g16 = run(params)
    assert y16.dtype == jnp.bfloat16
    assert_rel_close(y16, _naive(params, x, cfg), tolerances.forward(jnp.bfloat16))
    assert jax.tree.map(lambda a: a.dtype, g16) == jax.tree.map(lambda a: a.dtype, params)
    assert_rel_close(g16, g32, tolerances.grad(jnp.bfloat16))
    # float32 grad of the down kernel: h^T r with h the hidden activations
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64 = np.asarray(x, np.float64)
    h = ACT["silu"](x64 @ p64["gate"]["kernel"]) * (x64 @ p64["up"]["kernel"])
    want = np.einsum("btf,btd->fd", h, np.asarray(r, np.float64))
    assert_rel_close(g32["down"]["kernel"], want, tolerances.grad(jnp.float32))


def test_registered():
    fns = core.layer_fns("mlp")
    assert fns.config is mlp.Config and fns.kind == "mlp"
