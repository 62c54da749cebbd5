"""MemoryFormer hashing projection and memory block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.lookup import memoryformer as mf
from tests import tolerances
from tests._asserts import assert_rel_close


def _all_sign_codes(tau):
    """[2^tau, tau] in {-1, +1}, row c has coordinate i = +1 iff bit i of c is set."""
    c = np.arange(2**tau)[:, None]
    return np.where((c >> np.arange(tau)[None, :]) & 1, 1.0, -1.0).astype(np.float32)


@pytest.mark.parametrize("tau", [1, 3, 6, 10])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_closed_form_weight_is_the_bucket_softmax(tau, temperature, key):
    z = 1.5 * jax.random.normal(key, (7, tau), jnp.float32)
    signs = jnp.asarray(_all_sign_codes(tau))
    probs = jax.nn.softmax(
        jnp.einsum("nt,ct->nc", z, signs, precision="highest") / temperature, axis=-1
    )
    code = mf.hash_codes(z, tau)[:, 0]
    brute = jnp.take_along_axis(probs, code[:, None], axis=-1)[:, 0]
    closed = mf.bucket_weights(z, tau, temperature)[:, 0]
    np.testing.assert_allclose(np.asarray(closed), np.asarray(brute), rtol=2e-5)
    # The selected code is the most probable one.
    np.testing.assert_array_equal(np.asarray(code), np.asarray(jnp.argmax(probs, axis=-1)))


def test_public_code_weight_is_l1_times_prob(key):
    x = jax.random.normal(key, (5, 12), jnp.float32)
    p = mf.bucket_weights(x, 4, 1.0, "prob")
    l1 = mf.bucket_weights(x, 4, 1.0, "l1_prob")
    want = p * jnp.sum(jnp.abs(x.reshape(5, 3, 4)), axis=-1)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(want), rtol=1e-6)


def test_hash_codes_bits_are_signs(key):
    x = jax.random.normal(key, (3, 4, 12), jnp.float32)
    codes = np.asarray(mf.hash_codes(x, 6))  # [3, 4, 2]
    bits = (codes[..., None] >> np.arange(6)) & 1
    np.testing.assert_array_equal(bits.astype(bool), np.asarray(x).reshape(3, 4, 2, 6) >= 0)
    assert codes.dtype == np.int32


@pytest.mark.parametrize("tau", [2, 4, 8])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_filled_tables_with_unit_weights_equal_sign_x_times_w(tau, implementation, key):
    d_in, d_out = 16, 12
    k1, k2 = jax.random.split(key)
    kernel = jax.random.randint(k1, (d_in, d_out), -3, 4).astype(jnp.float32)  # exact sums
    cfg = mf.Config(d_in=d_in, d_out=d_out, tau=tau, weight="ones", implementation=implementation)
    params = {"tables": mf.tables_from_dense(kernel, tau), "bias": jnp.zeros((d_out,))}
    x = jax.random.normal(k2, (2, 5, d_in), jnp.float32)
    y = mf.apply(params, x, cfg)
    want = jnp.matmul(jnp.where(x >= 0, 1.0, -1.0), kernel, precision="highest")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


@pytest.mark.parametrize("weight", ["prob", "l1_prob"])
def test_grad_x_matches_finite_differences(weight, key):
    cfg = mf.Config(d_in=12, d_out=8, tau=4, weight=weight)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = mf.init(k1, cfg)
    # Away from sign boundaries: |x| >= 0.3, and the probe step moves x by at most 1e-3.
    g = jax.random.normal(k2, (3, 12), jnp.float32)
    x = jnp.sign(g) * (0.3 + jnp.abs(g))
    v = jax.random.normal(k3, x.shape, jnp.float32)
    v = v / jnp.max(jnp.abs(v))
    probe = jax.random.normal(k4, (3, 8), jnp.float32)
    f = lambda xx: jnp.sum(mf.apply(params, xx, cfg) * probe)
    grad = jax.grad(f)(x)
    eps = 1e-3
    fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert mf.hash_codes(x + eps * v, 4).tolist() == mf.hash_codes(x, 4).tolist()
    analytic = jnp.sum(grad * v)
    assert abs(float(fd - analytic)) <= 2e-2 * abs(float(analytic)) + 1e-4, (fd, analytic)
    assert float(jnp.abs(grad).max()) > 0


def test_reference_and_xla_agree_with_gradients(key):
    cfg_x = mf.Config(d_in=16, d_out=8, tau=4, implementation="xla")
    cfg_r = cfg_x.replace(implementation="reference")
    k1, k2 = jax.random.split(key)
    params = mf.init(k1, cfg_x)
    x = jax.random.normal(k2, (6, 16), jnp.float32)
    loss = lambda c: lambda p, xx: jnp.sum(jnp.sin(mf.apply(p, xx, c)))
    gx = jax.grad(loss(cfg_x), argnums=(0, 1))(params, x)
    gr = jax.grad(loss(cfg_r), argnums=(0, 1))(params, x)
    assert_rel_close(gx, gr, tolerances.grad(jnp.float32))


def test_any_leading_dims(key):
    cfg = mf.Config(d_in=8, d_out=5, tau=4)
    params = mf.init(key, cfg)
    x = jax.random.normal(key, (2, 3, 4, 8), jnp.float32)
    y = mf.apply(params, x, cfg)
    assert y.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(
        np.asarray(y.reshape(-1, 5)),
        np.asarray(mf.apply(params, x.reshape(-1, 8), cfg)),
        rtol=1e-6,
    )


def test_flops_are_about_tau_times_fewer():
    cfg = mf.Config(d_in=1024, d_out=4096, tau=8)
    f = mf.flops(cfg, tokens=8192)
    ratio = f["dense"] / f["memoryformer"]
    assert 0.8 * cfg.tau <= ratio <= cfg.tau, ratio


def test_memory_block_structure(key):
    cfg = mf.BlockConfig(d_model=16, tau=4)
    params = mf.block_param_specs(cfg)
    assert params["up"]["tables"].shape == (4, 16, 24)  # J = 4, 2^4 rows, J (tau + 2) wide
    assert params["down"]["tables"].shape == (4, 64, 16)  # (tau + 2)-bit codes
    p = core.init_params(key, mf.block_param_specs(cfg))
    x = jax.random.normal(key, (2, 3, 16), jnp.float32)
    assert mf.block_apply(p, x, cfg).shape == (2, 3, 16)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_d_in_not_divisible_by_tau():
    with pytest.raises(ValueError, match="d_in=10 must be divisible by tau=4"):
        mf.Config(d_in=10, d_out=8, tau=4)


def test_tau_too_large_for_the_table_budget_states_the_memory():
    with pytest.raises(ValueError, match=r"tau=24 is too large .* would need 2.0 GiB"):
        mf.Config(d_in=48, d_out=16, tau=24, max_table_bytes=1 << 30)


def test_tau_range():
    with pytest.raises(ValueError, match=r"tau must be in \[1, 30\]"):
        mf.Config(d_in=31 * 2, d_out=8, tau=31)


def test_weight_choice():
    with pytest.raises(ValueError, match="weight must be one of"):
        mf.Config(d_in=8, d_out=8, tau=4, weight="softmax")


def test_temperature_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mf.Config(d_in=8, d_out=8, tau=4, temperature=0.0)


def test_block_d_model_not_divisible():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by tau=4"):
        mf.BlockConfig(d_model=10, tau=4)


def test_x_feature_dim(key):
    cfg = mf.Config(d_in=8, d_out=8, tau=4)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(d_in\) must be 8; got 6"):
        mf.apply(mf.init(key, cfg), jnp.ones((2, 6)), cfg)


def test_x_must_be_floating(key):
    cfg = mf.Config(d_in=8, d_out=8, tau=4)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        mf.apply(mf.init(key, cfg), jnp.ones((2, 8), jnp.int32), cfg)
