"""TokenFormer Pattention: the modified-softmax formula and function-preserving growth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.lookup import pattention as pa
from tests import tolerances
from tests._asserts import assert_rel_close


def _naive(params, x, n_scale):
    a = x @ params["key_tokens"].T
    a = a * n_scale / jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))
    return jax.nn.gelu(a, approximate=False) @ params["value_tokens"]


def test_matches_paper_formula(key):
    cfg = pa.Config(d_in=12, d_out=7, num_tokens=20)
    k1, k2 = jax.random.split(key)
    params = core.init_params(k1, pa.param_specs(cfg))
    x = jax.random.normal(k2, (3, 4, 12), jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = _naive(params, x, np.sqrt(20.0))
    assert_rel_close(pa.apply(params, x, cfg), want, tolerances.forward(jnp.float32))


@pytest.mark.parametrize("new_tokens", [1, 16])
def test_growth_keeps_outputs_and_new_tokens_learn(new_tokens, key):
    cfg = pa.Config(d_in=12, d_out=7, num_tokens=20)
    k1, k2, k3 = jax.random.split(key, 3)
    params = core.init_params(k1, pa.param_specs(cfg))
    x = jax.random.normal(k2, (5, 12), jnp.float32)
    grown, cfg2 = pa.grow(k3, params, cfg, new_tokens)
    assert cfg2.num_tokens == 20 + new_tokens and cfg2.tau == cfg.tau
    assert grown["key_tokens"].shape == (20 + new_tokens, 12)
    np.testing.assert_allclose(
        np.asarray(pa.apply(grown, x, cfg2)),
        np.asarray(pa.apply(params, x, cfg)),
        rtol=1e-6,
        atol=1e-6,
    )
    g = jax.grad(lambda p: jnp.sum(jnp.sin(pa.apply(p, x, cfg2))))(grown)
    assert float(jnp.abs(g["key_tokens"][20:]).max()) > 0, "new keys get no gradient"
    # Growing twice still preserves the function.
    grown2, cfg3 = pa.grow(k3, grown, cfg2, 3)
    np.testing.assert_allclose(
        np.asarray(pa.apply(grown2, x, cfg3)),
        np.asarray(pa.apply(params, x, cfg)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_grow_count_positive(key):
    cfg = pa.Config(d_in=4, d_out=4, num_tokens=4)
    with pytest.raises(ValueError, match="new_tokens must be positive"):
        pa.grow(key, core.init_params(key, pa.param_specs(cfg)), cfg, 0)


def test_num_tokens_positive():
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        pa.Config(d_in=4, d_out=4, num_tokens=0)
