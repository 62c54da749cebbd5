"""Delta-rule Pallas kernels (GPU-structured Triton kernels and TPU Mosaic kernels).

Interpret mode on CPU against the float32 token-by-token reference: outputs, final states and
``jax.vjp`` gradients for q, k, v, beta, log_decay and initial_state; plus lowering checks that
run the real Triton and Mosaic lowerings (``jax.export``) on this machine.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._lowering import lower_for
from pallas_kernels.linear_attention import (
    delta_kernel_gpu_prep,
    delta_ops,
    delta_parallel,
    reference,
)
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.pallas_kernels.linear_attention import cases


def _case(*a, **kw) -> cases.Case:
    return cases.Case(*a, op="delta", **kw)


# Default run: few cases (each interpret-mode compile costs seconds on CPU), chosen to cover
# gate / no gate, T not a chunk multiple, initial state, segments, bf16 and a strong gate.
GPU_CASES = [
    _case(2, 37, 1, 16, 16, gate="head", with_initial_state=True, with_segments=True),
    _case(1, 33, 2, 64, 64, gate="none", chunk=32, dtype="bfloat16", with_initial_state=True),
    _case(1, 50, 1, 16, 16, gate="head", chunk=16, decay="strong", with_initial_state=True),
]
# K = 128 exercises the TPU kernels' flat [B, T, H*K] view, V = 24 the transposed one.
TPU_CASES = [
    _case(1, 40, 2, 128, 24, gate="head", chunk=16, with_initial_state=True, with_segments=True),
]


def _inputs(case, key):
    x = case.make_inputs(key)
    args = (x["q"], x["k"], x["v"], x["beta"], x["log_decay"], x["initial_state"])
    return x, args


def _with_vjp(fn, key):
    """jit(args -> (outputs, vjp(random cotangent))); cotangents drawn in float32."""

    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        keys = jax.random.split(key, 2)
        ct = tuple(
            jax.random.normal(kk, o.shape, jnp.float32).astype(o.dtype)
            for kk, o in zip(keys, out, strict=True)
        )
        return out, vjp(ct)

    return jax.jit(run)


def _check(case, key, backend):
    x, args = _inputs(case, key)

    def pallas(q, k, v, beta, g, s0):
        return delta_ops.delta_rule_pallas(
            q,
            k,
            v,
            beta,
            g,
            s0,
            x["segment_ids"],
            scale=x["scale"],
            chunk_size=case.chunk,
            interpret=True,
            backend=backend,
        )

    def ref(q, k, v, beta, g, s0):
        return reference.delta_rule(
            q, k, v, beta, g, scale=x["scale"], initial_state=s0, segment_ids=x["segment_ids"]
        )

    ct_key = jax.random.fold_in(key, 1)
    (o, s), grads = _with_vjp(pallas, ct_key)(*args)
    (o_ref, s_ref), grads_ref = _with_vjp(ref, ct_key)(*args)
    dtype = jnp.dtype(case.dtype)
    assert o.dtype == dtype and s.dtype == jnp.float32
    assert_rel_close(o, o_ref, tolerances.forward(dtype), "o")
    assert_rel_close(s, s_ref, tolerances.forward(dtype), "final_state")
    names = ("dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")
    for name, gr, gr_ref in zip(names, grads, grads_ref, strict=True):
        if gr_ref is None:
            assert gr is None, name
            continue
        assert gr.dtype == gr_ref.dtype or name in ("dq", "dk", "dv"), name
        assert_rel_close(gr, gr_ref, tolerances.grad(dtype), name)


@pytest.mark.parametrize("case", GPU_CASES, ids=cases.ids)
def test_gpu_kernels_match_reference(case, key):
    _check(case, key, "gpu")


@pytest.mark.parametrize("case", TPU_CASES, ids=cases.ids)
def test_tpu_kernels_match_reference(case, key):
    _check(case, key, "tpu")


@pytest.mark.parametrize("chunk", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_gpu_prepare_kernel_matches_batched_solve(chunk, key):
    """The blocked (16 x 16 substitution + block substitution) inverse at C = 64 / 128."""
    case = _case(2, 2 * chunk, 2, 32, 16, gate="head", chunk=chunk, with_segments=True)
    x = case.make_inputs(key)
    R = reference.segment_runs(x["segment_ids"], case.B, case.T)
    R = R.reshape(case.B, -1, chunk)
    R = (R - R[..., :1]).reshape(case.B, case.T)  # within-chunk reset counts
    g = x["log_decay"]
    G = jnp.cumsum(g.reshape(case.B, -1, chunk, case.H), axis=2)
    G = G.reshape(case.B, case.T, case.H).transpose(0, 2, 1)
    w, ut = jax.jit(
        lambda k, v, beta, G, R: delta_kernel_gpu_prep.prepare(
            k, v, beta.transpose(0, 2, 1), G, R, chunk=chunk, heads=case.H, interpret=True
        )
    )(x["k"], x["v"], x["beta"], G, R)
    w_ref, ut_ref = delta_parallel.prepare(
        x["k"], x["v"], x["beta"], g, R, chunk=chunk, out_dtype=jnp.float32
    )
    assert_rel_close(w, w_ref, tolerances.forward(jnp.float32), "W")
    assert_rel_close(ut, ut_ref, tolerances.forward(jnp.float32), "Ut")


def test_backend_none_on_cpu_uses_gpu_structured_kernels(key):
    case = _case(1, 16, 1, 16, 16, gate="head")
    x, args = _inputs(case, key)
    o, s = jax.jit(
        lambda *a: delta_ops.delta_rule_pallas(
            *a, None, scale=x["scale"], chunk_size=16, interpret=True
        )
    )(*args)
    o_ref, s_ref = reference.delta_rule(*args[:5], scale=x["scale"])
    assert_rel_close(o, o_ref, tolerances.forward(jnp.float32), "o")
    assert_rel_close(s, s_ref, tolerances.forward(jnp.float32), "final_state")


def test_beta_one_orthonormal_keys_retrieve_values(key):
    """With beta = 1 and orthonormal keys, querying a stored key returns its value exactly."""
    B, T, H, K, V = 1, 16, 1, 16, 16
    kq, kv = jax.random.split(key)
    basis, _ = jnp.linalg.qr(jax.random.normal(kq, (K, K), jnp.float32))
    k = basis[None, :, None, :]  # token t stores key basis[t]
    v = jax.random.normal(kv, (B, T, H, V), jnp.float32)
    beta = jnp.ones((B, T, H), jnp.float32)
    _, s = jax.jit(
        lambda k, v, beta: delta_ops.delta_rule_pallas(
            k, k, v, beta, None, None, None, scale=1.0, chunk_size=16, interpret=True
        )
    )(k, v, beta)
    retrieved = jnp.einsum("tk,kv->tv", basis, s[0, 0], precision="highest")
    assert_rel_close(retrieved, v[0, :, 0], 1e-5, "retrieved")


# ------------------------------------------------------------------------------------------
# Unsupported cases raise NotImplementedError (the api then falls back to the jnp path).
# ------------------------------------------------------------------------------------------


def _tiny(dtype=jnp.float32, K=16, V=16):
    q = jnp.ones((1, 16, 1, K), dtype)
    v = jnp.ones((1, 16, 1, V), dtype)
    beta = jnp.full((1, 16, 1), 0.5, jnp.float32)
    return q, q, v, beta, None, None, None


def test_chunk_not_power_of_two_is_not_implemented():
    with pytest.raises(NotImplementedError, match="chunk_size a power of two"):
        delta_ops.delta_rule_pallas(*_tiny(), scale=1.0, chunk_size=24, interpret=True)


def test_large_head_dim_is_not_implemented():
    with pytest.raises(NotImplementedError, match="head dims up to 256"):
        delta_ops.delta_rule_pallas(*_tiny(K=512), scale=1.0, chunk_size=16, interpret=True)


def test_integer_inputs_are_not_implemented():
    with pytest.raises(NotImplementedError, match="float32/bfloat16/float16"):
        delta_ops.delta_rule_pallas(*_tiny(jnp.int32), scale=1.0, chunk_size=16, interpret=True)


def test_cpu_without_interpret_is_not_implemented():
    with pytest.raises(NotImplementedError, match="only with interpret=True"):
        delta_ops.delta_rule_pallas(*_tiny(), scale=1.0, chunk_size=16, interpret=False)


def test_unknown_backend_is_not_implemented():
    with pytest.raises(NotImplementedError, match="unsupported backend 'metal'"):
        delta_ops.delta_rule_pallas(
            *_tiny(), scale=1.0, chunk_size=16, interpret=True, backend="metal"
        )


# ------------------------------------------------------------------------------------------
# Lowering for the real backends (bf16, a realistic shape), forward and backward.
# ------------------------------------------------------------------------------------------


def _lowering_args(gated: bool, segmented: bool):
    B, T, H, K, V = 2, 1024, 4, 128, 128
    q = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((B, T, H, V), jnp.bfloat16)
    beta = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
    g = beta if gated else None
    s0 = jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)
    seg = jnp.zeros((B, T), jnp.int32) if segmented else None
    return (q, q, v, beta, g, s0), seg


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    "gated,segmented",
    [(True, True), pytest.param(False, False, marks=pytest.mark.slow)],
    ids=["gated_segments", "plain"],
)
def test_lowers_forward_and_backward(platform, gated, segmented):
    args, seg = _lowering_args(gated, segmented)
    backend = "gpu" if platform == "cuda" else "tpu"

    def fwd(q, k, v, beta, g, s0):
        return delta_ops.delta_rule_pallas(
            q,
            k,
            v,
            beta,
            g,
            s0,
            seg,
            scale=128**-0.5,
            chunk_size=64,
            interpret=False,
            backend=backend,
        )

    def loss(*a):
        o, s = fwd(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    argnums = (0, 1, 2, 3, 4, 5) if gated else (0, 1, 2, 3, 5)
    text_f = lower_for(platform, fwd, *args)
    text_b = lower_for(platform, jax.grad(loss, argnums=argnums), *args)
    suffix = "" if platform == "cuda" else "_tpu"
    fwd_kernels = ["delta_state_fwd", "delta_output"]
    if platform == "cuda":
        fwd_kernels.append("delta_prepare")  # the TPU path does the UT transform in jnp
    for name in fwd_kernels:
        assert name + suffix in text_f, name
    for name in ("delta_state_fwd", "delta_state_bwd"):
        assert name + suffix in text_b, name


# ------------------------------------------------------------------------------------------
# Slow sweep: every shared delta case on both kernel families.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", cases.DELTA_CASES, ids=cases.ids)
def test_sweep_shared_cases(case, backend, key):
    _check(case, key, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_sweep_chunk64_bf16_segments(backend, key):
    case = dataclasses.replace(TPU_CASES[0], T=150, chunk=64, dtype="bfloat16", B=2, V=128)
    _check(case, key, backend)
