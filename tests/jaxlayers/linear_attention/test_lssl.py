"""LSSL: HiPPO-LegS, bilinear discretisation in float64, recurrence == convolution, decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import lssl
from tests import tolerances
from tests._asserts import assert_rel_close

F32 = tolerances.forward(jnp.float32)
# FFT convolution vs a sequential recurrence: different summation orders over up to T terms.
CONV = 1e-5


def _params(cfg, seed=0):
    params = core.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed)
    ssm = dict(params["ssm"])
    ssm["d"] = jnp.asarray(rng.normal(size=(cfg.d_model,)), jnp.float32)
    params["ssm"] = ssm
    return params


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _np_hippo(n):
    a = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i > j:
                a[i, j] = -np.sqrt(2 * i + 1) * np.sqrt(2 * j + 1)
            elif i == j:
                a[i, j] = -(i + 1)
    return a, np.sqrt(2 * np.arange(n) + 1.0)


def _np_lssl(params, x, cfg, x0=None):
    """Float64 bilinear discretisation and recurrence, channel by channel."""
    f64 = lambda a: np.asarray(a, np.float64)
    x = f64(x)
    b, t, d = x.shape
    n = cfg.state_size
    a, bb = _np_hippo(n)
    dt = np.exp(f64(params["ssm"]["log_dt"]))
    c, dd = f64(params["ssm"]["c"]), f64(params["ssm"]["d"])
    y = np.zeros((b, t, d))
    state = np.zeros((b, d, n)) if x0 is None else f64(x0).copy()
    for ch in range(d):
        m = np.eye(n) - dt[ch] / 2 * a
        a_bar = np.linalg.solve(m, np.eye(n) + dt[ch] / 2 * a)
        b_bar = np.linalg.solve(m, dt[ch] * bb)
        for ti in range(t):
            state[:, ch] = state[:, ch] @ a_bar.T + b_bar[None] * x[:, ti, ch : ch + 1]
            y[:, ti, ch] = state[:, ch] @ c[ch] + dd[ch] * x[:, ti, ch]
    return y @ f64(params["o"]["kernel"]) + f64(params["o"]["bias"]), state


def test_hippo_legs_matrices():
    a, b = lssl.hippo_legs(3)
    want_a = -np.array(
        [[1.0, 0.0, 0.0], [np.sqrt(3.0), 2.0, 0.0], [np.sqrt(5.0), np.sqrt(15.0), 3.0]]
    )
    np.testing.assert_allclose(a, want_a, rtol=1e-12)
    np.testing.assert_allclose(b, [1.0, np.sqrt(3.0), np.sqrt(5.0)], rtol=1e-12)
    a8, b8 = lssl.hippo_legs(8)
    np.testing.assert_allclose(a8, _np_hippo(8)[0], rtol=1e-12)
    np.testing.assert_allclose(b8, _np_hippo(8)[1], rtol=1e-12)


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_matches_float64_recurrence(mode, monkeypatch):
    monkeypatch.setattr(lssl, "_BLOCK", 8)  # three lag blocks, the last one partial
    cfg = lssl.Config(d_model=4, state_size=8, dt_min=0.01, dt_max=0.5, mode=mode)
    params = _params(cfg)
    x = _x((2, 20, 4))
    rng = np.random.default_rng(5)
    x0 = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    want, want_state = _np_lssl(params, x, cfg, x0)

    @jax.jit
    def run(p, x, x0):
        return lssl.apply(p, x, cfg, initial_state={"x": x0}, return_state=True)

    got, state = run(params, x, x0)
    assert_rel_close(got, want, CONV)
    assert_rel_close(state["x"], want_state, CONV, name="final state")


def test_conv_kernel_is_c_abar_powers_bbar(monkeypatch):
    monkeypatch.setattr(lssl, "_BLOCK", 4)
    cfg = lssl.Config(d_model=3, state_size=6, dt_min=0.05, dt_max=0.5)
    params = _params(cfg)
    kernel = lssl.conv_kernel(params["ssm"], cfg, 13)
    a_bar, b_bar = (np.asarray(m, np.float64) for m in lssl.discretize(params["ssm"], cfg))
    c = np.asarray(params["ssm"]["c"], np.float64)
    want = np.stack(
        [
            [c[ch] @ np.linalg.matrix_power(a_bar[ch], l) @ b_bar[ch] for l in range(13)]
            for ch in range(3)
        ]
    )
    assert_rel_close(kernel, want, F32)


def test_recurrence_equals_convolution_long(monkeypatch):
    monkeypatch.setattr(lssl, "_BLOCK", 64)
    cfg = lssl.Config(d_model=4, state_size=32, dt_min=0.01, dt_max=0.1)
    params = _params(cfg)
    x = _x((2, 256, 4))

    @jax.jit
    def run(p, x):
        conv = lssl.apply(p, x, cfg, return_state=True)
        rec = lssl.apply(p, x, cfg.replace(mode="recurrent"), return_state=True)
        return conv, rec

    (y_conv, s_conv), (y_rec, s_rec) = run(params, x)
    assert_rel_close(y_conv, y_rec, CONV)
    assert_rel_close(s_conv["x"], s_rec["x"], CONV, name="final state")


def test_split_sequences_and_steps_equal_one_apply():
    cfg = lssl.Config(d_model=4, state_size=8)
    params = _params(cfg)
    x = _x((2, 14, 4))

    @jax.jit
    def run(p, x):
        full = lssl.apply(p, x, cfg)
        y1, s = lssl.apply(p, x[:, :5], cfg, return_state=True)
        ys = []
        for i in range(5, 8):
            y, s = lssl.step(p, s, x[:, i], cfg)
            ys.append(y[:, None])
        y2 = lssl.apply(p, x[:, 8:], cfg.replace(mode="recurrent"), initial_state=s)
        return full, jnp.concatenate([y1] + ys + [y2], axis=1)

    full, pieces = run(params, x)
    assert_rel_close(pieces, full, CONV)


def test_segment_ids_reset_the_recurrence():
    cfg = lssl.Config(d_model=4, state_size=8, mode="recurrent")
    params = _params(cfg)
    x = _x((2, 12, 4))
    seg = jnp.asarray([[0] * 5 + [1] * 7, [3] * 12], jnp.int32)

    @jax.jit
    def run(p, x):
        packed = lssl.apply(p, x, cfg, segment_ids=seg)
        row0 = jnp.concatenate(
            [lssl.apply(p, x[:1, :5], cfg), lssl.apply(p, x[:1, 5:], cfg)], axis=1
        )
        row1 = lssl.apply(p, x[1:], cfg)
        return packed, jnp.concatenate([row0, row1], axis=0)

    packed, separate = run(params, x)
    assert_rel_close(packed, separate, F32)


# ------------------------------------------------------------------------------------------
# Errors: one test per message
# ------------------------------------------------------------------------------------------

_CFG = lssl.Config(d_model=4, state_size=4)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p: lssl.Config(d_model=0), ValueError, "d_model must be positive"),
        (lambda p: lssl.Config(d_model=4, state_size=0), ValueError, "state_size must be"),
        (lambda p: lssl.Config(d_model=4, dt_min=0.2, dt_max=0.1), ValueError, "dt_min and dt_max"),
        (lambda p: lssl.Config(d_model=4, mode="fft"), ValueError, "mode must be one of"),
        (lambda p: lssl.apply(p, jnp.ones((2, 4)), _CFG), ValueError, "x must have rank 3"),
        (lambda p: lssl.apply(p, jnp.ones((2, 3, 5)), _CFG), ValueError, r"x.shape\[-1\]"),
        (
            lambda p: lssl.apply(p, jnp.ones((2, 3, 4)), _CFG, segment_ids=jnp.zeros((2, 3), int)),
            NotImplementedError,
            "mode='conv' does not support segment_ids",
        ),
        (
            lambda p: lssl.apply(
                p,
                jnp.ones((2, 3, 4)),
                _CFG.replace(mode="recurrent"),
                segment_ids=jnp.zeros((2, 3)),
            ),
            TypeError,
            "segment_ids must have an integer dtype",
        ),
        (
            lambda p: lssl.apply(
                p,
                jnp.ones((2, 3, 4)),
                _CFG.replace(mode="recurrent"),
                segment_ids=jnp.zeros((2, 4), jnp.int32),
            ),
            ValueError,
            "segment_ids must have shape",
        ),
        (
            lambda p: lssl.apply(p, jnp.ones((2, 3, 4)), _CFG, initial_state={"h": 0}),
            ValueError,
            "state must be a dict with keys",
        ),
        (
            lambda p: lssl.apply(
                p, jnp.ones((2, 3, 4)), _CFG, initial_state={"x": jnp.zeros((2, 4, 3))}
            ),
            ValueError,
            r"state\['x'\] must have shape",
        ),
        (
            lambda p: lssl.step(p, lssl.init_state(_CFG, 2), jnp.ones((2, 1, 4)), _CFG),
            ValueError,
            "x_t must have rank 2",
        ),
    ],
    ids=[
        "d_model",
        "state_size",
        "dt_range",
        "mode",
        "x_rank",
        "x_dim",
        "segment_conv",
        "segment_dtype",
        "segment_shape",
        "state_keys",
        "state_shape",
        "x_t_rank",
    ],
)
def test_errors(call, exc, match):
    params = core.init(jax.random.key(0), _CFG)
    with pytest.raises(exc, match=match):
        call(params)
