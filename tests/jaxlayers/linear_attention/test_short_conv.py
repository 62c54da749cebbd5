"""ShortConvolution: naive formula, packed segments, caches and decode, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.linear_attention import short_conv as sc
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.jaxlayers.linear_attention import _naive

F32 = tolerances.forward(jnp.float32)


def _params(cfg: sc.Config, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = {"kernel": rng.normal(size=(cfg.kernel_size, cfg.d_model))}
    if cfg.use_bias:
        p["bias"] = rng.normal(size=(cfg.d_model,))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)


def _x(shape, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _apply(cfg, **kwargs):
    return jax.jit(lambda p, x, **kw: sc.apply(p, x, cfg, **kw, **kwargs))


CONFIGS = {
    "k4_silu_bias": sc.Config(d_model=6, kernel_size=4, activation="silu", use_bias=True),
    "k3_identity": sc.Config(d_model=6, kernel_size=3, activation=None),
    "k1": sc.Config(d_model=6, kernel_size=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_naive(name):
    cfg = CONFIGS[name]
    p, x = _params(cfg), _x((2, 9, 6))
    cache = _x((2, cfg.kernel_size - 1, 6), seed=2)
    y, state = _apply(cfg, return_state=True)(p, x, initial_state=cache)
    want, want_state = _naive.conv(
        x,
        _naive.f64(p["kernel"]),
        _naive.f64(p.get("bias")) if cfg.use_bias else None,
        cfg.activation,
        cache=cache,
    )
    assert_rel_close(y, want, F32)
    if cfg.kernel_size > 1:
        np.testing.assert_array_equal(np.asarray(state), np.asarray(want_state, np.float32))
    assert state.shape == (2, cfg.kernel_size - 1, 6)


def test_packed_segments_equal_separate():
    """Segments of lengths 5, 2 (shorter than the cache), 3 and an id that reappears."""
    cfg = CONFIGS["k4_silu_bias"]
    p, x = _params(cfg), _x((1, 14, 6))
    ids = [3] * 5 + [4] * 2 + [3] * 3 + [9] * 4
    seg = jnp.asarray([ids], jnp.int32)
    cache = _x((1, 3, 6), seed=5)
    y, state = _apply(cfg, return_state=True)(p, x, segment_ids=seg, initial_state=cache)
    bounds = [(0, 5), (5, 7), (7, 10), (10, 14)]
    for i, (s, e) in enumerate(bounds):
        # The incoming cache reaches the first sequence only.
        init = cache if i == 0 else None
        want, want_state = sc.apply(p, x[:, s:e], cfg, initial_state=init, return_state=True)
        np.testing.assert_allclose(np.asarray(y[:, s:e]), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state), np.asarray(want_state))
    # A last sequence shorter than the cache leaves zeros for the tokens before it.
    _, short_state = sc.apply(
        p, x[:, :7], cfg, segment_ids=seg[:, :7], initial_state=cache, return_state=True
    )
    np.testing.assert_array_equal(np.asarray(short_state[:, 0]), 0.0)
    np.testing.assert_array_equal(np.asarray(short_state[:, 1:]), np.asarray(x[:, 5:7]))


def test_packed_matches_naive():
    cfg = CONFIGS["k4_silu_bias"]
    p, x = _params(cfg), _x((2, 10, 6))
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [5] * 10], jnp.int32)
    y = sc.apply(p, x, cfg, segment_ids=seg)
    want, _ = _naive.conv(x, _naive.f64(p["kernel"]), _naive.f64(p["bias"]), "silu", seg)
    assert_rel_close(y, want, F32)


@pytest.mark.parametrize("t0", [1, 5], ids=lambda t: f"prefill={t}")
def test_prefill_then_step_and_continue_match_apply(t0):
    cfg = CONFIGS["k4_silu_bias"]
    p, x = _params(cfg), _x((2, 9, 6))
    full = sc.apply(p, x, cfg)
    y0, state = sc.apply(p, x[:, :t0], cfg, return_state=True)
    # Chunked: a second apply continues from the cache.
    y1 = sc.apply(p, x[:, t0:], cfg, initial_state=state)
    assert_rel_close(jnp.concatenate([y0, y1], axis=1), full, F32)
    # Step by step from the prefill cache.
    ys = []
    for i in range(t0, x.shape[1]):
        y_t, state = sc.step(p, state, x[:, i], cfg)
        ys.append(y_t)
    assert_rel_close(jnp.stack(ys, axis=1), full[:, t0:], F32)


def test_step_from_init_state_matches_apply():
    cfg = CONFIGS["k3_identity"]
    p, x = _params(cfg), _x((2, 6, 6))
    state = sc.init_state(cfg, 2, jnp.float32)

    def body(s, x_t):
        y_t, s = sc.step(p, s, x_t, cfg)
        return s, y_t

    _, ys = jax.lax.scan(body, state, jnp.moveaxis(x, 1, 0))
    assert_rel_close(jnp.moveaxis(ys, 0, 1), sc.apply(p, x, cfg), F32)


def test_cache_keeps_initial_state_dtype():
    cfg = CONFIGS["k4_silu_bias"].replace(dtype=jnp.bfloat16)
    p, x = _params(cfg), _x((2, 5, 6))
    y, state = sc.apply(p, x, cfg, initial_state=sc.init_state(cfg, 2), return_state=True)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    y_t, state = sc.step(p, state, x[:, 0], cfg)
    assert y_t.dtype == jnp.bfloat16 and state.dtype == jnp.float32


def test_init_range():
    cfg = sc.Config(d_model=64, kernel_size=4, use_bias=True)
    p = sc.init(jax.random.key(0), cfg)
    assert p["kernel"].shape == (4, 64) and p["bias"].shape == (64,)
    assert float(jnp.max(jnp.abs(p["kernel"]))) <= 0.5
    np.testing.assert_array_equal(np.asarray(p["bias"]), 0.0)


# ----------------------------------------------------------------------------------------------
# Bad input: one test per message.
# ----------------------------------------------------------------------------------------------

_CFG = CONFIGS["k4_silu_bias"]
_P = _params(_CFG)
_X = _x((2, 5, 6))

ERRORS = {
    "config_d_model": (lambda: sc.Config(d_model=0), ValueError, r"d_model must be positive"),
    "config_kernel_size": (
        lambda: sc.Config(d_model=4, kernel_size=0),
        ValueError,
        r"kernel_size must be >= 1; got kernel_size=0",
    ),
    "config_activation": (
        lambda: sc.Config(d_model=4, activation="gelu"),
        ValueError,
        r"activation must be one of \(None, 'silu'\); got 'gelu'",
    ),
    "x_rank": (
        lambda: sc.apply(_P, _X[0], _CFG),
        ValueError,
        r"x must have rank 3 \(\[batch, time, d_model\]\); got shape \(5, 6\)",
    ),
    "x_width": (
        lambda: sc.apply(_P, _X[..., :4], _CFG),
        ValueError,
        r"x.shape\[-1\] \(d_model\) must be 6; got 4",
    ),
    "x_integer": (
        lambda: sc.apply(_P, jnp.ones((2, 5, 6), jnp.int32), _CFG),
        TypeError,
        r"x must have a floating dtype",
    ),
    "segment_ids_shape": (
        lambda: sc.apply(_P, _X, _CFG, segment_ids=jnp.zeros((2, 4), jnp.int32)),
        ValueError,
        r"segment_ids must have shape \[batch, time\] = \(2, 5\); got \(2, 4\)",
    ),
    "segment_ids_dtype": (
        lambda: sc.apply(_P, _X, _CFG, segment_ids=jnp.zeros((2, 5), jnp.float32)),
        TypeError,
        r"segment_ids must have an integer dtype",
    ),
    "initial_state_shape": (
        lambda: sc.apply(_P, _X, _CFG, initial_state=jnp.zeros((2, 4, 6))),
        ValueError,
        r"initial_state must have shape \[batch, kernel_size - 1, channels\] = \(2, 3, 6\)",
    ),
    "step_state_shape": (
        lambda: sc.step(_P, jnp.zeros((2, 2, 6)), _X[:, 0], _CFG),
        ValueError,
        r"state must have shape \[batch, kernel_size - 1, channels\] = \(2, 3, 6\)",
    ),
    "step_x_rank": (
        lambda: sc.step(_P, sc.init_state(_CFG, 2), _X, _CFG),
        ValueError,
        r"x_t must have rank 2 \(\[batch, d_model\]\)",
    ),
    "kernel_channels": (
        lambda: sc.causal_conv(_X, jnp.ones((4, 5))),
        ValueError,
        r"kernel.shape\[1\] \(channels of x\) must be 6; got 5",
    ),
    "bias_channels": (
        lambda: sc.causal_conv(_X, jnp.ones((4, 6)), jnp.ones((5,))),
        ValueError,
        r"bias.shape\[0\] \(channels of x\) must be 6; got 5",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input(case):
    fn, exc, match = ERRORS[case]
    with pytest.raises(exc, match=match):
        fn()
