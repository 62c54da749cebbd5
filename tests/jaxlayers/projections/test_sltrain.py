"""SLTrain: x ((alpha/r) A B + S) + b against numpy with S scattered on the fixed support; the
support is deterministic, unique, of size round(delta * i * o); one test per error message."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.projections import sltrain
from tests import tolerances
from tests._asserts import assert_rel_close


def _random_params(rng, cfg):
    p = {
        "lora_a": rng.standard_normal((cfg.d_in, cfg.rank)),
        "lora_b": rng.standard_normal((cfg.rank, cfg.d_out)),
        "sparse_values": rng.standard_normal(cfg.nnz),
        "bias": rng.standard_normal(cfg.d_out),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _naive(params, x, cfg):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    s = np.zeros((cfg.d_in, cfg.d_out))
    rows, cols = np.divmod(sltrain.support_indices(cfg), cfg.d_out)
    s[rows, cols] = p["sparse_values"]
    w = cfg.alpha / cfg.rank * p["lora_a"] @ p["lora_b"] + s
    return np.asarray(x, np.float64) @ w + p["bias"]


@pytest.mark.parametrize("density", [0.05, 0.5, 1.0], ids=lambda d: f"density={d}")
def test_matches_sparse_plus_low_rank(density):
    cfg = sltrain.Config(d_in=12, d_out=10, rank=3, density=density, alpha=2.0, support_seed=7)
    rng = np.random.default_rng(0)
    params = _random_params(rng, cfg)
    x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    assert_rel_close(sltrain.apply(params, x, cfg), _naive(params, x, cfg), 2e-5)
    w = sltrain.dense_weight(params, cfg)
    y_dense = x @ w + params["bias"][None, None]
    assert_rel_close(sltrain.apply(params, x, cfg), y_dense, tolerances.forward(jnp.float32))


def test_support_is_fixed_unique_and_seeded():
    cfg = sltrain.Config(d_in=32, d_out=24, rank=2, density=0.1, support_seed=3)
    idx = sltrain.support_indices(cfg)
    assert idx.dtype == np.int32 and idx.shape == (round(0.1 * 32 * 24),) == (cfg.nnz,)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 32 * 24
    np.testing.assert_array_equal(idx, sltrain.support_indices(cfg.replace(rank=5)))
    assert not np.array_equal(idx, sltrain.support_indices(cfg.replace(support_seed=4)))


def test_init_starts_at_sparse_part(key):
    cfg = sltrain.Config(d_in=16, d_out=8, rank=4, density=0.25)
    params = sltrain.init(key, cfg)
    np.testing.assert_array_equal(params["lora_b"], 0.0)
    assert float(jnp.max(jnp.abs(params["sparse_values"]))) <= 1 / 4
    w = np.asarray(sltrain.dense_weight(params, cfg))
    assert np.count_nonzero(w) == cfg.nnz
    # Only float leaves: jax.grad works on the whole tree.
    x = jnp.ones((3, 16), jnp.float32)
    grads = jax.grad(lambda p: jnp.sum(sltrain.apply(p, x, cfg) ** 2))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(jnp.abs(grads["lora_b"]).sum()) > 0


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


@pytest.mark.parametrize("density", [0.0, 1.5])
def test_density_range(density):
    with _raises(ValueError, f"density must be in (0, 1]; got {density}"):
        sltrain.Config(d_in=4, d_out=4, rank=1, density=density)


def test_density_leaves_entries():
    with _raises(ValueError, "density=0.01 leaves no sparse entry in a 4x4 kernel"):
        sltrain.Config(d_in=4, d_out=4, rank=1, density=0.01)


def test_rank_positive():
    with _raises(ValueError, "rank must be positive; got 0"):
        sltrain.Config(d_in=4, d_out=4, rank=0)


def test_sparse_values_shape_matches_config():
    cfg = sltrain.Config(d_in=8, d_out=8, rank=2, density=0.25)
    params = jax.eval_shape(lambda: sltrain.init(jax.random.key(0), cfg))
    wrong = cfg.replace(density=0.5)
    with _raises(ValueError, "params['sparse_values'] must have shape (32,)"):
        jax.eval_shape(lambda p, x: sltrain.apply(p, x, wrong), params, jnp.zeros((2, 8)))


def test_wrong_input_width():
    cfg = sltrain.Config(d_in=8, d_out=8, rank=2, density=0.25)
    params = jax.eval_shape(lambda: sltrain.init(jax.random.key(0), cfg))
    with _raises(ValueError, "x.shape[-1] (d_in) must be 8; got 3 (shape (2, 3))"):
        jax.eval_shape(lambda p, x: sltrain.apply(p, x, cfg), params, jnp.zeros((2, 3)))
