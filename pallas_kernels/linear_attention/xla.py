"""The chunked algorithm for the linear attention family in plain ``jnp``: the CPU fast path and
the specification the Pallas kernels follow.

The sequence is cut into chunks of ``C`` tokens (``t`` is padded to a multiple of ``C`` with
``k = v = q = 0``, ``beta = 0`` and ``g = 0``, so padded steps leave the state unchanged, and the
padded outputs are dropped). Inside a chunk all token interactions are small matmuls; across
chunks a ``lax.scan`` carries the float32 state ``[b, h, k, v]``. Everything is computed in
float32 whatever the input dtype; matmuls use the configured default precision.

Gates. ``G`` is the float32 inclusive cumulative sum of ``g`` *within the chunk*, so ``G <= 0``
and it is non-increasing (for valid gates ``g <= 0``). Every exponential the algorithm takes has
an exponent ``<= 0`` — it may underflow to 0 (harmless: the true value is below float32 range
too) but never overflows, for any decay strength:

* queries against the incoming state: ``q_i exp(G_i)``;
* keys into the outgoing state: ``k_j exp(G_C - G_j)``;
* per-head scalar gate, intra-chunk: the ``C x C`` matrix ``exp(G_i - G_j)`` is formed with the
  difference masked *before* the exponential (``exp(where(j <= i, G_i - G_j, -inf))``), never as
  ``exp(G_i) * exp(-G_j)``;
* per-key gate (GLA), intra-chunk: ``sum_k q_ik k_jk exp(G_ik - G_jk)`` cannot be one matmul of
  pre-scaled operands without a common reference point. The chunk is split into sub-chunks of
  ``c`` tokens. For a query in sub-chunk ``I`` and a key in an *earlier* sub-chunk, the product
  is factored through ``R_I``, the cumulative gate at the end of sub-chunk ``I - 1`` (which lies
  between key and query)::

      exp(G_i - G_j) = exp(G_i - R_I) * exp(R_I - G_j),   both exponents <= 0,

  giving one ``[c, k] x [k, C]`` matmul per query sub-chunk. Pairs inside the same sub-chunk
  use the exact ``[c, c, k]`` tensor ``exp(where(j <= i, G_i - G_j, -inf))``. Cost per chunk is
  ``O(C^2 k + C c k)``; ``c`` defaults to about ``sqrt(C)`` which minimises the memory of the
  two intermediates.

Delta rule (WY / UT transform, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"; gated form from "Gated Delta Networks"). With the pseudo-values
``u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)`` the recurrence is the scalar-gated linear one
``S_t = exp(g_t) S_{t-1} + k_t u_t^T``. Within a chunk with incoming state ``S``::

    (I + A) u = beta * (v - exp(G) * (k S)),   A_ij = beta_i exp(G_i - G_j) k_i.k_j  (j < i)
    u = U - W S,   U = (I + A)^-1 (beta v),   W = (I + A)^-1 (beta exp(G) k)
    o = scale [ (q exp(G)) S + ((q k^T) * exp(G_i - G_j), j <= i) u ]
    S' = exp(G_C) S + (k exp(G_C - G))^T u

``(I + A)^-1`` is formed explicitly by row-by-row forward substitution (:func:`unit_lower_inverse`,
with a closed-form ``custom_vjp``), batched over all chunks before the scan, and applied by one
matmul; the scan itself only does the two state matmuls. (A triangular solve computes the same
thing; XLA's CPU ``triangular_solve`` is ~30x slower than this at C = 64.)

Packed sequences. ``segment_ids`` are turned into run indices (+1 at every change). Intra-chunk
pairs need equal runs; token ``i`` sees the incoming state only if its run equals the run of
the token before the chunk; the state is carried out of a chunk only if no boundary lies in it,
and only keys of the chunk's last run enter the outgoing state.

Gradients: plain autodiff through this code (the scan stores one state per chunk).
Positive ``log_decay`` is outside the contract: exponents can then be positive and overflow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .reference import segment_runs

__all__ = ["gated_linear_attention", "delta_rule", "default_sub_chunk", "unit_lower_inverse"]

DEFAULT_CHUNK = 64


def default_sub_chunk(chunk_size: int) -> int:
    """Sub-chunk length for the per-key gate: the power of two at or below sqrt(chunk_size).

    The exact same-sub-chunk term costs ``O(sub_chunk)`` passes over q and k, the cross-sub-chunk
    term ``O(chunk_size / sub_chunk)`` copies of k; 4 for chunks of 32 measured best on CPU.
    """
    return max(1, 2 ** int(math.floor(math.log2(chunk_size) / 2)))


# ---------------------------------------------------------------------------------------------
# Layout helpers: [b, t, h, d] <-> [b, h, n, c, d] with t padded to n * c.
# ---------------------------------------------------------------------------------------------


def _pad_time(x, tp):
    t = x.shape[1]
    if tp == t:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, tp - t)
    return jnp.pad(x, pad)


def _to_chunks(x, c):
    """[b, t, h, ...] (t a multiple of c) -> [b, h, n, c, ...] in float32."""
    b, t, h = x.shape[:3]
    x = jnp.asarray(x, jnp.float32).reshape((b, t // c, c, h) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _from_chunks(x, t):
    """[b, h, n, c, v] -> [b, t, h, v] (dropping padding)."""
    b, h, n, c, dv = x.shape
    x = jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, dv)
    return x[:, :t]


def _neg_inf_exp(mask, x):
    """exp(x) where mask, exactly 0 elsewhere (the masked-out x is never exponentiated)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def _pair_decay(big_g, strict, with_diagonal):
    """exp(G_i - G_j) over the last two axes for j < i (``strict`` mask), plus 1 on the diagonal.

    The diagonal is the constant 1 rather than exp(G_i - G_i): its gradient would otherwise reach
    G_i along two paths (+c and -c) that cancel only up to rounding of the O(1) cotangent, which
    swamps the true gate gradient (~exp(g)) under strong decay.
    """
    dec = _neg_inf_exp(strict, big_g[..., :, None] - big_g[..., None, :])
    if with_diagonal:
        c = big_g.shape[-1]
        dec = dec + jnp.eye(c, dtype=jnp.float32).reshape((1,) * (dec.ndim - 2) + (c, c))
    return dec


