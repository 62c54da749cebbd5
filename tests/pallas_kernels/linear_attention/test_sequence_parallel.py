"""Sequence-parallel (LASP-2 style) linear attention on 8 fake CPU devices == the unsharded op.

Every case compares outputs, final state and the gradients of every float input (q, k, v,
log_decay, beta, initial_state) for a random output cotangent, computed in one jitted
``jax.vjp``. ``T = 45`` over 8 shards pads to 48 (6 tokens per shard, below one chunk); the
packed-sequence ids put resets on a shard's first token, inside shards, and let the first
segment (which sees ``initial_state``) span a shard boundary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from benchmarks.scaleout import collective_bytes
from pallas_kernels.linear_attention import api
from pallas_kernels.linear_attention.sequence_parallel import (
    delta_rule_sp,
    gated_linear_attention_sp,
)
from tests import tolerances
from tests._asserts import assert_rel_close

N = 8


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:N]), ("sequence",))


@dataclasses.dataclass(frozen=True)
class SPCase:
    op: str  # "gla" or "delta"
    gate: str  # "none", "head" ([B,T,H]) or "key" ([B,T,H,K])
    T: int = 45
    segments: bool = True
    initial_state: bool = True
    dtype: str = "float32"
    implementation: str | None = None
    strong_decay: bool = False  # log decay about -20 per step: exp(cumulative gate) underflows
    B: int = 2
    H: int = 2
    K: int = 16
    V: int = 16

    @property
    def id(self) -> str:
        parts = [self.op, f"gate-{self.gate}", f"T{self.T}"]
        parts += ["seg"] * self.segments + ["s0"] * self.initial_state
        parts += [self.dtype] if self.dtype != "float32" else []
        parts += [self.implementation] if self.implementation else []
        parts += ["strong"] if self.strong_decay else []
        return "_".join(parts)


def _segment_ids(B, T):
    """Resets on shard starts (tokens 6, 12, 30 with 6 tokens per shard) and inside shards."""
    seg = np.zeros((B, T), np.int32)
    starts = [(12, 27, 30, 31), (6, 20, 40)]
    for b in range(B):
        for s in starts[b % 2]:
            if s < T:
                seg[b, s:] += 1
    return jnp.asarray(seg)


def _inputs(case: SPCase, key):
    seed = np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist()
    rng = np.random.default_rng(seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    f32 = np.float32
    dt = jnp.dtype(case.dtype)
    q = rng.standard_normal((B, T, H, K)).astype(f32)
    k = rng.standard_normal((B, T, H, K)).astype(f32)
    v = rng.standard_normal((B, T, H, V)).astype(f32)
    args = {}
    if case.op == "delta":
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
        args["beta"] = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, T, H)))), jnp.float32)
    else:
        k = k * K**-0.5
    args = {"q": jnp.asarray(q, dt), "k": jnp.asarray(k, dt), "v": jnp.asarray(v, dt), **args}
    gshape = {"none": None, "head": (B, T, H), "key": (B, T, H, K)}[case.gate]
    if gshape is not None:
        x = rng.standard_normal(gshape)
        g = -20.0 + 5.0 * np.tanh(x) if case.strong_decay else -np.logaddexp(0.0, -(x + 2.5))
        args["log_decay"] = jnp.asarray(g, jnp.float32)
    if case.initial_state:
        args["initial_state"] = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    seg = _segment_ids(B, T) if case.segments else None
    cot = (
        jnp.asarray(rng.standard_normal((B, T, H, V)), dt),
        jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32),
    )
    return args, seg, cot


def _call(fn, case: SPCase, **extra):
    """fn(args_dict, seg) -> (o, final) for the op of ``case``."""

    def run(a, seg):
        kw = dict(
            scale=None,
            initial_state=a.get("initial_state"),
            return_final_state=True,
            segment_ids=seg,
            chunk_size=16,
            **extra,
        )
        if case.op == "delta":
            return fn(a["q"], a["k"], a["v"], a["beta"], a.get("log_decay"), **kw)
        return fn(a["q"], a["k"], a["v"], a.get("log_decay"), **kw)

    return run


def _value_and_vjp(run, args, seg, cot):
    def f(args, seg, cot):
        out, vjp = jax.vjp(lambda a: run(a, seg), args)
        return out, vjp(cot)[0]

    return jax.jit(f)(args, seg, cot)


CASES = [
    SPCase("gla", "head"),
    SPCase("gla", "key"),
    SPCase("delta", "none"),
    SPCase("delta", "head"),  # gated delta rule
]
SLOW_CASES = [
    SPCase("gla", "none"),
    SPCase("gla", "key", T=100, segments=False),  # 13 tokens per shard, several chunks
    SPCase("gla", "head", T=100, segments=False, initial_state=False),
    SPCase("delta", "head", T=100, segments=False, initial_state=False),
    SPCase("delta", "none", T=300, segments=True),
    SPCase("gla", "key", T=300, segments=True),
    SPCase("gla", "head", implementation="reference"),
    SPCase("delta", "head", implementation="reference"),
    SPCase("gla", "key", strong_decay=True),
    SPCase("delta", "head", strong_decay=True),
]


def _check_case(case: SPCase, mesh, key):
    args, seg, cot = _inputs(case, key)
    unsharded = api.delta_rule if case.op == "delta" else api.gated_linear_attention
    sharded = delta_rule_sp if case.op == "delta" else gated_linear_attention_sp
    interpret = case.implementation == "pallas"
    (o, final), grads = _value_and_vjp(
        _call(sharded, case, mesh=mesh, implementation=case.implementation, interpret=interpret),
        args,
        seg,
        cot,
    )
    (o_ref, final_ref), grads_ref = _value_and_vjp(
        _call(unsharded, case, implementation="reference"), args, seg, cot
    )
    dt = jnp.dtype(case.dtype)
    assert o.dtype == dt and final.dtype == jnp.float32
    fwd_tol = tolerances.RECURRENT_FORWARD[dt]
    assert_rel_close(o, o_ref, fwd_tol, "o")
    assert_rel_close(final, final_ref, fwd_tol, "final_state")
    assert set(grads) == set(args)
    assert_rel_close(grads, grads_ref, tolerances.grad(dt), "grad")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_unsharded(case, mesh, key):
    _check_case(case, mesh, key)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.id)
def test_matches_unsharded_sweep(case, mesh, key):
    _check_case(case, mesh, key)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_bfloat16(op, mesh, key):
    _check_case(SPCase(op, "head", dtype="bfloat16"), mesh, key)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_pallas_interpret_local_op(op, mesh, key):
    """The local op may be the Pallas kernels (interpret mode on CPU; their custom_vjp)."""
    _check_case(SPCase(op, "head", T=64, B=1, H=1, implementation="pallas"), mesh, key)


def test_batch_axis_on_2d_mesh(key):
    """Batch split over "data", sequence over "sequence" (a 2 x 4 mesh from jax.make_mesh)."""
    mesh = jax.make_mesh((2, 4), ("data", "sequence"))
    case = SPCase("gla", "head", T=21, segments=False, initial_state=False)
    args, seg, _ = _inputs(case, key)
    run = _call(gated_linear_attention_sp, case, mesh=mesh, batch_axis="data")
    o, final = jax.jit(run)(args, seg)
    o_ref, final_ref = jax.jit(_call(api.gated_linear_attention, case, implementation="reference"))(
        args, seg
    )
    tol = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]
    assert_rel_close(o, o_ref, tol, "o")
    assert_rel_close(final, final_ref, tol, "final_state")


def test_output_only_and_allgather_volume(mesh):
    """Without return_final_state only ``o`` comes back. Measured from the compiled HLO, the
    forward does one all_gather of [n, B, H, K, V + 1] float32 whatever T."""
    B, H, K, V = 1, 1, 16, 16
    rng = np.random.default_rng(11)

    def compiled(T):
        s = jax.ShapeDtypeStruct
        shapes = [s((B, T, H, K), jnp.float32)] * 2 + [s((B, T, H, V), jnp.float32)]
        fn = jax.jit(lambda q, k, v: gated_linear_attention_sp(q, k, v, mesh=mesh))
        return fn.lower(*shapes).compile()

    small, large = compiled(64), compiled(512)
    expected = {"all-gather": N * B * H * K * (V + 1) * 4}
    assert collective_bytes(small.as_text()) == collective_bytes(large.as_text()) == expected
    q, k, v = (jnp.asarray(rng.standard_normal((B, 64, H, K)), jnp.float32) for _ in range(3))
    o = small(q, k * 0.25, v)
    ref = jax.jit(lambda q, k, v: api.gated_linear_attention(q, k, v, implementation="reference"))
    assert_rel_close(o, ref(q, k * 0.25, v), tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)])


# ---------------------------------------------------------------------------------------------
# Bad input: one test per message.
# ---------------------------------------------------------------------------------------------


def _small():
    x = jnp.ones((2, 8, 1, 16), jnp.float32)
    return x, x, x


def test_error_mesh_type():
    q, k, v = _small()
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        gated_linear_attention_sp(q, k, v, mesh=("sequence",))


def test_error_axis_not_in_mesh(mesh):
    q, k, v = _small()
    with pytest.raises(ValueError, match=r"axis_name must be one of the mesh axes \('sequence',\)"):
        gated_linear_attention_sp(q, k, v, mesh=mesh, axis_name="time")


def test_error_batch_axis_not_in_mesh(mesh):
    q, k, v = _small()
    with pytest.raises(ValueError, match="batch_axis must be None or one of the mesh axes"):
        delta_rule_sp(q, k, v, jnp.ones((2, 8, 1)), mesh=mesh, batch_axis="data")


def test_error_batch_axis_is_axis_name(mesh):
    q, k, v = _small()
    with pytest.raises(ValueError, match="batch_axis must differ from axis_name='sequence'"):
        gated_linear_attention_sp(q, k, v, mesh=mesh, batch_axis="sequence")


def test_error_batch_not_divisible():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "sequence"))
    q, k, v = _small()
    with pytest.raises(
        ValueError, match=r"batch \(q.shape\[0\]=2\) must be divisible by the size 4"
    ):
        gated_linear_attention_sp(q, k, v, mesh=mesh, batch_axis="data")


def test_error_log_decay_rank_global_shapes(mesh):
    """Shape errors are those of the unsharded op, printed with the global shapes."""
    q, k, v = _small()
    with pytest.raises(ValueError, match=r"log_decay must have rank 3 .* got shape \(2, 8\)"):
        gated_linear_attention_sp(q, k, v, jnp.zeros((2, 8)), mesh=mesh)


def test_error_beta_shape_global_shapes(mesh):
    q, k, v = _small()
    with pytest.raises(
        ValueError, match=r"beta must have shape \[batch, time, heads\] = \(2, 8, 1\)"
    ):
        delta_rule_sp(q, k, v, jnp.ones((2, 8)), mesh=mesh)


def test_error_positive_log_decay(mesh):
    q, k, v = _small()
    with pytest.raises(ValueError, match="log_decay must be <= 0 everywhere"):
        gated_linear_attention_sp(q, k, v, jnp.full((2, 8, 1), 0.5), mesh=mesh)


def test_error_implementation_name(mesh):
    q, k, v = _small()
    with pytest.raises(ValueError, match="implementation must be one of"):
        gated_linear_attention_sp(q, k, v, mesh=mesh, implementation="cuda")
