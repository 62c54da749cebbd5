"""Chunked (gated) delta rule in plain ``jnp`` via the WY / UT transform, with a chunked backward.

"Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; gated form from
"Gated Delta Networks". With the pseudo-values ``u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)``
the recurrence is the scalar-gated linear one ``S_t = exp(g_t) S_{t-1} + k_t u_t^T``. Within a
chunk (``[b, h, C, d]`` slices, one loop over chunks; see :mod:`.xla_common`) with incoming state
``S`` and ``Gam_ij = exp(G_i - G_j)`` for ``j <= i`` in the same run (1 without a gate)::

    A_ij = beta_i Gam_ij k_i.k_j  (j < i),          T = (I + A)^-1
    U = T (beta v),   W = T (beta exp(G) k),       u = U - W S
    o = scale [ (q exp(G)) S + ((q k^T) * Gam) u ]
    S' = exp(G_C) S + (k exp(G_C - G))^T u

``T`` is formed by block doubling (:func:`unit_lower_inverse`): log2 C levels of two small
matmuls, no powers of ``A``. (XLA's CPU ``triangular_solve`` is far slower at these sizes.)

Backward (``custom_vjp``): the forward stores each chunk's incoming state ``S``; one reverse
loop recomputes the chunk-local quantities (``T``, ``U``, ``W``, ``u``) and carries ``X = dS'``
(the cotangent of the chunk's outgoing state)::

    du = P^T do + k_out X,                 X_prev = exp(G_C) X + q_in^T do - W^T du
    dW = -du S^T,   [dU_in, dW_in] = T^T [du, dW]   (cotangents of beta v, beta exp(G) k)
    dA = -(dU_in U^T + dW_in W^T)          (strictly lower; from dT = d[U, W] rhs^T and
                                            dA = -T^T dT T^T with T rhs = [U, W]: no C^3 terms)

The gate cotangent of ``Gam`` is the row-minus-column sum of ``dA * A`` and ``dP * P`` (strict
parts), so the diagonal (a constant 1) contributes nothing, as it must under strong decay.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from .xla_common import (
    ChunkMasks,
    gate_sums,
    gate_sums_bwd,
    neg_inf_exp,
    pad_time,
    prepare,
    put,
    runs_of,
    take,
    vec,
    where0,
)

__all__ = ["delta_rule", "unit_lower_inverse"]


def _forward_substitution(a):
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], one row at a time.

    Row i of Y = (I + a)^-1 is e_i - a[i, :] Y (a[i, j] = 0 for j >= i, so the rows not yet
    computed, still e_j, do not contribute). C sequential batched vector-matrix products. Never
    forms powers of a (which overflow or lose precision once |a| > 1).
    """
    c = a.shape[-1]
    eye = jnp.eye(c, dtype=a.dtype)
    lead = (1,) * (a.ndim - 2)
    row_axis = a.ndim - 2

    def body(i, y):
        row = lax.dynamic_index_in_dim(a, i, axis=row_axis, keepdims=True)  # [..., 1, C]
        e_i = lax.dynamic_index_in_dim(eye, i, axis=0, keepdims=True).reshape(lead + (1, c))
        new = e_i - jnp.einsum("...ij,...jk->...ik", row, y)
        return lax.dynamic_update_index_in_dim(y, new, i, axis=row_axis)

    return lax.fori_loop(1, c, body, jnp.broadcast_to(eye, a.shape))


def _doubling_inverse(a):
    """(I + a)^-1 for strictly lower-triangular a [..., C, C] (C a power of two), by doubling.

    For a unit lower-triangular ``[[I + a11, 0], [a21, I + a22]]`` the inverse is
    ``[[T11, 0], [-T22 a21 T11, T22]]``: starting from 1 x 1 blocks, each level combines pairs
    of diagonal blocks with two small matmuls (log2 C levels, all blocks of a level batched).
    Exact block algebra, like forward substitution; never forms powers of ``a``.
    """
    lead, c = a.shape[:-2], a.shape[-1]
    crosses = []
    blocks = a[..., None, :, :]
    s = c // 2
    while s >= 1:
        crosses.append(blocks[..., s:, :s])  # [..., nb, s, s]: rows of half 2, cols of half 1
        blocks = jnp.stack([blocks[..., :s, :s], blocks[..., s:, s:]], axis=-3)
        blocks = blocks.reshape(lead + (-1, s, s))
        s //= 2
    t = jnp.ones(lead + (c, 1, 1), a.dtype)
    for cross in reversed(crosses):
        s = cross.shape[-1]
        tb = t.reshape(lead + (-1, 2, s, s))
        t11, t22 = tb[..., 0, :, :], tb[..., 1, :, :]
        t21 = -jnp.matmul(jnp.matmul(t22, cross), t11)
        top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
        bottom = jnp.concatenate([t21, t22], axis=-1)
        t = jnp.concatenate([top, bottom], axis=-2)
    return t.reshape(lead + (c, c))


