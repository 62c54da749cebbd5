"""custom_vjp wiring of the gather_sum Pallas kernels (GPU/Triton or TPU/Mosaic).

Forward: one kernel, ``y = sum_j w[:, j] * tables[j, idx[:, j]]`` (float32 accumulation, output
in ``tables.dtype``). Residuals: the (sanitised) inputs only.

Backward, two kernels:

* ``d_weights[n, j] = <dy[n], tables[j, idx[n, j]]>`` (a second gather);
* ``d_tables`` = scatter-add of ``w[n, j] * dy[n]`` into row ``idx[n, j]`` of table ``j``. The
  ``n * j`` entries are sorted by flat table row ``j * r + idx`` (``lax.sort``, stable) so that
  duplicates become contiguous runs that one program reduces in a fixed order: deterministic, no
  atomics. Work is proportional to the ``n * j`` entries: on GPU one program per table row sums
  its run (an empty run writes zeros, so no separate zero fill); on TPU a sequential pass writes
  each touched row once into an aliased zero buffer.

``indices`` get no cotangent (they are integers). Out-of-range indices are clamped to row 0 with
their weight set to 0 before any kernel runs (``xla.sanitize``): the term is dropped and its
weight's gradient is 0, as in the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import kernel_gpu, kernel_tpu
from .block_sizes import BlockSizes
from .xla import sanitize

__all__ = ["gather_sum", "sorted_entries"]


def sorted_entries(indices: jax.Array, weights: jax.Array, stride: int):
    """Entries (n, j) sorted by flat table row ``j * stride + idx`` (stride 0: one shared table).

    Returns (keys, token ids, float32 weights), each [n * j].
    """
    n, j = indices.shape
    keys = (jnp.arange(j, dtype=jnp.int32)[None, :] * stride + indices).reshape(-1)
    order = jnp.arange(n * j, dtype=jnp.int32)
    keys_s, order_s = lax.sort((keys, order), num_keys=1, is_stable=True)
    n_s = order_s // j
    w_s = weights.reshape(-1).astype(jnp.float32)[order_s]
    return keys_s, n_s, w_s


def _pad_rows(x, multiple):
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def _forward(platform, bs, interpret, indices, weights, tables):
    if platform == "gpu":
        return kernel_gpu.forward(indices, weights, tables, block_sizes=bs, interpret=interpret)
    n = indices.shape[0]
    y = kernel_tpu.forward(
        _pad_rows(indices, bs.block_n),
        _pad_rows(weights, bs.block_n),
        tables,
        block_sizes=bs,
        interpret=interpret,
    )
    return y[:n]


def _d_weights(platform, bs, interpret, indices, dy, tables):
    if platform == "gpu":
        return kernel_gpu.d_weights(indices, dy, tables, block_sizes=bs, interpret=interpret)
    n = indices.shape[0]
    dw = kernel_tpu.d_weights(
        _pad_rows(indices, bs.block_n),
        _pad_rows(dy, bs.block_n),
        tables,
        block_sizes=bs,
        interpret=interpret,
    )
    return dw[:n]


def _d_tables(platform, bs, interpret, indices, weights, dy, tables):
    t, r, d = tables.shape
    keys_s, n_s, w_s = sorted_entries(indices, weights, r if t == indices.shape[1] else 0)
    if platform == "gpu":
        counts = jnp.zeros((t * r,), jnp.int32).at[keys_s].add(1)
        offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)])
        out = kernel_gpu.d_tables(
            offsets.astype(jnp.int32),
            n_s,
            w_s,
            dy,
            rows=t * r,
            out_dtype=tables.dtype,
            block_sizes=bs,
            interpret=interpret,
        )
    else:
        pad = (-keys_s.shape[0]) % bs.block_e
        if pad:
            keys_s = jnp.concatenate([keys_s, jnp.broadcast_to(keys_s[-1:], (pad,))])
            n_s = jnp.concatenate([n_s, jnp.zeros((pad,), jnp.int32)])
            w_s = jnp.concatenate([w_s, jnp.zeros((pad,), jnp.float32)])
        out = kernel_tpu.d_tables(
            keys_s,
            n_s,
            w_s,
            dy,
            rows=t * r,
            out_dtype=tables.dtype,
            block_sizes=bs,
            interpret=interpret,
        )
    return out.reshape(t, r, d)


@functools.cache
def _make_op(platform: str, bs: BlockSizes, interpret):
    @jax.custom_vjp
    def op(indices, weights, tables):
        return _forward(platform, bs, interpret, indices, weights, tables)

    def fwd(indices, weights, tables):
        return op(indices, weights, tables), (indices, weights, tables)

    def bwd(res, dy):
        indices, weights, tables = res
        dy = dy.astype(tables.dtype)
        dw = _d_weights(platform, bs, interpret, indices, dy, tables).astype(weights.dtype)
        dtab = _d_tables(platform, bs, interpret, indices, weights, dy, tables)
        return None, dw, dtab

    op.defvjp(fwd, bwd)
    return op


def gather_sum(
    indices, weights, tables, *, platform: str, block_sizes: BlockSizes, interpret=False
):
    """Pallas gather_sum for ``platform`` ("gpu" or "tpu"); inputs already validated."""
    safe, w, _ = sanitize(indices, weights, tables.shape[1])
    return _make_op(platform, block_sizes, interpret)(safe, w, tables)
