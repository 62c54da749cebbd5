"""Pallas GPU (Triton backend) kernels for the chunked delta rule: the sequential state passes.

Notation of one chunk of ``C`` tokens (see :mod:`delta_ops` for the derivation): ``G`` the
within-chunk cumulative log decay, ``R`` the within-chunk count of segment resets,
``D[i, j] = exp(G_i - G_j) [j <= i, R_i == R_j]``, ``a_i = exp(G_i) [R_i == 0]`` (chunk-start
state to token i), ``e_j = exp(G_C - G_j) [R_j == R_C]`` (token j to chunk end) and
``gC = exp(G_C) [R_C == 0] = a_{C-1}``. Every exponent is a difference of cumulative sums that is
<= 0 when ``log_decay <= 0``, so nothing overflows however strong the decay.

Kernels (all take ``[batch, time, heads, dim]`` arrays padded to the chunk multiple, per-token
gates ``G`` as ``[batch, heads, time]`` float32 and resets ``R`` as ``[batch, time]`` int32):

- :func:`state_forward`: grid ``(batch*heads, value blocks)``; one program walks the chunks in
  order with the ``[K, BV]`` float32 state in registers: ``U = Ut - W S`` (the new values),
  ``S <- gC S + (e*K)^T U``. Writes the chunk-start states, ``U`` and the final state.
- :func:`output`: grid ``(value blocks, chunks, batch*heads)``, fully parallel:
  ``O = scale * (a * (Q S) + ((Q K^T) * D) U)``.
- :func:`state_backward`: grid ``(batch*heads, value blocks)``; walks the chunks in reverse with
  the state cotangent in registers: ``dU = P^T dO + (e*K) dS``,
  ``dS <- gC dS + scale (a*Q)^T dO - W^T dU`` with ``P = scale (Q K^T) * D``. Writes the
  cotangent of every chunk-end state and that of the initial state.

Matmul operands are in the input dtype (bf16 -> tensor cores, float32 -> IEEE float32, never
TF32) and accumulate in float32; states and their cotangents are carried in float32 and stored
in the input dtype for the parallel consumers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32


def _mm(a, b, *, ta: bool = False, tb: bool = False):
    """``a @ b`` (optionally transposed operands) with float32 accumulation."""
    prec = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=(prec, prec), preferred_element_type=F32)


def chunk_decays(G, R, chunk: int, *, gated: bool, segmented: bool):
    """Decay factors of one chunk from its cumulative gates ``G [C]`` and resets ``R [C]``.

    Returns ``(D, a, e)``: ``D [C, C]`` (inclusive causal, zero above the diagonal), ``a [C]``
    and ``e [C]``, all float32; ``gC`` is ``a[C-1]``. Shared by the GPU and TPU kernels.
    """
    row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    mask = col <= row
    last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    if segmented:
        mask = mask & (R[:, None] == R[None, :])
        r_last = jnp.sum(jnp.where(last, R, 0))
        live_start = R == 0
        live_end = R == r_last
    if gated:
        g_last = jnp.sum(jnp.where(last, G, 0.0))
        diff = jnp.where(mask, G[:, None] - G[None, :], -jnp.inf)
        D = jnp.exp(diff)
        a = jnp.exp(G)
        e = jnp.exp(g_last - G)
    else:
        D = jnp.where(mask, 1.0, 0.0).astype(F32)
        a = jnp.ones((chunk,), F32)
        e = jnp.ones((chunk,), F32)
    if segmented:
        a = jnp.where(live_start, a, 0.0)
        e = jnp.where(live_end, e, 0.0)
    return D, a, e


def last_of(x, chunk: int):
    """The last element of a ``[C]`` vector as a scalar (a masked sum: no dynamic indexing)."""
    last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    return jnp.sum(jnp.where(last, x, 0.0))


def _compiler_params(num_warps: int, num_stages: int):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _bh(heads):
    return lambda bh: (bh // heads, bh % heads)


# --------------------------------------------------------------------------------------------
# Forward sequential state pass
# --------------------------------------------------------------------------------------------


def _state_fwd_kernel(*refs, chunk, n_chunks, gated, segmented, has_init, state_dtype):
    refs = list(refs)
    w_ref, ut_ref, k_ref = refs[:3]
    pos = 3
    g_ref = refs[pos] if gated else None
    pos += gated
    r_ref = refs[pos] if segmented else None
    pos += segmented
    s0_ref = refs[pos] if has_init else None
    pos += has_init
    u_ref, sch_ref, sfin_ref = refs[pos:]
    cd = k_ref.dtype
    bv = ut_ref.shape[-1]
    kd = k_ref.shape[-1]

    def body(n, s):
        t0 = pl.multiple_of(n * chunk, chunk)
        sl = pl.ds(t0, chunk)
        sch_ref[n] = s.astype(state_dtype)
        w = w_ref[sl, :]
        u = ut_ref[sl, :].astype(F32) - _mm(w, s.astype(cd))
        u_ref[sl, :] = u.astype(u_ref.dtype)
        G = g_ref[sl] if gated else None
        R = r_ref[sl] if segmented else None
        _, a, e = chunk_decays(G, R, chunk, gated=gated, segmented=segmented)
        ke = (k_ref[sl, :].astype(F32) * e[:, None]).astype(cd)
        g_c = last_of(a, chunk)
        return g_c * s + _mm(ke, u.astype(cd), ta=True)

    s = s0_ref[...].astype(F32) if has_init else jnp.zeros((kd, bv), F32)
    s = lax.fori_loop(0, n_chunks, body, s)
    sfin_ref[...] = s


def state_forward(
    w,
    ut,
    k,
    G,
    R,
    s0,
    *,
    chunk: int,
    heads: int,
    block_v: int,
    state_dtype,
    num_warps: int = 4,
    num_stages: int = 1,
    interpret: bool = False,
):
    """Sequential forward pass. Shapes: w, k ``[B,T,H,K]``; ut ``[B,T,H,V]``; G ``[B,H,T]`` or
    None; R ``[B,T]`` or None; s0 ``[B,H,K,V]`` or None. Returns ``(u [B,T,H,V],
    states [B,H,NC,K,V] (state_dtype, chunk-start), final [B,H,K,V] float32)``."""
    B, T, H, Kd = k.shape
    Vd = ut.shape[-1]
    nc = T // chunk
    nv = Vd // block_v
    bh = _bh(heads)
    gated, segmented, has_init = G is not None, R is not None, s0 is not None

    in_specs = [
        pl.BlockSpec((None, T, None, Kd), lambda i, j: (bh(i)[0], 0, bh(i)[1], 0)),
        pl.BlockSpec((None, T, None, block_v), lambda i, j: (bh(i)[0], 0, bh(i)[1], j)),
        pl.BlockSpec((None, T, None, Kd), lambda i, j: (bh(i)[0], 0, bh(i)[1], 0)),
    ]
    args = [w, ut, k]
    if gated:
        in_specs.append(pl.BlockSpec((None, None, T), lambda i, j: (bh(i)[0], bh(i)[1], 0)))
        args.append(G)
    if segmented:
        in_specs.append(pl.BlockSpec((None, T), lambda i, j: (bh(i)[0], 0)))
        args.append(R)
    if has_init:
        in_specs.append(
            pl.BlockSpec((None, None, Kd, block_v), lambda i, j: (bh(i)[0], bh(i)[1], 0, j))
        )
        args.append(s0)
    out_specs = [
        pl.BlockSpec((None, T, None, block_v), lambda i, j: (bh(i)[0], 0, bh(i)[1], j)),
        pl.BlockSpec((None, None, nc, Kd, block_v), lambda i, j: (bh(i)[0], bh(i)[1], 0, 0, j)),
        pl.BlockSpec((None, None, Kd, block_v), lambda i, j: (bh(i)[0], bh(i)[1], 0, j)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, T, H, Vd), k.dtype),
        jax.ShapeDtypeStruct((B, H, nc, Kd, Vd), state_dtype),
        jax.ShapeDtypeStruct((B, H, Kd, Vd), F32),
    ]
    kernel = functools.partial(
        _state_fwd_kernel,
        chunk=chunk,
        n_chunks=nc,
        gated=gated,
        segmented=segmented,
        has_init=has_init,
        state_dtype=state_dtype,
    )
    return pl.pallas_call(
        kernel,
        grid=(B * H, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="delta_state_fwd",
    )(*args)


# --------------------------------------------------------------------------------------------
# Parallel output
# --------------------------------------------------------------------------------------------


def _output_kernel(*refs, chunk, scale, gated, segmented):
    refs = list(refs)
    q_ref, k_ref, u_ref, s_ref = refs[:4]
    pos = 4
    g_ref = refs[pos] if gated else None
    pos += gated
    r_ref = refs[pos] if segmented else None
    pos += segmented
    (o_ref,) = refs[pos:]
    cd = q_ref.dtype
    q = q_ref[...]
    k = k_ref[...]
    G = g_ref[...] if gated else None
    R = r_ref[...] if segmented else None
    D, a, _ = chunk_decays(G, R, chunk, gated=gated, segmented=segmented)
    inter = _mm(q, s_ref[...].astype(cd)) * a[:, None]
    p = (_mm(q, k, tb=True) * D).astype(cd)
    intra = _mm(p, u_ref[...].astype(cd))
    o_ref[...] = (scale * (inter + intra)).astype(o_ref.dtype)


def output(
    q,
    k,
    u,
    states,
    G,
    R,
    *,
    chunk: int,
    heads: int,
    scale: float,
    block_v: int,
    out_dtype,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """``O [B,T,H,V]`` from the new values ``u`` and the chunk-start ``states``."""
    B, T, H, Kd = q.shape
    Vd = u.shape[-1]
    nc = T // chunk
    nv = Vd // block_v
    bh = _bh(heads)
    gated, segmented = G is not None, R is not None
    in_specs = [
        pl.BlockSpec((None, chunk, None, Kd), lambda j, n, i: (bh(i)[0], n, bh(i)[1], 0)),
        pl.BlockSpec((None, chunk, None, Kd), lambda j, n, i: (bh(i)[0], n, bh(i)[1], 0)),
        pl.BlockSpec((None, chunk, None, block_v), lambda j, n, i: (bh(i)[0], n, bh(i)[1], j)),
        pl.BlockSpec(
            (None, None, None, Kd, block_v), lambda j, n, i: (bh(i)[0], bh(i)[1], n, 0, j)
        ),
    ]
    args = [q, k, u, states]
    if gated:
        in_specs.append(pl.BlockSpec((None, None, chunk), lambda j, n, i: (*bh(i), n)))
        args.append(G)
    if segmented:
        in_specs.append(pl.BlockSpec((None, chunk), lambda j, n, i: (bh(i)[0], n)))
        args.append(R)
    kernel = functools.partial(
        _output_kernel, chunk=chunk, scale=scale, gated=gated, segmented=segmented
    )
    return pl.pallas_call(
        kernel,
        grid=(nv, nc, B * H),
        in_specs=in_specs,
        out_specs=pl.BlockSpec(
            (None, chunk, None, block_v), lambda j, n, i: (bh(i)[0], n, bh(i)[1], j)
        ),
        out_shape=jax.ShapeDtypeStruct((B, T, H, Vd), out_dtype),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="delta_output",
    )(*args)


# --------------------------------------------------------------------------------------------
# Backward sequential pass for the state cotangent
# --------------------------------------------------------------------------------------------


def _state_bwd_kernel(*refs, chunk, n_chunks, scale, gated, segmented, has_dfin, state_dtype):
    refs = list(refs)
    q_ref, k_ref, w_ref, do_ref = refs[:4]
    pos = 4
    g_ref = refs[pos] if gated else None
    pos += gated
    r_ref = refs[pos] if segmented else None
    pos += segmented
    dfin_ref = refs[pos] if has_dfin else None
    pos += has_dfin
    dsch_ref, ds0_ref = refs[pos:]
    cd = q_ref.dtype
    bv = do_ref.shape[-1]
    kd = q_ref.shape[-1]

    def body(i, ds):
        n = n_chunks - 1 - i
        t0 = pl.multiple_of(n * chunk, chunk)
        sl = pl.ds(t0, chunk)
        dsch_ref[n] = ds.astype(state_dtype)
        q = q_ref[sl, :]
        k = k_ref[sl, :]
        do = do_ref[sl, :].astype(cd)
        G = g_ref[sl] if gated else None
        R = r_ref[sl] if segmented else None
        D, a, e = chunk_decays(G, R, chunk, gated=gated, segmented=segmented)
        p = (scale * _mm(q, k, tb=True) * D).astype(cd)
        ke = (k.astype(F32) * e[:, None]).astype(cd)
        du = _mm(p, do, ta=True) + _mm(ke, ds.astype(cd))
        qa = (q.astype(F32) * (scale * a)[:, None]).astype(cd)
        g_c = last_of(a, chunk)
        return g_c * ds + _mm(qa, do, ta=True) - _mm(w_ref[sl, :], du.astype(cd), ta=True)

    ds = dfin_ref[...].astype(F32) if has_dfin else jnp.zeros((kd, bv), F32)
    ds = lax.fori_loop(0, n_chunks, body, ds)
    ds0_ref[...] = ds


def state_backward(
    q,
    k,
    w,
    do,
    G,
    R,
    dfinal,
    *,
    chunk: int,
    heads: int,
    scale: float,
    block_v: int,
    state_dtype,
    num_warps: int = 4,
    num_stages: int = 1,
    interpret: bool = False,
):
    """Reverse pass. Returns ``(d_states [B,H,NC,K,V] (cotangent of each chunk-END state, in
    state_dtype), d_initial [B,H,K,V] float32)``."""
    B, T, H, Kd = q.shape
    Vd = do.shape[-1]
    nc = T // chunk
    nv = Vd // block_v
    bh = _bh(heads)
    gated, segmented, has_dfin = G is not None, R is not None, dfinal is not None
    in_specs = [
        pl.BlockSpec((None, T, None, Kd), lambda i, j: (bh(i)[0], 0, bh(i)[1], 0)),
        pl.BlockSpec((None, T, None, Kd), lambda i, j: (bh(i)[0], 0, bh(i)[1], 0)),
        pl.BlockSpec((None, T, None, Kd), lambda i, j: (bh(i)[0], 0, bh(i)[1], 0)),
        pl.BlockSpec((None, T, None, block_v), lambda i, j: (bh(i)[0], 0, bh(i)[1], j)),
    ]
    args = [q, k, w, do]
    if gated:
        in_specs.append(pl.BlockSpec((None, None, T), lambda i, j: (bh(i)[0], bh(i)[1], 0)))
        args.append(G)
    if segmented:
        in_specs.append(pl.BlockSpec((None, T), lambda i, j: (bh(i)[0], 0)))
        args.append(R)
    if has_dfin:
        in_specs.append(
            pl.BlockSpec((None, None, Kd, block_v), lambda i, j: (bh(i)[0], bh(i)[1], 0, j))
        )
        args.append(dfinal)
    out_specs = [
        pl.BlockSpec((None, None, nc, Kd, block_v), lambda i, j: (bh(i)[0], bh(i)[1], 0, 0, j)),
        pl.BlockSpec((None, None, Kd, block_v), lambda i, j: (bh(i)[0], bh(i)[1], 0, j)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, H, nc, Kd, Vd), state_dtype),
        jax.ShapeDtypeStruct((B, H, Kd, Vd), F32),
    ]
    kernel = functools.partial(
        _state_bwd_kernel,
        chunk=chunk,
        n_chunks=nc,
        scale=scale,
        gated=gated,
        segmented=segmented,
        has_dfin=has_dfin,
        state_dtype=state_dtype,
    )
    return pl.pallas_call(
        kernel,
        grid=(B * H, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="delta_state_bwd",
    )(*args)
