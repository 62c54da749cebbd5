"""Log-linear attention: Fenwick buckets in float64, chunked == naive, special cases, decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import log_linear as ll
from pallas_kernels.linear_attention import gated_linear_attention
from tests import tolerances
from tests._asserts import assert_rel_close

F32 = tolerances.forward(jnp.float32)
REC = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]


def _fenwick_level(t: int, s: int, num_levels: int) -> int:
    """Level of key ``s`` in the Fenwick decomposition of the prefix ``[0, t]``: the token
    itself is level 0; each set bit ``j`` of ``t`` owns the block ``[lo, lo + 2^j)`` with
    ``lo = (t >> (j+1)) << (j+1)`` at level ``j + 1`` (clamped to ``L - 1``)."""
    if s == t:
        return 0
    for j in range(t.bit_length()):
        if t >> j & 1:
            lo = (t >> (j + 1)) << (j + 1)
            if lo <= s < lo + (1 << j):
                return min(j + 1, num_levels - 1)
    raise AssertionError(f"key {s} not covered for query {t}")


def _np_log_linear(q, k, v, g, lam, num_levels, scale):
    """``o_t = scale Σ_s λ_t^(ℓ(t,s)) exp(G_t - G_s) (q_t·k_s) v_s`` in float64."""
    q, k, v, g, lam = (np.asarray(a, np.float64) for a in (q, k, v, g, lam))
    b, t, h, _ = q.shape
    G = np.cumsum(g, axis=1)
    o = np.zeros(v.shape)
    for ti in range(t):
        for si in range(ti + 1):
            lvl = _fenwick_level(ti, si, num_levels)
            w = lam[:, ti, :, lvl] * np.exp(G[:, ti] - G[:, si])  # [b, h]
            qk = np.sum(q[:, ti] * k[:, si], axis=-1)
            o[:, ti] += (w * qk)[..., None] * v[:, si]
    return o * scale


def _inputs(b, t, h, dk, L, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, dk)), jnp.float32) for _ in range(3))
    g = jnp.asarray(np.log(rng.uniform(0.7, 1.0, (b, t, h))), jnp.float32)
    lam = jnp.asarray(rng.uniform(0.1, 2.0, (b, t, h, L)), jnp.float32)
    return q, k, v, g, lam


def test_levels_are_the_fenwick_partition():
    L = 6
    t = np.arange(40)
    got = np.asarray(ll.levels(t[:, None], t[None, :], L))
    for ti in range(40):
        want = [_fenwick_level(ti, si, L) for si in range(ti + 1)]
        np.testing.assert_array_equal(got[ti, : ti + 1], want)
        if ti < 2 ** (L - 2):  # unclamped: level 0 plus one bucket per set bit of t
            assert len(set(want)) == 1 + bin(ti).count("1")


@pytest.mark.parametrize(
    "t,L,chunk",
    [(13, 4, 4), (20, 8, 8), (9, 3, 16)],
    ids=lambda v: str(v),
)
def test_chunked_and_naive_match_float64_fenwick_formula(t, L, chunk):
    q, k, v, g, lam = _inputs(2, t, 2, 4, L)
    want = _np_log_linear(q, k, v, g, lam, L, 0.5)

    @jax.jit
    def run(q, k, v, g, lam):
        return [
            ll.log_linear_attention(
                q, k, v, g, lam, num_levels=L, scale=0.5, chunk_size=chunk, implementation=impl
            )[0]
            for impl in ("chunked", "naive")
        ]

    chunked, naive = run(q, k, v, g, lam)
    assert_rel_close(chunked, want, F32, name="chunked")
    assert_rel_close(naive, want, F32, name="naive")


def test_unit_weights_are_gated_linear_attention():
    L = 5
    q, k, v, g, _ = _inputs(2, 19, 2, 4, L, seed=1)
    lam = jnp.ones((2, 19, 2, L), jnp.float32)
    o, _ = ll.log_linear_attention(q, k, v, g, lam, num_levels=L, chunk_size=4)
    want = gated_linear_attention(q, k, v, g, implementation="reference")
    assert_rel_close(o, want, F32)


def test_split_sequences_and_steps_equal_one_apply():
    cfg = ll.Config(d_model=8, num_heads=2, num_levels=4, chunk_size=3)
    params = core.init(jax.random.key(0), cfg)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 17, 8)), jnp.float32)

    @jax.jit
    def run(p, x):
        outs = [ll.apply(p, x, cfg)]
        for impl in ("chunked", "naive"):
            c = cfg.replace(implementation=impl)
            y1, s = ll.apply(p, x[:, :5], c, return_state=True)
            y2, s = ll.apply(p, x[:, 5:11], c, initial_state=s, return_state=True)
            ys = []
            for i in range(11, 13):
                y, s = ll.step(p, s, x[:, i], c)
                ys.append(y[:, None])
            y3, s = ll.apply(p, x[:, 13:], c, initial_state=s, return_state=True)
            outs.append(jnp.concatenate([y1, y2] + ys + [y3], axis=1))
            outs.append(s)
        return outs

    full, pieces_c, state_c, pieces_n, state_n = run(params, x)
    assert_rel_close(pieces_c, full, REC, name="chunked pieces")
    assert_rel_close(pieces_n, full, REC, name="naive pieces")
    assert_rel_close(state_c["levels"], state_n["levels"], REC, name="final states")
    assert int(state_c["index"]) == 17


def test_layer_uses_its_projections():
    cfg = ll.Config(d_model=8, num_heads=2, num_levels=4, gated=False, chunk_size=4)
    params = core.init(jax.random.key(1), cfg)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 6, 8)), jnp.float32)
    q, k, v, g, lam = ll.project(params, x, cfg)
    assert g is None and lam.shape == (1, 6, 2, 4) and float(jnp.min(lam)) > 0
    o = _np_log_linear(q, k, v, np.zeros((1, 6, 2)), lam, 4, 0.5)
    want = o.reshape(1, 6, 8) @ np.asarray(params["o"]["kernel"], np.float64)
    assert_rel_close(ll.apply(params, x, cfg), want, F32)


# ------------------------------------------------------------------------------------------
# Errors: one test per message
# ------------------------------------------------------------------------------------------

_CFG = ll.Config(d_model=8, num_heads=2, num_levels=4)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p: ll.Config(d_model=8, num_heads=0), ValueError, "num_heads must be positive"),
        (lambda p: ll.Config(d_model=9, num_heads=2), ValueError, "d_model=9 must be divisible"),
        (lambda p: ll.Config(d_model=8, num_heads=2, num_levels=1), ValueError, "num_levels"),
        (lambda p: ll.Config(d_model=8, num_heads=2, chunk_size=0), ValueError, "chunk_size"),
        (
            lambda p: ll.Config(d_model=8, num_heads=2, implementation="x"),
            ValueError,
            "implementation must be one of",
        ),
        (lambda p: ll.apply(p, jnp.ones((2, 8)), _CFG), ValueError, "x must have rank 3"),
        (lambda p: ll.apply(p, jnp.ones((2, 3, 6)), _CFG), ValueError, r"x.shape\[-1\]"),
        (
            lambda p: ll.apply(p, jnp.ones((2, 3, 8)), _CFG, segment_ids=jnp.zeros((2, 3), int)),
            NotImplementedError,
            "does not support segment_ids",
        ),
        (
            lambda p: ll.apply(p, jnp.ones((2, 3, 8)), _CFG, initial_state={"levels": 0}),
            ValueError,
            "state must be a dict with keys",
        ),
        (
            lambda p: ll.apply(
                p,
                jnp.ones((2, 3, 8)),
                _CFG,
                initial_state=ll.init_state(_CFG.replace(num_levels=5), 2),
            ),
            ValueError,
            r"state\['levels'\] must have shape",
        ),
        (
            lambda p: ll.step(p, ll.init_state(_CFG, 2), jnp.ones((2, 1, 8)), _CFG),
            ValueError,
            "x_t must have rank 2",
        ),
    ],
    ids=[
        "heads",
        "divisible",
        "levels",
        "chunk",
        "implementation",
        "x_rank",
        "x_dim",
        "segment_ids",
        "state_keys",
        "state_shape",
        "x_t_rank",
    ],
)
def test_errors(call, exc, match):
    params = core.init(jax.random.key(0), _CFG)
    with pytest.raises(exc, match=match):
        call(params)
