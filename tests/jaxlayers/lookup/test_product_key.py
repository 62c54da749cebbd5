"""Product-key memory, UltraMem-style memory and PEER against brute-force formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.lookup import peer, product_key
from tests import tolerances
from tests._asserts import assert_rel_close

HI = "highest"


@pytest.mark.parametrize("n1,n2,k", [(8, 8, 4), (16, 5, 5), (7, 12, 1), (6, 6, 6)])
def test_product_key_topk_equals_brute_force(n1, n2, k, key):
    k1, k2 = jax.random.split(key)
    s1 = jax.random.normal(k1, (3, 2, n1), jnp.float32)
    s2 = jax.random.normal(k2, (3, 2, n2), jnp.float32)
    if k > n2:
        pytest.skip("k must not exceed either half")
    scores, ids = product_key.product_key_topk(s1, s2, k)
    full = (s1[..., :, None] + s2[..., None, :]).reshape(3, 2, n1 * n2)
    want_scores, want_ids = jax.lax.top_k(full, k)
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(want_scores))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))


def _pkm_naive(params, x, cfg):
    q = (x @ params["query"]["kernel"]).reshape(-1, cfg.heads, 2, cfg.d_key // 2)
    s = jnp.einsum("nhtd,htsd->nhts", q, params["sub_keys"], precision=HI)
    full = s[:, :, 0, :, None] + s[:, :, 1, None, :]  # [n, h, n_sub, n_sub]
    scores, ids = jax.lax.top_k(full.reshape(full.shape[:2] + (-1,)), cfg.k)
    w = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("nhk,nhkd->nd", w, params["values"][ids], precision=HI)


@pytest.mark.parametrize("heads,k", [(1, 3), (3, 4)])
def test_pkm_matches_naive(heads, k, key):
    cfg = product_key.Config(d_in=12, d_out=10, n_sub=6, k=k, heads=heads, d_key=8)
    k1, k2 = jax.random.split(key)
    params = core.init_params(k1, product_key.param_specs(cfg))
    x = jax.random.normal(k2, (2, 5, 12), jnp.float32)
    y = product_key.apply(params, x, cfg)
    assert y.shape == (2, 5, 10)
    assert_rel_close(
        y.reshape(10, 10),
        _pkm_naive(params, x.reshape(10, 12), cfg),
        tolerances.forward(jnp.float32),
    )


def test_pkm_gradients_match_reference_implementation(key):
    cfg = product_key.Config(
        d_in=12, d_out=10, n_sub=6, k=3, heads=2, d_key=8, implementation="xla"
    )
    k1, k2 = jax.random.split(key)
    params = core.init_params(k1, product_key.param_specs(cfg))
    x = jax.random.normal(k2, (7, 12), jnp.float32)
    loss = lambda c: lambda p, xx: jnp.sum(jnp.sin(product_key.apply(p, xx, c)))
    g = jax.grad(loss(cfg), argnums=(0, 1))(params, x)
    g_ref = jax.grad(loss(cfg.replace(implementation="reference")), argnums=(0, 1))(params, x)
    assert_rel_close(g, g_ref, tolerances.grad(jnp.float32))


def test_ultramem_with_all_candidates_is_the_exact_tucker_top_k(key):
    """k == n_sub: every pair is a candidate, so the selection is exact; compare to brute force."""
    cfg = product_key.UltraMemConfig(
        d_in=12, d_out=9, n_sub=5, k=5, heads=2, d_key=8, rank=3, d_value=7
    )
    k1, k2 = jax.random.split(key)
    p = core.init_params(k1, product_key.ultramem_param_specs(cfg))
    x = jax.random.normal(k2, (6, 12), jnp.float32)
    y = product_key.ultramem_apply(p, x, cfg)
    q = (x @ p["query"]["kernel"]).reshape(6, 2, 2, 3, 4)
    s = jnp.einsum("nhtad,htasd->nhtas", q, p["sub_keys"], precision=HI)
    full = jnp.einsum("nhai,hab,nhbj->nhij", s[:, :, 0], p["core"], s[:, :, 1], precision=HI)
    scores, ids = jax.lax.top_k(full.reshape(6, 2, 25), 5)
    w = jax.nn.softmax(scores, axis=-1)
    mem = jnp.einsum("nhk,nhkd->nd", w, p["values"][ids], precision=HI)
    assert_rel_close(y, mem @ p["value_proj"]["kernel"], tolerances.forward(jnp.float32))


def test_peer_matches_naive(key):
    cfg = peer.Config(d_in=12, d_out=10, n_sub=6, k=3, heads=2, d_key=8)
    k1, k2 = jax.random.split(key)
    p = core.init_params(k1, peer.param_specs(cfg))
    x = jax.random.normal(k2, (9, 12), jnp.float32)
    q = (x @ p["query"]["kernel"]).reshape(9, 2, 2, 4)
    s = jnp.einsum("nhtd,htsd->nhts", q, p["sub_keys"], precision=HI)
    full = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).reshape(9, 2, 36)
    scores, ids = jax.lax.top_k(full, 3)
    g = jax.nn.softmax(scores, axis=-1)
    h = jax.nn.gelu(jnp.einsum("nd,nhkd->nhk", x, p["down"][ids], precision=HI), approximate=False)
    want = jnp.einsum("nhk,nhkd->nd", g * h, p["up"][ids], precision=HI)
    assert_rel_close(peer.apply(p, x, cfg), want, tolerances.forward(jnp.float32))


def test_k_larger_than_n_sub():
    with pytest.raises(ValueError, match="k=9 must be <= n_sub=8"):
        product_key.Config(d_in=8, d_out=8, n_sub=8, k=9)


def test_d_key_must_be_even():
    with pytest.raises(ValueError, match=r"d_key=7 must be divisible by 2 \(two halves\)=2"):
        peer.Config(d_in=8, d_out=8, n_sub=8, k=2, d_key=7)


def test_pkm_x_feature_dim(key):
    cfg = product_key.Config(d_in=8, d_out=8, n_sub=4, k=2, heads=1, d_key=4)
    params = core.init_params(key, product_key.param_specs(cfg))
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(d_in\) must be 8"):
        product_key.apply(params, jnp.ones((3, 5)), cfg)
