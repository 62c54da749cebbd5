"""gather_sum in plain jnp: take rows, weight them, sum over tables (the CPU fast path).

    y[n] = sum_j w[n, j] * tables[j, idx[n, j]]

The tables are processed in groups of ``g`` (a divisor of ``j``) by a ``lax.scan`` so that the
gathered rows never take more than about ``_MAX_ELEMS`` elements at once (the one-shot form
would hold an ``[n, j, d]`` array). Rows are gathered with ``jnp.take_along_axis``-style
indexing, accumulated in float32, and the result is cast to ``tables.dtype``.

Backward (a ``custom_vjp``, so no ``[n, j, d]`` residual is saved; only the inputs are):

    d_w[n, j]         = <dy[n], tables[j, idx[n, j]]>
    d_tables[j, r, :] = sum_{n : idx[n, j] = r} w[n, j] * dy[n]    (a scatter-add)

The scatter-add touches only the rows that appear in ``idx``; duplicates accumulate. With one
shared table (``tables [1, r, d]``) every group scatters into it (a float32 carry).

Out-of-range indices are dropped (weight treated as 0, no gradient), matching the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["gather_sum", "sanitize"]

_MAX_ELEMS = 1 << 22


def sanitize(indices: jax.Array, weights: jax.Array, rows: int):
    """Clamp out-of-range indices to 0 and zero their weights; also return the valid mask."""
    valid = (indices >= 0) & (indices < rows)
    safe = jnp.where(valid, indices, 0).astype(jnp.int32)
    w = jnp.where(valid, weights, jnp.zeros((), weights.dtype))
    return safe, w, valid


def _group(j: int, n: int, d: int) -> int:
    cap = max(1, _MAX_ELEMS // max(1, n * d))
    g = min(j, cap)
    while j % g:
        g -= 1
    return g


def _shared(indices, tables) -> bool:
    return tables.shape[0] != indices.shape[1]


def _grouped(indices, weights, tables):
    """Reshape to scan over groups: idx/w [G, n, g], tables [G, g, r, d] ([G] dummy if shared)."""
    n, j = indices.shape
    t, r, d = tables.shape
    g = _group(j, n, d)
    idx_g = indices.reshape(n, j // g, g).transpose(1, 0, 2)
    w_g = weights.reshape(n, j // g, g).transpose(1, 0, 2)
    tab_g = jnp.zeros((j // g,), jnp.int32) if t != j else tables.reshape(j // g, g, r, d)
    return idx_g, w_g, tab_g


def _gather_rows(tab, idx, shared):
    """tab [g, r, d] (or [1, r, d] if shared), idx [n, g] -> rows [n, g, d]."""
    if shared:
        return tab[0][idx]
    return tab[jnp.arange(tab.shape[0])[None, :], idx]


def _forward(indices, weights, tables):
    n = indices.shape[0]
    d = tables.shape[2]
    idx_g, w_g, tab_g = _grouped(indices, weights, tables)
    shared = _shared(indices, tables)

    def step(acc, xs):
        idx, w, tab = xs
        rows = _gather_rows(tables if shared else tab, idx, shared).astype(jnp.float32)
        return acc + jnp.einsum(
            "ng,ngd->nd", w.astype(jnp.float32), rows, precision=lax.Precision.HIGHEST
        ), None

    acc, _ = lax.scan(step, jnp.zeros((n, d), jnp.float32), (idx_g, w_g, tab_g))
    return acc.astype(tables.dtype)


@jax.custom_vjp
def _gather_sum(indices, weights, tables):
    return _forward(indices, weights, tables)


def _fwd(indices, weights, tables):
    return _forward(indices, weights, tables), (indices, weights, tables)


def _bwd(res, dy):
    indices, weights, tables = res
    n, j = indices.shape
    t, r, d = tables.shape
    idx_g, w_g, tab_g = _grouped(indices, weights, tables)
    shared = _shared(indices, tables)
    dy32 = dy.astype(jnp.float32)
    g = idx_g.shape[2]

    def step(acc, xs):
        idx, w, tab = xs
        rows = _gather_rows(tables if shared else tab, idx, shared).astype(jnp.float32)
        dw = jnp.einsum("nd,ngd->ng", dy32, rows, precision=lax.Precision.HIGHEST)
        contrib = w.astype(jnp.float32)[:, :, None] * dy32[:, None, :]  # [n, g, d]
        if shared:  # accumulate every group into the one table (float32 carry)
            return acc.at[idx].add(contrib), (dw, None)
        tab_ids = jnp.broadcast_to(jnp.arange(g)[None, :], idx.shape)
        dtab = jnp.zeros((g, r, d), jnp.float32).at[tab_ids, idx].add(contrib)
        return acc, (dw, dtab.astype(tables.dtype))

    acc0 = jnp.zeros((r, d), jnp.float32) if shared else None
    acc, (dw_g, dtab_g) = lax.scan(step, acc0, (idx_g, w_g, tab_g))
    d_weights = dw_g.transpose(1, 0, 2).reshape(n, j).astype(weights.dtype)
    if shared:
        d_tables = acc.astype(tables.dtype)[None]
    else:
        d_tables = dtab_g.reshape(j, r, d)
    return None, d_weights, d_tables


_gather_sum.defvjp(_fwd, _bwd)


@functools.partial(jax.jit)
def gather_sum(indices: jax.Array, weights: jax.Array, tables: jax.Array) -> jax.Array:
    """gather_sum by take + weighted sum (see module docstring). Inputs are not validated."""
    safe, w, _ = sanitize(indices, weights, tables.shape[1])
    return _gather_sum(safe, w, tables)
