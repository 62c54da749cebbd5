"""Pallas GLA kernels (GPU/Triton-structured and TPU/Mosaic) vs the float32 reference scan.

The kernels run in the Pallas interpreter on CPU (compile time dominates: a few cases run by
default, the full sweep is ``-m slow``). Lowering tests run the real Triton (``cuda``) and
Mosaic (``tpu``) lowering of forward and backward at a realistic bf16 shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._lowering import lower_for
from pallas_kernels.linear_attention import gla_ops, reference
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.pallas_kernels.linear_attention import cases
from tests.pallas_kernels.linear_attention.cases import Case

# Default run: the per-key gate with chunk 32 (two 16-row sub-chunks) and "mixed" decays (the
# first quarter strong, the rest mild; with T=45 the first chunk is strong and the second mild),
# so one call runs both the exact sub-chunk form and the one-matmul form; plus the scalar gate
# under strong decay with segments.
FAST_GPU = [
    Case(2, 45, 2, 16, 16, gate="key", chunk=32, with_initial_state=True, with_segments=True),
    Case(1, 50, 1, 16, 16, gate="head", chunk=32, decay="strong", with_segments=True),
]
FAST_TPU = [
    Case(1, 45, 2, 16, 32, gate="key", chunk=32, with_initial_state=True, with_segments=True),
]
EXTRA = [
    Case(1, 100, 2, 32, 16, gate="key", chunk=64, with_initial_state=True),
    Case(1, 100, 1, 16, 16, gate="key", chunk=64, decay="strong", with_segments=True),
    Case(2, 70, 2, 32, 32, gate="none", chunk=32, with_initial_state=True, with_segments=True),
    Case(1, 64, 2, 64, 32, gate="head", chunk=64, dtype="bfloat16", with_initial_state=True),
    Case(1, 48, 1, 32, 64, gate="key", chunk=32, dtype="bfloat16", with_segments=True),
]
SLOW = cases.GLA_CASES + EXTRA
SLOW_KEY = [c for c in SLOW if c.gate == "key" and c.decay == "mild"]


def _mixed_decay(x):
    """Strong decay (about -20 per step) on the first quarter of the sequence, mild on the rest."""
    g = x["log_decay"]
    t = g.shape[1]
    strong = -20.0 + 5.0 * jnp.tanh(g)
    first = (jnp.arange(t) < t // 4).reshape((1, t) + (1,) * (g.ndim - 2))
    return dict(x, log_decay=jnp.where(first, strong, g))


def _check(case: Case, key, backend: str, mixed: bool = False):
    x = case.make_inputs(key)
    if mixed:
        x = _mixed_decay(x)
    seg = x["segment_ids"]

    def pallas(q, k, v, g, s0):
        return gla_ops.gated_linear_attention_pallas(
            q,
            k,
            v,
            g,
            s0,
            seg,
            scale=x["scale"],
            chunk_size=case.chunk,
            interpret=True,
            backend=backend,
        )

    def ref(q, k, v, g, s0):
        return reference.gated_linear_attention(
            q, k, v, g, scale=x["scale"], initial_state=s0, segment_ids=seg
        )

    primals = (x["q"], x["k"], x["v"], x["log_decay"], x["initial_state"])
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    do = jax.random.normal(k1, x["v"].shape, jnp.float32)
    ds = jax.random.normal(k2, (case.B, case.H, case.K, case.V), jnp.float32)

    @jax.jit
    def run(primals, do, ds):
        (o, s), vjp = jax.vjp(pallas, *primals)
        (o_ref, s_ref), vjp_ref = jax.vjp(ref, *primals)
        return o, s, vjp((do.astype(o.dtype), ds)), o_ref, s_ref, vjp_ref((do, ds))

    o, s, grads, o_ref, s_ref, grads_ref = run(primals, do, ds)
    assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
    assert o.shape == x["v"].shape and s.shape == (case.B, case.H, case.K, case.V)
    dtype = x["q"].dtype
    assert_rel_close(o, o_ref, tolerances.forward(dtype), "o")
    assert_rel_close(s, s_ref, tolerances.forward(dtype), "final_state")
    for name, g, g_ref in zip(("q", "k", "v", "log_decay", "initial_state"), grads, grads_ref):
        if g_ref is None:
            assert g is None
            continue
        assert g.dtype == g_ref.dtype or name in "qkv", (name, g.dtype)
        assert_rel_close(g, g_ref, tolerances.grad(dtype), f"d{name}")


@pytest.mark.parametrize("case", FAST_GPU, ids=cases.ids)
def test_gpu_kernels_match_reference(case, key):
    _check(case, key, "gpu", mixed=case.gate == "key")


@pytest.mark.parametrize("case", FAST_TPU, ids=cases.ids)
def test_tpu_kernels_match_reference(case, key):
    _check(case, key, "tpu", mixed=case.gate == "key")


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=cases.ids)
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_match_reference_sweep(case, backend, key):
    _check(case, key, backend)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_KEY, ids=cases.ids)
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_exact_key_gate_form_on_mild_decay(case, backend, key, monkeypatch):
    """The exact sub-chunk form (normally only for strong decays) forced on every chunk."""
    monkeypatch.setattr(gla_ops, "KEY_GATE_FAST_SPAN", -1.0)
    _check(case, key, backend)


def test_strong_decay_stays_finite(key):
    """g = -1e4 per step (exp(cumsum) underflows after one step): finite, equals reference."""
    case = Case(1, 64, 1, 16, 16, gate="key", chunk=32, with_initial_state=True)
    x = case.make_inputs(key)
    g = jnp.full(x["log_decay"].shape, -1e4, jnp.float32)
    o, s = gla_ops.gated_linear_attention_pallas(
        x["q"],
        x["k"],
        x["v"],
        g,
        x["initial_state"],
        None,
        scale=x["scale"],
        chunk_size=32,
        interpret=True,
        backend="gpu",
    )
    o_ref, s_ref = reference.gated_linear_attention(
        x["q"], x["k"], x["v"], g, scale=x["scale"], initial_state=x["initial_state"]
    )
    assert_rel_close(o, o_ref, tolerances.forward(jnp.float32), "o")
    assert_rel_close(s, s_ref, tolerances.forward(jnp.float32), "final_state")


# ---------------------------------------------------------------------------------------------
# Lowering for the real backends (no accelerator needed).
# ---------------------------------------------------------------------------------------------

_LOWER_CASES = [
    pytest.param("none", False, False, id="gate-none"),
    pytest.param("head", True, True, id="gate-head_s0_seg"),
    pytest.param("key", True, True, id="gate-key_s0_seg"),
]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("gate,with_state,with_segments", _LOWER_CASES)
def test_lowers_forward_and_backward(platform, gate, with_state, with_segments):
    # T = 1100: not a chunk multiple, and the padded length (1152) is not a power of two.
    b, t, h, dk, dv = 2, 1100, 4, 128, 128
    bf16 = jnp.bfloat16
    q = jax.ShapeDtypeStruct((b, t, h, dk), bf16)
    v = jax.ShapeDtypeStruct((b, t, h, dv), bf16)
    g = {
        "none": None,
        "head": jax.ShapeDtypeStruct((b, t, h), jnp.float32),
        "key": jax.ShapeDtypeStruct((b, t, h, dk), jnp.float32),
    }[gate]
    s0 = jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32) if with_state else None
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if with_segments else None
    backend = "gpu" if platform == "cuda" else "tpu"
    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"

    def fwd(q, k, v, g, s0, seg):
        return gla_ops.gated_linear_attention_pallas(
            q,
            k,
            v,
            g,
            s0,
            seg,
            scale=dk**-0.5,
            chunk_size=None,
            interpret=False,
            backend=backend,
        )

    def fwd_bwd(q, k, v, g, s0, seg):
        out, vjp = jax.vjp(lambda *a: fwd(*a, seg), q, k, v, g, s0)
        return vjp(out)

    text = lower_for(platform, fwd, q, q, v, g, s0, seg)
    assert text.count(marker) >= (2 if platform == "cuda" else 1)
    text = lower_for(platform, fwd_bwd, q, q, v, g, s0, seg)
    assert text.count(marker) >= (6 if platform == "cuda" else 3)


# ---------------------------------------------------------------------------------------------
# Unsupported cases raise NotImplementedError (the api then falls back to the xla path).
# ---------------------------------------------------------------------------------------------


def _small(dk=16, dv=16):
    q = jnp.ones((1, 16, 1, dk), jnp.float32)
    v = jnp.ones((1, 16, 1, dv), jnp.float32)
    return q, q, v


def test_cpu_without_interpret_is_not_implemented():
    with pytest.raises(NotImplementedError, match="interpret=True"):
        gla_ops.gated_linear_attention_pallas(
            *_small(), None, None, None, scale=0.25, chunk_size=None, interpret=False
        )


def test_gpu_head_dim_not_power_of_two_is_not_implemented():
    with pytest.raises(NotImplementedError, match="key_dim a power of two"):
        gla_ops.gated_linear_attention_pallas(
            *_small(dk=48),
            None,
            None,
            None,
            scale=0.25,
            chunk_size=None,
            interpret=True,
            backend="gpu",
        )


def test_bad_chunk_size_is_not_implemented():
    with pytest.raises(NotImplementedError, match="chunk_size a power of two"):
        gla_ops.gated_linear_attention_pallas(
            *_small(), None, None, None, scale=0.25, chunk_size=24, interpret=True
        )


def test_unknown_backend_is_not_implemented():
    with pytest.raises(NotImplementedError, match="backend"):
        gla_ops.gated_linear_attention_pallas(
            *_small(),
            None,
            None,
            None,
            scale=0.25,
            chunk_size=None,
            interpret=True,
            backend="metal",
        )
