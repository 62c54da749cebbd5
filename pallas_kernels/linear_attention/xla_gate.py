"""Intra-chunk scores of gated linear attention with a per-key-dim gate, and their backward.

For one chunk of ``C`` tokens with inclusive cumulative gates ``G [C, k]``::

    P_ij = sum_k q_ik k_jk exp(G_ik - G_jk)      (j <= i)

is not one matmul of pre-scaled operands unless the scaling has a common reference point
``M``: ``exp(G_i - G_j) = exp(G_i - M) exp(M - G_j)``. Two forms are used:

* **fast** (one matmul): ``M = G_C / 2`` per key dim (half the chunk's total decay). Every
  exponent then lies in ``[-LIMIT, LIMIT]`` when every ``|G_i - M| <= LIMIT``, which holds
  whenever a chunk's total decay is ``<= 2 * LIMIT`` in every key dim (mild and typical
  decays). The factors ``exp(+-LIMIT)`` are far inside float32 range and the products are
  exact to rounding (a product of two exponentials carries no cancellation).
* **exact** (any decay strength; every exponent ``<= 0``): a binary tree over the chunk. At
  the level with blocks of ``2s`` tokens, the pairs with the query in the second half and
  the key in the first half of a block are factored through ``R``, the cumulative gate at
  the block's midpoint, which lies between key and query::

      exp(G_i - G_j) = exp(G_i - R) * exp(R - G_j),   both exponents <= 0,

  one ``[s, k] x [k, s]`` matmul per block. Every pair ``j < i`` is split at exactly one
  level (the highest bit in which ``i`` and ``j`` differ); the diagonal ``j = i`` is the
  plain ``q_i . k_i``. Cost ``O(C k log C)`` elementwise and ``O(C^2 k)`` in matmuls.

The form is chosen at run time for each chunk (``lax.cond`` on the chunk's largest
``|G_i - M|`` over batch, heads and key dims), so chunks with strong decays take the exact
form and stay finite while the others keep the fast one.

Backward, for a cotangent ``dP`` of the strictly lower part (the diagonal has no gate and is
handled by the caller)::

    dq_i = sum_{j<i} dP_ij k_j exp(G_i - G_j),   dk_j = sum_{i>j} dP_ij q_i exp(G_i - G_j),
    dG   = q * dq - k * dk                                         (elementwise, exact)

``dG`` has no term from the diagonal: its two O(1) paths (``+x`` and ``-x``) would cancel
only to rounding and swamp the true gate gradient (``~exp(g)``) under strong decay.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["LIMIT", "fast_form_ok", "scores", "scores_bwd"]

# exp(30) ~ 1e13: q * exp(30), and products up to exp(60) * |q| |k| k_dim in the (discarded)
# upper triangle of the fast matmul, stay finite.
LIMIT = 30.0


def _fast_factor(big_g, g_end):
    """``exp(G - M)`` with the reference ``M = G_C / 2`` (g_end: [..., 1, k])."""
    return jnp.exp(big_g - 0.5 * g_end)


def fast_form_ok(big_g, g_end):
    """Scalar bool: every ``|G_i - G_C / 2| <= LIMIT`` (the fast form is safe)."""
    return jnp.max(jnp.abs(big_g - 0.5 * g_end)) <= LIMIT


def _halves(x, s):
    """[..., C, d] -> [..., C / 2s, 2, s, d]."""
    lead, c = x.shape[:-2], x.shape[-2]
    return x.reshape(lead + (c // (2 * s), 2, s) + x.shape[-1:])


def _half_mask(ndim, which):
    """Bool [1, .., 1, 2, 1, 1] (rank ndim) selecting half ``which`` of [..., 2, s, k]."""
    return (jnp.arange(2) == which).reshape((1,) * (ndim - 3) + (2, 1, 1))


def _level_factors(q, k, big_g, s):
    """Operands of tree level ``s`` (blocks of ``2s`` tokens), shape [..., C/2s, 2, s, k].

    Half 1 (queries): ``q exp(G - R)``; half 0 (keys): ``k exp(R - G)``; ``R`` = G at the last
    token of half 0. Also returns the factor tensor itself (to scale cotangents back).
    """
    gb = _halves(big_g, s)
    ref = gb[..., 0:1, s - 1 : s, :]  # [..., nb, 1, 1, k]
    second = _half_mask(gb.ndim, 1)
    e = jnp.exp(jnp.where(second, gb - ref, ref - gb))  # exponent <= 0 for g <= 0
    x = jnp.where(second, _halves(q, s), _halves(k, s)) * e
    return x, e


def _levels(c):
    s = 1
    while s < c:
        yield s
        s *= 2


def _tree_scores(q, k, big_g):
    """Exact ``P`` (lower triangle incl. diagonal; zero above) by the binary tree."""
    lead, c = q.shape[:-2], q.shape[-2]
    blocks = jnp.sum(q * k, axis=-1)[..., None, None]  # [..., C, 1, 1]: the diagonal
    for s in _levels(c):
        x, _ = _level_factors(q, k, big_g, s)
        cross = jnp.einsum("...ik,...jk->...ij", x[..., 1, :, :], x[..., 0, :, :])
        prev = blocks.reshape(lead + (c // (2 * s), 2, s, s))
        top = jnp.concatenate([prev[..., 0, :, :], jnp.zeros_like(cross)], axis=-1)
        bottom = jnp.concatenate([cross, prev[..., 1, :, :]], axis=-1)
        blocks = jnp.concatenate([top, bottom], axis=-2)  # [..., nb, 2s, 2s]
    return blocks.reshape(lead + (c, c))


def _tree_bwd(q, k, big_g, dp):
    """(dq, dk) of the strictly lower part of ``P`` for the cotangent ``dp`` [..., C, C]."""
    c = q.shape[-2]
    dq = jnp.zeros_like(q)
    dk = jnp.zeros_like(k)
    blocks = dp[..., None, :, :]  # [..., nb=1, C, C]
    for s in reversed(list(_levels(c))):
        cross = blocks[..., s:, :s]  # [..., nb, s, s]: queries of half 1 x keys of half 0
        blocks = jnp.stack([blocks[..., :s, :s], blocks[..., s:, s:]], axis=-3)
        blocks = blocks.reshape(blocks.shape[:-4] + (-1, s, s))
        x, e = _level_factors(q, k, big_g, s)
        dx_q = jnp.einsum("...ij,...jk->...ik", cross, x[..., 0, :, :])
        dx_k = jnp.einsum("...ij,...ik->...jk", cross, x[..., 1, :, :])
        y = jnp.stack([dx_k, dx_q], axis=-3) * e  # [..., nb, 2, s, k]
        dq = dq + jnp.where(_half_mask(y.ndim, 1), y, 0.0).reshape(dq.shape)
        dk = dk + jnp.where(_half_mask(y.ndim, 0), y, 0.0).reshape(dk.shape)
    return dq, dk


def scores(q, k, big_g, g_end, fast):
    """``P [..., C, C]`` (valid on and below the diagonal; the caller masks the rest).

    q, k, big_g: [..., C, k]; g_end: [..., 1, k] (``G_C``); fast: scalar bool from
    :func:`fast_form_ok`.
    """

    def fast_branch(q, k, big_g, g_end):
        e = _fast_factor(big_g, g_end)
        return jnp.einsum("...ik,...jk->...ij", q * e, k / e)

    def exact_branch(q, k, big_g, g_end):
        return _tree_scores(q, k, big_g)

    return lax.cond(fast, fast_branch, exact_branch, q, k, big_g, g_end)


def scores_bwd(q, k, big_g, g_end, fast, dp_strict):
    """``(dq, dk)`` for the cotangent ``dp_strict`` of the strictly lower part of ``P``."""

    def fast_branch(q, k, big_g, g_end, dp):
        e = _fast_factor(big_g, g_end)
        dq = jnp.einsum("...ij,...jk->...ik", dp, k / e) * e
        dk = jnp.einsum("...ij,...ik->...jk", dp, q * e) / e
        return dq, dk

    def exact_branch(q, k, big_g, g_end, dp):
        return _tree_bwd(q, k, big_g, dp)

    return lax.cond(fast, fast_branch, exact_branch, q, k, big_g, g_end, dp_strict)
