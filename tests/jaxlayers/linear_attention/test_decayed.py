"""RetNet, TransNormerLLM NormAttention (Lightning attention) and LightNet against float64 numpy
implementations of the papers' equations; packed sequences; state hand-over; bad inputs.

Also holds the helpers ``test_gated.py`` reuses (names starting with ``_``). The shared registry
suites (jit / grad / bf16 / Flax / decode / sharding) run these layers too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import decayed
from tests import tolerances
from tests._asserts import assert_rel_close

TOL = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]
B, T, D = 2, 12, 16
# Row 0 is one sequence; row 1 packs two (5 + 7 tokens).
SEGMENTS = np.array([[0] * T, [3] * 5 + [8] * 7], np.int32)


# --------------------------------------------------------------------------------------------
# Shared helpers (also imported by test_gated.py)
# --------------------------------------------------------------------------------------------


def _np_params(cfg, seed: int):
    """Random params for ``cfg`` (numpy, no compilation): kernels ~ N(0, 1/fan_in), norm scales
    and ``D`` around 1, biases ~ N(0, 0.3^2), Mamba-2 ``A_log`` / ``dt_bias`` in their ranges."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = path[-1].key
        if len(spec.shape) == 2:
            v = rng.standard_normal(spec.shape) / np.sqrt(spec.shape[0])
        elif name in ("scale", "d_skip"):
            v = 1.0 + 0.3 * rng.standard_normal(spec.shape)
        elif name == "a_log":
            v = np.log(rng.uniform(1.0, 16.0, spec.shape))
        elif name == "dt_bias":
            v = np.log(np.expm1(rng.uniform(0.01, 0.5, spec.shape)))
        else:
            v = 0.3 * rng.standard_normal(spec.shape)
        return jnp.asarray(v, jnp.float32)

    specs = dict(core.param_specs(cfg))
    return jax.tree_util.tree_map_with_path(
        leaf, specs, is_leaf=lambda s: isinstance(s, core.ParamSpec)
    )


