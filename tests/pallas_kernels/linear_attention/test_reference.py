"""The token-by-token reference against independent oracles: the dense masked form of GLA and
literal float64 numpy loops of both recurrences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import reference
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.pallas_kernels.linear_attention import cases
from tests.pallas_kernels.linear_attention.cases import Case

F32 = jnp.float32


def _numpy_oracle(op, x):
    """Literal float64 loop: S <- exp(g) (I - beta k k^T) S + beta k v^T (delta) or
    S <- diag(exp(g)) S + k v^T (GLA); reset to 0 where the segment id changes."""
    q, k, v = (np.asarray(x[n], np.float64) for n in ("q", "k", "v"))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    g = None if x["log_decay"] is None else np.asarray(x["log_decay"], np.float64)
    seg = None if x["segment_ids"] is None else np.asarray(x["segment_ids"])
    o = np.zeros((b, t, h, dv))
    final = np.zeros((b, h, dk, dv))
    for bi in range(b):
        for hi in range(h):
            s = np.zeros((dk, dv))
            if x["initial_state"] is not None:
                s = np.asarray(x["initial_state"], np.float64)[bi, hi].copy()
            for ti in range(t):
                if seg is not None and ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
                    s = np.zeros((dk, dv))
                if g is None:
                    decay = np.ones((dk, 1))
                elif g.ndim == 3:
                    decay = np.full((dk, 1), np.exp(g[bi, ti, hi]))
                else:
                    decay = np.exp(g[bi, ti, hi])[:, None]
                kt, vt = k[bi, ti, hi], v[bi, ti, hi]
                if op == "gla":
                    s = decay * s + np.outer(kt, vt)
                else:
                    beta = float(x["beta"][bi, ti, hi])
                    s = decay * ((np.eye(dk) - beta * np.outer(kt, kt)) @ s)
                    s = s + beta * np.outer(kt, vt)
                o[bi, ti, hi] = s.T @ (x["scale"] * q[bi, ti, hi])
            final[bi, hi] = s
    return o, final


def _ref(op, x):
    kw = dict(scale=x["scale"], initial_state=x["initial_state"], segment_ids=x["segment_ids"])
    if op == "gla":
        return reference.gated_linear_attention(x["q"], x["k"], x["v"], x["log_decay"], **kw)
    return reference.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], **kw)


ORACLE_CASES = [
    Case(1, 9, 2, 4, 3, gate="none", op="gla"),
    Case(2, 11, 1, 5, 3, gate="head", op="gla", with_initial_state=True, with_segments=True),
    Case(1, 12, 2, 4, 6, gate="key", op="gla", with_initial_state=True, with_segments=True),
    Case(1, 9, 2, 4, 3, gate="none", op="delta", with_initial_state=True),
    Case(2, 11, 1, 5, 3, gate="head", op="delta", with_initial_state=True, with_segments=True),
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: c.id)
def test_reference_matches_float64_loop(case, key):
    x = case.make_inputs(key)
    o, s = _ref(case.op, x)
    o64, s64 = _numpy_oracle(case.op, x)
    assert o.dtype == F32 and s.dtype == F32
    assert_rel_close(o, o64, tolerances.forward(F32), "o")
    assert_rel_close(s, s64, tolerances.forward(F32), "final_state")


DENSE_CASES = [
    Case(1, 20, 2, 8, 4, gate="none"),
    Case(2, 24, 1, 8, 8, gate="head", with_initial_state=True),
    Case(2, 23, 2, 8, 4, gate="key", with_initial_state=True, with_segments=True),
    Case(1, 30, 1, 4, 8, gate="head", with_segments=True, decay="strong"),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c.id)
def test_scan_matches_dense_form_with_gradients(case, key):
    kx, kc = jax.random.split(key)
    x = case.make_inputs(kx)
    names = [n for n in ("q", "k", "v", "log_decay", "initial_state") if x[n] is not None]

    def f_of(fn):
        def f(*args):
            d = {**x, **dict(zip(names, args))}
            return fn(
                d["q"], d["k"], d["v"], d["log_decay"], scale=d["scale"],
                initial_state=d["initial_state"], segment_ids=d["segment_ids"],
            )  # fmt: skip

        return f

    # Concrete cotangents, drawn outside jit.
    shapes = jax.eval_shape(f_of(reference.gated_linear_attention), *[x[n] for n in names])
    ct = jax.tree.map(lambda a: cases.normal(kc, a.shape, a.dtype), shapes)

    def run(fn, ct):
        out, pull = jax.vjp(f_of(fn), *[x[n] for n in names])
        return out, pull(ct)

    (o, s), g = jax.jit(lambda c: run(reference.gated_linear_attention, c))(ct)
    (od, sd), gd = jax.jit(lambda c: run(reference.gated_linear_attention_dense, c))(ct)
    assert_rel_close(o, od, tolerances.forward(F32), "o")
    assert_rel_close(s, sd, tolerances.forward(F32), "final_state")
    for name, a, b in zip(names, g, gd):
        if name == "log_decay" and case.decay == "strong":
            # The dense form's gate gradient is ~exp(-20) and drowns in the rounding of O(1)
            # terms that cancel (exp(G_i - G_i)); the scan is the accurate one here.
            continue
        assert_rel_close(a, b, tolerances.grad(F32), f"d{name}")


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_packed_row_equals_separate_sequences(op, key):
    """A row packing [A | B | C] gives A (with the initial state), B and C run separately."""
    case = Case(1, 21, 2, 8, 4, gate="head", op=op, with_initial_state=True)
    x = case.make_inputs(key)
    bounds = [0, 7, 8, 21]  # includes a one-token segment
    seg = np.zeros((1, 21), np.int32)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[:, lo:hi] = 10 * i + 3  # arbitrary ids
    o, s = _ref(op, {**x, "segment_ids": jnp.asarray(seg)})
    outs = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = {n: (a[:, lo:hi] if n in ("q", "k", "v", "beta", "log_decay") and a is not None
                    else a)
                for n, a in x.items()}  # fmt: skip
        part["initial_state"] = x["initial_state"] if i == 0 else None
        o_i, s_i = _ref(op, part)
        outs.append(o_i)
    assert_rel_close(o, jnp.concatenate(outs, axis=1), tolerances.forward(F32), "o")
    assert_rel_close(s, s_i, tolerances.forward(F32), "final_state")


def test_reappearing_segment_id_starts_a_new_sequence(key):
    """Resets happen at every *change* of id: [0,0,1,1,0,0] is three sequences."""
    case = Case(1, 6, 1, 4, 4, gate="head", with_initial_state=True)
    x = case.make_inputs(key)
    a = _ref("gla", {**x, "segment_ids": jnp.asarray([[0, 0, 1, 1, 0, 0]], jnp.int32)})
    b = _ref("gla", {**x, "segment_ids": jnp.asarray([[5, 5, 6, 6, 7, 7]], jnp.int32)})
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    runs = reference.segment_runs(jnp.asarray([[0, 0, 1, 1, 0, 0]], jnp.int32), 1, 6)
    np.testing.assert_array_equal(np.asarray(runs), [[0, 0, 1, 1, 2, 2]])


def test_no_decay_closed_form(key):
    case = Case(2, 19, 2, 8, 4, gate="none")
    x = case.make_inputs(key)
    o, s = _ref("gla", x)
    t = case.T
    causal = jnp.tril(jnp.ones((t, t), F32))[None, None]
    scores = causal * jnp.einsum("bihk,bjhk->bhij", x["q"], x["k"]) * x["scale"]
    assert_rel_close(o, jnp.einsum("bhij,bjhv->bihv", scores, x["v"]), tolerances.forward(F32))
    assert_rel_close(s, jnp.einsum("bthk,bthv->bhkv", x["k"], x["v"]), tolerances.forward(F32))


def test_delta_rule_with_zero_beta_only_decays(key):
    """beta = 0: no writes, S_t = exp(G_t) S_0 and o_t = exp(G_t) S_0^T (scale q_t)."""
    case = Case(1, 10, 2, 4, 3, gate="head", op="delta", with_initial_state=True)
    x = case.make_inputs(key)
    x["beta"] = jnp.zeros_like(x["beta"])
    o, s = _ref("delta", x)
    big_g = jnp.cumsum(x["log_decay"], axis=1)  # [b, t, h]
    expected = jnp.exp(big_g)[..., None] * jnp.einsum(
        "bthk,bhkv->bthv", x["q"] * x["scale"], x["initial_state"]
    )
    assert_rel_close(o, expected, tolerances.forward(F32), "o")
    final = jnp.exp(big_g[:, -1])[..., None, None] * x["initial_state"]
    assert_rel_close(s, final, tolerances.forward(F32), "final_state")


def test_delta_rule_orthonormal_keys_retrieve_values(key):
    b, h, dk, dv = 1, 2, 8, 5
    ks = jax.random.split(key, 3)
    basis = jnp.linalg.qr(cases.normal(ks[0], (b * h, dk, dk), F32))[0]
    k = jnp.transpose(basis, (0, 2, 1)).reshape(b, h, dk, dk).transpose(0, 2, 1, 3)
    v = cases.normal(ks[1], (b, dk, h, dv), F32)
    s0 = cases.normal(ks[2], (b, h, dk, dv), F32)
    o, s = reference.delta_rule(k, k, v, jnp.ones((b, dk, h), F32), scale=1.0, initial_state=s0)
    np.testing.assert_allclose(np.asarray(o), np.asarray(v), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jnp.einsum("bhkv,bthk->bthv", s, k)), np.asarray(v), atol=1e-5
    )


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_bf16_inputs_are_computed_in_float32(op, key):
    case = Case(1, 8, 1, 4, 4, gate="head", op=op, dtype="bfloat16")
    x = case.make_inputs(key)
    o, s = _ref(op, x)
    o32, s32 = _ref(op, {**x, **{n: x[n].astype(F32) for n in ("q", "k", "v")}})
    assert o.dtype == F32 and s.dtype == F32
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o32))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s32))
