"""VQ-Logits head: code logits scattered to the vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.lookup import vq_logits as vq


def test_logits_are_code_logits_scattered(key):
    k1, k2, k3 = jax.random.split(key, 3)
    assign = tuple(int(a) for a in jax.random.randint(k3, (30,), 0, 6))
    cfg = vq.Config(d_model=8, vocab_size=30, codebook_size=6, assignment=assign)
    params = core.init_params(k1, vq.param_specs(cfg))
    params["bias"] = jax.random.normal(k2, (30,), jnp.float32)
    x = jax.random.normal(k2, (2, 3, 8), jnp.float32)
    out = vq.apply(params, x, cfg)
    assert out.shape == (2, 3, 30)
    want = (
        jnp.einsum("btd,vd->btv", x, params["codebook"][np.array(assign)], precision="highest")
        + params["bias"][None, None]
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_codebook_gradient_sums_over_assigned_tokens(key):
    cfg = vq.Config(d_model=4, vocab_size=10, codebook_size=3, use_bias=False)
    params = core.init_params(key, vq.param_specs(cfg))
    x = jax.random.normal(key, (5, 4), jnp.float32)
    probe = jax.random.normal(jax.random.fold_in(key, 1), (5, 10), jnp.float32)
    g = jax.grad(lambda p: jnp.sum(vq.apply(p, x, cfg) * probe))(params)["codebook"]
    a = cfg.assignment_array()
    want = np.stack([np.asarray(x.T @ probe[:, a == c].sum(axis=1)) for c in range(3)])
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)


def test_assignment_from_embeddings(key):
    centres = jnp.array([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    labels = jnp.arange(30) % 3
    emb = centres[labels] + 0.1 * jax.random.normal(key, (30, 2))
    assign, _ = vq.assignment_from_embeddings(key, emb, 3)
    cfg = vq.Config(d_model=2, vocab_size=30, codebook_size=3, assignment=assign)
    a = cfg.assignment_array()
    # Same clusters up to relabelling.
    for c in range(3):
        assert len(set(a[np.asarray(labels) == c].tolist())) == 1


def test_assignment_length():
    with pytest.raises(ValueError, match="assignment must be a tuple of vocab_size=5 ints"):
        vq.Config(d_model=4, vocab_size=5, codebook_size=2, assignment=(0, 1))


def test_assignment_range():
    with pytest.raises(ValueError, match=r"assignment entries must lie in \[0, codebook_size=2\)"):
        vq.Config(d_model=4, vocab_size=3, codebook_size=2, assignment=(0, 1, 2))


def test_codebook_not_larger_than_vocab():
    with pytest.raises(ValueError, match="codebook_size=9 must be <= vocab_size=5"):
        vq.Config(d_model=4, vocab_size=5, codebook_size=9)
