"""Dense: y = x W + b against numpy, init, jit, grad, bf16 compute.

Inputs are drawn with numpy from the test's key: jax.random compiles per shape, which costs
seconds on the shared CPU machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, dense
from tests import tolerances
from tests._asserts import assert_rel_close


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _params(rng, cfg):
    params = {"kernel": rng.standard_normal((cfg.d_in, cfg.d_out)) / np.sqrt(cfg.d_in)}
    if cfg.use_bias:
        params["bias"] = rng.standard_normal(cfg.d_out)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _naive(params, x):
    y = np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64)
    if "bias" in params:
        y = y + np.asarray(params["bias"], np.float64)
    return y


def test_init_names_shapes_axes(key):
    cfg = dense.Config(d_in=64, d_out=64, kernel_axes=("mlp", "embed"))
    params = dense.init(key, cfg)
    assert jax.tree.map(jnp.shape, params) == {"kernel": (64, 64), "bias": (64,)}
    assert jax.tree.map(lambda a: a.dtype, params) == {"kernel": jnp.float32, "bias": jnp.float32}
    assert core.logical_axes(dense.param_specs(cfg)) == {
        "kernel": ("mlp", "embed"),
        "bias": ("embed",),
    }
    np.testing.assert_array_equal(params["bias"], 0.0)
    # fan-in init: std ~ 1/sqrt(d_in) (the truncated normal is rescaled to keep the variance)
    assert abs(float(jnp.std(params["kernel"])) * 8 - 1.0) < 0.1
    # keys come from parameter paths: dropping the bias leaves the kernel unchanged
    without = dense.init(key, cfg.replace(use_bias=False))
    assert set(without) == {"kernel"}
    np.testing.assert_array_equal(without["kernel"], params["kernel"])


def test_custom_init_and_param_dtype(key):
    cfg = dense.Config(
        d_in=4, d_out=3, kernel_init=core.initializers.ones, param_dtype=jnp.bfloat16
    )
    params = dense.init(key, cfg)
    assert params["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["kernel"], np.float32), 1.0)
    y = dense.apply(params, jnp.ones((2, 4), jnp.float32), cfg)
    assert y.dtype == jnp.float32  # compute dtype follows the input when cfg.dtype is None


@pytest.mark.parametrize("use_bias", [True, False], ids=lambda b: f"use_bias={b}")
@pytest.mark.parametrize(
    "shape", [(5, 12), (2, 7, 12), (2, 3, 4, 12)], ids=lambda s: f"x_shape={s}"
)
def test_matches_naive(key, shape, use_bias):
    rng = _rng(key)
    cfg = dense.Config(d_in=12, d_out=9, use_bias=use_bias)
    params = _params(rng, cfg)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    y = jax.jit(dense.apply, static_argnums=2)(params, x, cfg)
    assert y.shape == shape[:-1] + (9,)
    assert_rel_close(y, _naive(params, x), tolerances.forward(jnp.float32))


def test_grad_matches_analytic(key):
    rng = _rng(key)
    cfg = dense.Config(d_in=8, d_out=5)
    params = _params(rng, cfg)
    x = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    r = rng.standard_normal((3, 4, 5))

    def loss(p, x):
        return jnp.sum(dense.apply(p, x, cfg) * jnp.asarray(r, jnp.float32))

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    x64 = np.asarray(x, np.float64)
    tol = tolerances.grad(jnp.float32)
    assert_rel_close(gp["kernel"], np.einsum("bti,bto->io", x64, r), tol)
    assert_rel_close(gp["bias"], r.sum((0, 1)), tol)
    assert_rel_close(gx, r @ np.asarray(params["kernel"], np.float64).T, tol)


@pytest.mark.parametrize("how", ["cfg_dtype", "input_dtype"])
def test_bf16_compute_close_to_float32(key, how):
    rng = _rng(key)
    cfg32 = dense.Config(d_in=32, d_out=16)
    params = _params(rng, cfg32)
    x = jnp.asarray(rng.standard_normal((4, 8, 32)), jnp.float32)
    if how == "cfg_dtype":
        cfg, xin = cfg32.replace(dtype=jnp.bfloat16), x
    else:
        cfg, xin = cfg32, x.astype(jnp.bfloat16)

    @jax.jit
    def fwd_and_grad(p):
        y = dense.apply(p, xin, cfg)
        return y, jax.grad(lambda p: jnp.sum(dense.apply(p, xin, cfg).astype(jnp.float32)))(p)

    y, g = fwd_and_grad(params)
    assert y.dtype == jnp.bfloat16
    assert_rel_close(y, _naive(params, x), tolerances.forward(jnp.bfloat16))
    # float32 master params get float32 gradients
    assert jax.tree.map(lambda a: a.dtype, g) == {"kernel": jnp.float32, "bias": jnp.float32}


def test_registered():
    fns = core.layer_fns("dense")
    assert fns.config is dense.Config and fns.kind == "projection"
    assert core.layer_fns(dense.Config(d_in=1, d_out=1)) is fns
    assert fns.example is not None
