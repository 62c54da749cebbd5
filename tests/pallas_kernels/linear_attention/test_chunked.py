"""The chunked jnp path (``xla.py``) against the token-by-token reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import reference, xla, xla_gate
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.pallas_kernels.linear_attention import cases
from tests.pallas_kernels.linear_attention.cases import Case

F32 = jnp.float32


def _run(impl, case: Case, x: dict, **over):
    """Call ``impl``'s op for ``case`` with inputs ``x`` (entries in ``over`` replace them)."""
    x = {**x, **over}
    kw = dict(scale=x["scale"], initial_state=x["initial_state"], segment_ids=x["segment_ids"])
    if impl is xla:
        kw["chunk_size"] = case.chunk
    if case.op == "gla":
        return impl.gated_linear_attention(x["q"], x["k"], x["v"], x["log_decay"], **kw)
    return impl.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], **kw)


def _diff_names(case: Case, x: dict) -> list[str]:
    names = ["q", "k", "v"]
    names += [n for n in ("beta", "log_decay", "initial_state") if x[n] is not None]
    return names


def _vjp(impl, case, x, ct):
    """Outputs and input cotangents of ``impl`` for cotangent ``ct``, under one jit."""
    names = _diff_names(case, x)
    rest = {n: a for n, a in x.items() if n not in names and n != "scale"}

    @jax.jit
    def run(args, rest, ct):
        def f(*a):
            return _run(impl, case, {**x, **rest, **dict(zip(names, a))})

        out, pullback = jax.vjp(f, *args)
        return out, pullback(ct)

    out, grads = run([x[n] for n in names], rest, ct)
    return out, dict(zip(names, grads))


def _check_against_reference(case: Case, key, grads=True):
    kx, kc = jax.random.split(key)
    x = case.make_inputs(kx)
    dtype = jnp.dtype(case.dtype)
    # Both paths compute in float32 from the same (possibly bf16) inputs: they differ only by
    # summation order, so the float32 forward tolerance applies to the outputs.
    tol_f = tolerances.RECURRENT_FORWARD[jnp.dtype(F32)]
    if not grads:
        (o, s), (o_ref, s_ref) = jax.jit(lambda x: (_run(xla, case, x), _run(reference, case, x)))(
            x
        )
        assert o.dtype == F32 and s.dtype == F32
        assert_rel_close(o, o_ref, tol_f, "o")
        assert_rel_close(s, s_ref, tol_f, "final_state")
        return
    o_ref, s_ref = _run(reference, case, x)
    ct = (
        cases.normal(kc, o_ref.shape, F32),
        cases.normal(jax.random.fold_in(kc, 1), s_ref.shape, F32),
    )
    (o, s), g = _vjp(xla, case, x, ct)
    (o_ref, s_ref), g_ref = _vjp(reference, case, x, ct)
    assert_rel_close(o, o_ref, tol_f, "o")
    assert_rel_close(s, s_ref, tol_f, "final_state")
    for name in g:
        # q, k, v cotangents come back in the input dtype (bf16 rounding for bf16 inputs).
        tol = tolerances.grad(dtype if name in ("q", "k", "v") else F32)
        assert g[name].dtype == x[name].dtype
        assert_rel_close(g[name], g_ref[name], tol, f"d{name}")


# Compiles dominate the run time (~10 s per case with gradients on a loaded 2-core machine),
# so the default run covers every feature once and the remaining shared cases run with -m slow.
_QUICK = {
    "gla_B2T37H1K16V16_gate-key_C16_float32_s0_seg",
    "gla_B1T48H2K16V16_gate-head_C32_float32_s0",
    "delta_B2T37H1K16V16_gate-head_C16_float32_s0_seg",
    "delta_B1T64H2K32V32_gate-none_C32_float32_seg",
}


def _split_quick(all_cases):
    return [
        pytest.param(c, id=c.id, marks=() if c.id in _QUICK else pytest.mark.slow)
        for c in all_cases
    ]


@pytest.mark.parametrize("case", _split_quick(cases.ALL_CASES))
def test_xla_matches_reference(case, key):
    _check_against_reference(case, key)