def _gate_sums(g):
    """Inclusive cumulative gate G_i and the remaining gate G_C - G_i, along axis 3.

    ``G_C - G_i`` is a reverse *exclusive* cumulative sum (not a difference), so the last
    token's exponent is an exact 0 independent of g, with no cancelling gradient paths.
    """
    big_g = jnp.cumsum(g, axis=3)
    rest = jnp.flip(jnp.cumsum(jnp.flip(g, 3), axis=3), 3)
    zero = jnp.zeros_like(lax.slice_in_dim(g, 0, 1, axis=3))
    rest = jnp.concatenate([lax.slice_in_dim(rest, 1, None, axis=3), zero], axis=3)
    return big_g, rest


class _Masks:
    """Causal / segment masks in the chunked layout, broadcastable against [b, h, n, ...].

    ``intra`` [b,1,n,c,c] (or [1,1,1,c,c]): j <= i and same run; ``strict``: j < i and same run;
    ``sees`` [b,1,n,c] or None: token i sees the incoming state; ``last`` [b,1,n,c] or None:
    token j belongs to the chunk's last run; ``carry`` [b,1,n] or None: no boundary in the chunk.
    """

    def __init__(self, segment_ids, b, t, tp, c):
        n = tp // c
        causal = jnp.tril(jnp.ones((c, c), bool))
        self.causal = causal[None, None, None]
        strict = jnp.tril(jnp.ones((c, c), bool), -1)[None, None, None]
        self.strict_causal = strict
        self.eye = jnp.eye(c, dtype=jnp.float32)[None, None, None]
        if segment_ids is None:
            self.intra, self.strict = self.causal, strict
            self.sees = self.last = self.carry = None
            return
        run = segment_runs(segment_ids, b, t)
        if tp > t:  # padding continues the last run: no boundary inside the padding
            run = jnp.concatenate([run, jnp.broadcast_to(run[:, -1:], (b, tp - t))], axis=1)
        run = run.reshape(b, n, c)
        prev = jnp.concatenate([jnp.zeros((b, 1), run.dtype), run[:, :-1, -1]], axis=1)
        same = run[..., :, None] == run[..., None, :]
        self.intra = (self.causal[0] & same)[:, None]
        self.strict = (strict[0] & same)[:, None]
        self.sees = (run == prev[..., None])[:, None]
        self.last = (run == run[..., -1:])[:, None]
        self.carry = (run[..., -1] == prev)[:, None]


