"""Embedding lookup and tied unembedding against numpy; jit, grad, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core, embedding
from tests import tolerances
from tests._asserts import assert_rel_close


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _setup(key, vocab=40, d=16):
    rng = _rng(key)
    cfg = embedding.Config(vocab_size=vocab, d_model=d)
    params = {"embedding": jnp.asarray(rng.standard_normal((vocab, d)), jnp.float32)}
    return rng, cfg, params


def test_init_shape_axes_scale(key):
    cfg = embedding.Config(vocab_size=512, d_model=64)
    params = embedding.init(key, cfg)
    assert params["embedding"].shape == (512, 64)
    assert core.logical_axes(embedding.param_specs(cfg)) == {"embedding": ("vocab", "embed")}
    # std 1/sqrt(d_model)
    assert abs(float(jnp.std(params["embedding"])) * 8 - 1.0) < 0.05


@pytest.mark.parametrize("shape", [(2, 7), (3,), (2, 2, 3)], ids=lambda s: f"tokens={s}")
def test_apply_is_row_lookup(key, shape):
    rng, cfg, params = _setup(key)
    tokens = rng.integers(0, cfg.vocab_size, shape).astype(np.int32)
    y = jax.jit(embedding.apply, static_argnums=2)(params, jnp.asarray(tokens), cfg)
    np.testing.assert_array_equal(y, np.asarray(params["embedding"])[tokens])


def test_attend_is_tied_unembedding(key):
    rng, cfg, params = _setup(key)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    logits = jax.jit(embedding.attend, static_argnums=2)(params, x, cfg)
    assert logits.shape == (2, 5, cfg.vocab_size)
    ref = np.asarray(x, np.float64) @ np.asarray(params["embedding"], np.float64).T
    assert_rel_close(logits, ref, tolerances.forward(jnp.float32))


def test_grad_scatters_into_used_rows(key):
    rng, cfg, params = _setup(key)
    tokens = jnp.asarray([[1, 3, 3], [5, 1, 0]], jnp.int32)
    r = rng.standard_normal((2, 3, 16))

    @jax.jit
    def loss(p):
        return jnp.sum(embedding.apply(p, tokens, cfg) * jnp.asarray(r, jnp.float32))

    g = jax.grad(loss)(params)["embedding"]
    want = np.zeros((cfg.vocab_size, 16))
    np.add.at(want, np.asarray(tokens), r)
    assert_rel_close(g, want, tolerances.grad(jnp.float32))


def test_bf16_compute(key):
    rng, cfg32, params = _setup(key)
    cfg = cfg32.replace(dtype=jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    y = embedding.apply(params, tokens, cfg)
    assert y.dtype == jnp.bfloat16
    assert_rel_close(y, embedding.apply(params, tokens, cfg32), tolerances.forward(jnp.bfloat16))
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    logits = embedding.attend(params, x, cfg)
    assert logits.dtype == jnp.bfloat16
    assert_rel_close(logits, embedding.attend(params, x, cfg32), tolerances.forward(jnp.bfloat16))


def test_registered():
    fns = core.layer_fns("embedding")
    assert fns.config is embedding.Config and fns.kind == "embedding"
    assert fns.example.input_kind == "tokens"
    assert fns.example.input_vocab == fns.example.config.vocab_size
