"""Every lookup layer as a drop-in inside the decoder LM: MLP / projection replacements in the
blocks and the VQ-Logits output head. One tiny LM per layer: apply, loss gradient and a decode
step that agrees with apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import attention
from jaxlayers.lookup import memoryformer, pattention, peer, product_key, vq_logits
from jaxlayers.models import lm
from jaxlayers.models.lm import LMConfig
from tests._asserts import assert_rel_close

D, V, T, B = 16, 40, 8, 2

MLPS = {
    "memoryformer_block": memoryformer.BlockConfig(d_model=D, tau=4),
    "memoryformer_projection": memoryformer.Config(d_in=D, d_out=D, tau=4),
    "pkm": product_key.Config(d_in=D, d_out=D, n_sub=8, k=4, heads=2, d_key=8),
    "ultramem": product_key.UltraMemConfig(
        d_in=D, d_out=D, n_sub=8, k=4, heads=2, d_key=8, rank=2, d_value=12
    ),
    "peer": peer.Config(d_in=D, d_out=D, n_sub=8, k=4, heads=2, d_key=8),
    "pattention": pattention.Config(d_in=D, d_out=D, num_tokens=32),
}


def _mixer():
    return attention.Config(d_model=D, num_heads=2, max_decode_len=T)


def _tokens(key):
    return jax.random.randint(key, (B, T), 0, V, jnp.int32)


def _check_lm(cfg: LMConfig, key):
    k_init, k_tok = jax.random.split(key)
    params = lm.init(k_init, cfg)
    tokens = _tokens(k_tok)
    logits = jax.jit(lm.apply, static_argnames="cfg")(params, tokens, cfg)
    assert logits.shape == (B, T, V) and bool(jnp.all(jnp.isfinite(logits)))
    grads = jax.grad(lambda p: lm.loss(p, {"tokens": tokens}, cfg)[0])(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
    # Decoding token by token equals the full forward.
    state = lm.init_state(cfg, B)
    step = jax.jit(lm.step, static_argnames="cfg")
    outs = []
    for t in range(T):
        out, state = step(params, state, tokens[:, t], cfg)
        outs.append(out)
    assert_rel_close(jnp.stack(outs, 1), logits, 1e-5, "decode logits")
    return params


# The three heaviest compile for ~20 s each on 2 cores: covered by `pytest -m slow`.
_SLOW = {"memoryformer_block", "ultramem", "peer"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in sorted(MLPS)]
)
def test_lookup_layer_as_lm_mlp(name, key):
    cfg = LMConfig.uniform(vocab_size=V, d_model=D, num_layers=1, mixer=_mixer(), mlp=MLPS[name])
    params = _check_lm(cfg, key)
    assert set(params["blocks"]["0"]["mlp"]) == set(lm.param_specs(cfg)["blocks"]["0"]["mlp"])


def test_vq_logits_as_lm_head(key):
    head = vq_logits.Config(d_model=D, vocab_size=V, codebook_size=8)
    cfg = LMConfig.uniform(
        vocab_size=V, d_model=D, num_layers=1, mixer=_mixer(), head=head, tie_embeddings=False
    )
    params = _check_lm(cfg, key)
    assert "head" in params and "unembed" not in params


def test_head_needs_untied_embeddings():
    head = vq_logits.Config(d_model=D, vocab_size=V, codebook_size=8)
    with pytest.raises(ValueError, match="head replaces the unembedding: set tie_embeddings=False"):
        LMConfig.uniform(vocab_size=V, d_model=D, num_layers=1, mixer=_mixer(), head=head)


def test_head_vocab_must_match():
    head = vq_logits.Config(d_model=D, vocab_size=V + 1, codebook_size=8)
    with pytest.raises(ValueError, match=r"head.vocab_size must equal vocab_size=40; got 41"):
        LMConfig.uniform(
            vocab_size=V, d_model=D, num_layers=1, mixer=_mixer(), head=head, tie_embeddings=False
        )
