"""sigma-Reparam: W_hat == W at init, sigma(W_hat) -> gamma as the power iteration runs, the
gradient of the reparameterised weight, and selection by path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.optim import sigma_reparam
from tests import tolerances
from tests._asserts import assert_rel_close


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "q": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)},
        "o": {"kernel": jnp.asarray(rng.standard_normal((6, 8)), jnp.float32), "bias": jnp.ones(8)},
        "norm": {"scale": jnp.ones(8)},
    }


def _sigma(w):
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0]


def test_init_is_identity_and_selects_kernels():
    params = _params()
    gammas, state = sigma_reparam.init(params)
    assert sorted(gammas) == ["o/kernel", "q/kernel"]
    np.testing.assert_allclose(gammas["q/kernel"], _sigma(params["q"]["kernel"]), rtol=1e-5)
    out, _ = sigma_reparam.apply(params, gammas, state)
    assert_rel_close(out, params, 1e-5)


def test_spectral_norm_of_w_hat_tracks_gamma():
    params = _params(1)
    gammas, state = sigma_reparam.init(params)
    gammas = {k: jnp.float32(0.5) for k in gammas}
    # perturb W so the stored vector is stale; a few steps of power iteration re-converge
    params["q"]["kernel"] = params["q"]["kernel"] + 0.5
    for _ in range(30):
        out, state = sigma_reparam.apply(params, gammas, state)
    np.testing.assert_allclose(_sigma(out["q"]["kernel"]), 0.5, rtol=1e-4)
    np.testing.assert_allclose(_sigma(out["o"]["kernel"]), 0.5, rtol=1e-4)
    np.testing.assert_array_equal(out["norm"]["scale"], params["norm"]["scale"])


def test_gradient_matches_naive_with_stopped_vectors():
    params = _params(2)
    gammas, state = sigma_reparam.init(params)
    w = params["q"]["kernel"]
    r = jnp.asarray(np.random.default_rng(3).standard_normal(w.shape), jnp.float32)

    def ours(w, g):
        p = dict(params, q={"kernel": w})
        out, _ = sigma_reparam.apply(p, dict(gammas, **{"q/kernel": g}), state)
        return jnp.sum(out["q"]["kernel"] * r)

    b = state["q/kernel"]
    a = jax.lax.stop_gradient(w @ b / jnp.linalg.norm(w @ b))
    b2 = jax.lax.stop_gradient(w.T @ a / jnp.linalg.norm(w.T @ a))

    def naive(w, g):
        return jnp.sum(g / (a @ w @ b2) * w * r)

    g0 = gammas["q/kernel"]
    got = jax.grad(ours, argnums=(0, 1))(w, g0)
    want = jax.grad(naive, argnums=(0, 1))(w, g0)
    assert_rel_close(got, want, tolerances.grad(jnp.float32))


def test_eval_keeps_state():
    params = _params()
    gammas, state = sigma_reparam.init(params)
    _, same = sigma_reparam.apply(params, gammas, state, update_state=False)
    assert same is not state and all(same[k] is state[k] for k in state)


def test_error_nothing_selected():
    with pytest.raises(ValueError, match=r"include selected no weight"):
        sigma_reparam.init({"b": jnp.ones(3)})


def test_error_not_matrix():
    with pytest.raises(ValueError, match=r"sigma-Reparam weights must be 2-D; b has shape \(3,\)"):
        sigma_reparam.init({"b": jnp.ones(3)}, include=lambda path, leaf: True)


def test_error_missing_state():
    params = _params()
    gammas, state = sigma_reparam.init(params)
    with pytest.raises(ValueError, match=r"state has no vector for \['q/kernel'\]"):
        sigma_reparam.apply(params, gammas, {"o/kernel": state["o/kernel"]})
