"""The chunked algorithm for the linear attention family in plain ``jnp``: the CPU fast path and
the specification the Pallas kernels follow.

The sequence is cut into chunks of ``C`` tokens (``t`` is padded to a multiple of ``C`` with
``k = v = q = 0``, ``beta = 0`` and ``g = 0``, so padded steps leave the state unchanged, and the
padded outputs are dropped). Inside a chunk all token interactions are small matmuls; across
chunks a loop carries the float32 state ``[b, h, k, v]``. Everything is computed in float32
whatever the input dtype; matmuls use the configured default precision. One loop over chunks
does all the work of a chunk in its body (:mod:`.xla_common` says why).

Gates. ``G`` is the float32 inclusive cumulative sum of ``g`` *within the chunk*, so ``G <= 0``
and it is non-increasing (for valid gates ``g <= 0``). The exponentials never overflow, for any
decay strength:

* queries against the incoming state: ``q_i exp(G_i)``;
* keys into the outgoing state: ``k_j exp(G_C - G_j)``;
* per-head scalar gate, intra-chunk: the ``C x C`` matrix ``exp(G_i - G_j)`` is formed with the
  difference masked *before* the exponential (``exp(where(j <= i, G_i - G_j, -inf))``), never as
  ``exp(G_i) * exp(-G_j)``;
* per-key gate (GLA), intra-chunk: ``sum_k q_ik k_jk exp(G_ik - G_jk)`` needs a common reference
  point for the two factors; see :mod:`.xla_gate` (per chunk: one matmul with the reference at
  half the chunk's decay when that keeps every exponent within +-30, else an exact binary tree
  of reference points with every exponent ``<= 0``).

Delta rule: :mod:`.xla_delta` (WY / UT transform).

Packed sequences. ``segment_ids`` are turned into run indices (+1 at every change). Intra-chunk
pairs need equal runs; token ``i`` sees the incoming state only if its run equals the run of
the token before the chunk; the state is carried out of a chunk only if no boundary lies in it,
and only keys of the chunk's last run enter the outgoing state.

Gradients: a ``jax.custom_vjp`` per op. The forward loop stores the incoming state of every
chunk; the backward is one reverse loop over chunks carrying the state cotangent ``X`` (of the
chunk's outgoing state) and forming all input cotangents of the chunk from recomputed
chunk-local quantities::

    dq_in = do S^T,  dk_out = v X^T,  dv = P^T do + k_out X,  dP = do v^T,
    X_prev = exp(G_C) X + q_in^T do.

Gate cotangents use ``dG = q * dq - k * dk`` for ``exp(G_i - G_j)`` factors per key (the
diagonal excluded) or the row-minus-column sums of ``dP * P`` (strict part) per head, then
cumulative sums back to ``g``; the diagonal (a constant 1) never contributes, so strong decays
keep exact gate gradients. Positive ``log_decay`` is outside the contract: exponents can then
be positive and overflow.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import xla_gate
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
from .xla_delta import delta_rule, unit_lower_inverse

__all__ = ["gated_linear_attention", "delta_rule", "unit_lower_inverse"]

DEFAULT_CHUNK = 64


class _Gate:
    """Gate quantities of one chunk (q, k: [b, h, C, k]): ``q_in = q exp(G)`` (masked by
    ``sees``), ``k_out = k exp(G_C - G)`` (masked by ``last``), the state decay ``d_end``
    (masked by ``carry``; None = 1) and the intra-chunk scores ``P`` (masked by ``intra``)."""

    def __init__(self, mode, q, k, g, m: ChunkMasks):
        self.mode = mode
        self.e_in = self.e_out = d_end = None
        if mode == "none":
            p = where0(m.intra, jnp.einsum("bhik,bhjk->bhij", q, k))
        elif mode == "head":  # g: [b, h, C]
            self.big_g, self.rest, g_end = gate_sums(g)
            gi = self.big_g
            self.dec = neg_inf_exp(m.intra, gi[..., :, None] - gi[..., None, :])
            p = jnp.einsum("bhik,bhjk->bhij", q, k) * self.dec
            self.e_in = jnp.exp(gi)[..., None]
            self.e_out = jnp.exp(self.rest)[..., None]
            d_end = jnp.exp(g_end)[..., None]  # [b, h, 1, 1]
        else:  # per key, g: [b, h, C, k]
            self.big_g, self.rest, self.g_end = gate_sums(g)
            self.fast = xla_gate.fast_form_ok(self.big_g, self.g_end)
            p = xla_gate.scores(q, k, self.big_g, self.g_end, self.fast)
            p = where0(m.intra, p)
            self.e_in = jnp.exp(self.big_g)
            self.e_out = jnp.exp(self.rest)
            d_end = jnp.swapaxes(jnp.exp(self.g_end), -1, -2)  # [b, h, k, 1]
        self.p = p
        self.q_in = where0(vec(m.sees), q if self.e_in is None else q * self.e_in)
        self.k_out = where0(vec(m.last), k if self.e_out is None else k * self.e_out)
        if m.carry is not None:
            d_end = jnp.where(m.carry, 1.0 if d_end is None else d_end, 0.0)
        self.d_end = d_end  # None, [b|1, h|1, 1, 1] or [b, h, k, 1]


def _decay(d, s):
    return s if d is None else d * s


def _gla_forward(mode, scale, c, q, k, v, g, s0, runs, save_states):
    n = q.shape[1] // c
    o_buf = jnp.zeros(v.shape, jnp.float32)

    def body(carry, i):
        s, o_buf = carry
        qc = take(q, i, c) * scale
        kc, vc = take(k, i, c), take(v, i, c)
        gate = _Gate(mode, qc, kc, None if g is None else take(g, i, c), ChunkMasks(runs, i, c))
        o = jnp.einsum("bhij,bhjv->bhiv", gate.p, vc) + jnp.einsum("bhck,bhkv->bhcv", gate.q_in, s)
        new = jnp.einsum("bhck,bhcv->bhkv", gate.k_out, vc) + _decay(gate.d_end, s)
        # The incoming states leave as scan outputs (no zero-filled buffer to write first).
        return (new, put(o_buf, o, i, c)), (s if save_states else None)

    (final, o), states = lax.scan(body, (s0, o_buf), jnp.arange(n))
    return o, final, states


def _gla_backward(mode, scale, c, q, k, v, g, runs, states, do, d_final):
    n = q.shape[1] // c
    bufs = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
    bufs += (None if g is None else jnp.zeros_like(g),)

    def body(j, carry):
        i = n - 1 - j
        x, (dq_buf, dk_buf, dv_buf, dg_buf) = carry
        qc = take(q, i, c) * scale
        kc, vc, doc = take(k, i, c), take(v, i, c), take(do, i, c)
        s = lax.dynamic_index_in_dim(states, i, 0, keepdims=False)
        m = ChunkMasks(runs, i, c)
        gate = _Gate(mode, qc, kc, None if g is None else take(g, i, c), m)
        p = gate.p

        dq_in = jnp.einsum("bhcv,bhkv->bhck", doc, s)
        dk_out = jnp.einsum("bhcv,bhkv->bhck", vc, x)
        dv = jnp.einsum("bhij,bhiv->bhjv", p, doc) + jnp.einsum("bhck,bhkv->bhcv", gate.k_out, x)
        dp = where0(m.intra, jnp.einsum("bhiv,bhjv->bhij", doc, vc))
        x_prev = jnp.einsum("bhck,bhcv->bhkv", gate.q_in, doc) + _decay(gate.d_end, x)

        dq = where0(vec(m.sees), dq_in if gate.e_in is None else dq_in * gate.e_in)
        dk = where0(vec(m.last), dk_out if gate.e_out is None else dk_out * gate.e_out)
        dg = None
        if mode in ("none", "head"):
            w = dp if mode == "none" else dp * gate.dec
            dq = dq + jnp.einsum("bhij,bhjk->bhik", w, kc)
            dk = dk + jnp.einsum("bhij,bhik->bhjk", w, qc)
        if mode == "head":
            z = where0(m.strict, dp * p)
            d_big_g = jnp.sum(z, axis=-1) - jnp.sum(z, axis=-2)
            d_big_g = d_big_g + jnp.sum(dq_in * gate.q_in, axis=-1)
            d_rest = jnp.sum(dk_out * gate.k_out, axis=-1)
            d_gend = jnp.sum(x * s, axis=(-1, -2), keepdims=True) * gate.d_end  # [b, h, 1, 1]
            dg = gate_sums_bwd(d_big_g, d_rest, d_gend[..., 0])
        elif mode == "key":
            diag = jnp.diagonal(dp, axis1=-2, axis2=-1)[..., None]  # [b, h, C, 1]
            dq_off, dk_off = xla_gate.scores_bwd(
                qc, kc, gate.big_g, gate.g_end, gate.fast, where0(m.strict, dp)
            )
            dq = dq + dq_off + diag * kc
            dk = dk + dk_off + diag * qc
            d_big_g = qc * dq_off - kc * dk_off + dq_in * gate.q_in
            d_rest = dk_out * gate.k_out
            d_gend = jnp.sum(x * s, axis=-1, keepdims=True) * gate.d_end  # [b, h, k, 1]
            dg = gate_sums_bwd(d_big_g, d_rest, jnp.swapaxes(d_gend, -1, -2))
        dq_buf = put(dq_buf, dq * scale, i, c)
        dk_buf = put(dk_buf, dk, i, c)
        dv_buf = put(dv_buf, dv, i, c)
        if dg is not None:
            dg_buf = put(dg_buf, dg, i, c)
        return x_prev, (dq_buf, dk_buf, dv_buf, dg_buf)

    ds0, grads = lax.fori_loop(0, n, body, (d_final, bufs))
    return grads, ds0


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gla(mode, scale, c, q, k, v, g, s0, runs):
    o, final, _ = _gla_forward(mode, scale, c, q, k, v, g, s0, runs, save_states=False)
    return o, final


def _gla_fwd(mode, scale, c, q, k, v, g, s0, runs):
    o, final, states = _gla_forward(mode, scale, c, q, k, v, g, s0, runs, save_states=True)
    return (o, final), (q, k, v, g, runs, states)


def _gla_bwd(mode, scale, c, res, cts):
    q, k, v, g, runs, states = res
    do, d_final = cts
    (dq, dk, dv, dg), ds0 = _gla_backward(mode, scale, c, q, k, v, g, runs, states, do, d_final)
    return dq, dk, dv, dg, ds0, None


_gla.defvjp(_gla_fwd, _gla_bwd)


def gated_linear_attention(
    q,
    k,
    v,
    log_decay=None,
    *,
    scale,
    initial_state=None,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Chunked GLA: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    Args:
      q, k: ``[b, t, h, k]``; v: ``[b, t, h, v]``; log_decay: None, ``[b, t, h]`` or
        ``[b, t, h, k]`` (<= 0); initial_state: ``[b, h, k, v]`` or None; segment_ids: ``[b, t]``
        int or None; chunk_size: ``C``.
    Returns:
      ``(o [b, t, h, v] float32, final_state [b, h, k, v] float32)``.
    """
    b, t = q.shape[:2]
    c = chunk_size
    fixed, q, s0, tp = prepare(q, k, v, scale, initial_state, c)
    mode = "none" if log_decay is None else ("head" if log_decay.ndim == 3 else "key")
    g = None if log_decay is None else jnp.asarray(log_decay, jnp.float32)
    q, k, v, g = (pad_time(x, tp) for x in (q, k, v, g))
    runs = runs_of(segment_ids, b, t, tp)
    o, final = _gla(mode, fixed, c, q, k, v, g, s0, runs)
    return o[:, :t], final
