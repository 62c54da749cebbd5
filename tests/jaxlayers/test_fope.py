"""FoPE: reduces to RoPE when its extra frequencies are off; the Fourier-series formula against
numpy; clipped frequencies pass through; position 0 is the identity."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, fope, position
from tests import tolerances
from tests._asserts import assert_rel_close

_apply = jax.jit(fope.apply, static_argnums=2)


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _naive(x, pos, cos_coef, sin_coef, theta, r, kept):
    """numpy float64 of the module docstring's equations."""
    x = np.asarray(x, np.float64)
    half = r // 2
    w = theta ** (-np.arange(half) * 2.0 / r)
    ang = np.asarray(pos, np.float64)[:, :, None] * w  # [b, t, half]
    out = x.copy()
    for j in range(half):
        if kept[j]:
            a, b = cos_coef[:, kept, j], sin_coef[:, kept, j]  # [h, n_kept]
            c = np.einsum("bti,hi->bth", np.cos(ang[..., kept]), a) / a.sum(1)
            s = np.einsum("bti,hi->bth", np.sin(ang[..., kept]), b) / b.sum(1)
        else:
            c, s = np.ones(x.shape[:3]), np.zeros(x.shape[:3])
        out[..., j] = x[..., j] * c - x[..., j + half] * s
        out[..., j + half] = x[..., j + half] * c + x[..., j] * s
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.5], ids=lambda f: f"fraction={f}")
def test_reduces_to_rope_without_extra_frequencies(key, fraction):
    rng = _rng(key)
    cfg = fope.Config(num_heads=3, head_dim=16, fraction=fraction, sigma=0.0)
    params = fope.init(key, cfg)
    x = jnp.asarray(rng.standard_normal((2, 6, 3, 16)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 500, (2, 6)), jnp.int32)
    got = jax.jit(lambda p, x, pos: fope.apply(p, x, cfg, positions=pos))(params, x, pos)
    want = position.apply_rope(x, pos, fraction=fraction)
    assert_rel_close(got, want, 2e-6)


def test_clipped_frequencies_pass_through(key):
    rng = _rng(key)
    cfg = fope.Config(num_heads=2, head_dim=8, sigma=0.0, train_length=64)
    kept = fope.kept_frequencies(cfg)
    np.testing.assert_array_equal(kept, [True, True, False, False])  # w = 1, .1, .01, .001
    x = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 300, (1, 5)), jnp.int32)
    y = _apply(fope.init(key, cfg), x, cfg, positions=pos)
    rope = position.apply_rope(x, pos)
    for j in (0, 1):
        np.testing.assert_allclose(y[..., [j, j + 4]], rope[..., [j, j + 4]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[..., [2, 3, 6, 7]], x[..., [2, 3, 6, 7]])


@pytest.mark.parametrize(
    "separate_heads,train_length",
    [(True, None), (False, None), (True, 100)],
    ids=["per-head", "shared", "clipped"],
)
def test_matches_fourier_series_formula(key, separate_heads, train_length):
    rng = _rng(key)
    cfg = fope.Config(
        num_heads=2,
        head_dim=12,
        sigma=0.3,
        separate_heads=separate_heads,
        train_length=train_length,
    )
    params = fope.init(key, cfg)
    assert params["cos_coef"].shape == ((2 if separate_heads else 1), 6, 6)
    x = rng.standard_normal((2, 5, 2, 12))
    pos = rng.integers(0, 200, (2, 5))
    y = _apply(params, jnp.asarray(x, jnp.float32), cfg, positions=jnp.asarray(pos, jnp.int32))
    cc = np.broadcast_to(np.asarray(params["cos_coef"], np.float64), (2, 6, 6))
    sc = np.broadcast_to(np.asarray(params["sin_coef"], np.float64), (2, 6, 6))
    want = _naive(x, pos, cc, sc, cfg.theta, 12, fope.kept_frequencies(cfg))
    assert_rel_close(y, want, tolerances.forward(jnp.float32))
    assert (
        np.abs(
            np.asarray(y)
            - position.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32))
        ).max()
        > 1e-3
    )


def test_position_zero_is_identity_and_default_positions(key):
    rng = _rng(key)
    cfg = fope.Config(num_heads=2, head_dim=8)
    params = fope.init(key, cfg)
    x = jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)
    y0 = fope.apply(params, x, cfg, positions=jnp.zeros((2, 4), jnp.int32))
    np.testing.assert_allclose(y0, x, rtol=1e-5, atol=1e-6)
    arange = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4))
    np.testing.assert_array_equal(
        fope.apply(params, x, cfg), fope.apply(params, x, cfg, positions=arange)
    )


def test_error_rank():
    cfg = fope.Config(num_heads=2, head_dim=8)
    with pytest.raises(
        ValueError,
        match=re.escape("x must have rank 4 ([batch, time, heads, head_dim]); got shape (2, 3, 8)"),
    ):
        fope.apply(fope.init(jax.random.key(0), cfg), jnp.ones((2, 3, 8)), cfg)


def test_error_heads():
    cfg = fope.Config(num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=re.escape("x.shape[2] (num_heads) must be 2; got 3")):
        fope.apply(fope.init(jax.random.key(0), cfg), jnp.ones((1, 3, 3, 8)), cfg)


def test_error_positions_shape():
    cfg = fope.Config(num_heads=2, head_dim=8)
    with pytest.raises(
        ValueError,
        match=re.escape("positions must have shape (batch, time) = (1, 3); got shape (1, 4)"),
    ):
        fope.apply(
            fope.init(jax.random.key(0), cfg),
            jnp.ones((1, 3, 2, 8)),
            cfg,
            positions=jnp.zeros((1, 4), jnp.int32),
        )


def test_error_no_rotated_pair():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "head_dim * fraction must give at least one rotated pair; got head_dim=8, fraction=0.1"
        ),
    ):
        fope.Config(num_heads=2, head_dim=8, fraction=0.1)


def test_error_train_length():
    with pytest.raises(ValueError, match=r"train_length must be positive or None; got 0"):
        fope.Config(num_heads=2, head_dim=8, train_length=0)


def test_registered():
    assert core.layer_fns("fope").config is fope.Config
