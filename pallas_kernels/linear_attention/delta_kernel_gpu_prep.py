"""Pallas GPU (Triton) kernel for the per-chunk UT transform of the delta rule.

For one chunk of ``C`` tokens (see :mod:`delta_ops`)::

    A  = strict_lower(beta_i (k_i . k_j) D_ij)         D_ij = exp(G_i - G_j) [same segment]
    T  = (I + A)^-1
    W  = T (beta a K) ;   Ut = T (beta V)

The chunk is cut into ``C / 16`` row blocks. ``T`` is assembled block by block:

- each 16 x 16 diagonal block ``T_ii = (I + A_ii)^-1`` by forward substitution, one row per
  step (``T[r] = e_r - A[r, :r] T[:r]``) with masked reductions on a 16 x 16 tile: exact
  arithmetic of a triangular solve, no powers of ``A`` (which grow for C = 64);
- the blocks below the diagonal by block forward substitution,
  ``T_ij = -T_ii sum_{j <= m < i} A_im T_mj`` (16 x 16 matmuls in float32).

``W`` and ``Ut`` are then ``sum_j T_ij rhs_j``; for bf16 inputs these last products take
``T`` rounded to bf16 (tensor cores), as the peer library does; float32 inputs stay float32
throughout. Grid: ``(chunks, batch*heads)``, fully parallel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention.delta_kernel_gpu import F32, _bh, _compiler_params, _mm

SUB = 16  # row-block size of the blocked inverse


def _diag_inverse(a_blk):
    """``(I + L)^-1`` of a 16 x 16 strictly lower ``L`` by row-wise forward substitution."""
    row = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    col = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    eye = jnp.where(row == col, 1.0, 0.0).astype(F32)

    def body(r, x):
        a_r = jnp.sum(jnp.where(row == r, a_blk, 0.0), axis=0)  # A[r, :] (zero for cols >= r)
        new = -jnp.sum(a_r[:, None] * x, axis=0)  # -A[r, :] @ X
        return jnp.where(row == r, x + new[None, :], x)

    return lax.fori_loop(1, SUB, body, eye)


def _prep_kernel(*refs, chunk, gated, segmented):
    refs = list(refs)
    k_ref, v_ref, b_ref = refs[:3]
    pos = 3
    g_ref = refs[pos] if gated else None
    pos += gated
    r_ref = refs[pos] if segmented else None
    pos += segmented
    w_ref, ut_ref = refs[pos:]
    cd = k_ref.dtype
    nb = chunk // SUB
    row = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    col = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)

    ks, rhs_k, rhs_v, gs, rs = [], [], [], [], []
    for i in range(nb):
        sl = pl.ds(i * SUB, SUB)
        k_i = k_ref[sl, :]
        beta = b_ref[sl]
        G = g_ref[sl] if gated else None
        R = r_ref[sl] if segmented else None
        a = jnp.exp(G) if gated else jnp.ones((SUB,), F32)
        if segmented:
            a = jnp.where(R == 0, a, 0.0)
        ks.append(k_i)
        gs.append(G)
        rs.append(R)
        rhs_k.append((k_i.astype(F32) * (beta * a)[:, None]).astype(cd))
        rhs_v.append((v_ref[sl, :].astype(F32) * beta[:, None]).astype(cd))

    def a_block(i, j):
        """``A_ij`` (16 x 16, float32): rows of block i, columns of block j <= i."""
        beta = b_ref[pl.ds(i * SUB, SUB)]
        mask = (col < row) if i == j else None
        if segmented:
            same = rs[i][:, None] == rs[j][None, :]
            mask = same if mask is None else mask & same
        kk = _mm(ks[i], ks[j], tb=True) * beta[:, None]
        if gated:
            diff = gs[i][:, None] - gs[j][None, :]
            if mask is not None:
                diff = jnp.where(mask, diff, -jnp.inf)
            return kk * jnp.exp(diff)
        if mask is not None:
            kk = jnp.where(mask, kk, 0.0)
        return kk

    # Blocked inverse: T[i][j] for j <= i.
    T = [[None] * nb for _ in range(nb)]
    A = [[None] * nb for _ in range(nb)]
    for i in range(nb):
        for j in range(i):
            A[i][j] = a_block(i, j)
        T[i][i] = _diag_inverse(a_block(i, i))
        for j in range(i - 1, -1, -1):
            acc = _mm(A[i][j], T[j][j])
            for m in range(j + 1, i):
                acc = acc + _mm(A[i][m], T[m][j])
            T[i][j] = -_mm(T[i][i], acc)

    for i in range(nb):
        sl = pl.ds(i * SUB, SUB)
        w = None
        ut = None
        for j in range(i + 1):
            t_ij = T[i][j].astype(cd)
            dw, du = _mm(t_ij, rhs_k[j]), _mm(t_ij, rhs_v[j])
            w = dw if w is None else w + dw
            ut = du if ut is None else ut + du
        w_ref[sl, :] = w.astype(w_ref.dtype)
        ut_ref[sl, :] = ut.astype(ut_ref.dtype)


def prepare(
    k,
    v,
    beta,
    G,
    R,
    *,
    chunk: int,
    heads: int,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """``(W [B,T,H,K], Ut [B,T,H,V])`` in k's dtype. Shapes: k ``[B,T,H,K]``, v ``[B,T,H,V]``,
    beta ``[B,H,T]`` float32, G ``[B,H,T]`` float32 (within-chunk cumulative) or None,
    R ``[B,T]`` int32 or None. ``chunk`` must be a multiple of 16."""
    B, T, H, Kd = k.shape
    Vd = v.shape[-1]
    nc = T // chunk
    bh = _bh(heads)
    gated, segmented = G is not None, R is not None
    in_specs = [
        pl.BlockSpec((None, chunk, None, Kd), lambda n, i: (bh(i)[0], n, bh(i)[1], 0)),
        pl.BlockSpec((None, chunk, None, Vd), lambda n, i: (bh(i)[0], n, bh(i)[1], 0)),
        pl.BlockSpec((None, None, chunk), lambda n, i: (*bh(i), n)),
    ]
    args = [k, v, beta]
    if gated:
        in_specs.append(pl.BlockSpec((None, None, chunk), lambda n, i: (*bh(i), n)))
        args.append(G)
    if segmented:
        in_specs.append(pl.BlockSpec((None, chunk), lambda n, i: (bh(i)[0], n)))
        args.append(R)
    out_specs = [
        pl.BlockSpec((None, chunk, None, Kd), lambda n, i: (bh(i)[0], n, bh(i)[1], 0)),
        pl.BlockSpec((None, chunk, None, Vd), lambda n, i: (bh(i)[0], n, bh(i)[1], 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, T, H, Kd), k.dtype),
        jax.ShapeDtypeStruct((B, T, H, Vd), k.dtype),
    ]
    kernel = functools.partial(_prep_kernel, chunk=chunk, gated=gated, segmented=segmented)
    return pl.pallas_call(
        kernel,
        grid=(nc, B * H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="delta_prepare",
    )(*args)
