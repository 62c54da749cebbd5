"""GLA, HGRN-2, ReGLA and the Mamba-2 scalar gate against float64 numpy loops over an explicit
state matrix (the papers' recurrences); packed sequences; state hand-over; special cases; bad
configs. Shared helpers come from ``test_decayed.py``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.linear_attention import gated
from tests.jaxlayers.linear_attention.test_decayed import (
    D,
    _check_naive,
    _check_state_handover,
    _heads,
    _lin,
    _norm,
    _sigmoid,
    _silu,
)

# --------------------------------------------------------------------------------------------
# Naive float64 recurrences (one sequence x [t, d])
# --------------------------------------------------------------------------------------------


def _loop(q, k, v, decay, scale):
    """``S_t = decay_t[:, :, None] * S_{t-1} + k_t v_t^T``; ``o_t = S_t^T (scale q_t)``.
    ``decay [t, h, k]`` (per key dim) or ``[t, h, 1]`` (per head)."""
    t, h, dk = q.shape
    s = np.zeros((h, dk, v.shape[-1]))
    o = np.zeros((t, h, v.shape[-1]))
    for i in range(t):
        s = decay[i][:, :, None] * s + k[i][:, :, None] * v[i][:, None, :]
        o[i] = np.einsum("hk,hkv->hv", scale * q[i], s)
    return o


def _naive_gla(p, x, cfg, start=0):
    h = cfg.num_heads
    q, k, v = (_heads(_lin(p, n, x), h) for n in ("q", "k", "v"))
    alpha = _sigmoid(_lin(p, "decay_up", _lin(p, "decay_down", x))) ** (1.0 / cfg.gate_normalizer)
    o = _loop(q, k, v, _heads(alpha, h), cfg.dk**-0.5)
    y = _norm(o, cfg.norm_eps, per_head=True, centered=False, **p["norm"])
    return (y * _silu(_lin(p, "gate", x))) @ p["o"]["kernel"]


def _naive_plain_linear_attention_gla_output(p, x, cfg, start=0):
    """GLA's output stage over causal linear attention without decay (parallel form)."""
    h, t = cfg.num_heads, x.shape[0]
    q, k, v = (_heads(_lin(p, n, x), h) for n in ("q", "k", "v"))
    mask = np.tril(np.ones((t, t)))
    o = np.einsum("tsh,shv->thv", np.einsum("thk,shk->tsh", q, k) * mask[:, :, None], v)
    y = _norm(o * cfg.dk**-0.5, cfg.norm_eps, per_head=True, centered=False, **p["norm"])
    return (y * _silu(_lin(p, "gate", x))) @ p["o"]["kernel"]


def _naive_hgrn2(p, x, cfg, start=0):
    h, beta = cfg.num_heads, cfg.lower_bound
    f = beta + (1.0 - beta) * _sigmoid(_lin(p, "forget", x))
    q = _silu(_lin(p, "q", x))
    o = _loop(
        _heads(q, h), _heads(1.0 - f, h), _heads(_lin(p, "input", x), h), _heads(f, h), cfg.dk**-0.5
    )
    return _norm(o, cfg.norm_eps, per_head=False, centered=False, **p["norm"]) @ p["o"]["kernel"]


def _naive_regla(p, x, cfg, start=0):
    """The paper's equations: keys shifted by their maximum over all positions and dims."""
    h = cfg.num_heads
    q, k, v = (_heads(_lin(p, n, x), h) for n in ("q", "k", "v"))
    phi_q = np.exp(q - q.max(-1, keepdims=True))
    phi_k = np.exp(k - k.max(axis=(0, 2))[None, :, None])
    g, r = _sigmoid(_lin(p, "forget", x)), _sigmoid(_lin(p, "refine", x))
    f = (1.0 - r) * g**2 + r * (1.0 - (1.0 - g) ** 2)
    alpha = 1.0 / (math.e * math.sqrt(cfg.dk * (math.e**2 - 1.0)))
    o = _loop(phi_q, phi_k, v, _heads(f, h), alpha)
    return _norm(o, cfg.norm_eps, per_head=True, centered=True, **p["norm"]) @ p["o"]["kernel"]


def _naive_mamba2(p, x, cfg, start=0):
    h, ng = cfg.num_heads, cfg.num_groups
    z, u = _lin(p, "z", x), _heads(_silu(_lin(p, "x", x)), h)
    bm, cm = _heads(_silu(_lin(p, "b", x)), ng), _heads(_silu(_lin(p, "c", x)), ng)
    dt = np.log1p(np.exp(_lin(p, "dt", x) + p["dt_bias"]))  # softplus, [t, h]
    a = -np.exp(p["a_log"])
    t = x.shape[0]
    y = np.zeros((t, h, cfg.dv))
    for n in range(h):
        grp = n // (h // ng)
        s = np.zeros((cfg.dk, cfg.dv))
        for i in range(t):
            s = np.exp(dt[i, n] * a[n]) * s + dt[i, n] * np.outer(bm[i, grp], u[i, n])
            y[i, n] = cm[i, grp] @ s + p["d_skip"][n] * u[i, n]
    y = y.reshape(t, -1) * _silu(z)
    return (
        _norm(y.reshape(t, h, -1), cfg.norm_eps, per_head=False, centered=False, **p["norm"])
        @ p["o"]["kernel"]
    )


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

