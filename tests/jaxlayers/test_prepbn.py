"""PRepBN: the gamma schedule, training output and running statistics against numpy, eval as
RepBN, and the eval-time fold into the following Dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, dense, prepbn
from tests import tolerances
from tests._asserts import assert_rel_close


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _params(rng, cfg):
    def rand(spec, base):
        return jnp.asarray(base + 0.3 * rng.standard_normal(spec.shape), jnp.float32)

    specs = prepbn.param_specs(cfg)
    return {
        "norm": {k: rand(s, 1.0 if k == "scale" else 0.0) for k, s in specs["norm"].items()},
        "bn": {k: rand(s, 1.0 if k == "scale" else 0.0) for k, s in specs["bn"].items()},
        "eta": jnp.float32(0.7),
    }


def _stats(rng, d):
    return {
        "mean": jnp.asarray(0.2 * rng.standard_normal(d), jnp.float32),
        "var": jnp.asarray(1 + rng.uniform(0, 1, d), jnp.float32),
        "step": jnp.int32(3),
    }


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _naive_train(p, x, gamma, eps):
    x2 = x.reshape(-1, x.shape[-1])
    mu, var = x2.mean(0), x2.var(0)
    bn = (x - mu) / np.sqrt(var + eps) * p["bn"]["scale"] + p["bn"]["bias"]
    lmu = x.mean(-1, keepdims=True)
    lvar = x.var(-1, keepdims=True)
    ln = (x - lmu) / np.sqrt(lvar + eps) * p["norm"]["scale"] + p["norm"].get("bias", 0.0)
    return gamma * ln + (1 - gamma) * (bn + p["eta"] * x), mu, var


def _naive_eval(p, s, x, eps):
    bn = (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["bn"]["scale"] + p["bn"]["bias"]
    return bn + p["eta"] * x


def test_gamma_schedule():
    cfg = prepbn.Config(dim=4, warmup_steps=10, decay_steps=40)
    got = [float(prepbn.gamma(s, cfg)) for s in (0, 9, 10, 20, 30, 50, 1000)]
    np.testing.assert_allclose(got, [1, 1, 1, 0.75, 0.5, 0, 0], atol=1e-7)


@pytest.mark.parametrize("step", [0, 5, 12], ids=lambda s: f"step={s}")
def test_train_matches_naive(key, step):
    rng = _rng(key)
    cfg = prepbn.Config(dim=12, decay_steps=12, momentum=0.25)
    params, stats = _params(rng, cfg), _stats(rng, 12)
    x = 1.0 + 2.0 * rng.standard_normal((3, 5, 12))
    y, new = jax.jit(lambda p, x, s: prepbn.apply(p, x, cfg, stats=s, train=True, step=step))(
        params, jnp.asarray(x, jnp.float32), stats
    )
    want, mu, var = _naive_train(_np(params), x, max(0.0, 1 - step / 12), cfg.eps)
    assert_rel_close(y, want, tolerances.forward(jnp.float32))
    s = _np(stats)
    assert_rel_close(new["mean"], 0.75 * s["mean"] + 0.25 * mu, 1e-6)
    assert_rel_close(new["var"], 0.75 * s["var"] + 0.25 * var * 15 / 14, 1e-6)
    assert int(new["step"]) == 4


def test_step_counter_drives_gamma(key):
    """Without ``step=``, gamma comes from stats["step"]: at the end of the decay it is RepBN."""
    rng = _rng(key)
    cfg = prepbn.Config(dim=8, norm="rms", decay_steps=4)
    params = _params(rng, cfg)
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    stats = prepbn.init_stats(cfg)
    for _ in range(5):
        y, stats = prepbn.apply(params, x, cfg, stats=stats, train=True)
    assert int(stats["step"]) == 5  # the last call ran at step 4: gamma = 0
    want, _, _ = _naive_train(_np(params), np.asarray(x, np.float64), 0.0, cfg.eps)
    assert_rel_close(y, want, tolerances.forward(jnp.float32))


def test_eval_is_repbn_with_running_stats(key):
    rng = _rng(key)
    cfg = prepbn.Config(dim=12)
    params, stats = _params(rng, cfg), _stats(rng, 12)
    x = rng.standard_normal((2, 6, 12))
    y = prepbn.apply(params, jnp.asarray(x, jnp.float32), cfg, stats=stats)
    assert_rel_close(y, _naive_eval(_np(params), _np(stats), x, cfg.eps), 1e-5)


@pytest.mark.parametrize("use_bias", [True, False], ids=lambda b: f"bias={b}")
def test_fold_into_dense_equals_prepbn_then_dense(key, use_bias):
    rng = _rng(key)
    cfg = prepbn.Config(dim=16)
    params, stats = _params(rng, cfg), _stats(rng, 16)
    dcfg = dense.Config(d_in=16, d_out=24, use_bias=use_bias)
    dparams = dense.init(key, dcfg)
    if use_bias:
        dparams["bias"] = jnp.asarray(rng.standard_normal(24), jnp.float32)
    x = jnp.asarray(1.0 + rng.standard_normal((2, 5, 16)), jnp.float32)
    want = dense.apply(dparams, prepbn.apply(params, x, cfg, stats=stats), dcfg)
    folded = prepbn.fold_into_dense(params, stats, cfg, dparams)
    got = dense.apply(folded, x, dcfg.replace(use_bias=True))
    assert_rel_close(got, want, tolerances.forward(jnp.float32))


def test_error_eval_without_stats():
    cfg = prepbn.Config(dim=4)
    with pytest.raises(ValueError, match=r"stats must be the running statistics .*; got None"):
        prepbn.apply(prepbn.init(jax.random.key(0), cfg), jnp.ones((2, 4)), cfg)


def test_error_norm_choice():
    with pytest.raises(ValueError, match=r"norm must be one of \('layer', 'rms'\); got 'batch'"):
        prepbn.Config(dim=4, norm="batch")


def test_error_schedule():
    with pytest.raises(ValueError, match=r"decay_steps must be positive .*decay_steps=0"):
        prepbn.Config(dim=4, decay_steps=0)


def test_error_fold_kernel_shape():
    cfg = prepbn.Config(dim=4)
    p = prepbn.init(jax.random.key(0), cfg)
    with pytest.raises(
        ValueError, match=r"dense_params\['kernel'\] must have shape \(dim=4, d_out\)"
    ):
        prepbn.fold_into_dense(p, prepbn.init_stats(cfg), cfg, {"kernel": jnp.ones((5, 3))})


def test_error_dim_mismatch():
    cfg = prepbn.Config(dim=4)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(dim\) must be 4; got 3"):
        prepbn.apply(prepbn.init(jax.random.key(0), cfg), jnp.ones((2, 3)), cfg, train=True)


def test_registered_stateful():
    fns = core.layer_fns("prepbn")
    assert fns.stateful and fns.kind == "norm"


def test_rms_branch_at_step_zero(key):
    """gamma(0) = 1: the layer is exactly the norm branch (here RMSNorm)."""
    rng = _rng(key)
    cfg = prepbn.Config(dim=8, norm="rms")
    params = _params(rng, cfg)
    x = rng.standard_normal((3, 8))
    y, _ = prepbn.apply(params, jnp.asarray(x, jnp.float32), cfg, train=True)
    want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.eps) * _np(params)["norm"]["scale"]
    assert_rel_close(y, want, tolerances.forward(jnp.float32))
