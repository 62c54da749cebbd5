"""Collapsed-QK attention: equals softmax attention whose W_Q W_K^T is factorised
(from_attention), the symmetric packing, the no-value-projection form; errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import attention, core
from jaxlayers.projections import collapsed_qk as cq
from tests import tolerances
from tests._asserts import assert_rel_close


@pytest.mark.parametrize("causal", [True, False], ids=lambda c: f"causal={c}")
def test_equals_factorised_attention(causal, key):
    acfg = attention.Config(
        d_model=16, num_heads=2, use_rope=False, causal=causal, implementation="reference"
    )
    k1, k2 = jax.random.split(key)
    aparams = core.init(k1, acfg)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 16)), jnp.float32)
    params, cfg = cq.from_attention(aparams, acfg)
    assert cfg.causal == causal and params["qk"].shape == (2, 16, 16)
    want = attention.apply(aparams, x, acfg)
    assert_rel_close(cq.apply(params, x, cfg), want, 2e-5)


def _naive(m, x, scale, causal):
    x = np.asarray(x, np.float64)
    logits = np.einsum("btd,hde,bse->bhts", x, np.asarray(m, np.float64), x) * scale
    if causal:
        t = x.shape[1]
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bsd->btd", p, x) / m.shape[0]


def test_symmetric_and_no_value_projection():
    rng = np.random.default_rng(1)
    d, h = 6, 3
    cfg = cq.Config(d_model=d, num_heads=h, head_dim=2, symmetric=True, value_proj=False)
    packed = rng.standard_normal((h, d * (d + 1) // 2))
    params = {"qk_packed": jnp.asarray(packed, jnp.float32)}
    m = np.asarray(cq.qk_matrices(params, cfg))
    np.testing.assert_array_equal(m, np.swapaxes(m, 1, 2))
    rows, cols = np.triu_indices(d)
    np.testing.assert_array_equal(m[:, rows, cols], packed.astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 5, d)), jnp.float32)
    out = cq.apply(params, x, cfg)
    assert_rel_close(out, _naive(m, x, 1 / np.sqrt(2), True), tolerances.forward(jnp.float32))
    # the packed symmetric form computes what the full form does with the same matrix
    full = cq.apply({"qk": jnp.asarray(m)}, x, cfg.replace(symmetric=False))
    assert_rel_close(out, full, tolerances.forward(jnp.float32))


def test_param_tree(key):
    cfg = cq.Config(d_model=8, num_heads=2, symmetric=True)
    params = cq.init(key, cfg)
    assert jax.tree.map(jnp.shape, params) == {
        "qk_packed": (2, 36),
        "v": {"kernel": (8, 8)},
        "o": {"kernel": (8, 8)},
    }


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


def test_wrong_rank():
    cfg = cq.Config(d_model=8, num_heads=2)
    params = jax.eval_shape(lambda: cq.init(jax.random.key(0), cfg))
    with _raises(ValueError, "x must have rank 3 ([batch, time, d_model=8]); got shape (4, 8)"):
        jax.eval_shape(lambda p, x: cq.apply(p, x, cfg), params, jnp.zeros((4, 8)))


def test_heads_divide_d_model():
    with _raises(ValueError, "d_model=10 must be divisible by num_heads=4"):
        cq.Config(d_model=10, num_heads=4)


def test_sizes_positive():
    with _raises(ValueError, "d_model and num_heads must be positive; got d_model=8, num_heads=0"):
        cq.Config(d_model=8, num_heads=0)


def test_head_dim_positive():
    with _raises(ValueError, "head_dim must be positive; got 0"):
        cq.Config(d_model=8, num_heads=2, head_dim=0)


def test_from_attention_needs_plain_projections():
    acfg = attention.Config(d_model=8, num_heads=2)  # RoPE on
    params = jax.eval_shape(lambda: core.init(jax.random.key(0), acfg))
    with _raises(ValueError, "from_attention needs an attention cfg with use_rope=False"):
        cq.from_attention(params, acfg)
