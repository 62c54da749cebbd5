"""DeltaNet and Gated DeltaNet: naive recurrence, packed segments, decode, the unit-decay special
case, the Pallas path (interpret mode) and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.linear_attention import deltanet as dn
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.jaxlayers.linear_attention import _naive

TOL = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]

CONFIGS = {
    "deltanet_gate_bias_v12": dn.DeltaNetConfig(
        d_model=16,
        num_heads=2,
        head_dim=8,
        value_dim=12,
        use_output_gate=True,
        conv_bias=True,
        conv_size=3,
        chunk_size=16,
    ),
    "gated_deltanet_v16": dn.GatedDeltaNetConfig(
        d_model=16, num_heads=2, head_dim=8, value_dim=16, chunk_size=16
    ),
    "gated_deltanet_noconv_scale": dn.GatedDeltaNetConfig(
        d_model=16, num_heads=4, use_short_conv=False, scale=0.5, chunk_size=16
    ),
}


def perturbed_params(cfg, seed=0, init=None):
    """Init params plus noise on every leaf, so that ones/zeros inits (norm scale, conv bias)
    are exercised as general values."""
    params = dn.init(jax.random.key(seed), cfg) if init is None else init(seed, cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype), params)


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.cache
def _jit_apply(cfg):
    """Jitted ``apply(..., return_state=True)``; tests share its compilations by using the same
    configs and shapes (x ``[2, 20, 16]``)."""
    return jax.jit(
        lambda p, x, seg=None, s0=None: dn.apply(
            p, x, cfg, segment_ids=seg, initial_state=s0, return_state=True
        )
    )


def _random_state(cfg, seed=3):
    return jax.tree.map(lambda a: _x(a.shape, seed=seed) * 0.3, dn.init_state(cfg, 2))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_naive(name):
    """T = 20 with chunks of 16: two chunks, the second partial; random initial state."""
    cfg = CONFIGS[name]
    p, x, s0 = perturbed_params(cfg), _x((2, 20, 16)), _random_state(cfg)
    y, state = _jit_apply(cfg)(p, x, None, s0)
    want, want_state = _naive.deltanet(p, x, cfg, state=s0)
    assert_rel_close(y, want, TOL, name=name)
    assert_rel_close(state, want_state, TOL, name=f"{name}[state]")


SEGMENTS = [[0] * 6 + [1] * 2 + [2] * 12, [7] * 20]


def test_packed_segments_equal_separate():
    """Row 0 packs sequences of lengths 6, 2 and 12; each equals the sequence run alone (by the
    naive recurrence), and the final state is that of the last sequence, conv caches included."""
    cfg = CONFIGS["gated_deltanet_v16"]
    p, x = perturbed_params(cfg), _x((2, 20, 16))
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    y, state = _jit_apply(cfg)(p, x, seg)
    for s, e in [(0, 6), (6, 8), (8, 20)]:
        want, want_state = _naive.deltanet(p, x[:1, s:e], cfg)
        assert_rel_close(y[:1, s:e], want, TOL, name=f"sequence [{s}, {e})")
    assert_rel_close(jax.tree.map(lambda a: a[:1], state), want_state, TOL, name="final state")
    want, want_state = _naive.deltanet(p, x, cfg, segment_ids=seg)
    assert_rel_close(y, want, TOL, name="naive")
    assert_rel_close(state, want_state, TOL, name="naive state")


@pytest.mark.parametrize(
    "name",
    [pytest.param("deltanet_gate_bias_v12", marks=pytest.mark.slow), "gated_deltanet_v16"],
)
def test_prefill_step_and_chunked_match_apply(name):
    """40 tokens: apply on the first 20 (from a zero state), then either apply on the next 20
    from the returned state, or step token by token; both equal the naive run of all 40."""
    cfg = CONFIGS[name]
    p, x = perturbed_params(cfg), _x((2, 40, 16))
    want, want_final = _naive.deltanet(p, x, cfg)
    y0, state = _jit_apply(cfg)(p, x[:, :20], None, dn.init_state(cfg, 2))
    y1, final = _jit_apply(cfg)(p, x[:, 20:], None, state)
    assert_rel_close(jnp.concatenate([y0, y1], axis=1), want, TOL, name="chunked")
    assert_rel_close(final, want_final, TOL, name="chunked final state")

    @jax.jit
    def decode(p, state, xs):
        def body(s, x_t):
            y_t, s = dn.step(p, s, x_t, cfg)
            return s, y_t

        return jax.lax.scan(body, state, jnp.moveaxis(xs, 1, 0))

    final, ys = decode(p, state, x[:, 20:])
    assert_rel_close(jnp.moveaxis(ys, 0, 1), want[:, 20:], TOL, name="step")
    assert_rel_close(final, want_final, TOL, name="step final state")


def test_gated_with_unit_decay_equals_deltanet():
    """Gated DeltaNet with exp(A_log) == 0 (decay exactly 1) is DeltaNet with an output gate."""
    gcfg = CONFIGS["gated_deltanet_v16"]
    p = perturbed_params(gcfg)
    p["decay"]["a_log"] = jnp.full_like(p["decay"]["a_log"], -1e4)  # exp underflows to 0
    fields = {f: getattr(gcfg, f) for f in dn.DeltaNetConfig.__dataclass_fields__}
    cfg = dn.DeltaNetConfig(**fields)
    assert cfg.use_output_gate
    p_plain = {k: v for k, v in p.items() if k != "decay"}
    assert jax.tree.structure(p_plain) == jax.tree.structure(dn.init(jax.random.key(0), cfg))
    x, seg = _x((2, 20, 16)), jnp.asarray(SEGMENTS, jnp.int32)
    y_g, s_g = _jit_apply(gcfg)(p, x, seg)
    y_d, s_d = _jit_apply(cfg)(p_plain, x, seg)
    np.testing.assert_allclose(np.asarray(y_g), np.asarray(y_d), rtol=1e-6, atol=1e-6)
    for key in s_d:
        np.testing.assert_allclose(np.asarray(s_g[key]), np.asarray(s_d[key]), rtol=1e-6, atol=1e-6)


def test_pallas_interpret_matches_xla():
    cfg = CONFIGS["gated_deltanet_v16"]
    p, x = perturbed_params(cfg), _x((2, 20, 16))
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    want = _jit_apply(cfg)(p, x, seg)
    got = _jit_apply(cfg.replace(implementation="pallas", interpret=True))(p, x, seg)
    assert_rel_close(got, want, TOL)


def test_decay_init():
    cfg = dn.GatedDeltaNetConfig(d_model=64, num_heads=64, head_dim=4)
    p = dn.decay_param_specs(cfg)
    p = {k: p[k].init(jax.random.key(i), p[k].shape, jnp.float32) for i, k in enumerate(p)}
    a = np.exp(np.asarray(p["a_log"]))
    dt = np.asarray(jax.nn.softplus(p["dt_bias"]))
    assert np.all((a >= 1.0 - 1e-5) & (a <= 16.0 + 1e-4))
    assert np.all((dt >= cfg.dt_min * (1 - 1e-4)) & (dt <= cfg.dt_max * (1 + 1e-4)))
    assert dt.max() / dt.min() > 10  # log-uniform spread


# ----------------------------------------------------------------------------------------------
# Bad input: one test per message.
# ----------------------------------------------------------------------------------------------

_CFG = dn.DeltaNetConfig(d_model=16, num_heads=2)
_P = dn.init(jax.random.key(0), _CFG)
_X = _x((2, 5, 16))
_S = dn.init_state(_CFG, 2)

ERRORS = {
    "config_heads": (
        lambda: dn.DeltaNetConfig(d_model=16, num_heads=0),
        ValueError,
        r"d_model and num_heads must be positive; got d_model=16, num_heads=0",
    ),
    "config_divisible": (
        lambda: dn.DeltaNetConfig(d_model=16, num_heads=3),
        ValueError,
        r"d_model=16 must be divisible by num_heads=3",
    ),
    "config_conv_size": (
        lambda: dn.DeltaNetConfig(d_model=16, num_heads=2, conv_size=0),
        ValueError,
        r"conv_size must be >= 1; got conv_size=0",
    ),
    "config_implementation": (
        lambda: dn.DeltaNetConfig(d_model=16, num_heads=2, implementation="cuda"),
        ValueError,
        r"implementation must be one of \('pallas', 'xla', 'reference'\) or None; got 'cuda'",
    ),
    "config_chunk_size": (
        lambda: dn.DeltaNetConfig(d_model=16, num_heads=2, chunk_size=24),
        ValueError,
        r"chunk_size must be a power of two >= 16 .*; got 24",
    ),
    "config_norm_eps": (
        lambda: dn.DeltaNetConfig(d_model=16, num_heads=2, norm_eps=0.0),
        ValueError,
        r"norm_eps must be positive; got norm_eps=0.0",
    ),
    "config_a_init_range": (
        lambda: dn.GatedDeltaNetConfig(d_model=16, num_heads=2, a_init_range=(0.0, 16.0)),
        ValueError,
        r"a_init_range must satisfy 0 < lo <= hi; got \(0.0, 16.0\)",
    ),
    "config_dt_range": (
        lambda: dn.GatedDeltaNetConfig(d_model=16, num_heads=2, dt_min=0.2, dt_max=0.1),
        ValueError,
        r"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got dt_min=0.2, dt_max=0.1",
    ),
    "config_head_dims": (
        lambda: dn.DeltaNetConfig(d_model=16, num_heads=2, value_dim=0),
        ValueError,
        r"head_dim and value_dim must be positive; got None, 0",
    ),
    "x_rank": (
        lambda: dn.apply(_P, _X[0], _CFG),
        ValueError,
        r"x must have rank 3 \(\[batch, time, d_model\]\); got shape \(5, 16\)",
    ),
    "x_width": (
        lambda: dn.apply(_P, _X[..., :8], _CFG),
        ValueError,
        r"x.shape\[-1\] \(d_model\) must be 16; got 8",
    ),
    "segment_ids_shape": (
        lambda: dn.apply(_P, _X, _CFG, segment_ids=jnp.zeros((2, 6), jnp.int32)),
        ValueError,
        r"segment_ids must have shape \[batch, time\] = \(2, 5\); got \(2, 6\)",
    ),
    "initial_state_keys": (
        lambda: dn.apply(_P, _X, _CFG, initial_state={"recurrent": _S["recurrent"]}),
        ValueError,
        r"initial_state must be a dict with keys \['conv_k', 'conv_q', 'conv_v', 'recurrent'\]",
    ),
    "initial_state_shape": (
        lambda: dn.apply(_P, _X, _CFG, initial_state={**_S, "recurrent": jnp.zeros((2, 2, 8, 4))}),
        ValueError,
        r"initial_state\['recurrent'\] must have shape \(2, 2, 8, 8\); got \(2, 2, 8, 4\)",
    ),
    "step_state_shape": (
        lambda: dn.step(_P, {**_S, "conv_q": jnp.zeros((2, 2, 16))}, _X[:, 0], _CFG),
        ValueError,
        r"state\['conv_q'\] must have shape \(2, 3, 16\); got \(2, 2, 16\)",
    ),
    "step_x_rank": (
        lambda: dn.step(_P, _S, _X, _CFG),
        ValueError,
        r"x_t must have rank 2 \(\[batch, d_model\]\)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input(case):
    fn, exc, match = ERRORS[case]
    with pytest.raises(exc, match=match):
        fn()
