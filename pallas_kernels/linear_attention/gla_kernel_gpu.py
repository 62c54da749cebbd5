"""Pallas (Triton backend) kernels for chunked gated linear attention: math, forward kernels.

Recurrence (per batch row b and head h; ``S`` is ``[K, V]``)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ,     o_t = S_t^T (scale * q_t)

from "Gated Linear Attention Transformers with Hardware-Efficient Training" (GLA; per-key gate
``g [T, K]``), with the per-head scalar gate (``g [T]``: RetNet / Lightning Attention / Mamba-2
form) and no gate (plain causal linear attention) as special cases.

Chunked form (chunk ``C``; ``G`` is the inclusive cumulative sum of ``g`` *inside* the chunk, so
``G <= 0`` and non-increasing; ``h[n]`` is the state before chunk ``n``; ``L`` its last row)::

    o_i     = (scale q_i * exp(G_i)) h[n] + sum_{j <= i} scale (q_i . (k_j * exp(G_i - G_j))) v_j
    h[n+1]  = diag(exp(G_L)) h[n] + sum_j (k_j * exp(G_L - G_j)) v_j^T

Numerical scheme (stable for any decay, e.g. ``g = -20`` per step): every exponent that is
evaluated is a difference ``G_a - G_b`` with ``a`` at or after ``b``, hence ``<= 0`` (entries
that the causal mask removes are clamped with ``min(., 0)`` before ``exp`` and then masked),
except in the bounded one-matmul form below.

* scalar gate / no gate: the ``C x C`` decay matrix ``exp(min(G_i - G_j, 0))`` multiplies
  ``q k^T`` elementwise (exact, one matmul).
* per-key gate, chunks with a small decay span ``max_k (G_0 - G_L) <= fast_span`` (60; every
  chunk of a typical GLA model): one matmul ``(q * exp(G - G_0)) @ (k * exp(G_0 - G))^T``; the
  factors lie in ``[exp(-60), 1]`` and ``[1, exp(60)]``, far inside float32/bf16 range, and each
  product keeps the operand dtype's relative precision.
* per-key gate, other chunks (exact form): the chunk is cut into sub-chunks of ``c = 16`` rows.
  Rows ``I`` of sub-chunk ``m`` against the columns ``j`` before it use the sub-chunk's first
  row ``r`` as reference, ``(q_I * exp(G_I - G_r)) @ (k_j * exp(G_r - G_j))^T`` (both factors
  ``<= 1``); the ``c x c`` diagonal blocks are computed exactly column by column
  (``sum_k q_ik k_jk exp(G_ik - G_jk)``). ``dk`` uses the last row of a column sub-chunk as
  reference. The choice is made per chunk at run time (``pl.when``).

Gradient of the gate: ``dG = q * dq - k * dk`` (per key; summed over keys for the scalar gate)
plus, on the chunk's last row, ``sum_v h[n+1] * dh[n] = exp(G_L) sum_v h[n] * dh[n] +
sum_j k_j * dk_j^{state}``; ``dg`` is the reverse cumulative sum of ``dG`` inside the chunk
(``gla_ops``). Terms that cancel exactly -- the diagonal ``i == j`` of the intra-chunk part and
the last row's own state term -- are left out of ``dG``, and the backward kernel reads ``G`` as
two parts (``gla_gate``) so that ``G_i - G_j`` is exact; otherwise strong decays leave rounding
noise of the large cancelled terms (or of ``|G|``) that swamps the tiny true ``dg``.

Kernels (``B*H`` is flattened into the first grid axis; arrays stay in ``[B, T, H, D]``):

1. ``chunk_states``   grid ``(B*H, K/BK, V/BV)``: a ``fori_loop`` over chunks writes ``h[n]``
   (``[B, H, NC, K, V]``) and the final state (float32).
2. ``chunk_output``   grid ``(B*H, NC, V/BV)``: intra-chunk attention + ``q h[n]``.

Backward (``gla_kernel_gpu_bwd``; ``h`` is recomputed by ``chunk_states``, nothing per token is
kept from the forward):

3. ``chunk_dstates``  grid ``(B*H, K/BK, V/BV)``: reverse ``fori_loop`` for ``dh[n]`` (the
   gradient of the state at the *end* of chunk ``n``) and the initial-state gradient.
4. ``chunk_dv``       grid ``(B*H, NC, V/BV)``: ``dv = A^T do + k~ dh[n]``.
5. ``chunk_dqkg``     grid ``(B*H, NC, K/BK)``: ``dq``, ``dk`` and ``dG``.

Packed sequences: the caller passes ``rel`` ``[B, T]`` int32, the segment run index relative to
the run of the token before the chunk (``0`` = still in the sequence that the carried state
belongs to). Pairs ``(i, j)`` interact only if ``rel_i == rel_j``; row ``i`` sees ``h[n]`` only if
``rel_i == 0``; the state leaving the chunk keeps ``h[n]`` only if ``rel_L == 0`` and receives
only the keys with ``rel_j == rel_L``.

Matmul operands are in the input dtype (bf16 on GPU) with float32 accumulation; float32 inputs
use IEEE float32 matmuls (``Precision.HIGHEST``). The carried state, the final state and the
initial-state gradient are float32; the per-chunk states ``h[n]`` / ``dh[n]`` written to HBM for
the parallel kernels are stored in the input dtype (their consumers feed them to matmuls in that
dtype anyway; this halves their HBM traffic for bf16). Triton needs power-of-two blocks and
matmul dimensions ``>= 16``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.linear_attention import gla_gate as gg

SUB_CHUNK = 16  # rows of the exact diagonal blocks for the per-key gate

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Static description of one call (hashable; part of the custom_vjp's nondiff state).

    gate: "none", "head" (``G [B, T, H]``) or "key" (``G [B, T, H, K]``).
    chunk: chunk length ``C`` (power of two, >= 16); T must already be padded to a multiple.
    block_k / block_v: blocks of the key / value dims for the state kernels; block_v_out for
    ``chunk_output`` / ``chunk_dv``; block_k_dq for ``chunk_dqkg``.
    num_warps / num_warps_parallel: Triton warps of the sequential state kernels / of the
    per-chunk kernels (output, dv, dqkg), which hold several [C, K] float32 tiles at once.
    fast_span: per-key gate only: a chunk whose total decay ``max_k (G_0 - G_L)`` is at most
    this uses the one-matmul form (reference row 0; factors ``exp(G_i - G_0) <= 1`` and
    ``exp(G_0 - G_j) <= exp(fast_span)``, far from float32/bf16 overflow at 60); other chunks
    use the exact sub-chunk form. Negative: always the exact form.
    """

    gate: str
    chunk: int
    scale: float
    segments: bool
    block_k: int
    block_v: int
    block_v_out: int
    block_k_dq: int
    num_warps: int = 4
    num_warps_parallel: int = 4
    num_stages: int = 2
    interpret: bool = False
    fast_span: float = 60.0