def _where_or(mask, x):
    return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _prepare(q, k, v, c, initial_state):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    tp = -(-t // c) * c
    q, k, v = (_to_chunks(_pad_time(x, tp), c) for x in (q, k, v))
    if initial_state is None:
        s0 = jnp.zeros((b, h, dk, dv), jnp.float32)
    else:
        s0 = jnp.asarray(initial_state, jnp.float32)
    return q, k, v, s0, tp


def _scan_chunks(body, s0, xs):
    """lax.scan over the chunk axis (axis 2 of every [b, h, n, ...] leaf)."""
    xs = tuple(jnp.moveaxis(x, 2, 0) for x in xs)
    final, ys = lax.scan(body, s0, xs)
    return final, tuple(jnp.moveaxis(y, 0, 2) for y in ys)


# ---------------------------------------------------------------------------------------------
# Gated linear attention.
# ---------------------------------------------------------------------------------------------


def _key_gate_scores(q, k, big_g, c):
    """sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i, per chunk, with every exponent <= 0.

    q, k, big_g: [b, h, n, C, k] -> [b, h, n, C, C] (zero above the diagonal).
    """
    b, h, n, cc, dk = q.shape
    ns = cc // c
    gs = big_g.reshape(b, h, n, ns, c, dk)
    qs = q.reshape(b, h, n, ns, c, dk)
    # Reference point of query sub-chunk I: cumulative gate at the end of sub-chunk I-1.
    ref = jnp.concatenate(
        [jnp.zeros((b, h, n, 1, dk), jnp.float32), gs[:, :, :, :-1, -1, :]], axis=3
    )  # [b, h, n, ns, k]
    q_ref = qs * jnp.exp(gs - ref[..., None, :])  # exponent <= 0
    before = jnp.arange(cc)[None, :] < (jnp.arange(ns) * c)[:, None]  # [ns, C]
    k_ref = k[:, :, :, None] * _neg_inf_exp(
        before[None, None, None, :, :, None], ref[..., None, :] - big_g[:, :, :, None]
    )  # [b, h, n, ns, C, k], zero for keys not strictly before sub-chunk I
    off = jnp.einsum("bhnsak,bhnsjk->bhnsaj", q_ref, k_ref).reshape(b, h, n, cc, cc)
    # Same sub-chunk: exact pairwise decays, one token offset d at a time. Pair (i, i - d) gets
    # sum_k q_ik k_(i-d)k exp(G_ik - G_(i-d)k) (exponent <= 0); shifting along time keeps every
    # intermediate the size of q, instead of a [C, c, c, k] tensor of pairwise decays (which
    # made this term ~2x slower on CPU, bound by memory traffic).
    pos = jnp.arange(cc) % c  # position inside the sub-chunk
    vals = [jnp.sum(q * k, axis=-1)]  # d = 0: decay exp(0) = 1, exactly
    for d in range(1, c):
        pad = ((0, 0), (0, 0), (0, 0), (d, 0), (0, 0))
        k_d = jnp.pad(k, pad)[..., :cc, :]
        g_d = jnp.pad(big_g, pad)[..., :cc, :]
        same = (pos >= d)[:, None]  # i - d is in the same sub-chunk as i
        vals.append(jnp.sum(q * k_d * _neg_inf_exp(same, big_g - g_d), axis=-1))
    vals = jnp.stack(vals, axis=-1)  # [b, h, n, C, c]: entry (i, d) is pair (i, i - d)
    # Scatter offset d to column i - d with a tiny one-hot contraction over d.
    i_idx = jnp.arange(cc)[:, None, None]
    place = (jnp.arange(cc)[None, None, :] == i_idx - jnp.arange(c)[None, :, None]).astype(
        jnp.float32
    )  # [C, c, C]
    diag = jnp.einsum("bhnid,idj->bhnij", vals, place)
    return off + diag


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
    sub_chunk: int | None = None,
):
    """Chunked GLA: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    Args:
      q, k: ``[b, t, h, k]``; v: ``[b, t, h, v]``; log_decay: None, ``[b, t, h]`` or
        ``[b, t, h, k]`` (<= 0); initial_state: ``[b, h, k, v]`` or None; segment_ids: ``[b, t]``
        int or None; chunk_size: ``C``; sub_chunk: sub-chunk length for the per-key gate
        (divides ``C``; default :func:`default_sub_chunk`).
    Returns:
      ``(o [b, t, h, v] float32, final_state [b, h, k, v] float32)``.
    """
    b, t, h, dk = q.shape
    c = chunk_size
    q, k, v, s0, tp = _prepare(q, k, v, c, initial_state)
    q = q * scale
    m = _Masks(segment_ids, b, t, tp, c)

    if log_decay is None:
        scores = jnp.einsum("bhnik,bhnjk->bhnij", q, k)
        q_in, k_out = q, k
        d_end = jnp.ones(q.shape[:3] + (1, 1), jnp.float32)
    else:
        g = _to_chunks(_pad_time(log_decay, tp), c)
        big_g, rest = _gate_sums(g)  # [b, h, n, C] or [b, h, n, C, k]
        g_end = jnp.sum(g, axis=3, keepdims=True)  # [b, h, n, 1] or [b, h, n, 1, k]
        if g.ndim == 4:  # one decay per head
            qk = jnp.einsum("bhnik,bhnjk->bhnij", q, k)
            scores = qk * _pair_decay(big_g, m.strict_causal, with_diagonal=True)
            q_in = q * jnp.exp(big_g)[..., None]
            k_out = k * jnp.exp(rest)[..., None]
            d_end = jnp.exp(g_end)[..., None]  # [b, h, n, 1, 1]
        else:  # one decay per key dimension
            sub = sub_chunk or default_sub_chunk(c)
            if c % sub:
                raise ValueError(f"sub_chunk must divide chunk_size={c}; got {sub}")
            scores = _key_gate_scores(q, k, big_g, sub)
            q_in = q * jnp.exp(big_g)
            k_out = k * jnp.exp(rest)
            d_end = jnp.swapaxes(jnp.exp(g_end), -1, -2)  # [b, h, n, k, 1]

    scores = jnp.where(m.intra, scores, jnp.zeros_like(scores))
    q_in = _where_or(None if m.sees is None else m.sees[..., None], q_in)
    k_out = _where_or(None if m.last is None else m.last[..., None], k_out)
    if m.carry is not None:
        d_end = jnp.where(m.carry[..., None, None], d_end, jnp.zeros_like(d_end))
    d_end = jnp.broadcast_to(d_end, q.shape[:3] + d_end.shape[3:])

    def body(state, xs):
        k_n, v_n, d_n = xs
        new = d_n * state + jnp.einsum("bhck,bhcv->bhkv", k_n, v_n)
        return new, (state,)

    final, (s_start,) = _scan_chunks(body, s0, (k_out, v, d_end))
    o = jnp.einsum("bhnij,bhnjv->bhniv", scores, v) + jnp.einsum(
        "bhnck,bhnkv->bhncv", q_in, s_start
    )
    return _from_chunks(o, t), final


