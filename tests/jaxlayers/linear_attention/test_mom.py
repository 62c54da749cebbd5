"""Mixture-of-Memories: naive per-memory recurrence, router, packed segments, decode, the
one-memory == Gated DeltaNet special case, the Pallas path (interpret mode) and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.linear_attention import deltanet as dn
from jaxlayers.linear_attention import mom
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.jaxlayers.linear_attention import _naive

TOL = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]

_BASE = dict(d_model=16, num_heads=2, head_dim=8, chunk_size=16)
CONFIGS = {
    "gated_delta_shared": mom.Config(**_BASE, num_memories=4, top_k=2),
    "delta_noshared_v12_top1": mom.Config(
        **_BASE,
        value_dim=12,
        num_memories=3,
        top_k=1,
        use_shared_memory=False,
        update_rule="delta",
        conv_bias=True,
    ),
    "gated_linear_shared": mom.Config(
        **_BASE, num_memories=3, top_k=2, update_rule="gated_linear", use_output_gate=False
    ),
    "linear_noconv_top3": mom.Config(
        **_BASE, num_memories=3, top_k=3, update_rule="linear", use_short_conv=False
    ),
}


def perturbed_params(cfg, seed=0):
    params = mom.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype), params)


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.cache
def _jit_apply(cfg):
    """Jitted ``apply(..., return_state=True)``; tests share its compilations by using the same
    configs and shapes (x ``[2, 20, 16]``)."""
    return jax.jit(
        lambda p, x, seg=None, s0=None: mom.apply(
            p, x, cfg, segment_ids=seg, initial_state=s0, return_state=True
        )
    )


def _random_state(cfg, seed=3):
    return jax.tree.map(lambda a: _x(a.shape, seed=seed) * 0.3, mom.init_state(cfg, 2))


# The default run checks one delta and one linear rule; the other two are marked slow.
_SLOW = ("delta_noshared_v12_top1", "gated_linear_shared")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in CONFIGS]
)
def test_matches_naive(name):
    """T = 20 with chunks of 16; a random initial state for every memory and conv cache."""
    cfg = CONFIGS[name]
    p, x, s0 = perturbed_params(cfg), _x((2, 20, 16)), _random_state(cfg)
    y, state = _jit_apply(cfg)(p, x, None, s0)
    want, want_state = _naive.mom(p, x, cfg, state=s0)
    assert_rel_close(y, want, TOL, name=name)
    assert_rel_close(state, want_state, TOL, name=f"{name}[state]")


def test_router():
    cfg = CONFIGS["gated_delta_shared"]
    p, x = perturbed_params(cfg), _x((2, 20, 16))
    w, selected, probs = jax.jit(functools.partial(mom.route, cfg=cfg))(p, x)
    np.testing.assert_array_equal(np.asarray(jnp.sum(selected, -1)), cfg.top_k)
    np.testing.assert_allclose(np.asarray(jnp.sum(w, -1)), 1.0, rtol=1e-6)
    want_w, want_sel, want_probs = _naive.router(_naive.f64(p), np.asarray(x, np.float64), 2)
    np.testing.assert_array_equal(np.asarray(selected), want_sel)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5, atol=1e-6)
    # Load-balancing loss: M * sum_m f_m P_m.
    want_loss = 4 * np.sum(want_sel.mean((0, 1)) / 2 * want_probs.mean((0, 1)))
    loss = jax.jit(functools.partial(mom.load_balancing_loss, cfg=cfg))(p, x)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)


SEGMENTS = [[0] * 6 + [1] * 2 + [2] * 12, [7] * 20]


def test_packed_segments_equal_separate():
    """Row 0 packs sequences of lengths 6, 2 and 12; each equals the sequence run alone (by the
    naive recurrence), and the final state is that of the last sequence, conv caches included."""
    cfg = CONFIGS["gated_delta_shared"]
    p, x = perturbed_params(cfg), _x((2, 20, 16))
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    y, state = _jit_apply(cfg)(p, x, seg)
    for s, e in [(0, 6), (6, 8), (8, 20)]:
        want, want_state = _naive.mom(p, x[:1, s:e], cfg)
        assert_rel_close(y[:1, s:e], want, TOL, name=f"sequence [{s}, {e})")
    assert_rel_close(jax.tree.map(lambda a: a[:1], state), want_state, TOL, name="final state")
    want, want_state = _naive.mom(p, x, cfg, segment_ids=seg)
    assert_rel_close(y, want, TOL, name="naive")
    assert_rel_close(state, want_state, TOL, name="naive state")


@pytest.mark.parametrize(
    "name", ["gated_delta_shared", pytest.param("gated_linear_shared", marks=pytest.mark.slow)]
)
def test_prefill_step_and_chunked_match_apply(name):
    """40 tokens: apply on the first 20 (from a zero state), then either apply on the next 20
    from the returned state, or step token by token; both equal the naive run of all 40."""
    cfg = CONFIGS[name]
    p, x = perturbed_params(cfg), _x((2, 40, 16))
    want, want_final = _naive.mom(p, x, cfg)
    y0, state = _jit_apply(cfg)(p, x[:, :20], None, mom.init_state(cfg, 2))
    y1, final = _jit_apply(cfg)(p, x[:, 20:], None, state)
    assert_rel_close(jnp.concatenate([y0, y1], axis=1), want, TOL, name="chunked")
    assert_rel_close(final, want_final, TOL, name="chunked final state")

    @jax.jit
    def decode(p, state, xs):
        def body(s, x_t):
            y_t, s = mom.step(p, s, x_t, cfg)
            return s, y_t

        return jax.lax.scan(body, state, jnp.moveaxis(xs, 1, 0))

    final, ys = decode(p, state, x[:, 20:])
    assert_rel_close(jnp.moveaxis(ys, 0, 1), want[:, 20:], TOL, name="step")
    assert_rel_close(final, want_final, TOL, name="step final state")


def test_one_memory_equals_gated_deltanet():
    """One memory, top-1, no shared memory: the router weight is 1 and MoM is Gated DeltaNet."""
    cfg = mom.Config(**_BASE, value_dim=16, num_memories=1, top_k=1, use_shared_memory=False)
    gcfg = dn.GatedDeltaNetConfig(**_BASE, value_dim=16)
    p = perturbed_params(cfg)
    p_gdn = {k: v for k, v in p.items() if k != "router"}
    assert jax.tree.structure(p_gdn) == jax.tree.structure(dn.init(jax.random.key(0), gcfg))
    x, seg = _x((2, 20, 16)), jnp.asarray(SEGMENTS, jnp.int32)
    y, state = _jit_apply(cfg)(p, x, seg)
    y_g, state_g = jax.jit(
        lambda p, x, seg: dn.apply(p, x, gcfg, segment_ids=seg, return_state=True)
    )(p_gdn, x, seg)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_g), rtol=1e-6, atol=1e-6)
    for key in state_g:
        np.testing.assert_allclose(
            np.asarray(state[key]), np.asarray(state_g[key]), rtol=1e-6, atol=1e-6
        )


@pytest.mark.slow  # the same op and plumbing as test_deltanet's Pallas test
def test_pallas_interpret_matches_xla():
    cfg = CONFIGS["gated_delta_shared"]
    p, x = perturbed_params(cfg), _x((2, 20, 16))
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    want = _jit_apply(cfg)(p, x, seg)
    got = _jit_apply(cfg.replace(implementation="pallas", interpret=True))(p, x, seg)
    assert_rel_close(got, want, TOL)


# ----------------------------------------------------------------------------------------------
# Bad input: one test per message.
# ----------------------------------------------------------------------------------------------

_CFG = mom.Config(d_model=16, num_heads=2, num_memories=3, top_k=2)
_P = mom.init(jax.random.key(0), _CFG)
_X = _x((2, 5, 16))
_S = mom.init_state(_CFG, 2)

ERRORS = {
    "config_update_rule": (
        lambda: mom.Config(d_model=16, num_heads=2, update_rule="gla"),
        ValueError,
        r"update_rule must be one of \('gated_delta', 'delta', 'gated_linear', 'linear'\); "
        r"got 'gla'",
    ),
    "config_num_memories": (
        lambda: mom.Config(d_model=16, num_heads=2, num_memories=0, top_k=0),
        ValueError,
        r"num_memories must be >= 1; got num_memories=0",
    ),
    "config_top_k": (
        lambda: mom.Config(d_model=16, num_heads=2, num_memories=3, top_k=4),
        ValueError,
        r"top_k must be in \[1, num_memories=3\]; got top_k=4",
    ),
    "x_rank": (
        lambda: mom.apply(_P, _X[0], _CFG),
        ValueError,
        r"x must have rank 3 \(\[batch, time, d_model\]\); got shape \(5, 16\)",
    ),
    "x_width": (
        lambda: mom.apply(_P, _X[..., :8], _CFG),
        ValueError,
        r"x.shape\[-1\] \(d_model\) must be 16; got 8",
    ),
    "segment_ids_dtype": (
        lambda: mom.apply(_P, _X, _CFG, segment_ids=jnp.zeros((2, 5), jnp.float32)),
        TypeError,
        r"segment_ids must have an integer dtype \(int32\); got float32",
    ),
    "initial_state_shape": (
        lambda: mom.apply(_P, _X, _CFG, initial_state={**_S, "recurrent": jnp.zeros((2, 6, 8, 8))}),
        ValueError,
        r"initial_state\['recurrent'\] must have shape \(2, 8, 8, 8\); got \(2, 6, 8, 8\)",
    ),
    "step_state_keys": (
        lambda: mom.step(_P, {"recurrent": _S["recurrent"]}, _X[:, 0], _CFG),
        ValueError,
        r"state must be a dict with keys \['conv_k', 'conv_q', 'conv_v', 'recurrent'\]; "
        r"got \['recurrent'\]",
    ),
    "step_x_width": (
        lambda: mom.step(_P, _S, _X[:, 0, :8], _CFG),
        ValueError,
        r"x_t.shape\[-1\] \(d_model\) must be 16; got 8",
    ),
    "load_balancing_x_rank": (
        lambda: mom.load_balancing_loss(_P, _X[0], _CFG),
        ValueError,
        r"x must have rank 3 \(\[batch, time, d_model\]\)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input(case):
    fn, exc, match = ERRORS[case]
    with pytest.raises(exc, match=match):
        fn()