def _params(cfg: GpuConfig, num_warps: int | None = None):
    return pl_triton.CompilerParams(num_warps=num_warps or cfg.num_warps, num_stages=cfg.num_stages)


def _dot(a, b, dtype, contract=((1,), (0,))):
    """``a @ b`` (or a transposed variant) with operands in ``dtype`` and float32 accumulation."""
    precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (contract, ((), ())),
        precision=precision,
        preferred_element_type=_F32,
    )


_NT = ((1,), (1,))  # a @ b^T
_TN = ((0,), (0,))  # a^T @ b


def _exp_le0(x):
    """exp of an exponent that is mathematically <= 0 where it is used (clamped elsewhere)."""
    return jnp.exp(jnp.minimum(x, 0.0))


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


# ---------------------------------------------------------------------------------------------
# Shared per-chunk pieces (all take refs that hold exactly one chunk of C rows).
# ---------------------------------------------------------------------------------------------


def _chunk_gate_last(cfg, g_ref, t0=0):
    """(G of the chunk, G of its last row) for the scalar / per-key gate."""
    c = cfg.chunk
    if cfg.gate == "head":
        return g_ref[pl.ds(t0, c)], g_ref[t0 + c - 1]
    return g_ref[pl.ds(t0, c), :], g_ref[t0 + c - 1, :]


def _decayed_keys(cfg, k, g, g_last, rel, rel_last):
    """k_j * exp(G_L - G_j), restricted to the keys of the last row's sequence."""
    if cfg.gate == "head":
        k = k * jnp.exp(g_last - g)[:, None]
    elif cfg.gate == "key":
        k = k * jnp.exp(g_last[None, :] - g)
    if cfg.segments:
        k = jnp.where((rel == rel_last)[:, None], k, 0.0)
    return k


def _state_decay(cfg, g_last, rel_last, column=True):
    """Factor applied to the carried state across one chunk: scalar, [BK, 1] (or [BK]), None."""
    decay = None
    if cfg.gate == "head":
        decay = jnp.exp(gg.value(g_last))
    elif cfg.gate == "key":
        decay = jnp.exp(gg.value(g_last))
        decay = decay[:, None] if column else decay
    if cfg.segments:
        keep = (rel_last == 0).astype(_F32)
        decay = keep if decay is None else decay * keep
    return decay


