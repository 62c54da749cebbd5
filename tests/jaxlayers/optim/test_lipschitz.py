"""Spectral-norm cap: sigma_max (numpy SVD) <= cap + tol after every update; weights under
the cap are untouched; non-matrix leaves pass through."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlayers.optim import lipschitz


def _sigma(w):
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0]


def test_power_iteration_converges_to_top_singular_value():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((20, 12)), jnp.float32)
    u0 = lipschitz.random_unit_vector(jax.random.key(0), 20)
    sigma, u, v = lipschitz.power_iteration(w, u0, num_iters=50)
    np.testing.assert_allclose(float(sigma), _sigma(w), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.linalg.norm(u)), 1.0, rtol=1e-6)


def test_cap_holds_during_training():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = x @ jnp.asarray(3.0 * rng.standard_normal((16, 8)), jnp.float32)  # needs sigma >> 2
    cap = 2.0
    opt = optax.chain(optax.sgd(0.05), lipschitz.spectral_norm_cap(cap, num_iters=3))
    params = {"w": jnp.asarray(0.1 * rng.standard_normal((16, 8)), jnp.float32), "b": jnp.zeros(8)}

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"][None] - y) ** 2)

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    sigmas = []
    for _ in range(25):
        params, state = step(params, state)
        sigmas.append(_sigma(params["w"]))
    assert max(sigmas) <= cap * (1 + 1e-3), max(sigmas)
    assert sigmas[-1] > 0.99 * cap  # the constraint is active: the fit wants a larger norm


def test_weights_under_the_cap_are_unchanged():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((6, 5)) * 0.1, jnp.float32)
    params = {"w": w, "v": jnp.ones((3, 2, 2))}
    upd = {"w": 0.01 * jnp.ones_like(w), "v": jnp.ones((3, 2, 2))}
    t = lipschitz.spectral_norm_cap(10.0)
    out, state = t.update(upd, t.init(params), params)
    np.testing.assert_allclose(out["w"], upd["w"], atol=1e-7)
    np.testing.assert_array_equal(out["v"], upd["v"])  # not 2-D: passed through
    assert state.u["w"].shape == (6,) and state.u["v"].shape == (0,)


def test_error_params_required():
    t = lipschitz.spectral_norm_cap(1.0)
    p = {"w": jnp.ones((2, 2))}
    with pytest.raises(
        ValueError, match=r"params must be passed to update\(updates, state, params\)"
    ):
        t.update(p, t.init(p))


def test_error_max_norm():
    with pytest.raises(ValueError, match=r"max_norm must be positive; got max_norm=0"):
        lipschitz.spectral_norm_cap(0)
