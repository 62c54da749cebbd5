"""EvoNorm-B0 and -S0 against numpy formulas; B0's running variance; S0's causal variant."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, evonorm
from tests import tolerances
from tests._asserts import assert_rel_close


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _params(rng, d):
    return {
        "scale": jnp.asarray(1 + 0.3 * rng.standard_normal(d), jnp.float32),
        "bias": jnp.asarray(0.3 * rng.standard_normal(d), jnp.float32),
        "v": jnp.asarray(1 + 0.3 * rng.standard_normal(d), jnp.float32),
    }


def _np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _naive_b0(p, x, batch_var, eps):
    spatial = tuple(range(1, x.ndim - 1))
    inst = x.var(axis=spatial, keepdims=True)
    denom = np.maximum(np.sqrt(batch_var + eps), p["v"] * x + np.sqrt(inst + eps))
    return x / denom * p["scale"] + p["bias"]


def _naive_s0(p, x, groups, eps, causal):
    c = x.shape[-1]
    g = x.reshape(*x.shape[:-1], groups, c // groups)
    axes = (-1,) if causal else (*range(1, x.ndim - 1), -1)
    std = np.sqrt(g.var(axis=axes, keepdims=True) + eps)
    return (x * _sigmoid(p["v"] * x) / np.broadcast_to(std, g.shape).reshape(x.shape)) * p[
        "scale"
    ] + p["bias"]


@pytest.mark.parametrize("shape", [(3, 7, 12), (2, 4, 5, 12)], ids=["seq", "image"])
def test_b0_train_eval_and_running_var(key, shape):
    rng = _rng(key)
    cfg = evonorm.EvoNormB0Config(dim=12, momentum=0.3)
    params = _params(rng, 12)
    x = 0.5 + 1.5 * rng.standard_normal(shape)
    stats = {"var": jnp.full((12,), 2.0, jnp.float32)}
    y, new = jax.jit(lambda p, x, s: evonorm.b0_apply(p, x, cfg, stats=s, train=True))(
        params, jnp.asarray(x, jnp.float32), stats
    )
    flat = x.reshape(-1, 12)
    assert_rel_close(y, _naive_b0(_np(params), x, flat.var(0), cfg.eps), 1e-5)
    n = flat.shape[0]
    assert_rel_close(new["var"], 0.7 * 2.0 + 0.3 * flat.var(0) * n / (n - 1), 1e-6)
    y_eval = evonorm.b0_apply(params, jnp.asarray(x, jnp.float32), cfg, stats=new)
    want = _naive_b0(_np(params), x, np.asarray(new["var"], np.float64), cfg.eps)
    assert_rel_close(y_eval, want, 1e-5)


@pytest.mark.parametrize(
    "shape,groups,causal",
    [((3, 7, 12), 4, False), ((2, 4, 5, 12), 3, False), ((3, 7, 12), 4, True)],
    ids=["seq", "image", "seq-causal"],
)
def test_s0_matches_naive(key, shape, groups, causal):
    rng = _rng(key)
    cfg = evonorm.EvoNormS0Config(dim=12, groups=groups, causal=causal)
    params = _params(rng, 12)
    x = 0.5 + 1.5 * rng.standard_normal(shape)
    y = jax.jit(lambda p, x: evonorm.s0_apply(p, x, cfg))(params, jnp.asarray(x, jnp.float32))
    assert_rel_close(y, _naive_s0(_np(params), x, groups, cfg.eps, causal), 1e-5)


def test_s0_causal_ignores_the_future_and_default_does_not(key):
    rng = _rng(key)
    params = _params(rng, 8)
    x = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    x2 = x.at[:, 4:].set(5.0)
    for causal, same in [(True, True), (False, False)]:
        cfg = evonorm.EvoNormS0Config(dim=8, groups=2, causal=causal)
        a, b = evonorm.s0_apply(params, x, cfg), evonorm.s0_apply(params, x2, cfg)
        assert np.allclose(a[:, :4], b[:, :4]) == same


def test_bf16_keeps_dtype(key):
    rng = _rng(key)
    params = _params(rng, 8)
    x = rng.standard_normal((2, 5, 8))
    cfg = evonorm.EvoNormS0Config(dim=8, groups=2)
    y = evonorm.s0_apply(params, jnp.asarray(x, jnp.bfloat16), cfg)
    assert y.dtype == jnp.bfloat16
    x_r = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    assert_rel_close(
        y, _naive_s0(_np(params), x_r, 2, cfg.eps, False), tolerances.forward(jnp.bfloat16)
    )


def test_error_groups_divide_dim():
    with pytest.raises(ValueError, match=r"dim=12 must be divisible by groups=5"):
        evonorm.EvoNormS0Config(dim=12, groups=5)


def test_error_rank():
    cfg = evonorm.EvoNormS0Config(dim=8, groups=2)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "x must have rank >= 3 ([batch, *spatial or time, channels=8]); got shape (2, 8)"
        ),
    ):
        evonorm.s0_apply(evonorm.init(jax.random.key(0), cfg), jnp.ones((2, 8)), cfg)


def test_error_b0_eval_without_stats():
    cfg = evonorm.EvoNormB0Config(dim=4)
    with pytest.raises(
        ValueError, match=r"stats must be the running variance .* when train=False; got None"
    ):
        evonorm.b0_apply(evonorm.init(jax.random.key(0), cfg), jnp.ones((2, 3, 4)), cfg)


def test_error_dim():
    with pytest.raises(ValueError, match=r"dim must be positive; got dim=0"):
        evonorm.EvoNormB0Config(dim=0)


def test_registered():
    assert core.layer_fns("evonorm_b0").stateful
    assert not core.layer_fns("evonorm_s0").stateful
