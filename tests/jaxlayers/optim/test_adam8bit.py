"""8-bit block-wise Adam: the code books, quantisation error, a regression run against float32
Adam (final loss within a few %), and the state's size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlayers.optim import adam8bit


def test_dynamic_maps():
    signed = adam8bit.quantization_map("dynamic", signed=True)
    unsigned = adam8bit.quantization_map("dynamic", signed=False)
    assert len(unsigned) == 256 and len(signed) == 255
    assert len(np.unique(unsigned)) == 256 and np.all(np.diff(signed) > 0)
    assert unsigned[0] == 0 and unsigned[-1] == 1 and signed[0] == -1 and signed[-1] == 1
    np.testing.assert_allclose(unsigned[1], 1e-7, rtol=1e-6)  # 7 decades below the max
    assert len(adam8bit.quantization_map("linear")) == 256


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
def test_quantize_roundtrip(kind):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(1000) * np.exp(rng.standard_normal(1000)), jnp.float32)
    qmap = jnp.asarray(adam8bit.quantization_map(kind))
    q = adam8bit.quantize_blockwise(x, qmap, 256)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (4, 256) and q.absmax.shape == (4,)
    y = np.asarray(adam8bit.dequantize_blockwise(q, qmap, (1000,)))
    x = np.asarray(x)
    # every value maps to its nearest code: error <= half the local gap of the scaled code book
    blocks = np.pad(x, (0, 24)).reshape(4, 256)
    scaled = np.asarray(qmap)[None, :] * np.abs(blocks).max(1)[:, None]
    nearest = np.abs(scaled[:, None, :] - blocks[:, :, None]).min(-1).reshape(-1)[:1000]
    np.testing.assert_allclose(np.abs(y - x), nearest, atol=1e-6)
    # block maxima are exact
    for b in range(4):
        i = np.argmax(np.abs(blocks[b]))
        if b * 256 + i < 1000:
            np.testing.assert_allclose(y[b * 256 + i], x[b * 256 + i], rtol=1e-6)


def _problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((64, 32)) / 8, jnp.float32)
    y = jnp.tanh(x @ w_true) + 0.05 * jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
    p0 = {
        "w1": jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((64, 32)) / 8, jnp.float32),
        "b": jnp.zeros((32,), jnp.float32),
    }

    def loss(p):
        return jnp.mean((jax.nn.gelu(x @ p["w1"]) @ p["w2"] + p["b"][None] - y) ** 2)

    return p0, loss


def _train(opt, p0, loss, steps=200):
    @jax.jit
    def run(p):
        def body(c, _):
            p, s = c
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
        return loss(p), s

    with jax.numpy_dtype_promotion("standard"):  # optax.adam needs it; ours runs either way
        return run(p0)


def test_regression_matches_float32_adam_within_a_few_percent():
    p0, loss = _problem()
    l8, s8 = _train(adam8bit.adam_8bit(3e-3, min_size=0), p0, loss)
    l32, s32 = _train(optax.adam(3e-3), p0, loss)
    l0 = float(loss(p0))
    assert float(l32) < 0.05 * l0  # the problem is learned
    assert abs(float(l8) - float(l32)) <= 0.05 * float(l32), (float(l8), float(l32))
    # state: 1 byte per moment element + 4 bytes per 256-block, vs 4 bytes
    b8, b32 = adam8bit.state_nbytes(s8), adam8bit.state_nbytes(s32)
    assert b8 < 0.3 * b32, (b8, b32)


def test_state_bytes_and_small_leaves_stay_float32():
    params = {"big": jnp.zeros((1024, 1024), jnp.float32), "small": jnp.zeros((64,), jnp.float32)}
    s8 = jax.eval_shape(adam8bit.scale_by_adam_8bit().init, params)
    assert isinstance(s8.mu["big"], adam8bit.QuantizedTensor)
    assert s8.mu["small"].dtype == jnp.float32
    n = 1024 * 1024
    want = 2 * (n + 4 * n // 256) + 2 * 4 * 64 + 4
    assert adam8bit.state_nbytes(s8) == want


def test_update_runs_under_strict_promotion():
    opt = adam8bit.scale_by_adam_8bit(min_size=0)
    g = {"w": jnp.linspace(-1, 1, 300, dtype=jnp.float32).reshape(20, 15)}
    u, s = jax.jit(opt.update)(g, opt.init(g))
    assert u["w"].shape == (20, 15) and int(s.count) == 1
    # first step of Adam: m_hat = g, v_hat = g^2 -> u = g / (|g| + eps) up to quantisation
    np.testing.assert_allclose(u["w"], np.sign(g["w"]), atol=1e-3)


def test_error_block_size():
    with pytest.raises(ValueError, match=r"block_size must be >= 1; got block_size=0"):
        adam8bit.scale_by_adam_8bit(block_size=0)


def test_error_map_kind():
    with pytest.raises(ValueError, match=r"kind must be one of \('dynamic', 'linear'\); got 'log'"):
        adam8bit.quantization_map("log")
