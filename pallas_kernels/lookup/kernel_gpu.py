"""gather_sum Pallas kernels for GPU, lowered through Triton.

All refs are whole arrays in global memory (no BlockSpecs); every load/store is a masked
pointer gather, so no input needs padding and shapes need not be powers of 2 (only the blocks
are). Indices and weights are passed transposed (``[j, n]``, an O(n j) XLA transpose) so the
per-table loads of ``bn`` indices / weights are contiguous; d_weights is likewise written
``[j, n]`` and transposed back. Indices are assumed in range (``ops.py`` clamps
out-of-range ones and zeroes their weights before calling).

Forward, grid ``(cdiv(n, bn), cdiv(d, bd))``: each program owns a ``[bn, bd]`` tile of ``y``
and loops over the ``j`` tables, gathering ``bn`` row segments of ``bd`` contiguous elements
per table (``tables`` viewed as ``[j * r, d]``, row ``j * r + idx``), accumulating
``w[:, j] * rows`` in float32 registers. Memory traffic is the minimum: each gathered row
segment is read once, ``y`` written once; the loop over ``j`` inside the program keeps the
accumulator on chip.

d_weights, grid ``(cdiv(n, bn), j)``: ``dw[n, j] = <dy[n], tables[j, idx[n, j]]>`` with a loop
over feature blocks inside the program.

d_tables, grid ``(j * r, cdiv(d, bd))``, deterministic (no atomics): the ``n * j`` (entry ->
table row) pairs are sorted by table row outside the kernel (``ops.py``), so the entries of
row ``k`` are the contiguous range ``[offsets[k], offsets[k + 1])``. The program owning row
``k`` sums ``w_e * dy[n_e]`` over that range, ``block_e`` entries per step, and writes the row
once (zeros for untouched rows), so duplicates accumulate in a fixed order and no zero-fill
pass or atomic is needed. A very hot row is summed by a single program (load imbalance).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .block_sizes import BlockSizes

__all__ = ["forward", "d_weights", "d_tables"]


def _params(bs: BlockSizes):
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _fwd_kernel(idx_ref, w_ref, tab_ref, y_ref, *, n, d, r, j_count, bn, bd):
    n0 = pl.program_id(0) * bn
    d0 = pl.program_id(1) * bd
    cols = d0 + jnp.arange(bd)
    nmask = (n0 + jnp.arange(bn)) < n
    mask = nmask[:, None] & (cols < d)[None, :]

    def body(j, acc):
        idx = plgpu.load(idx_ref.at[j, pl.ds(n0, bn)], mask=nmask, other=0)
        w = plgpu.load(w_ref.at[j, pl.ds(n0, bn)], mask=nmask, other=0)
        rows = plgpu.load(tab_ref.at[(j * r + idx)[:, None], cols[None, :]], mask=mask, other=0)
        return acc + w.astype(jnp.float32)[:, None] * rows.astype(jnp.float32)

    acc = lax.fori_loop(0, j_count, body, jnp.zeros((bn, bd), jnp.float32))
    plgpu.store(y_ref.at[pl.ds(n0, bn), pl.ds(d0, bd)], acc.astype(y_ref.dtype), mask=mask)


def forward(indices, weights, tables, *, block_sizes: BlockSizes, interpret=False):
    """y [n, d] in tables.dtype; indices must be in range."""
    n, j = indices.shape
    t, r, d = tables.shape
    stride = r if t == j else 0  # one table shared by every j when t == 1
    bn, bd = block_sizes.block_n, block_sizes.block_d
    kernel = functools.partial(_fwd_kernel, n=n, d=d, r=stride, j_count=j, bn=bn, bd=bd)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), pl.cdiv(d, bd)),
        out_shape=jax.ShapeDtypeStruct((n, d), tables.dtype),
        compiler_params=_params(block_sizes),
        interpret=interpret,
        name="gather_sum_fwd",
    )(indices.T, weights.T, tables.reshape(t * r, d))


def _dw_kernel(idx_ref, dy_ref, tab_ref, dw_ref, *, n, d, r, bn, bd):
    n0 = pl.program_id(0) * bn
    j = pl.program_id(1)
    rows_n = n0 + jnp.arange(bn)
    nmask = rows_n < n
    idx = plgpu.load(idx_ref.at[j, pl.ds(n0, bn)], mask=nmask, other=0)
    tab_rows = (j * r + idx)[:, None]

    def body(c, acc):
        cols = c * bd + jnp.arange(bd)
        mask = nmask[:, None] & (cols < d)[None, :]
        g = plgpu.load(dy_ref.at[rows_n[:, None], cols[None, :]], mask=mask, other=0)
        t = plgpu.load(tab_ref.at[tab_rows, cols[None, :]], mask=mask, other=0)
        return acc + jnp.sum(g.astype(jnp.float32) * t.astype(jnp.float32), axis=1)

    acc = lax.fori_loop(0, pl.cdiv(d, bd), body, jnp.zeros((bn,), jnp.float32))
    plgpu.store(dw_ref.at[j, pl.ds(n0, bn)], acc, mask=nmask)


def d_weights(indices, dy, tables, *, block_sizes: BlockSizes, interpret=False):
    """dw [n, j] float32: dw[n, j] = <dy[n], tables[j, idx[n, j]]>."""
    n, j = indices.shape
    t, r, d = tables.shape
    stride = r if t == j else 0  # one table shared by every j when t == 1
    bn, bd = block_sizes.block_n, block_sizes.block_d
    kernel = functools.partial(_dw_kernel, n=n, d=d, r=stride, bn=bn, bd=bd)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), j),
        out_shape=jax.ShapeDtypeStruct((j, n), jnp.float32),
        compiler_params=_params(block_sizes),
        interpret=interpret,
        name="gather_sum_d_weights",
    )(indices.T, dy, tables.reshape(t * r, d)).T


def _dtab_kernel(offs_ref, n_ref, w_ref, dy_ref, out_ref, *, d, be, bd):
    k = pl.program_id(0)
    d0 = pl.program_id(1) * bd
    cols = d0 + jnp.arange(bd)
    dmask = cols < d
    start = offs_ref[k]
    end = offs_ref[k + 1]

    def body(c, acc):
        e = start + c * be + jnp.arange(be)
        emask = e < end
        n_e = plgpu.load(n_ref.at[e], mask=emask, other=0)
        w_e = plgpu.load(w_ref.at[e], mask=emask, other=0)
        mask = emask[:, None] & dmask[None, :]
        g = plgpu.load(dy_ref.at[n_e[:, None], cols[None, :]], mask=mask, other=0)
        return acc + jnp.sum(w_e[:, None] * g.astype(jnp.float32), axis=0)

    trips = (end - start + be - 1) // be
    acc = lax.fori_loop(0, trips, body, jnp.zeros((bd,), jnp.float32))
    plgpu.store(out_ref.at[k, pl.ds(d0, bd)], acc.astype(out_ref.dtype), mask=dmask)


def d_tables(
    offsets, n_sorted, w_sorted, dy, *, rows, out_dtype, block_sizes: BlockSizes, interpret=False
):
    """d_tables [rows, d] (rows = j * r) from entries sorted by table row.

    offsets [rows + 1] int32: entries of row k are [offsets[k], offsets[k+1]) of the sorted
    arrays; n_sorted [e] int32 token of each entry; w_sorted [e] float32 its weight.
    """
    d = dy.shape[1]
    be, bd = block_sizes.block_e, block_sizes.block_d
    kernel = functools.partial(_dtab_kernel, d=d, be=be, bd=bd)
    return pl.pallas_call(
        kernel,
        grid=(rows, pl.cdiv(d, bd)),
        out_shape=jax.ShapeDtypeStruct((rows, d), out_dtype),
        compiler_params=_params(block_sizes),
        interpret=interpret,
        name="gather_sum_d_tables",
    )(offsets, n_sorted, w_sorted, dy)
