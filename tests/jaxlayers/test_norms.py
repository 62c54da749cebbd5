"""RMSNorm and LayerNorm against numpy; float32 statistics; jit, grad, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, norms
from tests import tolerances
from tests._asserts import assert_rel_close


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _naive_rms(x, scale, eps):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)
    return y if scale is None else y * np.asarray(scale, np.float64)


def _naive_ln(x, scale, bias, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def _params(rng, cfg):
    params = {}
    for name, spec in norms.param_specs(cfg).items():
        base = 1.0 if name == "scale" else 0.0
        params[name] = jnp.asarray(base + 0.5 * rng.standard_normal(spec.shape), jnp.float32)
    return params


CASES = [
    norms.RMSNormConfig(dim=24),
    norms.RMSNormConfig(dim=24, use_scale=False, eps=1e-3),
    norms.LayerNormConfig(dim=24),
    norms.LayerNormConfig(dim=24, use_bias=False),
    norms.LayerNormConfig(dim=24, use_scale=False, use_bias=False),
]
IDS = [f"{type(c).__name__}-scale={c.use_scale}-bias={getattr(c, 'use_bias', None)}" for c in CASES]


def _naive(params, x, cfg):
    if isinstance(cfg, norms.RMSNormConfig):
        return _naive_rms(x, params.get("scale"), cfg.eps)
    return _naive_ln(x, params.get("scale"), params.get("bias"), cfg.eps)


def test_init_and_axes(key):
    p = norms.init(key, norms.LayerNormConfig(dim=8))
    np.testing.assert_array_equal(p["scale"], 1.0)
    np.testing.assert_array_equal(p["bias"], 0.0)
    specs = norms.param_specs(norms.RMSNormConfig(dim=8))
    assert core.logical_axes(specs) == {"scale": ("embed",)}
    assert norms.init(key, norms.RMSNormConfig(dim=8, use_scale=False)) == {}


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_matches_naive(key, cfg):
    rng = _rng(key)
    params = _params(rng, cfg)
    x = jnp.asarray(2.0 + 3.0 * rng.standard_normal((2, 5, 24)), jnp.float32)
    y = jax.jit(norms.apply, static_argnums=2)(params, x, cfg)
    assert_rel_close(y, _naive(params, x, cfg), tolerances.forward(jnp.float32))


@pytest.mark.parametrize("cfg", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_grad_matches_autodiff_of_naive(key, cfg):
    rng = _rng(key)
    params = _params(rng, cfg)
    x = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)

    def naive_jnp(p, x):
        if isinstance(cfg, norms.RMSNormConfig):
            return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.eps) * p["scale"][None]
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + cfg.eps) * p["scale"][None] + p["bias"][None]

    def loss(f):
        return lambda p, x: jnp.sum(f(p, x) * r)

    got = jax.jit(jax.grad(loss(lambda p, x: norms.apply(p, x, cfg)), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(naive_jnp), argnums=(0, 1)))(params, x)
    assert_rel_close(got, want, tolerances.grad(jnp.float32))


def test_layer_norm_large_mean_is_accurate(key):
    """Two-pass variance: a mean of 1e4 with unit spread must not lose the signal."""
    rng = _rng(key)
    cfg = norms.LayerNormConfig(dim=64, use_scale=False, use_bias=False)
    x = jnp.asarray(1e4 + rng.standard_normal((4, 64)), jnp.float32)
    y = norms.layer_norm({}, x, cfg)
    assert_rel_close(y, _naive(params={}, x=x, cfg=cfg), 1e-3)


@pytest.mark.parametrize("cfg", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_bf16_input_float32_statistics(key, cfg):
    rng = _rng(key)
    params = _params(rng, cfg)
    x = jnp.asarray(rng.standard_normal((4, 6, 24)), jnp.bfloat16)
    y = norms.apply(params, x, cfg)
    assert y.dtype == jnp.bfloat16
    # reference on the same (bf16-rounded) input: only the output rounding differs
    assert_rel_close(
        y, _naive(params, x.astype(jnp.float32), cfg), tolerances.forward(jnp.bfloat16)
    )
    # compute dtype from the config: float32 input, bf16 output
    y2 = norms.apply(params, x.astype(jnp.float32), cfg.replace(dtype=jnp.bfloat16))
    assert y2.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y, np.float32))


def test_float16_large_values_no_overflow():
    """1000^2 overflows float16 (max 65504); the statistics are taken in float32."""
    x = jnp.asarray([[1e3, -1e3, 1e3, -1e3]], jnp.float16)
    y = norms.rms_norm({}, x, norms.RMSNormConfig(dim=4, use_scale=False))
    assert y.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(y, np.float32), [[1, -1, 1, -1]], rtol=1e-3)
    y = norms.layer_norm({}, x, norms.LayerNormConfig(dim=4, use_scale=False, use_bias=False))
    np.testing.assert_allclose(np.asarray(y, np.float32), [[1, -1, 1, -1]], rtol=1e-3)


def test_registered():
    assert core.layer_fns("rms_norm").apply is norms.rms_norm
    assert core.layer_fns("layer_norm").apply is norms.layer_norm
    assert core.layer_fns(norms.RMSNormConfig(dim=2)).kind == "norm"


# ----------------------------------------------------------------------------------------------
# BatchNorm: batch statistics in training, running statistics at eval, a pure state
# ----------------------------------------------------------------------------------------------


def _naive_bn_train(x, scale, bias, eps):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    mu, var = x.mean(0), x.var(0)
    return (x - mu) / np.sqrt(var + eps) * scale + bias, mu, var


def test_batch_norm_train_and_running_stats(key):
    rng = _rng(key)
    cfg = norms.BatchNormConfig(dim=12, momentum=0.2)
    params = {
        "scale": jnp.asarray(1 + 0.3 * rng.standard_normal(12), jnp.float32),
        "bias": jnp.asarray(0.3 * rng.standard_normal(12), jnp.float32),
    }
    x = 1.5 + 2.0 * rng.standard_normal((3, 7, 12))
    stats = {"mean": jnp.full((12,), 0.5, jnp.float32), "var": jnp.full((12,), 2.0, jnp.float32)}
    fn = jax.jit(lambda p, x, s: norms.batch_norm(p, x, cfg, stats=s, train=True))
    y, new = fn(params, jnp.asarray(x, jnp.float32), stats)
    want, mu, var = _naive_bn_train(
        x, np.asarray(params["scale"]), np.asarray(params["bias"]), cfg.eps
    )
    assert_rel_close(y, want.reshape(x.shape), tolerances.forward(jnp.float32))
    n = 21
    assert_rel_close(new["mean"], 0.8 * 0.5 + 0.2 * mu, 1e-6)
    assert_rel_close(new["var"], 0.8 * 2.0 + 0.2 * var * n / (n - 1), 1e-6)
    # eval: the running statistics, as an affine map
    y_eval = norms.batch_norm(params, jnp.asarray(x, jnp.float32), cfg, stats=new)
    s, b = np.asarray(params["scale"], np.float64), np.asarray(params["bias"], np.float64)
    m, v = np.asarray(new["mean"], np.float64), np.asarray(new["var"], np.float64)
    assert_rel_close(
        y_eval, (x - m) / np.sqrt(v + cfg.eps) * s + b, tolerances.forward(jnp.float32)
    )
    # the dispatching apply and the registry agree
    assert core.layer_fns("batch_norm").stateful
    y2, _ = norms.apply(params, jnp.asarray(x, jnp.float32), cfg, stats=stats, train=True)
    assert_rel_close(y2, y, tolerances.forward(jnp.float32))


def test_batch_norm_fresh_stats_in_training(key):
    cfg = norms.BatchNormConfig(dim=4, use_scale=False, use_bias=False)
    x = jnp.asarray(_rng(key).standard_normal((5, 4)), jnp.float32)
    _, new = norms.batch_norm({}, x, cfg, train=True)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * np.var(np.asarray(x), 0, ddof=1), rtol=1e-5)


def test_batch_norm_error_eval_without_stats():
    cfg = norms.BatchNormConfig(dim=4)
    with pytest.raises(
        ValueError, match=r"stats must be the running statistics .* when train=False; got None"
    ):
        norms.batch_norm(norms.init(jax.random.key(0), cfg), jnp.ones((2, 4)), cfg)


def test_batch_norm_error_momentum():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]; got momentum=2"):
        norms.BatchNormConfig(dim=4, momentum=2)