# Chunk sizes and head dims, forward only (gradients are covered by the cases above).
SWEEP = [
    Case(1, 100, 1, 64, 64, gate="key", chunk=64, with_initial_state=True, with_segments=True),
    pytest.param(Case(1, 65, 1, 128, 64, gate="head", chunk=64), marks=pytest.mark.slow),
    Case(1, 33, 2, 64, 64, gate="key", chunk=32, dtype="bfloat16", with_initial_state=True),
    Case(1, 40, 1, 128, 128, gate="head", chunk=16, op="delta", dtype="bfloat16"),
    pytest.param(
        Case(2, 45, 2, 16, 32, gate="key", chunk=16, with_initial_state=True),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Case(1, 70, 2, 32, 16, gate="head", chunk=32, with_segments=True), marks=pytest.mark.slow
    ),
    pytest.param(
        Case(1, 50, 1, 32, 32, gate="none", chunk=32, op="delta", with_segments=True),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Case(1, 100, 2, 64, 32, gate="head", chunk=64, op="delta", with_initial_state=True),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Case(1, 70, 1, 256, 256, gate="head", chunk=64, op="gla", with_initial_state=True),
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("case", SWEEP, ids=cases.ids)
def test_chunk_and_head_dim_sweep(case, key):
    """Forward outputs and final states over chunk sizes 16/32/64, head dims 16..256, bf16."""
    _check_against_reference(case, key, grads=False)


def test_head_dim_256(key):
    """One head-dim-256 case in the default run (forward; gradients in the slow sweep)."""
    case = Case(1, 20, 1, 256, 256, gate="key", chunk=16, with_initial_state=True)
    _check_against_reference(case, key, grads=False)


SLOW_SWEEP = [
    Case(2, 300, 2, 256, 64, gate="key", chunk=64, with_initial_state=True),
    Case(1, 257, 2, 256, 256, gate="head", chunk=32, op="delta", with_segments=True),
    Case(2, 513, 4, 64, 64, gate="key", chunk=64, with_segments=True, with_initial_state=True),
    Case(2, 513, 4, 64, 64, gate="head", chunk=64, op="delta", with_initial_state=True),
    Case(1, 200, 2, 128, 128, gate="key", chunk=32, dtype="bfloat16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_SWEEP, ids=cases.ids)
def test_large_sweep(case, key):
    _check_against_reference(case, key)


@pytest.mark.parametrize(
    "limit",
    [
        pytest.param(0.0, id="exact-tree"),
        # Also covered by every mild per-key case above.
        pytest.param(np.inf, id="fast-single-reference", marks=pytest.mark.slow),
    ],
)
def test_key_gate_forms_are_invisible(limit, key, monkeypatch):
    """Both per-key intra-chunk forms (forced for every chunk) give the reference's outputs and
    gradients on mild decays (where the single-reference form is safe)."""
    monkeypatch.setattr(xla_gate, "LIMIT", limit)
    case = Case(1, 40, 2, 16, 16, gate="key", chunk=16, with_initial_state=True)
    _check_against_reference(case, key)


def test_key_gate_form_is_chosen_per_chunk(key):
    """One chunk with strong decay (exact form) among mild ones (fast form): still exact."""
    case = Case(1, 64, 1, 16, 16, gate="key", chunk=16, with_initial_state=True)
    x = case.make_inputs(key)
    g = np.array(x["log_decay"])
    g[:, 16:32] = -20.0 + np.tanh(g[:, 16:32])  # chunk 1: total decay ~ -320 per key dim
    x = {**x, "log_decay": jnp.asarray(g)}
    big_g = jnp.cumsum(x["log_decay"].reshape(1, 4, 16, 1, 16), axis=2)
    span = jnp.max(jnp.abs(big_g - 0.5 * big_g[:, :, -1:]), axis=(0, 2, 3, 4))
    assert float(span[1]) > xla_gate.LIMIT > float(jnp.max(span[jnp.array([0, 2, 3])]))
    o_ref, s_ref = _run(reference, case, x)
    ct = (cases.normal(key, o_ref.shape, F32), cases.normal(key, s_ref.shape, F32))
    (o, s), g_xla = _vjp(xla, case, x, ct)
    _, g_ref = _vjp(reference, case, x, ct)
    assert_rel_close(o, o_ref, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "o")
    assert_rel_close(s, s_ref, tolerances.RECURRENT_FORWARD[jnp.dtype(F32)], "final_state")
    for name in g_xla:
        assert_rel_close(g_xla[name], g_ref[name], tolerances.grad(F32), f"d{name}")


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_traced_scale_gradients(op, key):
    """A traced ``scale`` (an array under jit) is differentiated like the reference."""
    case = Case(1, 20, 1, 16, 16, gate="head", chunk=16, op=op)
    x = case.make_inputs(key)

    def loss(impl, q, scale):
        o, _ = _run(impl, case, {**x, "q": q, "scale": scale})
        return jnp.sum(o * x["v"])

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    scale = jnp.asarray(0.3, F32)
    for got, want, name in zip(
        grad(xla, x["q"], scale), grad(reference, x["q"], scale), ("dq", "dscale"), strict=True
    ):
        assert_rel_close(got, want, tolerances.grad(F32), name)


# ---------------------------------------------------------------------------------------------
# Strong decays: naive exp(cumsum) over a chunk under/overflows; the chunked path must not.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,gate",
    [
        ("gla", "key"),
        pytest.param("delta", "head", marks=pytest.mark.slow),
        pytest.param("gla", "head", marks=pytest.mark.slow),
    ],
)
def test_strong_decay_is_finite_and_exact(op, gate, key):
    """Outputs, states and all gradients (incl. log_decay, ~exp(g) small) match the reference.

    The gate gradient is the delicate one: it is ~exp(-20) and must not drown in the rounding
    of O(1) terms (see ``xla._pair_decay``).
    """
    case = Case(
        1,
        128,
        1,
        16,
        16,
        gate=gate,
        chunk=64,
        op=op,
        decay="strong",
        with_initial_state=True,
        with_segments=True,
    )
    x = case.make_inputs(key)
    big_g = jnp.cumsum(x["log_decay"][:, :64], axis=1)
    # The premise: over one chunk of 64 steps at ~-20 per step exp(-G) overflows, exp(G) is 0.
    assert not np.all(np.isfinite(np.asarray(jnp.exp(-big_g))))
    assert float(jnp.max(jnp.exp(big_g[:, -1]))) == 0.0
    _check_against_reference(case, key)


# ---------------------------------------------------------------------------------------------
# Closed forms.
# ---------------------------------------------------------------------------------------------


def test_no_decay_equals_masked_attention(key):
    b, t, h, dk, dv = 2, 50, 2, 16, 32
    kq, kk, kv = jax.random.split(key, 3)
    q = cases.normal(kq, (b, t, h, dk), F32)
    k = cases.normal(kk, (b, t, h, dk), F32)
    v = cases.normal(kv, (b, t, h, dv), F32)
    scale = 0.3
    causal = jnp.tril(jnp.ones((t, t), F32))[None, None]
    scores = causal * jnp.einsum("bihk,bjhk->bhij", q, k)
    expected = jnp.einsum("bhij,bjhv->bihv", scores * scale, v)
    o, _ = jax.jit(lambda q, k, v: xla.gated_linear_attention(q, k, v, scale=scale, chunk_size=16))(
        q, k, v
    )
    assert_rel_close(o, expected, tolerances.forward(F32))


def orthonormal_keys(key, b, h, dk):
    """[b, dk, h, dk]: for each (batch, head), the dk rows of a random orthogonal matrix."""
    basis = jnp.linalg.qr(cases.normal(key, (b * h, dk, dk), F32))[0]
    return jnp.transpose(basis, (0, 2, 1)).reshape(b, h, dk, dk).transpose(0, 2, 1, 3)


def test_delta_rule_orthonormal_keys_retrieve_values(key):
    """beta = 1 overwrites the value stored under an orthonormal key exactly (S^T k_j = v_j),
    whatever the initial state held."""
    b, h, dk, dv = 1, 2, 32, 16
    ks = jax.random.split(key, 3)
    k = orthonormal_keys(ks[0], b, h, dk)  # t = dk writes
    v = cases.normal(ks[1], (b, dk, h, dv), F32)
    s0 = cases.normal(ks[2], (b, h, dk, dv), F32)
    beta = jnp.ones((b, dk, h), F32)
    o, s = jax.jit(
        lambda k, v, beta, s0: xla.delta_rule(
            k, k, v, beta, scale=1.0, initial_state=s0, chunk_size=16
        )
    )(k, v, beta, s0)
    # o_t = S_t^T k_t retrieves v_t at the step it is written ...
    np.testing.assert_allclose(np.asarray(o), np.asarray(v), atol=2e-5)
    # ... and every value is still there at the end (later writes are orthogonal).
    read = jnp.einsum("bhkv,bthk->bthv", s, k)
    np.testing.assert_allclose(np.asarray(read), np.asarray(v), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Internals.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [32, 24], ids=["doubling", "substitution"])
def test_unit_lower_inverse_and_its_gradient(c, key):
    ka, kc = jax.random.split(key)
    # Entries of the size the delta rule produces (|beta k_i.k_j| < 1 for unit keys).
    a = 0.3 * cases.normal(ka, (3, c, c), F32)
    ct = cases.normal(kc, (3, c, c), F32)
    eye = jnp.eye(c, dtype=F32)[None]
    y, pull = jax.vjp(xla.unit_lower_inverse, a)
    y_ref, pull_ref = jax.vjp(lambda a: jnp.linalg.inv(eye + jnp.tril(a, -1)), a)
    assert_rel_close(y, y_ref, tolerances.forward(F32), "inverse")
    assert_rel_close(pull(ct)[0], pull_ref(ct)[0], tolerances.grad(F32), "d_a")
