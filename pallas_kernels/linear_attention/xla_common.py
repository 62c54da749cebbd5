"""Shared pieces of the chunked ``jnp`` path (:mod:`.xla`, :mod:`.xla_delta`).

Both ops run one ``lax.fori_loop`` over chunks in the forward and one (reversed) in the
backward, and do *all* chunk-local work inside the loop body, on ``[b, h, C, d]`` slices that
stay in cache. (On a CPU the alternative, batching each step over all chunks before a scan,
materialises a dozen ``[t, C]``-sized intermediates and was ~2x slower, bound by memory
traffic.) Inputs stay in their ``[b, t, h, d]`` layout; a chunk is a ``dynamic_slice`` along
time and its outputs are written back with ``dynamic_update_slice`` (in place).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .reference import segment_runs

F32 = jnp.float32


def pad_time(x, tp):
    """Zero-pad axis 1 (time) of ``x`` to length ``tp`` (None stays None)."""
    if x is None or x.shape[1] == tp:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, tp - x.shape[1])
    return jnp.pad(x, pad)


def take(x, i, c):
    """Chunk ``i`` of ``x [b, t, h, ...]`` as float32 ``[b, h, c, ...]``."""
    x = lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
    return jnp.swapaxes(x.astype(F32), 1, 2)


def put(buf, x, i, c):
    """Write ``x [b, h, c, ...]`` into chunk ``i`` of ``buf [b, t, h, ...]`` (buf's dtype)."""
    x = jnp.swapaxes(x, 1, 2).astype(buf.dtype)
    return lax.dynamic_update_slice_in_dim(buf, x, i * c, axis=1)


def neg_inf_exp(mask, x):
    """exp(x) where mask, exactly 0 elsewhere (the masked-out x is never exponentiated)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def where0(mask, x):
    """x where mask (broadcast), 0 elsewhere; mask None keeps x."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _sum_matrix(c):
    """[2C, C] float32 0/1: rows 0..C-1 sum tokens j <= i (inclusive cumulative sum), rows
    C..2C-1 sum tokens j > i (reverse exclusive cumulative sum)."""
    i = jnp.arange(c)[:, None]
    j = jnp.arange(c)[None, :]
    return jnp.concatenate([j <= i, j > i], axis=0).astype(F32)


def gate_sums(g):
    """``(G, rest, G_C)`` along the chunk axis 2 of ``g [b, h, C(, k)]``.

    ``G`` is the inclusive cumulative sum, ``rest = G_C - G`` the reverse *exclusive*
    cumulative sum (a sum, not a difference: the last token's exponent is an exact 0), ``G_C``
    the chunk total with the chunk axis kept (size 1). Both sums are one small matmul with a
    0/1 matrix: XLA's CPU ``cumsum`` (a ``reduce_window``) costs O(C^2) adds and was the largest
    cost of the per-key path.
    """
    c = g.shape[2]
    both = jnp.einsum("ij,bhj...->bhi...", _sum_matrix(c), g)
    big_g = lax.slice_in_dim(both, 0, c, axis=2)
    rest = lax.slice_in_dim(both, c, 2 * c, axis=2)
    g_end = lax.slice_in_dim(big_g, c - 1, c, axis=2)
    return big_g, rest, g_end


def gate_sums_bwd(d_big_g, d_rest, d_end):
    """Cotangent of ``g`` from those of ``(G, rest, G_C)`` (see :func:`gate_sums`).

    ``dg_t = sum_{i >= t} dG_i + sum_{j < t} drest_j + dG_C`` (the transposed 0/1 matmul). The
    last token's ``drest`` is O(1) (its exponent is 0) and meets only exact zeros, so no
    rounding noise swamps the tiny gate gradients of strong decays.
    """
    c = d_big_g.shape[2]
    both = jnp.concatenate([d_big_g, d_rest], axis=2)
    return jnp.einsum("ij,bhi...->bhj...", _sum_matrix(c), both) + d_end


def runs_of(segment_ids, b, t, tp):
    """int32 run index [b, tp] (+1 at every change of segment id; padding continues the last
    run), or None without segments."""
    if segment_ids is None:
        return None
    run = segment_runs(segment_ids, b, t)
    if tp > t:
        run = jnp.concatenate([run, jnp.broadcast_to(run[:, -1:], (b, tp - t))], axis=1)
    return run


class ChunkMasks:
    """Masks of chunk ``i`` (broadcastable against ``[b, h, ...]``).

    ``intra`` / ``strict`` [b|1, 1, C, C]: j <= i / j < i and the same run. ``sees`` [b, 1, C]
    or None: token i sees the incoming state (same run as the token before the chunk; the
    initial state belongs to run 0). ``last`` [b, 1, C] or None: token j is in the chunk's last
    run. ``carry`` [b, 1, 1, 1] or None: no boundary in the chunk (the state passes through).
    """

    def __init__(self, runs, i, c):
        causal = jnp.tril(jnp.ones((c, c), bool))[None, None]
        strict = jnp.tril(jnp.ones((c, c), bool), -1)[None, None]
        if runs is None:
            self.intra, self.strict = causal, strict
            self.sees = self.last = self.carry = None
            return
        run = lax.dynamic_slice_in_dim(runs, i * c, c, axis=1)  # [b, C]
        before = lax.dynamic_slice_in_dim(runs, jnp.maximum(i * c - 1, 0), 1, axis=1)
        prev = jnp.where(i > 0, before, jnp.zeros_like(before))  # [b, 1]
        same = (run[:, :, None] == run[:, None, :])[:, None]
        self.intra = causal & same
        self.strict = strict & same
        self.sees = (run == prev)[:, None]
        self.last = (run == run[:, -1:])[:, None]
        self.carry = (run[:, -1:] == prev)[:, :, None, None]


def vec(mask):
    """[..., C] token mask -> [..., C, 1] (against [..., C, d]); None stays None."""
    return None if mask is None else mask[..., None]


def static_scale(scale):
    """``(static float or None, traced scale or None)``: a concrete scale is baked in."""
    try:
        return float(scale), None
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None, scale


def prepare(q, k, v, scale, initial_state, chunk_size):
    """The shared preamble of the chunked ops.

    Returns ``(fixed_scale, q, s0, tp)``: a traced ``scale`` is folded into ``q`` (so it stays
    differentiable outside the ops' custom_vjp) and the static scale becomes 1; ``s0`` is the
    float32 initial state (zeros if None); ``tp`` is ``t`` rounded up to the chunk size.
    """
    b, t, h, dk = q.shape
    fixed, traced = static_scale(scale)
    if traced is not None:
        q, fixed = jnp.asarray(q, jnp.float32) * traced, 1.0
    if initial_state is None:
        s0 = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    else:
        s0 = jnp.asarray(initial_state, jnp.float32)
    return fixed, q, s0, -(-t // chunk_size) * chunk_size