def _query_inter(cfg, q, g, rel):
    """scale * q_i * exp(G_i), zeroed on rows that no longer see the carried state."""
    q = q.astype(_F32) * cfg.scale
    if cfg.gate == "head":
        q = q * jnp.exp(gg.value(g))[:, None]
    elif cfg.gate == "key":
        q = q * jnp.exp(gg.value(g))
    if cfg.segments:
        q = jnp.where((rel == 0)[:, None], q, 0.0)
    return q


def _pair_mask(cfg, rows, cols, row0, col0, rel_rows, rel_cols):
    """Causal (and same-sequence) mask for a [rows, cols] block at offsets (row0, col0)."""
    i = _iota((rows, cols), 0) + row0
    j = _iota((rows, cols), 1) + col0
    mask = j <= i
    if cfg.segments:
        mask = mask & (rel_rows[:, None] == rel_cols[None, :])
    return mask


def _scores_scalar(cfg, q, k, g, rel, dtype):
    """Full-chunk A = scale * (q k^T) * exp(G_i - G_j), masked; [C, C] float32."""
    c = cfg.chunk
    s = _dot(q, k, dtype, _NT)
    mask = _pair_mask(cfg, c, c, 0, 0, rel, rel)
    if cfg.gate == "head":
        s = s * _exp_le0(g[:, None] - g[None, :])
    return jnp.where(mask, s * cfg.scale, 0.0)


def _scores_key_rows(cfg, refs, m, k_all, g_all, rel_all, dtype):
    """Rows of sub-chunk m of A for the per-key gate (see module docstring).

    ``refs`` = (q_ref, k_ref, g_ref, rel_ref or None), each holding one chunk. Returns
    ``(A_m [c, C] float32 with scale and masks applied, q_m [c, K] f32, g_m [c, K], rel_m)``.
    """
    q_ref, k_ref, g_ref, rel_ref = refs
    c, C = SUB_CHUNK, cfg.chunk
    r0 = m * c
    q_m = q_ref[pl.ds(r0, c), :].astype(_F32)
    g_m = g_ref[pl.ds(r0, c), :]
    col = _iota((c, C), 1)
    if m > 0:
        g_r = g_ref[r0, :][None, :]
        k_r = k_all.astype(_F32) * _exp_le0(g_r - g_all)
        a = _dot(q_m * jnp.exp(g_m - g_r), k_r, dtype, _NT)
        a = jnp.where(col < r0, a, 0.0)
    else:
        a = jnp.zeros((c, C), _F32)
    row = _iota((c, 1), 0)

    def diag(jj, a):
        k_j = k_ref[r0 + jj, :].astype(_F32)[None, :]
        g_j = g_ref[r0 + jj, :][None, :]
        a_col = jnp.sum(q_m * k_j * _exp_le0(g_m - g_j), axis=1, keepdims=True)
        a_col = jnp.where(row >= jj, a_col, 0.0)
        return jnp.where(col == r0 + jj, a_col, a)

    a = lax.fori_loop(0, c, diag, a)
    rel_m = None
    if cfg.segments:
        rel_m = rel_ref[pl.ds(r0, c)]
        a = jnp.where(rel_m[:, None] == rel_all[None, :], a, 0.0)
    return a * cfg.scale, q_m, g_m, rel_m


def _key_fast_factors(g, g0):
    """exp(G_i - G_0) <= 1 and exp(G_0 - G_i) <= exp(span) for the one-matmul per-key form."""
    return jnp.exp(g - g0), jnp.exp(g0 - g)


def _scores_key_fast(cfg, q, k, g, g0, rel, dtype):
    """Full-chunk A for the per-key gate when the chunk's decay span is small (see GpuConfig)."""
    c = cfg.chunk
    e_q, e_k = _key_fast_factors(g, g0)
    a = _dot(q.astype(_F32) * e_q, k.astype(_F32) * e_k, dtype, _NT)
    return jnp.where(_pair_mask(cfg, c, c, 0, 0, rel, rel), a * cfg.scale, 0.0)


def _key_paths(cfg, g_ref, fast_fn, exact_fn):
    """Run ``fast_fn`` if the chunk's decay span allows the one-matmul form, else ``exact_fn``."""
    if cfg.fast_span < 0:
        exact_fn()
        return
    span = jnp.max(g_ref[0, :] - g_ref[cfg.chunk - 1, :])
    fast = span <= cfg.fast_span
    pl.when(fast)(fast_fn)
    pl.when(jnp.logical_not(fast))(exact_fn)


