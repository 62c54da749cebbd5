"""The public API of ``pallas_kernels.linear_attention``: dispatch, return conventions, decoding
steps (prefill + steps == full op) and one test per validation error message."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import api
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.pallas_kernels.linear_attention import cases

F32 = jnp.float32


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist())


def _inputs(key, b=2, t=20, h=2, dk=16, dv=16, gate="head", op="gla"):
    c = cases.Case(b, t, h, dk, dv, gate=gate, op=op, with_initial_state=True)
    return c.make_inputs(key)


def _call(op, x, **kw):
    if op == "gla":
        return api.gated_linear_attention(x["q"], x["k"], x["v"], x["log_decay"], **kw)
    return api.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], **kw)


# ---------------------------------------------------------------------------------------------
# Dispatch and return conventions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,gate", [("gla", "key"), ("gla", "none"), ("delta", "head")])
def test_auto_dispatch_on_cpu_matches_reference(op, gate, key):
    x = _inputs(key, gate=gate, op=op)
    kw = dict(initial_state=x["initial_state"], return_final_state=True)
    o_auto, s_auto = _call(op, x, **kw)
    o_ref, s_ref = _call(op, x, implementation="reference", **kw)
    assert_rel_close(o_auto, o_ref, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "o")
    assert_rel_close(s_auto, s_ref, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "state")


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_return_types_and_dtypes(op, key):
    c = cases.Case(1, 16, 1, 16, 32, gate="head", op=op, dtype="bfloat16")
    x = c.make_inputs(key)
    o = _call(op, x, implementation="xla")
    assert o.shape == (1, 16, 1, 32) and o.dtype == jnp.bfloat16
    o2, s = _call(op, x, implementation="xla", return_final_state=True)
    assert s.shape == (1, 1, 16, 32) and s.dtype == F32
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o2, np.float32))


def test_default_scale_is_inverse_sqrt_key_dim(key):
    x = _inputs(key, gate="none")
    o_default = _call("gla", x, implementation="xla")
    o_explicit = _call("gla", x, implementation="xla", scale=16**-0.5)
    np.testing.assert_allclose(np.asarray(o_default), np.asarray(o_explicit), rtol=1e-6)


def test_numpy_inputs_are_accepted(key):
    x = _inputs(key, gate="head")
    o_np = api.gated_linear_attention(
        np.asarray(x["q"]),
        np.asarray(x["k"]),
        np.asarray(x["v"]),
        np.asarray(x["log_decay"]),
        implementation="xla",
    )
    o_jx = _call("gla", x, implementation="xla")
    np.testing.assert_allclose(np.asarray(o_np), np.asarray(o_jx), rtol=1e-6)


def test_pallas_interpret_through_the_public_api(key):
    x = _inputs(key, t=20, gate="key")
    kw = dict(initial_state=x["initial_state"], return_final_state=True, chunk_size=16)
    o_p, s_p = _call("gla", x, implementation="pallas", interpret=True, **kw)
    o_r, s_r = _call("gla", x, implementation="reference", **kw)
    assert_rel_close(o_p, o_r, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "o")
    assert_rel_close(s_p, s_r, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "state")


def test_jit_with_static_options(key):
    x = _inputs(key, gate="head", op="delta")

    @jax.jit
    def f(q, k, v, beta, g):
        return api.delta_rule(q, k, v, beta, g, implementation="xla", chunk_size=16)

    o = f(x["q"], x["k"], x["v"], x["beta"], x["log_decay"])
    o_ref = _call("delta", x, implementation="reference")
    assert_rel_close(o, o_ref, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "o")


def test_log_decay_check_is_skipped_under_jit(key):
    # Positive log_decay cannot be detected on tracers; the documented behaviour is that the op
    # then computes the (growing) recurrence as written, which must still match the reference.
    x = _inputs(key, t=8, gate="head")
    g = jnp.abs(x["log_decay"]) * 0.01
    f = jax.jit(lambda g: _call("gla", {**x, "log_decay": g}, implementation="xla"))
    f_ref = jax.jit(lambda g: _call("gla", {**x, "log_decay": g}, implementation="reference"))
    o_ref = f_ref(g)
    # Eager calls reject it (see the error tests); under jit it runs.
    assert_rel_close(f(g), o_ref, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "o")


# ---------------------------------------------------------------------------------------------
# Decoding: prefill + steps == full op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,gate",
    [("gla", "none"), ("gla", "head"), ("gla", "key"), ("delta", "none"), ("delta", "head")],
)
def test_prefill_then_steps_equals_full_op(op, gate, key):
    t, prefill = 24, 17
    x = _inputs(key, t=t, gate=gate, op=op)
    full, s_full = _call(
        op, x, implementation="xla", initial_state=x["initial_state"], return_final_state=True
    )

    def part(a, sl):
        return None if a is None else a[:, sl]

    pre = {n: part(x[n], slice(0, prefill)) for n in ("q", "k", "v", "log_decay", "beta")}
    o_pre, state = _call(
        op, pre, implementation="xla", initial_state=x["initial_state"], return_final_state=True
    )
    outs = [o_pre]
    for i in range(prefill, t):
        g_t = None if x["log_decay"] is None else x["log_decay"][:, i]
        if op == "gla":
            o_t, state = api.gated_linear_attention_step(
                x["q"][:, i], x["k"][:, i], x["v"][:, i], g_t, state=state
            )
        else:
            o_t, state = api.delta_rule_step(
                x["q"][:, i], x["k"][:, i], x["v"][:, i], x["beta"][:, i], g_t, state=state
            )
        outs.append(o_t[:, None])
    tol = tolerances.RECURRENT_FORWARD[jnp.dtype(F32)]
    assert_rel_close(jnp.concatenate(outs, axis=1), full, tol, "o")
    assert_rel_close(state, s_full, tol, "state")


def test_step_from_zero_state_equals_first_token(key):
    x = _inputs(key, t=1, gate="key")
    b, _, h, dk = x["q"].shape
    s0 = jnp.zeros((b, h, dk, x["v"].shape[-1]), F32)
    o_t, _ = api.gated_linear_attention_step(
        x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["log_decay"][:, 0], state=s0
    )
    o = _call("gla", x, implementation="reference")
    assert_rel_close(o_t, o[:, 0], 1e-6, "o")


# ---------------------------------------------------------------------------------------------
# Bad input: one test per error message
# ---------------------------------------------------------------------------------------------


def _base(key):
    return _inputs(key, b=1, t=8, h=2, dk=16, dv=8, gate="head", op="delta")


def _gla_args(x, **over):
    args = dict(q=x["q"], k=x["k"], v=x["v"], log_decay=x["log_decay"])
    args.update(over)
    return args


GLA_ERRORS = [
    ("q rank", lambda x: _gla_args(x, q=x["q"][0]), r"q must have rank 4 \[batch, time, heads"),
    ("k rank", lambda x: _gla_args(x, k=x["k"][0]), r"k must have rank 4"),
    ("v rank", lambda x: _gla_args(x, v=x["v"][0]), r"v must have rank 4 .*value_dim"),
    (
        "int q",
        lambda x: _gla_args(x, q=x["q"].astype(jnp.int32)),
        r"q must have a floating dtype.*got int32",
    ),
    (
        "k shape",
        lambda x: _gla_args(x, k=x["k"][:, :, :, :8]),
        r"k must have the shape of q .* = \(1, 8, 2, 16\); got \(1, 8, 2, 8\)",
    ),
    (
        "v prefix",
        lambda x: _gla_args(x, v=x["v"][:, :4]),
        r"v must match q in \[batch, time, heads\] = \(1, 8, 2\)",
    ),
    (
        "mixed dtypes",
        lambda x: _gla_args(x, v=x["v"].astype(jnp.bfloat16)),
        r"q, k and v must have the same dtype",
    ),
    (
        "gate rank",
        lambda x: _gla_args(x, log_decay=x["log_decay"][..., 0]),
        r"log_decay must have rank 3 \[batch, time, heads\] or rank 4",
    ),
    (
        "gate shape",
        lambda x: _gla_args(x, log_decay=x["log_decay"][:, :4]),
        r"log_decay must have shape \[batch, time, heads\] = \(1, 8, 2\)",
    ),
    (
        "positive gate",
        lambda x: _gla_args(x, log_decay=-x["log_decay"]),
        r"log_decay must be <= 0 everywhere",
    ),
    (
        "int gate",
        lambda x: _gla_args(x, log_decay=x["log_decay"].astype(jnp.int32)),
        r"log_decay must have a floating dtype",
    ),
]


@pytest.mark.parametrize("name,make,match", GLA_ERRORS, ids=[e[0] for e in GLA_ERRORS])
def test_gla_bad_input(name, make, match, key):
    args = make(_base(key))
    with pytest.raises(ValueError, match=match):
        api.gated_linear_attention(
            args["q"], args["k"], args["v"], args["log_decay"], implementation="xla"
        )


COMMON_ERRORS = [
    (
        "initial_state shape",
        lambda x: dict(initial_state=x["initial_state"][..., :4]),
        r"initial_state must have shape \[batch, heads, key_dim, value_dim\] = \(1, 2, 16, 8\)",
    ),
    (
        "initial_state dtype",
        lambda x: dict(initial_state=x["initial_state"].astype(jnp.int32)),
        r"initial_state must have a floating dtype",
    ),
    (
        "segment_ids dtype",
        lambda x: dict(segment_ids=jnp.zeros((1, 8), F32)),
        r"segment_ids must have an integer dtype; got float32",
    ),
    (
        "segment_ids shape",
        lambda x: dict(segment_ids=jnp.zeros((1, 7), jnp.int32)),
        r"segment_ids must have shape \[batch, time\] = \(1, 8\)",
    ),
    ("chunk_size", lambda x: dict(chunk_size=24), r"chunk_size must be a power of two >= 16"),
    ("chunk_size small", lambda x: dict(chunk_size=8), r"chunk_size must be a power of two"),
    ("scale", lambda x: dict(scale=np.ones(2)), r"scale must be a scalar; got shape \(2,\)"),
    (
        "implementation",
        lambda x: dict(implementation="triton"),
        r"implementation must be one of .* or None; got 'triton'",
    ),
]


@pytest.mark.parametrize("op", ["gla", "delta"])
@pytest.mark.parametrize("name,make,match", COMMON_ERRORS, ids=[e[0] for e in COMMON_ERRORS])
def test_common_bad_input(op, name, make, match, key):
    x = _base(key)
    kw = {"implementation": "xla", **make(x)}
    with pytest.raises(ValueError, match=match):
        _call(op, x, **kw)


DELTA_ERRORS = [
    (
        "beta shape",
        lambda x: dict(beta=x["beta"][..., None]),
        r"beta must have shape \[batch, time, heads\] = \(1, 8, 2\)",
    ),
    (
        "beta dtype",
        lambda x: dict(beta=(x["beta"] > 0.5).astype(jnp.int32)),
        r"beta must have a floating dtype",
    ),
    (
        "per-key gate",
        lambda x: dict(log_decay=jnp.broadcast_to(x["log_decay"][..., None], (1, 8, 2, 16))),
        r"log_decay for the delta rule must have rank 3 \[batch, time, heads\]",
    ),
    (
        "gate shape",
        lambda x: dict(log_decay=x["log_decay"][:, :4]),
        r"log_decay must have shape \[batch, time, heads\] = \(1, 8, 2\)",
    ),
    (
        "positive gate",
        lambda x: dict(log_decay=-x["log_decay"]),
        r"log_decay must be <= 0 everywhere",
    ),
]


@pytest.mark.parametrize("name,make,match", DELTA_ERRORS, ids=[e[0] for e in DELTA_ERRORS])
def test_delta_bad_input(name, make, match, key):
    x = {**_base(key)}
    x.update(make(x))
    with pytest.raises(ValueError, match=match):
        _call("delta", x, implementation="xla")


STEP_ERRORS = [
    (
        "q_t rank",
        lambda s: dict(q_t=s["q_t"][0]),
        r"q_t must have rank 3 \[batch, heads, key_dim\]",
    ),
    (
        "k_t shape",
        lambda s: dict(k_t=s["k_t"][..., :8]),
        r"k_t must have shape \[batch, heads, key_dim\] = \(1, 2, 16\)",
    ),
    (
        "v_t shape",
        lambda s: dict(v_t=s["v_t"][:, :1]),
        r"v_t must have shape \[batch, heads, value_dim\] with \[batch, heads\] = \(1, 2\)",
    ),
    (
        "state shape",
        lambda s: dict(state=s["state"][..., :4]),
        r"state must have shape \[batch, heads, key_dim, value_dim\] = \(1, 2, 16, 8\)",
    ),
    (
        "int state",
        lambda s: dict(state=s["state"].astype(jnp.int32)),
        r"state must have a floating dtype",
    ),
    (
        "gate shape",
        lambda s: dict(log_decay_t=s["log_decay_t"][:, :1]),
        r"log_decay_t must have shape \[batch, heads\] = \(1, 2\) or \[batch, heads, key_dim\]",
    ),
]


def _step_args(key):
    x = _base(key)
    return {
        "q_t": x["q"][:, 0],
        "k_t": x["k"][:, 0],
        "v_t": x["v"][:, 0],
        "log_decay_t": x["log_decay"][:, 0],
        "state": x["initial_state"],
        "beta_t": x["beta"][:, 0],
    }


@pytest.mark.parametrize("name,make,match", STEP_ERRORS, ids=[e[0] for e in STEP_ERRORS])
def test_gla_step_bad_input(name, make, match, key):
    s = _step_args(key)
    s.update(make(s))
    with pytest.raises(ValueError, match=match):
        api.gated_linear_attention_step(
            s["q_t"], s["k_t"], s["v_t"], s["log_decay_t"], state=s["state"]
        )


@pytest.mark.parametrize(
    "name,over,match",
    [
        ("beta_t shape", "beta", r"beta_t must have shape \[batch, heads\] = \(1, 2\)"),
        ("gate shape", "gate", r"log_decay_t must have shape \[batch, heads\] = \(1, 2\)"),
    ],
)
def test_delta_step_bad_input(name, over, match, key):
    s = _step_args(key)
    if over == "beta":
        s["beta_t"] = s["beta_t"][:, :1]
    else:
        s["log_decay_t"] = jnp.broadcast_to(s["log_decay_t"][..., None], (1, 2, 16))
    with pytest.raises(ValueError, match=match):
        api.delta_rule_step(
            s["q_t"], s["k_t"], s["v_t"], s["beta_t"], s["log_decay_t"], state=s["state"]
        )
