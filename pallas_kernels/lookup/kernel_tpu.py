"""gather_sum Pallas kernels for TPU (Mosaic): row gathers by DMA from HBM.

The tables stay in HBM (``memory_space=pl.ANY``, viewed as ``[j * r, d]``); each kernel copies
the rows it needs into VMEM with one async DMA per row, double-buffered over the loop on
tables so the copies of table ``j + 1`` fly while table ``j`` is being accumulated. The indices
that drive the DMAs are read as scalars from SMEM. They are *blocked* into SMEM per grid step
(``indices`` reshaped to ``[n / bn, 1, bn * j]``, block ``(None, 1, bn * j)``) rather than
scalar-prefetched whole: scalar prefetch would put all ``n * j`` indices in SMEM at once, which
overflows it for realistic sizes (8192 tokens x 128 tables = 4 MiB), and no ``index_map`` needs
them (the gather is done by explicit DMAs, not by BlockSpecs).

Callers (``ops.py``) pad ``n`` to a multiple of ``block_n``, clamp out-of-range indices and
zero their weights. ``block_d`` divides ``d`` (or equals it).

* forward, grid ``(n / bn, d / bd)``: ``acc [bn, bd] += w[:, j] * rows_j`` in float32. The
  weight column is taken from the ``[bn, j]`` weight block with a lane mask (dynamic lane
  slicing is avoided on purpose).
* d_weights, grid ``(n / bn,)``: full rows are gathered, ``dw[:, j] = sum(dy * rows_j, -1)``.
* d_tables, grid ``(d / bd, e / be)`` with the entry axis sequential ("arbitrary"): entries
  sorted by table row stream through SMEM; consecutive entries with the same row accumulate
  ``w_e * dy[n_e]`` (``dy`` rows DMA'd from HBM, double-buffered) into a VMEM row, which is
  written to that table row by DMA when the row changes. Output rows no entry touches keep the
  zeros of the aliased input, so the kernel writes touched rows only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .block_sizes import BlockSizes

__all__ = ["forward", "d_weights", "d_tables"]


def _smem_blocks(x, block):
    """[m] or [m/block, block] -> [m/block, 1, block] so a (None, 1, block) SMEM block is legal."""
    return x.reshape(-1, 1, block)


def _row_copies(idx_ref, tab_hbm, buf, sem, j, slot, *, r, j_count, bn, cols):
    return [
        pltpu.make_async_copy(
            tab_hbm.at[pl.ds(j * r + idx_ref[0, b * j_count + j], 1), cols],
            buf.at[slot, pl.ds(b, 1)],
            sem.at[slot],
        )
        for b in range(bn)
    ]


def _fwd_kernel(idx_ref, w_ref, tab_hbm, y_ref, buf, sem, *, r, j_count, bn, bd):
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bd, bd), bd)
    copies = functools.partial(
        _row_copies, idx_ref, tab_hbm, buf, sem, r=r, j_count=j_count, bn=bn, cols=cols
    )
    for c in copies(0, 0):
        c.start()
    lane = lax.broadcasted_iota(jnp.int32, (bn, j_count), 1)
    w = w_ref[...].astype(jnp.float32)

    def body(j, acc):
        slot = j % 2

        @pl.when(j + 1 < j_count)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        w_col = jnp.sum(jnp.where(lane == j, w, 0.0), axis=1, keepdims=True)
        return acc + w_col * buf[slot].astype(jnp.float32)

    acc = lax.fori_loop(0, j_count, body, jnp.zeros((bn, bd), jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def forward(indices, weights, tables, *, block_sizes: BlockSizes, interpret=False):
    """y [n, d]; n % block_n == 0, indices in range."""
    n, j = indices.shape
    t, r, d = tables.shape
    stride = r if t == j else 0  # one table shared by every j when t == 1
    bn, bd = block_sizes.block_n, block_sizes.block_d
    kernel = functools.partial(_fwd_kernel, r=stride, j_count=j, bn=bn, bd=bd)
    return pl.pallas_call(
        kernel,
        grid=(n // bn, d // bd),
        in_specs=[
            pl.BlockSpec((None, 1, bn * j), lambda i, c: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((bn, j), lambda i, c: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((bn, bd), lambda i, c: (i, c)),
        out_shape=jax.ShapeDtypeStruct((n, d), tables.dtype),
        scratch_shapes=[pltpu.VMEM((2, bn, bd), tables.dtype), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="gather_sum_fwd",
    )(_smem_blocks(indices, bn * j), weights, tables.reshape(t * r, d))


def _dw_kernel(idx_ref, dy_ref, tab_hbm, dw_ref, buf, sem, *, r, j_count, bn):
    copies = functools.partial(
        _row_copies, idx_ref, tab_hbm, buf, sem, r=r, j_count=j_count, bn=bn, cols=slice(None)
    )
    for c in copies(0, 0):
        c.start()
    lane = lax.broadcasted_iota(jnp.int32, (bn, j_count), 1)
    g = dy_ref[...].astype(jnp.float32)

    def body(j, dw):
        slot = j % 2

        @pl.when(j + 1 < j_count)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        s = jnp.sum(g * buf[slot].astype(jnp.float32), axis=1, keepdims=True)
        return jnp.where(lane == j, s, dw)

    dw_ref[...] = lax.fori_loop(0, j_count, body, jnp.zeros((bn, j_count), jnp.float32))


def d_weights(indices, dy, tables, *, block_sizes: BlockSizes, interpret=False):
    """dw [n, j] float32; n % block_n == 0."""
    n, j = indices.shape
    t, r, d = tables.shape
    stride = r if t == j else 0  # one table shared by every j when t == 1
    bn = block_sizes.block_n
    kernel = functools.partial(_dw_kernel, r=stride, j_count=j, bn=bn)
    return pl.pallas_call(
        kernel,
        grid=(n // bn,),
        in_specs=[
            pl.BlockSpec((None, 1, bn * j), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((bn, d), lambda i: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((bn, j), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, j), jnp.float32),
        scratch_shapes=[pltpu.VMEM((2, bn, d), tables.dtype), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="gather_sum_d_weights",
    )(_smem_blocks(indices, bn * j), dy, tables.reshape(t * r, d))


def _dtab_kernel(
    keys_ref,
    n_ref,
    w_ref,
    dy_hbm,
    zeros_hbm,
    out_hbm,
    rowbuf,
    acc_ref,
    stage,
    cur_ref,
    sem,
    osem,
    *,
    be,
    bd,
    num_blocks,
):
    del zeros_hbm  # aliased to out_hbm: rows no entry touches stay zero
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * bd, bd), bd)
    eb = pl.program_id(1)

    def copy(b, slot):
        return pltpu.make_async_copy(
            dy_hbm.at[pl.ds(n_ref[0, b], 1), cols], rowbuf.at[slot], sem.at[slot]
        )

    def flush():
        stage[...] = acc_ref[...].astype(stage.dtype)
        c = pltpu.make_async_copy(stage, out_hbm.at[pl.ds(cur_ref[0], 1), cols], osem.at[0])
        c.start()
        c.wait()

    @pl.when(eb == 0)
    def _():
        cur_ref[0] = keys_ref[0, 0]
        acc_ref[...] = jnp.zeros_like(acc_ref)

    copy(0, 0).start()

    def body(b, carry):
        slot = b % 2

        @pl.when(b + 1 < be)
        def _():
            copy(b + 1, 1 - slot).start()

        copy(b, slot).wait()
        key = keys_ref[0, b]

        @pl.when(key != cur_ref[0])
        def _():
            flush()
            acc_ref[...] = jnp.zeros_like(acc_ref)
            cur_ref[0] = key

        acc_ref[...] += w_ref[0, b] * rowbuf[slot].astype(jnp.float32)
        return carry

    lax.fori_loop(0, be, body, 0)

    @pl.when(eb == num_blocks - 1)
    def _():
        flush()


def d_tables(
    keys_sorted,
    n_sorted,
    w_sorted,
    dy,
    *,
    rows,
    out_dtype,
    block_sizes: BlockSizes,
    interpret=False,
):
    """d_tables [rows, d] from entries sorted by table row (keys_sorted ascending).

    keys_sorted, n_sorted [e] int32 and w_sorted [e] float32 with e % block_e == 0 (pad with
    the last key and weight 0).
    """
    e = keys_sorted.shape[0]
    d = dy.shape[1]
    be, bd = block_sizes.block_e, block_sizes.block_d
    num_blocks = e // be
    kernel = functools.partial(_dtab_kernel, be=be, bd=bd, num_blocks=num_blocks)
    smem = functools.partial(
        pl.BlockSpec, (None, 1, be), lambda c, i: (i, 0, 0), memory_space=pltpu.SMEM
    )
    return pl.pallas_call(
        kernel,
        grid=(d // bd, num_blocks),
        in_specs=[
            smem(),
            smem(),
            smem(),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        out_shape=jax.ShapeDtypeStruct((rows, d), out_dtype),
        scratch_shapes=[
            pltpu.VMEM((2, 1, bd), dy.dtype),
            pltpu.VMEM((1, bd), jnp.float32),
            pltpu.VMEM((1, bd), out_dtype),
            pltpu.SMEM((1,), jnp.int32),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((1,)),
        ],
        input_output_aliases={4: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="gather_sum_d_tables",
    )(
        _smem_blocks(keys_sorted, be),
        _smem_blocks(n_sorted, be),
        _smem_blocks(w_sorted, be),
        dy,
        jnp.zeros((rows, d), out_dtype),
    )