# ---------------------------------------------------------------------------------------------
# 1. Forward chunk states.
# ---------------------------------------------------------------------------------------------


def _states_kernel(*refs, cfg: GpuConfig, num_chunks: int, has_s0: bool):
    it = iter(refs)
    k_ref, v_ref = next(it), next(it)
    g_ref = next(it) if cfg.gate != "none" else None
    rel_ref = next(it) if cfg.segments else None
    s0_ref = next(it) if has_s0 else None
    h_ref, ht_ref = next(it), next(it)
    c = cfg.chunk
    dtype = k_ref.dtype
    bk, bv = ht_ref.shape

    def body(n, h):
        t0 = pl.multiple_of(n * c, c)
        h_ref[n] = h.astype(h_ref.dtype)
        k = k_ref[pl.ds(t0, c), :].astype(_F32)
        v = v_ref[pl.ds(t0, c), :]
        g = g_last = rel = rel_last = None
        if g_ref is not None:
            g, g_last = _chunk_gate_last(cfg, g_ref, t0)
        if rel_ref is not None:
            rel, rel_last = rel_ref[pl.ds(t0, c)], rel_ref[t0 + c - 1]
        kd = _decayed_keys(cfg, k, g, g_last, rel, rel_last)
        decay = _state_decay(cfg, g_last, rel_last)
        if decay is not None:
            h = h * decay
        return h + _dot(kd, v, dtype, _TN)

    h0 = s0_ref[...] if s0_ref is not None else jnp.zeros((bk, bv), _F32)
    ht_ref[...] = lax.fori_loop(0, num_chunks, body, h0)


