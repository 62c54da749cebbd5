"""RoPE: the rotate-half formula, the paper's interleaved form under a permutation, the
relative-position property, partial rotation, dtypes, jit and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import position
from tests import tolerances
from tests._asserts import assert_rel_close


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _naive_rotate_half(x, pos, theta, r):
    """numpy float64: pairs (i, i + r/2) of the first r dims rotated by pos * theta^(-2i/r)."""
    x = np.asarray(x, np.float64).copy()
    half = r // 2
    inv = theta ** (-np.arange(half) * 2.0 / r)
    ang = np.asarray(pos, np.float64)[:, :, None, None] * inv  # [b, t, 1, half]
    x1, x2 = x[..., :half].copy(), x[..., half:r].copy()
    x[..., :half] = x1 * np.cos(ang) - x2 * np.sin(ang)
    x[..., half:r] = x2 * np.cos(ang) + x1 * np.sin(ang)
    return x


def _naive_paper_interleaved(x, pos, theta):
    """RoFormer eq. (34): pairs (2i, 2i+1) rotated by pos * theta^(-2i/d)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    inv = theta ** (-np.arange(d // 2) * 2.0 / d)
    ang = np.asarray(pos, np.float64)[:, :, None, None] * inv
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * np.cos(ang) - xo * np.sin(ang)
    out[..., 1::2] = xo * np.cos(ang) + xe * np.sin(ang)
    return out


def test_frequencies():
    inv = position.rope_frequencies(8, 10000.0)
    assert inv.dtype == jnp.float32 and inv.shape == (4,)
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


@pytest.mark.parametrize(
    "fraction,theta", [(1.0, 10000.0), (0.5, 10000.0), (1.0, 500.0)], ids=lambda v: str(v)
)
def test_matches_naive(key, fraction, theta):
    rng = _rng(key)
    x = rng.standard_normal((2, 6, 3, 8))
    pos = rng.integers(0, 1000, (2, 6))
    y = jax.jit(position.apply_rope, static_argnums=(2, 3))(
        jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32), theta, fraction
    )
    r = position.rotary_dim(8, fraction)
    assert_rel_close(y, _naive_rotate_half(x, pos, theta, r), tolerances.forward(jnp.float32))
    if r < 8:  # the un-rotated tail passes through exactly
        np.testing.assert_array_equal(y[..., r:], np.asarray(x[..., r:], np.float32))


def test_rotate_half_is_permuted_paper_form(key):
    rng = _rng(key)
    x = rng.standard_normal((1, 5, 2, 8))
    pos = np.arange(5)[None] * 7
    perm = np.stack([np.arange(4), np.arange(4) + 4], -1).reshape(-1)  # 0,4,1,5,2,6,3,7
    ours = position.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32))
    paper = _naive_paper_interleaved(x[..., perm], pos, 10000.0)
    assert_rel_close(np.asarray(ours)[..., perm], paper, tolerances.forward(jnp.float32))


def test_relative_position_property(key):
    """<rope(q, p), rope(k, s)> depends only on s - p."""
    rng = _rng(key)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    @jax.jit
    def score(p, s):
        rq = position.apply_rope(q, jnp.full((1, 1), p, jnp.int32))
        rk = position.apply_rope(k, jnp.full((1, 1), s, jnp.int32))
        return jnp.sum(rq * rk)

    base = float(score(3, 10))
    for shift in (0, 1, 25, 300):
        np.testing.assert_allclose(float(score(3 + shift, 10 + shift)), base, rtol=1e-4)
    np.testing.assert_allclose(float(score(0, 7)), base, rtol=1e-4)
    assert abs(float(score(3, 11)) - base) > 1e-3  # but it does depend on the difference


def test_norm_preserved_and_position_zero_identity(key):
    rng = _rng(key)
    x = jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)
    y = position.apply_rope(x, jnp.asarray(rng.integers(0, 99, (2, 4)), jnp.int32))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    y0 = position.apply_rope(x, jnp.zeros((2, 4), jnp.int32))
    np.testing.assert_array_equal(y0, x)


def test_bf16_and_grad(key):
    rng = _rng(key)
    x = rng.standard_normal((2, 4, 2, 8))
    pos = jnp.asarray(rng.integers(0, 50, (2, 4)), jnp.int32)
    y = position.apply_rope(jnp.asarray(x, jnp.bfloat16), pos)
    assert y.dtype == jnp.bfloat16
    assert_rel_close(y, _naive_rotate_half(x, pos, 10000.0, 8), tolerances.forward(jnp.bfloat16))
    # a rotation is orthogonal: the gradient of <r, R x> is R^T r = rope(r, -pos)
    r = jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)
    g = jax.jit(jax.grad(lambda v: jnp.sum(position.apply_rope(v, pos) * r)))(
        jnp.asarray(x, jnp.float32)
    )
    assert_rel_close(g, position.apply_rope(r, -pos), tolerances.grad(jnp.float32))