def _x(seed: int, shape=(B, T, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _lin(p, name, x):
    return x @ p[name]["kernel"] + p[name].get("bias", 0.0)


def _heads(a, h):
    return a.reshape(a.shape[0], h, -1)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _silu(a):
    return a * _sigmoid(a)


def _norm(o, eps, *, per_head, centered, scale=None, bias=None):
    """Norm of ``o [t, h, v]`` over each head or over all dims -> ``[t, h*v]``."""
    t = o.shape[0]
    z = o if per_head else o.reshape(t, 1, -1)
    if centered:
        z = z - z.mean(-1, keepdims=True)
    z = z / np.sqrt((z**2).mean(-1, keepdims=True) + eps)
    z = z.reshape(t, -1)
    return z * (1.0 if scale is None else scale) + (0.0 if bias is None else bias)


def _per_segment(naive, params, x, cfg, segment_ids):
    """Run ``naive(p, x_seq [t, d], cfg, start)`` on every sequence of every row."""
    p, x = _f64(params), np.asarray(x, np.float64)
    y = np.zeros(x.shape[:2] + (cfg.d_model,))
    for row in range(x.shape[0]):
        ids = np.asarray(segment_ids[row])
        starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            y[row, a:b] = naive(p, x[row, a:b], cfg, a)
    return y


@functools.cache
def _jit_apply(cfg):
    return jax.jit(lambda p, x, seg: core.apply(p, x, cfg, segment_ids=seg))


def _check_naive(naive, cfg, seed, tweak=None):
    params, x = _np_params(cfg, seed), _x(seed + 1)
    if tweak is not None:
        params = tweak(params)
    got = _jit_apply(cfg)(params, x, jnp.asarray(SEGMENTS))
    want = _per_segment(naive, params, x, cfg, SEGMENTS)
    assert_rel_close(got, want, TOL, name=type(cfg).__name__)


def _random_state(cfg, seed: int):
    """A decode state with random float entries (any finite value is a valid state) and
    ``index = 4`` (RetNet)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: core.init_state(cfg, B))

    def leaf(a):
        if jnp.issubdtype(a.dtype, jnp.integer):
            return jnp.full(a.shape, 4, a.dtype)
        return jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype)

    return jax.tree.map(leaf, shapes)


def _check_state_handover(cfg, seed, skip=()):
    """``initial_state`` reaches only the first sequence of a row; the returned state is that
    of the last sequence; both equal runs without ``segment_ids``."""
    params, s0, x = _np_params(cfg, seed), _random_state(cfg, seed + 1), _x(seed + 2)
    cut = 5

    @jax.jit
    def run(p, s0, x, seg):
        apply = functools.partial(core.apply, p, cfg=cfg)
        y, s = apply(x, segment_ids=seg, initial_state=s0, return_state=True)
        y_first, s_first = apply(x, initial_state=s0, return_state=True)
        # The last sequence alone, at the positions it has in the packed row (for RoPE).
        pos = jnp.broadcast_to(4 + cut + jnp.arange(T - cut, dtype=jnp.int32), (B, T - cut))
        y_last, s_last = apply(x[:, cut:], positions=pos, return_state=True)
        return y, s, y_first, s_first, y_last, s_last

    y, s, y_first, s_first, y_last, s_last = run(params, s0, x, jnp.asarray(SEGMENTS))
    assert_rel_close(y[0], y_first[0], TOL, name="row 0")
    assert_rel_close(y[1, :cut], y_first[1, :cut], TOL, name="row 1 first sequence")
    assert_rel_close(y[1, cut:], y_last[1], TOL, name="row 1 last sequence")
    for key in s:
        if key in skip:
            continue
        assert_rel_close(s[key][0], s_first[key][0], TOL, name=f"state[{key!r}] row 0")
        assert_rel_close(s[key][1], s_last[key][1], TOL, name=f"state[{key!r}] row 1")
    return s


# --------------------------------------------------------------------------------------------
# Naive float64 implementations of the papers' equations (one sequence x [t, d])
# --------------------------------------------------------------------------------------------


def _rope(x, pos, theta):
    half = x.shape[-1] // 2
    ang = pos[:, None, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate(
        [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1
    )


def _decayed_parallel(q, k, v, log_gamma, scale):
    """Parallel form ``o = ((q k^T) * D) v`` with ``D[t, s] = gamma^(t-s)`` (s <= t), per head."""
    t, h, _ = q.shape
    o = np.zeros((t, h, v.shape[-1]))
    dist = np.arange(t)[:, None] - np.arange(t)[None, :]
    for n in range(h):
        dmat = np.where(dist >= 0, np.exp(log_gamma[n] * np.maximum(dist, 0)), 0.0)
        o[:, n] = ((q[:, n] @ k[:, n].T) * scale * dmat) @ v[:, n]
    return o


def _naive_retnet(p, x, cfg, start):
    h = cfg.num_heads
    q, k = _heads(_lin(p, "q", x), h), _heads(_lin(p, "k", x), h)
    if cfg.use_rope:
        pos = start + np.arange(x.shape[0], dtype=np.float64)
        q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(h))
    o = _decayed_parallel(q, k, _heads(_lin(p, "v", x), h), np.log(gamma), cfg.dk**-0.5)
    y = _norm(o, cfg.norm_eps, per_head=True, centered=True, **p["norm"])
    return (_silu(_lin(p, "g", x)) * y) @ p["o"]["kernel"]


def _naive_lightning(p, x, cfg, start):
    del start
    h = cfg.num_heads
    slopes = 2.0 ** (-8.0 * (np.arange(h) + 1) / h)  # power-of-two head counts only
    depth = cfg.layer_index / (cfg.num_layers - 1) if cfg.num_layers > 1 else 0.0
    log_lambda = -slopes * (1.0 - depth + 1e-5)
    q, k = _silu(_heads(_lin(p, "q", x), h)), _silu(_heads(_lin(p, "k", x), h))
    o = _decayed_parallel(q, k, _heads(_lin(p, "v", x), h), log_lambda, 1.0)
    y = _norm(o, cfg.norm_eps, per_head=False, centered=False) * _lin(p, "u", x)
    return y @ p["o"]["kernel"]


def _naive_lightnet(p, x, cfg, start):
    del start
    h, t = cfg.num_heads, x.shape[0]
    q, a = _silu(_heads(_lin(p, "q", x), h)), _heads(_lin(p, "k", x), h)
    v = _heads(_lin(p, "v", x), h)
    o = np.zeros((t, h, cfg.dv))
    for i in range(t):  # S_i = sum_{s<=i} diag(exp(a_s) / Z_i) 1 v_s^T
        z = np.exp(a[: i + 1]).sum(0)
        s = np.einsum("shk,shv->hkv", np.exp(a[: i + 1]) / z, v[: i + 1])
        o[i] = np.einsum("hk,hkv->hv", q[i] * cfg.dk**-0.5, s)
    gate = _lin(p, "gate_up", _lin(p, "gate_down", x))
    y = _norm(o, cfg.norm_eps, per_head=False, centered=False, **p["norm"]) * _silu(gate)
    return y @ p["o"]["kernel"]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

CASES = {
    "retnet": (_naive_retnet, decayed.RetNetConfig(d_model=D, num_heads=2, chunk_size=16)),
    "retnet_norope_4heads": (
        _naive_retnet,
        decayed.RetNetConfig(d_model=D, num_heads=4, use_rope=False, value_dim=6, chunk_size=16),
    ),
    "lightning": (
        _naive_lightning,
        decayed.LightningConfig(d_model=D, num_heads=4, layer_index=1, num_layers=3, chunk_size=16),
    ),
    "lightnet": (
        _naive_lightnet,
        decayed.LightNetConfig(d_model=D, num_heads=2, key_dim=4, gate_low_rank=3, chunk_size=16),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_paper_equations_with_packed_sequences(case):
    naive, cfg = CASES[case]
    _check_naive(naive, cfg, seed=len(case))


@pytest.mark.parametrize("case", ["retnet", "lightnet"])
def test_initial_state_and_final_state_with_segments(case):
    # RetNet's "index" counts every token of the row (positions do not restart per sequence).
    s = _check_state_handover(CASES[case][1], seed=7, skip=("index",))
    if "index" in s:
        assert s["index"].dtype == jnp.int32 and int(s["index"]) == 4 + T


def test_decay_schedules():
    np.testing.assert_allclose(
        np.exp(decayed.retnet_log_decays(3)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128], rtol=1e-12
    )
    np.testing.assert_allclose(decayed.alibi_slopes(8), 2.0 ** -np.arange(1.0, 9.0), rtol=1e-12)
    # 6 heads: the 4-head slopes, then every other slope of 8 heads.
    want6 = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    np.testing.assert_allclose(decayed.alibi_slopes(6), want6, rtol=1e-12)
    first = decayed.lightning_log_decays(4, 0, 5)
    last = decayed.lightning_log_decays(4, 4, 5)
    np.testing.assert_allclose(first, -decayed.alibi_slopes(4) * (1 + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(last, -decayed.alibi_slopes(4) * 1e-5, rtol=1e-9)


def test_lightnet_large_keys_stay_finite():
    # Keys ~ N(0, 30^2): exp(k) overflows float32, the running log-sum-exp does not.
    naive, cfg = CASES["lightnet"]
    assert np.all(np.isneginf(np.asarray(decayed.init_state(cfg, B)["log_z"])))

    def big_keys(p):
        return {**p, "k": {"kernel": p["k"]["kernel"] * 30.0}}

    _check_naive(naive, cfg, seed=5, tweak=big_keys)


# ---------------------------------------------------------------------------------- bad input

_CFG = CASES["retnet"][1]
_STATE = decayed.init_state(_CFG, B)


def _apply(x=None, **kw):
    return decayed.retnet_apply(None, _x(0) if x is None else x, _CFG, **kw)


APPLY_ERRORS = {
    "x_dtype": (
        TypeError,
        "x must have a floating dtype",
        lambda: _apply(jnp.ones((B, T, D), jnp.int32)),
    ),
    "x_rank": (
        ValueError,
        r"x must have rank 3 \(\[batch, time, d_model\]\)",
        lambda: _apply(_x(0, (T, D))),
    ),
    "x_width": (
        ValueError,
        r"x.shape\[-1\] \(d_model\) must be 16",
        lambda: _apply(_x(0, (B, T, 8))),
    ),
    "segment_dtype": (
        TypeError,
        "segment_ids must have an integer dtype",
        lambda: _apply(segment_ids=jnp.zeros((B, T), jnp.float32)),
    ),
    "segment_shape": (
        ValueError,
        r"segment_ids must have shape \(batch, time\) = \(2, 12\)",
        lambda: _apply(segment_ids=jnp.zeros((B, T + 1), jnp.int32)),
    ),
    "positions_shape": (
        ValueError,
        r"positions must have shape \(batch, time\) = \(2, 12\)",
        lambda: _apply(positions=jnp.zeros((1, T), jnp.int32)),
    ),
    "state_keys": (
        ValueError,
        r"initial_state must be a dict with keys \['index', 's'\]",
        lambda: _apply(initial_state={"s": _STATE["s"]}),
    ),
    "state_shape": (
        ValueError,
        r"initial_state\['s'\] must have shape \(2, 2, 8, 16\)",
        lambda: _apply(initial_state={**_STATE, "s": jnp.zeros((B, 2, 8, 8))}),
    ),
    "step_rank": (
        ValueError,
        r"x_t must have rank 2 \(\[batch, d_model\]\)",
        lambda: decayed.retnet_step(None, _STATE, _x(0), _CFG),
    ),
    "step_state": (
        ValueError,
        r"state must be a dict with keys \['index', 's'\] \(see init_state\); got list",
        lambda: decayed.retnet_step(None, [], _x(0, (B, D)), _CFG),
    ),
}


@pytest.mark.parametrize("case", sorted(APPLY_ERRORS))
def test_bad_input_errors(case):
    exc, match, fn = APPLY_ERRORS[case]
    with pytest.raises(exc, match=match):
        fn()


CONFIG_ERRORS = {
    "d_model": (r"d_model must be positive; got d_model=0", dict(d_model=0, num_heads=2)),
    "num_heads": (r"num_heads must be positive; got num_heads=0", dict(d_model=16, num_heads=0)),
    "divisible": (
        r"d_model=16 must be divisible by num_heads=3",
        dict(d_model=16, num_heads=3),
    ),
    "key_dim": (
        r"key_dim must be positive or None; got key_dim=-2",
        dict(d_model=16, num_heads=2, key_dim=-2),
    ),
    "implementation": (
        r"implementation must be one of \(None, 'pallas', 'xla', 'reference'\); got 'cuda'",
        dict(d_model=16, num_heads=2, implementation="cuda"),
    ),
    "chunk_size": (
        r"chunk_size must be a power of two >= 16",
        dict(d_model=16, num_heads=2, chunk_size=24),
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_shared_config_errors(case):
    match, kwargs = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=match):
        decayed.LightningConfig(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: decayed.RetNetConfig(d_model=16, num_heads=2, key_dim=5),
            r"key_dim must be even with use_rope=True; got 5",
        ),
        (
            lambda: decayed.LightningConfig(d_model=16, num_heads=2, layer_index=3, num_layers=3),
            r"layer_index must be in \[0, num_layers=3\); got layer_index=3",
        ),
        (
            lambda: decayed.LightNetConfig(d_model=16, num_heads=2, gate_low_rank=0),
            r"gate_low_rank must be positive; got 0",
        ),
    ],
    ids=["retnet_rope_odd", "lightning_layer_index", "lightnet_rank"],
)
def test_layer_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
