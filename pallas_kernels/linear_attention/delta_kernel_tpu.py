"""Pallas TPU (Mosaic) kernels for the chunked delta rule: the sequential state passes.

Same algorithm and signatures as :mod:`delta_kernel_gpu` (see there and :mod:`delta_ops` for
the equations); the TPU structure differs:

- the chunk axis is the last grid axis, ``"arbitrary"``, and the ``[K, BV]`` float32 state (or
  its cotangent) lives in a VMEM scratch buffer across it; Pallas pipelines the chunk blocks;
- token arrays are viewed as ``[B, T, H*D]`` (a free reshape) when ``D`` is a multiple of 128,
  so that a head's ``[C, D]`` tile is a legal Mosaic block; otherwise they are transposed to
  ``[B, H, T, D]``;
- per-token gates and reset counts come as ``[B, H, NC, 1, C]`` / ``[B, NC, 1, C]`` rows (legal
  ``(1, C)`` blocks); the column form a ``[C, C]`` decay matrix needs is built in-kernel with a
  masked lane reduction rather than a transpose.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32


def _mm(a, b, *, ta: bool = False, tb: bool = False):
    prec = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=(prec, prec), preferred_element_type=F32)


def _column(row, chunk):
    """``[1, C] -> [C, 1]`` by a masked lane reduction (no transpose of a thin vector)."""
    eye = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) == lax.broadcasted_iota(
        jnp.int32, (chunk, chunk), 1
    )
    full = jnp.broadcast_to(row, (chunk, chunk))
    return jnp.sum(jnp.where(eye, full, jnp.zeros_like(full)), axis=1, keepdims=True)


def _last(row, chunk):
    """``[1, C] -> [1, 1]``: the last element."""
    last = lax.broadcasted_iota(jnp.int32, (1, chunk), 1) == chunk - 1
    return jnp.sum(jnp.where(last, row, jnp.zeros_like(row)), axis=1, keepdims=True)


def chunk_decays(g_row, r_row, chunk: int, *, gated: bool, segmented: bool):
    """``D [C, C]``, ``a [C, 1]``, ``e [C, 1]``, ``gC [1, 1]`` (float32) from a chunk's
    cumulative gates ``[1, C]`` and reset counts ``[1, C]`` (see :mod:`delta_kernel_gpu`)."""
    row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    mask = col <= row
    if segmented:
        r_col = _column(r_row, chunk)
        r_last = _last(r_row, chunk)
        mask = mask & (r_col == r_row)
    if gated:
        g_col = _column(g_row, chunk)
        g_last = _last(g_row, chunk)
        D = jnp.exp(jnp.where(mask, g_col - g_row, -jnp.inf))
        a = jnp.exp(g_col)
        e = jnp.exp(g_last - g_col)
        g_c = jnp.exp(g_last)
    else:
        D = jnp.where(mask, 1.0, 0.0).astype(F32)
        a = jnp.ones((chunk, 1), F32)
        e = a
        g_c = jnp.ones((1, 1), F32)
    if segmented:
        a = jnp.where(r_col == 0, a, 0.0)
        e = jnp.where(r_col == r_last, e, 0.0)
        g_c = jnp.where(r_last == 0, g_c, 0.0)
    return D, a, e, g_c


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------


class _Tokens:
    """Kernel view of a ``[B, T, H, D]`` array and the BlockSpec of one ``[C, bd]`` tile."""

    def __init__(self, x, heads: int, block_d: int):
        B, T, H, D = x.shape
        self.flat = D % 128 == 0 and block_d % 128 == 0
        self.nd = D // block_d
        self.block_d = block_d
        self.shape = x.shape
        self.array = x.reshape(B, T, H * D) if self.flat else x.transpose(0, 2, 1, 3)

    def spec(self, rows: int, index):
        """``index(*grid) -> (b, h, n, d)``: batch, head, row block and dim block."""
        bd = self.block_d
        if self.flat:
            nd = self.nd

            def index_map(*g):
                b, h, n, d = index(*g)
                return b, n, h * nd + d

            return pl.BlockSpec((None, rows, bd), index_map)
        return pl.BlockSpec((None, None, rows, bd), index)

    def unview(self, y):
        B, T, H, D = self.shape
        return y.reshape(B, T, H, D) if self.flat else y.transpose(0, 2, 1, 3)

    def out_shape(self, dtype):
        return jax.ShapeDtypeStruct(self.array.shape, dtype)


def _rows(G, R, chunk):
    """Gates ``[B,H,T] -> [B,H,NC,1,C]`` and resets ``[B,T] -> [B,NC,1,C]`` (free reshapes)."""
    g = None if G is None else G.reshape(*G.shape[:2], G.shape[2] // chunk, 1, chunk)
    r = None if R is None else R.reshape(R.shape[0], R.shape[1] // chunk, 1, chunk)
    return g, r


def _params(*sem):
    return pltpu.CompilerParams(dimension_semantics=sem)


# --------------------------------------------------------------------------------------------
# Forward sequential state pass
# --------------------------------------------------------------------------------------------


def _state_fwd_kernel(*refs, chunk, gated, segmented, has_init, state_dtype):
    refs = list(refs)
    w_ref, ut_ref, k_ref = refs[:3]
    pos = 3
    g_ref = refs[pos] if gated else None
    pos += gated
    r_ref = refs[pos] if segmented else None
    pos += segmented
    s0_ref = refs[pos] if has_init else None
    pos += has_init
    u_ref, sch_ref, sfin_ref, s_scr = refs[pos:]
    cd = k_ref.dtype
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _init():
        if has_init:
            s_scr[...] = s0_ref[...].astype(F32)
        else:
            s_scr[...] = jnp.zeros(s_scr.shape, F32)

    s = s_scr[...]
    sch_ref[...] = s.astype(state_dtype)
    u = ut_ref[...].astype(F32) - _mm(w_ref[...], s.astype(cd))
    u_ref[...] = u.astype(u_ref.dtype)
    _, _, e, g_c = chunk_decays(
        g_ref[...] if gated else None,
        r_ref[...] if segmented else None,
        chunk,
        gated=gated,
        segmented=segmented,
    )
    ke = (k_ref[...].astype(F32) * e).astype(cd)
    s_new = g_c * s + _mm(ke, u.astype(cd), ta=True)
    s_scr[...] = s_new

    @pl.when(n == pl.num_programs(3) - 1)
    def _fin():
        sfin_ref[...] = s_new


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
    interpret: bool = False,
):
    """See :func:`delta_kernel_gpu.state_forward` (same signature and results)."""
    B, T, H, Kd = k.shape
    Vd = ut.shape[-1]
    nc, nv = T // chunk, Vd // block_v
    gated, segmented, has_init = G is not None, R is not None, s0 is not None
    wv, kv = _Tokens(w, heads, Kd), _Tokens(k, heads, Kd)
    utv = _Tokens(ut, heads, block_v)
    g_rows, r_rows = _rows(G, R, chunk)

    def tok(b, h, j, n):
        return b, h, n, 0

    def tok_v(b, h, j, n):
        return b, h, n, j

    in_specs = [wv.spec(chunk, tok), utv.spec(chunk, tok_v), kv.spec(chunk, tok)]
    args = [wv.array, utv.array, kv.array]
    if gated:
        in_specs.append(
            pl.BlockSpec((None, None, None, 1, chunk), lambda b, h, j, n: (b, h, n, 0, 0))
        )
        args.append(g_rows)
    if segmented:
        in_specs.append(pl.BlockSpec((None, None, 1, chunk), lambda b, h, j, n: (b, n, 0, 0)))
        args.append(r_rows)
    state_spec = pl.BlockSpec((None, None, Kd, block_v), lambda b, h, j, n: (b, h, 0, j))
    if has_init:
        in_specs.append(state_spec)
        args.append(s0)
    out_specs = [
        utv.spec(chunk, tok_v),
        pl.BlockSpec((None, None, None, Kd, block_v), lambda b, h, j, n: (b, h, n, 0, j)),
        state_spec,
    ]
    out_shape = [
        utv.out_shape(k.dtype),
        jax.ShapeDtypeStruct((B, H, nc, Kd, Vd), state_dtype),
        jax.ShapeDtypeStruct((B, H, Kd, Vd), F32),
    ]
    kernel = functools.partial(
        _state_fwd_kernel,
        chunk=chunk,
        gated=gated,
        segmented=segmented,
        has_init=has_init,
        state_dtype=state_dtype,
    )
    u, states, s_fin = pl.pallas_call(
        kernel,
        grid=(B, H, nv, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((Kd, block_v), F32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="delta_state_fwd_tpu",
    )(*args)
    return utv.unview(u), states, s_fin


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
    D, a, _, _ = chunk_decays(
        g_ref[...] if gated else None,
        r_ref[...] if segmented else None,
        chunk,
        gated=gated,
        segmented=segmented,
    )
    inter = _mm(q, s_ref[...].astype(cd)) * a
    p = (_mm(q, k_ref[...], tb=True) * D).astype(cd)
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
    interpret: bool = False,
):
    """See :func:`delta_kernel_gpu.output`."""
    B, T, H, Kd = q.shape
    Vd = u.shape[-1]
    nc, nv = T // chunk, Vd // block_v
    gated, segmented = G is not None, R is not None
    qv, kv = _Tokens(q, heads, Kd), _Tokens(k, heads, Kd)
    uv = _Tokens(u, heads, block_v)
    g_rows, r_rows = _rows(G, R, chunk)

    def tok(b, h, n, j):
        return b, h, n, 0

    def tok_v(b, h, n, j):
        return b, h, n, j

    in_specs = [
        qv.spec(chunk, tok),
        kv.spec(chunk, tok),
        uv.spec(chunk, tok_v),
        pl.BlockSpec((None, None, None, Kd, block_v), lambda b, h, n, j: (b, h, n, 0, j)),
    ]
    args = [qv.array, kv.array, uv.array, states]
    if gated:
        in_specs.append(
            pl.BlockSpec((None, None, None, 1, chunk), lambda b, h, n, j: (b, h, n, 0, 0))
        )
        args.append(g_rows)
    if segmented:
        in_specs.append(pl.BlockSpec((None, None, 1, chunk), lambda b, h, n, j: (b, n, 0, 0)))
        args.append(r_rows)
    kernel = functools.partial(
        _output_kernel, chunk=chunk, scale=scale, gated=gated, segmented=segmented
    )
    o = pl.pallas_call(
        kernel,
        grid=(B, H, nc, nv),
        in_specs=in_specs,
        out_specs=uv.spec(chunk, tok_v),
        out_shape=uv.out_shape(out_dtype),
        compiler_params=_params("parallel", "parallel", "parallel", "parallel"),
        interpret=interpret,
        name="delta_output_tpu",
    )(*args)
    return uv.unview(o)


# --------------------------------------------------------------------------------------------
# Backward sequential pass for the state cotangent
# --------------------------------------------------------------------------------------------


def _state_bwd_kernel(*refs, chunk, scale, gated, segmented, has_dfin, state_dtype):
    refs = list(refs)
    q_ref, k_ref, w_ref, do_ref = refs[:4]
    pos = 4
    g_ref = refs[pos] if gated else None
    pos += gated
    r_ref = refs[pos] if segmented else None
    pos += segmented
    dfin_ref = refs[pos] if has_dfin else None
    pos += has_dfin
    dsch_ref, ds0_ref, ds_scr = refs[pos:]
    cd = q_ref.dtype
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _init():
        if has_dfin:
            ds_scr[...] = dfin_ref[...].astype(F32)
        else:
            ds_scr[...] = jnp.zeros(ds_scr.shape, F32)

    ds = ds_scr[...]
    dsch_ref[...] = ds.astype(state_dtype)
    q = q_ref[...]
    k = k_ref[...]
    do = do_ref[...].astype(cd)
    D, a, e, g_c = chunk_decays(
        g_ref[...] if gated else None,
        r_ref[...] if segmented else None,
        chunk,
        gated=gated,
        segmented=segmented,
    )
    p = (scale * _mm(q, k, tb=True) * D).astype(cd)
    ke = (k.astype(F32) * e).astype(cd)
    du = _mm(p, do, ta=True) + _mm(ke, ds.astype(cd))
    qa = (q.astype(F32) * (scale * a)).astype(cd)
    ds_new = g_c * ds + _mm(qa, do, ta=True) - _mm(w_ref[...], du.astype(cd), ta=True)
    ds_scr[...] = ds_new

    @pl.when(n == pl.num_programs(3) - 1)
    def _fin():
        ds0_ref[...] = ds_new


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
    interpret: bool = False,
):
    """See :func:`delta_kernel_gpu.state_backward`."""
    B, T, H, Kd = q.shape
    Vd = do.shape[-1]
    nc, nv = T // chunk, Vd // block_v
    gated, segmented, has_dfin = G is not None, R is not None, dfinal is not None
    qv, kv, wv = (_Tokens(x, heads, Kd) for x in (q, k, w))
    dov = _Tokens(do, heads, block_v)
    g_rows, r_rows = _rows(G, R, chunk)

    def tok(b, h, j, n):
        return b, h, nc - 1 - n, 0

    def tok_v(b, h, j, n):
        return b, h, nc - 1 - n, j

    in_specs = [
        qv.spec(chunk, tok),
        kv.spec(chunk, tok),
        wv.spec(chunk, tok),
        dov.spec(chunk, tok_v),
    ]
    args = [qv.array, kv.array, wv.array, dov.array]
    if gated:
        in_specs.append(
            pl.BlockSpec((None, None, None, 1, chunk), lambda b, h, j, n: (b, h, nc - 1 - n, 0, 0))
        )
        args.append(g_rows)
    if segmented:
        in_specs.append(
            pl.BlockSpec((None, None, 1, chunk), lambda b, h, j, n: (b, nc - 1 - n, 0, 0))
        )
        args.append(r_rows)
    state_spec = pl.BlockSpec((None, None, Kd, block_v), lambda b, h, j, n: (b, h, 0, j))
    if has_dfin:
        in_specs.append(state_spec)
        args.append(dfinal)
    out_specs = [
        pl.BlockSpec(
            (None, None, None, Kd, block_v),
            lambda b, h, j, n: (b, h, nc - 1 - n, 0, j),
        ),
        state_spec,
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, H, nc, Kd, Vd), state_dtype),
        jax.ShapeDtypeStruct((B, H, Kd, Vd), F32),
    ]
    kernel = functools.partial(
        _state_bwd_kernel,
        chunk=chunk,
        scale=scale,
        gated=gated,
        segmented=segmented,
        has_dfin=has_dfin,
        state_dtype=state_dtype,
    )
    return pl.pallas_call(
        kernel,
        grid=(B, H, nv, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((Kd, block_v), F32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="delta_state_bwd_tpu",
    )(*args)
