"""Pallas (Triton) backward kernels for chunked gated linear attention.

Kernels 3-5 of ``gla_kernel_gpu`` (see its module docstring for the math, the numerical scheme
and the layouts): ``chunk_dstates`` (reverse sequential ``dh``), ``chunk_dv`` and ``chunk_dqkg``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention import gla_gate as gg
from pallas_kernels.linear_attention.gla_kernel_gpu import (
    _F32,
    _NT,
    _TN,
    SUB_CHUNK,
    GpuConfig,
    _chunk_gate_last,
    _decayed_keys,
    _dot,
    _exp_le0,
    _gate_args,
    _iota,
    _key_fast_factors,
    _key_paths,
    _load_chunk_gate,
    _pair_mask,
    _params,
    _query_inter,
    _scores_key_fast,
    _scores_key_rows,
    _scores_scalar,
    _Specs,
    _state_decay,
    _unpack,
)

# ---------------------------------------------------------------------------------------------
# 3. Backward: state gradients (reverse sequential).
# ---------------------------------------------------------------------------------------------


def _dstates_kernel(*refs, cfg: GpuConfig, num_chunks: int):
    r = _unpack(cfg, refs, ("q", "g", "rel", "do", "dht", "dh", "ds0"))
    c = cfg.chunk
    dtype = r["q"].dtype

    def body(i, dh):
        n = num_chunks - 1 - i
        t0 = pl.multiple_of(n * c, c)
        r["dh"][n] = dh.astype(r["dh"].dtype)
        q = r["q"][pl.ds(t0, c), :]
        do = r["do"][pl.ds(t0, c), :]
        g = g_last = rel = rel_last = None
        if r["g"] is not None:
            g, g_last = _chunk_gate_last(cfg, r["g"], t0)
        if r["rel"] is not None:
            rel, rel_last = r["rel"][pl.ds(t0, c)], r["rel"][t0 + c - 1]
        decay = _state_decay(cfg, g_last, rel_last)
        if decay is not None:
            dh = dh * decay
        return dh + _dot(_query_inter(cfg, q, g, rel), do, dtype, _TN)

    r["ds0"][...] = lax.fori_loop(0, num_chunks, body, r["dht"][...])


def chunk_dstates(cfg: GpuConfig, q, g, rel, do, dht):
    """dh[n] (gradient of the state after chunk n) ``[B, H, NC, K, V]`` and d(initial state)."""
    b, t, nh, dk = q.shape
    dv = do.shape[-1]
    nc = t // cfg.chunk
    bk, bv = min(cfg.block_k, dk), min(cfg.block_v, dv)

    def seq_k(d):
        return pl.BlockSpec((None, t, None, d), lambda i, a, b_: (i // nh, 0, i % nh, a))

    in_specs, args = [seq_k(bk)], [q]
    if cfg.gate == "head":
        in_specs.append(pl.BlockSpec((None, t, None), lambda i, a, b_: (i // nh, 0, i % nh)))
        args.append(g)
    elif cfg.gate == "key":
        in_specs.append(seq_k(bk))
        args.append(g)
    if cfg.segments:
        in_specs.append(pl.BlockSpec((None, t), lambda i, a, b_: (i // nh, 0)))
        args.append(rel)
    in_specs.append(pl.BlockSpec((None, t, None, bv), lambda i, a, b_: (i // nh, 0, i % nh, b_)))
    args.append(do)
    state_spec = pl.BlockSpec((None, None, bk, bv), lambda i, a, b_: (i // nh, i % nh, a, b_))
    in_specs.append(state_spec)
    args.append(dht)
    return pl.pallas_call(
        functools.partial(_dstates_kernel, cfg=cfg, num_chunks=nc),
        grid=(b * nh, dk // bk, dv // bv),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, nc, bk, bv), lambda i, a, b_: (i // nh, i % nh, 0, a, b_)),
            state_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, nh, nc, dk, dv), q.dtype),
            jax.ShapeDtypeStruct((b, nh, dk, dv), _F32),
        ],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="gla_chunk_dstates",
    )(*args)


# ---------------------------------------------------------------------------------------------
# 4. Backward: dv.
# ---------------------------------------------------------------------------------------------


def _dv_kernel(*refs, cfg: GpuConfig):
    r = _unpack(cfg, refs, ("q", "k", "g", "rel", "do", "dh", "dv"))
    dtype = r["q"].dtype
    k_all = r["k"][...]
    g, g_last, rel, rel_last = _load_chunk_gate(cfg, r)
    kd = _decayed_keys(cfg, k_all.astype(_F32), g, g_last, rel, rel_last)
    dv = _dot(kd, r["dh"][...], dtype)
    if cfg.gate != "key":
        a = _scores_scalar(cfg, r["q"][...], k_all, g, rel, dtype)
        dv = dv + _dot(a, r["do"][...], dtype, _TN)
        r["dv"][...] = dv.astype(r["dv"].dtype)
        return

    def fast():
        a = _scores_key_fast(cfg, r["q"][...], k_all, g, r["g"][0, :][None, :], rel, dtype)
        r["dv"][...] = (dv + _dot(a, r["do"][...], dtype, _TN)).astype(r["dv"].dtype)

    def exact():
        acc = dv
        c = SUB_CHUNK
        refs4 = (r["q"], r["k"], r["g"], r["rel"])
        for m in range(cfg.chunk // c):
            a, _, _, _ = _scores_key_rows(cfg, refs4, m, k_all, g, rel, dtype)
            acc = acc + _dot(a, r["do"][pl.ds(m * c, c), :], dtype, _TN)
        r["dv"][...] = acc.astype(r["dv"].dtype)

    _key_paths(cfg, r["g"], fast, exact)


def chunk_dv(cfg: GpuConfig, q, k, v, g, rel, do, dh):
    b, t, nh, dk = q.shape
    dv = v.shape[-1]
    nc = t // cfg.chunk
    bv = min(cfg.block_v_out, dv)
    sp = _Specs(nh, cfg.chunk)
    gspecs, gargs = _gate_args(cfg, sp, g, rel, dk, blocked=False)
    in_specs = [sp.rows(dk), sp.rows(dk), *gspecs, sp.rows_blocked(bv), sp.state(dk, bv, "v")]
    return pl.pallas_call(
        functools.partial(_dv_kernel, cfg=cfg),
        grid=(b * nh, nc, dv // bv),
        in_specs=in_specs,
        out_specs=sp.rows_blocked(bv),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=_params(cfg, cfg.num_warps_parallel),
        interpret=cfg.interpret,
        name="gla_chunk_dv",
    )(q, k, *gargs, do, dh)


# ---------------------------------------------------------------------------------------------
# 5. Backward: dq, dk, dG.
# ---------------------------------------------------------------------------------------------


def _dqkg_scalar(cfg, r, dtype):
    c = cfg.chunk
    q, k = r["q"][...].astype(_F32), r["k"][...].astype(_F32)
    v, do = r["v"][...], r["do"][...]
    h, dh = r["h"][...].astype(_F32), r["dh"][...].astype(_F32)
    g, g_last, rel, rel_last = _load_chunk_gate(cfg, r)
    p = _dot(do, v, dtype, _NT)
    if cfg.gate == "head":
        p = p * _exp_le0(g[:, None] - g[None, :])
    i, j = _iota((c, c), 0), _iota((c, c), 1)
    p = jnp.where(_pair_mask(cfg, c, c, 0, 0, rel, rel), p * cfg.scale, 0.0)
    p_diag = jnp.sum(jnp.where(i == j, p, 0.0), axis=1, keepdims=True)
    p = jnp.where(i == j, 0.0, p)  # strictly lower part; the diagonal is added exactly below
    ones = jnp.ones((c, 1), _F32)
    dq_intra = _dot(p, k, dtype)
    dq_inter = _dot(do, h, dtype, _NT) * _query_inter(cfg, ones, g, rel)
    dk_intra = _dot(p, q, dtype, _TN)
    dk_state = _dot(v, dh, dtype, _NT) * _decayed_keys(cfg, ones, g, g_last, rel, rel_last)
    r["dq"][...] = (dq_intra + dq_inter + p_diag * k).astype(r["dq"].dtype)
    r["dk"][...] = (dk_intra + dk_state + p_diag * q).astype(r["dk"].dtype)
    if cfg.gate == "head":
        # The diagonal (i == j) terms and the last row's own state term cancel exactly in dG;
        # they are left out so that strong decays do not leave rounding noise of O(1) terms.
        row = _iota((c, 1), 0)
        dks = jnp.where(row == c - 1, 0.0, dk_state)
        dg = jnp.sum(q * (dq_intra + dq_inter) - k * (dk_intra + dks), axis=1)
        last = jnp.sum(k * dks) + jnp.sum(h * dh) * _state_decay(cfg, g_last, rel_last)
        r["dg"][...] = dg + jnp.where(_iota((c,), 0) == c - 1, last, 0.0)


def _dqkg_key_fast(cfg, r, dtype):
    """dq, dk, dG for the per-key gate in the one-matmul form (see GpuConfig.fast_span)."""
    c = cfg.chunk
    q, k = r["q"][...].astype(_F32), r["k"][...].astype(_F32)
    v, do = r["v"][...], r["do"][...]
    h, dh = r["h"][...].astype(_F32), r["dh"][...].astype(_F32)
    g, g_last, rel, rel_last = _load_chunk_gate(cfg, r)
    e_q, e_k = _key_fast_factors(g, r["g"][0, :][None, :])
    i, j = _iota((c, c), 0), _iota((c, c), 1)
    p = jnp.where(_pair_mask(cfg, c, c, 0, 0, rel, rel), _dot(do, v, dtype, _NT) * cfg.scale, 0.0)
    p_diag = jnp.sum(jnp.where(i == j, p, 0.0), axis=1, keepdims=True)
    p = jnp.where(i == j, 0.0, p)
    dq_intra = e_q * _dot(p, k * e_k, dtype)
    dk_intra = e_k * _dot(p, q * e_q, dtype, _TN)
    dq_inter = _dot(do, h, dtype, _NT) * _query_inter(cfg, jnp.ones_like(q), g, rel)
    w_k = _decayed_keys(cfg, jnp.ones_like(k), g, g_last, rel, rel_last)
    dk_state = _dot(v, dh, dtype, _NT) * w_k
    row = _iota((c, 1), 0)
    dks = jnp.where(row == c - 1, 0.0, dk_state)
    dg = q * (dq_intra + dq_inter) - k * (dk_intra + dks)
    last = jnp.sum(k * dks, axis=0) + jnp.sum(h * dh, axis=1) * _state_decay(
        cfg, g_last, rel_last, False
    )
    r["dg"][...] = dg + jnp.where(row == c - 1, last[None, :], 0.0)
    r["dq"][...] = (dq_intra + dq_inter + p_diag * k).astype(r["dq"].dtype)
    r["dk"][...] = (dk_intra + dk_state + p_diag * q).astype(r["dk"].dtype)


def _dqkg_key(cfg, r, dtype):
    c, C = SUB_CHUNK, cfg.chunk
    nb = C // c
    q_ref, k_ref, g_ref = r["q"], r["k"], r["g"]
    q_all, k_all = q_ref[...].astype(_F32), k_ref[...].astype(_F32)
    v_all, do_all = r["v"][...], r["do"][...]
    h, dh = r["h"][...].astype(_F32), r["dh"][...].astype(_F32)
    g_all, g_last, rel_all, rel_last = _load_chunk_gate(cfg, r)
    col, row_c = _iota((c, C), 1), _iota((C, c), 0)
    loc_r, loc_c = _iota((c, 1), 0), _iota((c, 1), 0)
    kdks = jnp.zeros((q_all.shape[1],), _F32)
    for m in range(nb):
        r0 = m * c
        rows = pl.ds(r0, c)
        q_m, k_m, g_m = q_ref[rows, :].astype(_F32), k_ref[rows, :].astype(_F32), g_ref[rows, :]
        do_m, v_m = r["do"][rows, :], r["v"][rows, :]
        rel_m = r["rel"][rows] if cfg.segments else None
        # P[i, j] = scale * do_i . v_j for rows i of sub-chunk m, and for its columns j.
        p_rows = _dot(do_m, v_all, dtype, _NT) * cfg.scale  # [c, C]
        p_cols = _dot(do_all, v_m, dtype, _NT) * cfg.scale  # [C, c]
        if cfg.segments:
            p_rows = jnp.where(rel_m[:, None] == rel_all[None, :], p_rows, 0.0)
            p_cols = jnp.where(rel_all[:, None] == rel_m[None, :], p_cols, 0.0)
        if m > 0:  # columns before the sub-chunk, reference = its first row
            g_r = g_ref[r0, :][None, :]
            k_r = k_all * _exp_le0(g_r - g_all)
            dq_m = jnp.exp(g_m - g_r) * _dot(jnp.where(col < r0, p_rows, 0.0), k_r, dtype)
        else:
            dq_m = jnp.zeros_like(q_m)
        if m < nb - 1:  # rows after the sub-chunk, reference = its last row
            g_r = g_ref[r0 + c - 1, :][None, :]
            q_r = q_all * _exp_le0(g_all - g_r)
            pc = jnp.where(row_c >= r0 + c, p_cols, 0.0)
            dk_m = jnp.exp(g_r - g_m) * _dot(pc, q_r, dtype, _TN)
        else:
            dk_m = jnp.zeros_like(k_m)

        def diag(tt, carry, r0=r0, p_rows=p_rows, p_cols=p_cols, g_m=g_m):
            dq_m, dk_m = carry
            j = r0 + tt
            k_j = k_ref[j, :].astype(_F32)[None, :]
            q_j = q_ref[j, :].astype(_F32)[None, :]
            g_j = g_ref[j, :][None, :]
            p_col = jnp.sum(jnp.where(col == j, p_rows, 0.0), axis=1, keepdims=True)
            p_col = jnp.where(loc_r > tt, p_col, 0.0)
            p_row = jnp.sum(jnp.where(row_c == j, p_cols, 0.0), axis=0)[:, None]
            p_row = jnp.where(loc_c < tt, p_row, 0.0)
            dq_m = dq_m + p_col * k_j * _exp_le0(g_m - g_j)
            dk_m = dk_m + p_row * q_j * _exp_le0(g_j - g_m)
            return dq_m, dk_m

        # Strictly-lower terms only; the diagonal (exp(0) = 1) is added after dG is formed,
        # because its contributions to q*dq and k*dk cancel exactly.
        dq_m, dk_m = lax.fori_loop(0, c, diag, (dq_m, dk_m))
        p_diag = jnp.sum(jnp.where(col == r0 + loc_r, p_rows, 0.0), axis=1, keepdims=True)
        dq_m = dq_m + _dot(do_m, h, dtype, _NT) * _query_inter(cfg, jnp.ones_like(q_m), g_m, rel_m)
        w_k = _decayed_keys(cfg, jnp.ones_like(k_m), g_m, g_last, rel_m, rel_last)
        dk_state = _dot(v_m, dh, dtype, _NT) * w_k
        if m == nb - 1:  # the last row's own state term cancels in dG as well
            dks = jnp.where(loc_r == c - 1, 0.0, dk_state)
        else:
            dks = dk_state
        dg_m = q_m * dq_m - k_m * (dk_m + dks)
        kdks = kdks + jnp.sum(k_m * dks, axis=0)
        if m == nb - 1:
            last = kdks + jnp.sum(h * dh, axis=1) * _state_decay(cfg, g_last, rel_last, False)
            dg_m = dg_m + jnp.where(loc_r == c - 1, last[None, :], 0.0)
        dq_m = dq_m + p_diag * k_m
        dk_m = dk_m + dk_state + p_diag * q_m
        r["dq"][rows, :] = dq_m.astype(r["dq"].dtype)
        r["dk"][rows, :] = dk_m.astype(r["dk"].dtype)
        r["dg"][rows, :] = dg_m


def _dqkg_kernel(*refs, cfg: GpuConfig):
    names = ("q", "k", "v", "g", "glo", "rel", "do", "h", "dh", "dq", "dk")
    if cfg.gate != "none":
        names = names + ("dg",)
        r = _unpack(cfg, refs, names)
        r["g"] = gg.SplitRef(r["g"], r["glo"])  # precise exponent differences (see gla_gate)
    else:
        r = _unpack(cfg, refs, names)
    dtype = r["q"].dtype
    if cfg.gate == "key":
        _key_paths(
            cfg, r["g"], lambda: _dqkg_key_fast(cfg, r, dtype), lambda: _dqkg_key(cfg, r, dtype)
        )
    else:
        _dqkg_scalar(cfg, r, dtype)


def chunk_dqkg(cfg: GpuConfig, q, k, v, g, rel, do, h, dh):
    """dq, dk (input dtypes) and dG (float32 ``[B, T, H(, K)]``).

    ``g`` is the pair ``(G_hi, G_lo)`` of ``gla_gate.split_chunk_cumsum`` (or None).
    """
    b, t, nh, dk = q.shape
    dv = v.shape[-1]
    nc = t // cfg.chunk
    bk = min(cfg.block_k_dq, dk)
    nk = dk // bk
    sp = _Specs(nh, cfg.chunk)
    gspecs, gargs = _gate_args(cfg, sp, None if g is None else g[0], rel, bk, blocked=True)
    if g is not None:  # the lo part right after the hi part
        gspecs.insert(1, gspecs[0])
        gargs.insert(1, g[1])
    in_specs = [
        sp.rows_blocked(bk),
        sp.rows_blocked(bk),
        sp.rows(dv),
        *gspecs,
        sp.rows(dv),
        sp.state(bk, dv, "k"),
        sp.state(bk, dv, "k"),
    ]
    out_specs = [sp.rows_blocked(bk), sp.rows_blocked(bk)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)]
    if cfg.gate == "head":
        out_specs.append(
            pl.BlockSpec((None, None, cfg.chunk, None), lambda i, n, x: (x, i // nh, n, i % nh))
        )
        out_shape.append(jax.ShapeDtypeStruct((nk, b, t, nh), _F32))
    elif cfg.gate == "key":
        out_specs.append(sp.rows_blocked(bk))
        out_shape.append(jax.ShapeDtypeStruct(q.shape, _F32))
    outs = pl.pallas_call(
        functools.partial(_dqkg_kernel, cfg=cfg),
        grid=(b * nh, nc, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(cfg, cfg.num_warps_parallel),
        interpret=cfg.interpret,
        name="gla_chunk_dqkg",
    )(q, k, v, *gargs, do, h, dh)
    if cfg.gate == "none":
        return outs[0], outs[1], None
    dq, dk_, dg = outs
    if cfg.gate == "head":
        dg = jnp.sum(dg, axis=0)
    return dq, dk_, dg