def chunk_states(cfg: GpuConfig, k, v, g, rel, s0):
    """h[n] (state before chunk n) ``[B, H, NC, K, V]`` and the final state ``[B, H, K, V]``."""
    b, t, nh, dk = k.shape
    dv = v.shape[-1]
    nc = t // cfg.chunk
    bk, bv = min(cfg.block_k, dk), min(cfg.block_v, dv)
    grid = (b * nh, dk // bk, dv // bv)

    def seq(d_block, which):
        if which == "k":
            return pl.BlockSpec((None, t, None, d_block), lambda i, a, _: (i // nh, 0, i % nh, a))
        return pl.BlockSpec((None, t, None, d_block), lambda i, _, a: (i // nh, 0, i % nh, a))

    in_specs = [seq(bk, "k"), seq(bv, "v")]
    args = [k, v]
    if cfg.gate == "head":
        in_specs.append(pl.BlockSpec((None, t, None), lambda i, a, b_: (i // nh, 0, i % nh)))
        args.append(g)
    elif cfg.gate == "key":
        in_specs.append(seq(bk, "k"))
        args.append(g)
    if cfg.segments:
        in_specs.append(pl.BlockSpec((None, t), lambda i, a, b_: (i // nh, 0)))
        args.append(rel)
    state_spec = pl.BlockSpec((None, None, bk, bv), lambda i, a, b_: (i // nh, i % nh, a, b_))
    if s0 is not None:
        in_specs.append(state_spec)
        args.append(s0)
    kernel = functools.partial(_states_kernel, cfg=cfg, num_chunks=nc, has_s0=s0 is not None)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, nc, bk, bv), lambda i, a, b_: (i // nh, i % nh, 0, a, b_)),
            state_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, nh, nc, dk, dv), k.dtype),
            jax.ShapeDtypeStruct((b, nh, dk, dv), _F32),
        ],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="gla_chunk_states",
    )(*args)


# ---------------------------------------------------------------------------------------------
# 2. Forward output.
# ---------------------------------------------------------------------------------------------


def _unpack(cfg, refs, names):
    """Split the flat ref list into named refs (gate / segment refs only when present)."""
    out, it = {}, iter(refs)
    for name in names:
        if name in ("g", "glo") and cfg.gate == "none":
            out[name] = None
        elif name == "rel" and not cfg.segments:
            out[name] = None
        else:
            out[name] = next(it)
    return out


def _load_chunk_gate(cfg, r):
    """(g, g_last, rel, rel_last) of the chunk held by the refs (None when absent)."""
    g = g_last = rel = rel_last = None
    if r["g"] is not None:
        g, g_last = _chunk_gate_last(cfg, r["g"])
    if r["rel"] is not None:
        rel, rel_last = r["rel"][...], r["rel"][cfg.chunk - 1]
    return g, g_last, rel, rel_last


def _output_kernel(*refs, cfg: GpuConfig):
    r = _unpack(cfg, refs, ("q", "k", "v", "g", "rel", "h", "o"))
    dtype = r["q"].dtype
    h, v = r["h"][...], r["v"][...]
    if cfg.gate != "key":
        q, k = r["q"][...], r["k"][...]
        g, _, rel, _ = _load_chunk_gate(cfg, r)
        a = _scores_scalar(cfg, q, k, g, rel, dtype)
        o = _dot(_query_inter(cfg, q, g, rel), h, dtype) + _dot(a, v, dtype)
        r["o"][...] = o.astype(r["o"].dtype)
        return

    def fast():
        q, k = r["q"][...], r["k"][...]
        g, _, rel, _ = _load_chunk_gate(cfg, r)
        a = _scores_key_fast(cfg, q, k, g, r["g"][0, :][None, :], rel, dtype)
        o = _dot(_query_inter(cfg, q, g, rel), h, dtype) + _dot(a, v, dtype)
        r["o"][...] = o.astype(r["o"].dtype)

    def exact():
        k_all, g_all = r["k"][...], r["g"][...]
        rel_all = r["rel"][...] if cfg.segments else None
        refs4 = (r["q"], r["k"], r["g"], r["rel"])
        c = SUB_CHUNK
        for m in range(cfg.chunk // c):
            a, q_m, g_m, rel_m = _scores_key_rows(cfg, refs4, m, k_all, g_all, rel_all, dtype)
            o_m = _dot(_query_inter(cfg, q_m, g_m, rel_m), h, dtype) + _dot(a, v, dtype)
            r["o"][pl.ds(m * c, c), :] = o_m.astype(r["o"].dtype)

    _key_paths(cfg, r["g"], fast, exact)


class _Specs:
    """BlockSpec factory for the parallel kernels: grid (B*H, NC, X) over [B, T, H, D] arrays."""

    def __init__(self, nh: int, chunk: int):
        self.nh, self.c = nh, chunk

    def rows(self, d):  # one chunk, the whole last dim
        nh = self.nh
        return pl.BlockSpec((None, self.c, None, d), lambda i, n, x: (i // nh, n, i % nh, 0))

    def rows_blocked(self, bd):  # one chunk, block x of the last dim
        nh = self.nh
        return pl.BlockSpec((None, self.c, None, bd), lambda i, n, x: (i // nh, n, i % nh, x))

    def gate(self, d=None, blocked=False):
        nh = self.nh
        if d is None:
            return pl.BlockSpec((None, self.c, None), lambda i, n, x: (i // nh, n, i % nh))
        return self.rows_blocked(d) if blocked else self.rows(d)

    def rel(self):
        nh = self.nh
        return pl.BlockSpec((None, self.c), lambda i, n, x: (i // nh, n))

    def state(self, dk, dv, block_axis):  # [B, H, NC, K, V] at chunk n
        nh = self.nh
        if block_axis == "v":
            return pl.BlockSpec(
                (None, None, None, dk, dv), lambda i, n, x: (i // nh, i % nh, n, 0, x)
            )
        return pl.BlockSpec((None, None, None, dk, dv), lambda i, n, x: (i // nh, i % nh, n, x, 0))


def _gate_args(cfg, sp, g, rel, dk, blocked):
    specs, args = [], []
    if cfg.gate == "head":
        specs.append(sp.gate())
        args.append(g)
    elif cfg.gate == "key":
        specs.append(sp.gate(dk, blocked))
        args.append(g)
    if cfg.segments:
        specs.append(sp.rel())
        args.append(rel)
    return specs, args


def chunk_output(cfg: GpuConfig, q, k, v, g, rel, h):
    """o ``[B, T, H, V]`` (dtype of v) from the inputs and the chunk-start states ``h``."""
    b, t, nh, dk = q.shape
    dv = v.shape[-1]
    nc = t // cfg.chunk
    bv = min(cfg.block_v_out, dv)
    sp = _Specs(nh, cfg.chunk)
    gspecs, gargs = _gate_args(cfg, sp, g, rel, dk, blocked=False)
    in_specs = [sp.rows(dk), sp.rows(dk), sp.rows_blocked(bv), *gspecs, sp.state(dk, bv, "v")]
    return pl.pallas_call(
        functools.partial(_output_kernel, cfg=cfg),
        grid=(b * nh, nc, dv // bv),
        in_specs=in_specs,
        out_specs=sp.rows_blocked(bv),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=_params(cfg, cfg.num_warps_parallel),
        interpret=cfg.interpret,
        name="gla_chunk_output",
    )(q, k, v, *gargs, h)