def _inverse(a):
    """(I + a)^-1 for strictly lower-triangular a: doubling for power-of-two sizes (the chunk
    sizes the ops accept), forward substitution otherwise."""
    c = a.shape[-1]
    return _doubling_inverse(a) if c & (c - 1) == 0 else _forward_substitution(a)


@jax.custom_vjp
def unit_lower_inverse(a):
    """``(I + a)^-1`` for strictly lower-triangular ``a [..., C, C]`` (entries on and above the
    diagonal are ignored). Backward: ``da = -tril(Y^T dY Y^T, -1)`` with ``Y = (I + a)^-1``."""
    return _inverse(jnp.tril(a, -1))


def _unit_lower_inverse_fwd(a):
    y = unit_lower_inverse(a)
    return y, y


def _unit_lower_inverse_bwd(y, dy):
    yt = jnp.swapaxes(y, -1, -2)
    da = -jnp.einsum("...ij,...jk,...kl->...il", yt, dy, yt)
    return (jnp.tril(da, -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


class _Chunk:
    """Chunk-local quantities (no state dependence) of chunk ``i``, shapes [b, h, C, d]."""

    def __init__(self, scale, c, i, q, k, v, beta, g, runs):
        m = self.m = ChunkMasks(runs, i, c)
        self.q = take(q, i, c) * scale
        self.k, self.v = take(k, i, c), take(v, i, c)
        self.beta = take(beta, i, c)[..., None]  # [b, h, C, 1]
        qk = jnp.einsum("bhik,bhjk->bhij", self.q, self.k)
        kk = jnp.einsum("bhik,bhjk->bhij", self.k, self.k)
        self.e_in = self.e_out = d_end = self.gam = None
        if g is None:
            self.p = where0(m.intra, qk)
            self.a_bar = where0(m.strict, kk)
        else:
            big_g, rest, g_end = gate_sums(take(g, i, c))  # [b, h, C], ..., [b, h, 1]
            self.gam = neg_inf_exp(m.intra, big_g[..., :, None] - big_g[..., None, :])
            self.p = qk * self.gam  # diagonal: exp(0) = 1
            self.a_bar = where0(m.strict, kk * self.gam)
            self.e_in = jnp.exp(big_g)[..., None]
            self.e_out = jnp.exp(rest)[..., None]
            d_end = jnp.exp(g_end)[..., None]  # [b, h, 1, 1]
        self.q_in = where0(vec(m.sees), _mul(self.q, self.e_in))
        self.k_w = where0(vec(m.sees), _mul(self.k, self.e_in))
        self.k_out = where0(vec(m.last), _mul(self.k, self.e_out))
        if m.carry is not None:
            d_end = jnp.where(m.carry, 1.0 if d_end is None else d_end, 0.0)
        self.d_end = d_end
        self.t = _inverse(self.beta * self.a_bar)
        self.u_v = jnp.einsum("bhij,bhjd->bhid", self.t, self.beta * self.v)
        self.w = jnp.einsum("bhij,bhjd->bhid", self.t, self.beta * self.k_w)


def _mul(x, e):
    return x if e is None else x * e


def _decay(d, s):
    return s if d is None else d * s


def _delta_forward(scale, c, q, k, v, beta, g, s0, runs, save_states):
    n = q.shape[1] // c
    o_buf = jnp.zeros(v.shape, jnp.float32)

    def body(carry, i):
        s, o_buf = carry
        ch = _Chunk(scale, c, i, q, k, v, beta, g, runs)
        u = ch.u_v - jnp.einsum("bhck,bhkv->bhcv", ch.w, s)
        o = jnp.einsum("bhij,bhjv->bhiv", ch.p, u) + jnp.einsum("bhck,bhkv->bhcv", ch.q_in, s)
        new = jnp.einsum("bhck,bhcv->bhkv", ch.k_out, u) + _decay(ch.d_end, s)
        # The incoming states leave as scan outputs (no zero-filled buffer to write first).
        return (new, put(o_buf, o, i, c)), (s if save_states else None)

    (final, o), states = lax.scan(body, (s0, o_buf), jnp.arange(n))
    return o, final, states


def _delta_backward(scale, c, q, k, v, beta, g, runs, states, do, d_final):
    n = q.shape[1] // c
    bufs = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros_like(beta))
    bufs += (None if g is None else jnp.zeros_like(g),)

    def body(j, carry):
        i = n - 1 - j
        x, (dq_buf, dk_buf, dv_buf, db_buf, dg_buf) = carry
        ch = _Chunk(scale, c, i, q, k, v, beta, g, runs)
        m = ch.m
        s = lax.dynamic_index_in_dim(states, i, 0, keepdims=False)
        doc = take(do, i, c)
        u = ch.u_v - jnp.einsum("bhck,bhkv->bhcv", ch.w, s)

        du = jnp.einsum("bhij,bhiv->bhjv", ch.p, doc) + jnp.einsum("bhck,bhkv->bhcv", ch.k_out, x)
        x_prev = (
            jnp.einsum("bhck,bhcv->bhkv", ch.q_in, doc)
            - jnp.einsum("bhck,bhcv->bhkv", ch.w, du)
            + _decay(ch.d_end, x)
        )
        dp = where0(m.intra, jnp.einsum("bhiv,bhjv->bhij", doc, u))
        dq_in = jnp.einsum("bhcv,bhkv->bhck", doc, s)
        dk_out = jnp.einsum("bhcv,bhkv->bhck", u, x)
        dw = -jnp.einsum("bhcv,bhkv->bhck", du, s)
        drhs_v = jnp.einsum("bhij,bhid->bhjd", ch.t, du)  # T^T du
        drhs_k = jnp.einsum("bhij,bhid->bhjd", ch.t, dw)
        da = jnp.einsum("bhid,bhjd->bhij", drhs_v, ch.u_v) + jnp.einsum(
            "bhid,bhjd->bhij", drhs_k, ch.w
        )
        da = -where0(m.strict, da)

        dbeta = (
            jnp.sum(da * ch.a_bar, axis=-1)
            + jnp.sum(drhs_v * ch.v, axis=-1)
            + jnp.sum(drhs_k * ch.k_w, axis=-1)
        )
        da_bar = ch.beta * da
        dv = ch.beta * drhs_v
        dk_w = ch.beta * drhs_k
        dkk = _mul(da_bar, ch.gam)
        dqk = _mul(dp, ch.gam)
        dq = jnp.einsum("bhij,bhjk->bhik", dqk, ch.k)
        dk = (
            jnp.einsum("bhij,bhik->bhjk", dkk, ch.k)
            + jnp.einsum("bhij,bhjk->bhik", dkk, ch.k)
            + jnp.einsum("bhij,bhik->bhjk", dqk, ch.q)
        )
        dq = dq + where0(vec(m.sees), _mul(dq_in, ch.e_in))
        dk = dk + where0(vec(m.sees), _mul(dk_w, ch.e_in))
        dk = dk + where0(vec(m.last), _mul(dk_out, ch.e_out))
        dq_buf = put(dq_buf, dq * scale, i, c)
        dk_buf = put(dk_buf, dk, i, c)
        dv_buf = put(dv_buf, dv, i, c)
        db_buf = put(db_buf, dbeta, i, c)
        if g is not None:
            z = da_bar * ch.a_bar + where0(m.strict, dp * ch.p)
            d_big_g = jnp.sum(z, axis=-1) - jnp.sum(z, axis=-2)
            d_big_g = d_big_g + jnp.sum(dq_in * ch.q_in + dk_w * ch.k_w, axis=-1)
            d_rest = jnp.sum(dk_out * ch.k_out, axis=-1)
            d_gend = jnp.sum(x * s, axis=(-1, -2), keepdims=True) * ch.d_end  # [b, h, 1, 1]
            dg_buf = put(dg_buf, gate_sums_bwd(d_big_g, d_rest, d_gend[..., 0]), i, c)
        return x_prev, (dq_buf, dk_buf, dv_buf, db_buf, dg_buf)

    ds0, grads = lax.fori_loop(0, n, body, (d_final, bufs))
    return grads, ds0


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _delta(scale, c, q, k, v, beta, g, s0, runs):
    o, final, _ = _delta_forward(scale, c, q, k, v, beta, g, s0, runs, save_states=False)
    return o, final


def _delta_fwd(scale, c, q, k, v, beta, g, s0, runs):
    o, final, states = _delta_forward(scale, c, q, k, v, beta, g, s0, runs, save_states=True)
    return (o, final), (q, k, v, beta, g, runs, states)


def _delta_bwd(scale, c, res, cts):
    q, k, v, beta, g, runs, states = res
    do, d_final = cts
    grads, ds0 = _delta_backward(scale, c, q, k, v, beta, g, runs, states, do, d_final)
    return grads + (ds0, None)


_delta.defvjp(_delta_fwd, _delta_bwd)


def delta_rule(
    q,
    k,
    v,
    beta,
    log_decay=None,
    *,
    scale,
    initial_state=None,
    segment_ids=None,
    chunk_size: int = 64,
):
    """Chunked (gated) delta rule via the WY / UT transform.

    ``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``.

    Args:
      q, k: ``[b, t, h, k]``; v: ``[b, t, h, v]``; beta: ``[b, t, h]``; log_decay: None or
        ``[b, t, h]`` (<= 0); initial_state: ``[b, h, k, v]`` or None; segment_ids: ``[b, t]``
        int or None; chunk_size: ``C``.
    Returns:
      ``(o [b, t, h, v] float32, final_state [b, h, k, v] float32)``.
    """
    b, t = q.shape[:2]
    c = chunk_size
    fixed, q, s0, tp = prepare(q, k, v, scale, initial_state, c)
    beta = jnp.asarray(beta, jnp.float32)
    g = None if log_decay is None else jnp.asarray(log_decay, jnp.float32)
    q, k, v, beta, g = (pad_time(x, tp) for x in (q, k, v, beta, g))
    runs = runs_of(segment_ids, b, t, tp)
    o, final = _delta(fixed, c, q, k, v, beta, g, s0, runs)
    return o[:, :t], final