_COMMON = dict(d_model=D, chunk_size=16)
CASES = {
    "gla": (_naive_gla, gated.GLAConfig(num_heads=2, gate_low_rank=3, **_COMMON)),
    "gla_gate_normalizer_1": (
        _naive_gla,
        gated.GLAConfig(num_heads=4, gate_low_rank=3, gate_normalizer=1.0, value_dim=3, **_COMMON),
    ),
    "hgrn2": (_naive_hgrn2, gated.HGRN2Config(num_heads=2, **_COMMON)),
    "hgrn2_lower_bound": (_naive_hgrn2, gated.HGRN2Config(num_heads=4, lower_bound=0.7, **_COMMON)),
    # eps -> 0: the running key maximum and the paper's global one then give the same output.
    "regla": (_naive_regla, gated.ReGLAConfig(num_heads=2, norm_eps=1e-12, **_COMMON)),
    "mamba2": (_naive_mamba2, gated.Mamba2Config(num_heads=2, key_dim=4, **_COMMON)),
    "mamba2_groups": (
        _naive_mamba2,
        gated.Mamba2Config(num_heads=4, num_groups=2, key_dim=4, value_dim=4, **_COMMON),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_paper_equations_with_packed_sequences(case):
    naive, cfg = CASES[case]
    _check_naive(naive, cfg, seed=len(case))


def test_regla_initial_state_and_final_state_with_segments():
    # ReGLA carries the running key maximum besides "s".
    _check_state_handover(CASES["regla"][1], seed=11)


def test_gla_with_gate_one_is_plain_linear_attention():
    cfg = CASES["gla"][1]

    def open_gate(p):  # logsigmoid(60) / 16 == 0 in float32
        up = {
            "kernel": jnp.zeros_like(p["decay_up"]["kernel"]),
            "bias": jnp.full_like(p["decay_up"]["bias"], 60.0),
        }
        return {**p, "decay_up": up}

    _check_naive(_naive_plain_linear_attention_gla_output, cfg, seed=2, tweak=open_gate)


def test_regla_refined_gate_formula():
    a = jnp.asarray([-40.0, -5.0, -0.3, 0.0, 2.0, 9.0, 40.0], jnp.float32)
    c = jnp.asarray([-40.0, 3.0, 0.5, 0.0, -2.0, 1.0, 40.0], jnp.float32)
    got = np.asarray(gated.refined_log_forget(a, c), np.float64)
    g, r = _sigmoid(np.asarray(a, np.float64)), _sigmoid(np.asarray(c, np.float64))
    # 1 - (1 - g)^2 written as g (2 - g): float64 loses it for g = sigmoid(-40) otherwise.
    want = np.log((1 - r) * g**2 + r * g * (2 - g))
    assert np.all(got <= 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # The refining gate keeps a gradient where the plain sigmoid gate saturates.
    grad = jax.grad(lambda a: jnp.sum(jnp.exp(gated.refined_log_forget(a, jnp.zeros_like(a)))))
    assert float(grad(jnp.asarray([12.0]))[0]) > 1e-6


def test_regla_empty_state_and_variance_scale():
    cfg = CASES["regla"][1]
    state = gated.init_state(cfg, 3)
    assert state["key_max"].shape == (3, 2) and np.all(np.isneginf(np.asarray(state["key_max"])))
    assert gated.regla_variance_scale(8) == pytest.approx(
        1 / (math.e * math.sqrt(8 * (math.e**2 - 1)))
    )


CONFIG_ERRORS = {
    "gla_rank": (
        lambda: gated.GLAConfig(d_model=16, num_heads=2, gate_low_rank=0),
        r"gate_low_rank must be positive; got 0",
    ),
    "gla_normalizer": (
        lambda: gated.GLAConfig(d_model=16, num_heads=2, gate_normalizer=0.0),
        r"gate_normalizer must be > 0; got 0.0",
    ),
    "hgrn2_lower_bound": (
        lambda: gated.HGRN2Config(d_model=16, num_heads=2, lower_bound=1.0),
        r"lower_bound must be in \[0, 1\); got 1.0",
    ),
    "mamba2_groups": (
        lambda: gated.Mamba2Config(d_model=16, num_heads=2, num_groups=3),
        r"num_heads=2 must be divisible by num_groups=3",
    ),
    "mamba2_dt": (
        lambda: gated.Mamba2Config(d_model=16, num_heads=2, dt_min=0.2, dt_max=0.1),
        r"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got 0.2, 0.1",
    ),
    "mamba2_a_init": (
        lambda: gated.Mamba2Config(d_model=16, num_heads=2, a_init_range=(0.0, 16.0)),
        r"a_init_range must satisfy 0 < lo <= hi; got \(0.0, 16.0\)",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors(case):
    make, match = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=match):
        make()


def test_state_errors_name_the_layer_keys():
    cfg = CASES["regla"][1]
    x = jnp.zeros((2, 4, D), jnp.float32)
    with pytest.raises(
        ValueError, match=r"initial_state must be a dict with keys \['key_max', 's'\]"
    ):
        gated.regla_apply(None, x, cfg, initial_state={"s": gated.init_state(cfg, 2)["s"]})