# ---------------------------------------------------------------------------------------------
# Delta rule.
# ---------------------------------------------------------------------------------------------


def _forward_substitution(a):
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], one row at a time.

    Row i of Y = (I + a)^-1 is e_i - a[i, :] Y (a[i, j] = 0 for j >= i, so the rows not yet
    computed, still e_j, do not contribute). C sequential batched vector-matrix products; on CPU
    this is ~30x faster than ``lax.linalg.triangular_solve`` at C = 64. Never forms powers of
    a (which overflow or lose precision once |a| > 1).
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


@jax.custom_vjp
def unit_lower_inverse(a):
    """``(I + a)^-1`` for strictly lower-triangular ``a [..., C, C]`` (entries on and above the
    diagonal are ignored). Backward: ``da = -tril(Y^T dY Y^T, -1)`` with ``Y = (I + a)^-1``."""
    return _forward_substitution(jnp.tril(a, -1))


def _unit_lower_inverse_fwd(a):
    y = unit_lower_inverse(a)
    return y, y


def _unit_lower_inverse_bwd(y, dy):
    yt = jnp.swapaxes(y, -1, -2)
    da = -jnp.einsum("...ij,...jk,...kl->...il", yt, dy, yt)
    return (jnp.tril(da, -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


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
    chunk_size: int = DEFAULT_CHUNK,
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
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    q, k, v, s0, tp = _prepare(q, k, v, c, initial_state)
    q = q * scale
    beta = _to_chunks(_pad_time(beta, tp), c)  # [b, h, n, C]
    m = _Masks(segment_ids, b, t, tp, c)

    kk = jnp.einsum("bhnik,bhnjk->bhnij", k, k)
    qk = jnp.einsum("bhnik,bhnjk->bhnij", q, k)
    if log_decay is None:
        a = jnp.where(m.strict, kk, jnp.zeros_like(kk))
        p = jnp.where(m.intra, qk, jnp.zeros_like(qk))
        q_in, k_w, k_out = q, k, k
        d_end = jnp.ones(q.shape[:3] + (1, 1), jnp.float32)
    else:
        g = _to_chunks(_pad_time(log_decay, tp), c)
        big_g, rest = _gate_sums(g)  # [b, h, n, C]
        g_end = jnp.sum(g, axis=3, keepdims=True)
        dec = _pair_decay(big_g, m.strict_causal, with_diagonal=False)
        a = jnp.where(m.strict, kk * dec, jnp.zeros_like(kk))
        p = jnp.where(m.intra, qk * (dec + m.eye), jnp.zeros_like(qk))
        e = jnp.exp(big_g)[..., None]
        q_in, k_w = q * e, k * e
        k_out = k * jnp.exp(rest)[..., None]
        d_end = jnp.exp(g_end)[..., None]  # [b, h, n, 1, 1]
    a = a * beta[..., :, None]
    q_in = _where_or(None if m.sees is None else m.sees[..., None], q_in)
    k_w = _where_or(None if m.sees is None else m.sees[..., None], k_w)
    k_out = _where_or(None if m.last is None else m.last[..., None], k_out)
    if m.carry is not None:
        d_end = jnp.where(m.carry[..., None, None], d_end, jnp.zeros_like(d_end))
    d_end = jnp.broadcast_to(d_end, q.shape[:3] + (1, 1))

    rhs = beta[..., None] * jnp.concatenate([v, k_w], axis=-1)
    sol = jnp.einsum("bhnij,bhnjd->bhnid", unit_lower_inverse(a), rhs)
    u_v, w = sol[..., :dv], sol[..., dv:]  # u = u_v - w S

    def body(state, xs):
        u_n, w_n, k_n, d_n = xs
        u = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, state)
        new = d_n * state + jnp.einsum("bhck,bhcv->bhkv", k_n, u)
        return new, (state, u)

    final, (s_start, u) = _scan_chunks(body, s0, (u_v, w, k_out, d_end))
    o = jnp.einsum("bhnij,bhnjv->bhniv", p, u) + jnp.einsum("bhnck,bhnkv->bhncv", q_in, s_start)
    return _from_chunks(o, t), final
