"""Pallas Mosaic-TPU kernels for chunked gated linear attention, forward and backward.

Same recurrence, chunked algorithm and numerical scheme as ``gla_kernel_gpu`` (read its module
docstring first): ``G`` is the chunk-local inclusive cumulative gate, every evaluated exponent is
a difference that is ``<= 0`` (or bounded by ``fast_span``); the per-key gate uses the
one-matmul form on chunks whose decay span is at most ``fast_span`` and otherwise sub-chunks of
16 rows with a reference row off the diagonal and an exact column-by-column diagonal (chosen
per chunk with ``lax.cond``); ``dG = q*dq - k*dk`` with the exactly-cancelling terms left out,
and the backward reads ``G`` as two parts (``gla_gate``) for exact differences.

TPU specifics:

* Layout ``[B, H, T, D]`` (the caller's ``[B, T, H, D]`` is transposed once by XLA) so a chunk is
  a ``(C, D)`` block with ``C % 16 == 0`` and ``D`` the full dim: legal for Mosaic's (8, 128)
  tiling (bf16 rows pack in pairs, hence 16).
* The state is kept transposed, ``S^T [V, K]`` float32 in VMEM scratch, so that the per-key
  decay ``exp(G_L)`` is a lane-broadcast row ``[1, K]`` (no transposes in the kernel).
  Scalar gates and segment run indices come as a column ``[C, 1]`` and a row ``[1, C]`` (two free
  reshapes of the same array).
* Forward: one fused kernel, grid ``(B*H, NC)`` with the chunk axis ``"arbitrary"``: per chunk
  ``o = (scale q exp(G)) S + A v`` then ``S <- decay S + k~^T v``; no chunk states hit HBM.
* Single rows of a chunk are picked from aligned 8-row windows (``_row``), columns by masked
  lane reductions: no unaligned sublane/lane slices.
* Backward: (1) ``_states`` recomputes the chunk-start states ``h[n]`` (``[B, H, NC, V, K]``,
  input dtype);
  (2) ``_backward`` walks the chunks in reverse (grid ``(B*H, NC)``, reversed index maps), keeps
  ``dS^T`` in VMEM scratch and produces ``dq, dk, dv, dG`` per chunk and ``d initial_state``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_attention import gla_gate as gg

SUB_CHUNK = 16
_F32 = jnp.float32
_NT = ((1,), (1,))  # a @ b^T
_TN = ((0,), (0,))  # a^T @ b
_NN = ((1,), (0,))


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Static description of one call. gate: "none" | "head" | "key"; chunk: C (multiple of 16)."""

    gate: str
    chunk: int
    scale: float
    segments: bool
    interpret: bool = False
    vmem_limit_bytes: int | None = None
    fast_span: float = 60.0  # as gla_kernel_gpu.GpuConfig.fast_span


def _params(cfg: TpuConfig):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=cfg.vmem_limit_bytes
    )


def _dot(a, b, dtype, dims=_NN):
    precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (dims, ((), ())),
        precision=precision,
        preferred_element_type=_F32,
    )


def _exp_le0(x):
    return jnp.exp(jnp.minimum(x, 0.0))


def _bh(i, nh):
    """(batch, head) of the flattened grid index (integer ops that Mosaic lowers; x64-safe)."""
    n = jnp.asarray(nh, i.dtype)
    return lax.div(i, n), lax.rem(i, n)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _row(x, j: int):
    """Row ``j`` (static) of a 2-D value as ``[1, N]``.

    Taken from the aligned 8-row window that holds it by a masked sublane sum, so that Mosaic
    never sees an unaligned sublane slice. Exact (one nonzero term).
    """
    if isinstance(x, gg.Split):
        return gg.Split(_row(x.hi, j), _row(x.lo, j))
    base = (j // 8) * 8
    if base == j:
        return x[j : j + 1]
    win = x[base : base + 8]
    sel = _iota((8, 1), 0) == (j - base)
    return jnp.sum(jnp.where(sel, win, jnp.zeros_like(win)), axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Per-chunk math on loaded values.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Chunk:
    """One chunk's inputs as values (float32 except where noted); absent pieces are None."""

    q: jax.Array  # [C, K]
    k: jax.Array  # [C, K]
    g: jax.Array | None = None  # head: [C, 1]; key: [C, K]
    g_row: jax.Array | None = None  # head: [1, C]
    g_last: jax.Array | None = None  # head: [1, 1]; key: [1, K]
    rel: jax.Array | None = None  # [C, 1] int32
    rel_row: jax.Array | None = None  # [1, C] int32
    rel_last: jax.Array | None = None  # [1, 1] int32


def _load(cfg, r) -> _Chunk:
    c = cfg.chunk
    ch = _Chunk(q=r["q"][...].astype(_F32), k=r["k"][...].astype(_F32))
    split = "glo" in r  # precise exponent differences (see gla_gate)
    if cfg.gate != "none":
        ch.g = gg.Split(r["g"][...], r["glo"][...]) if split else r["g"][...]
        ch.g_last = _row(ch.g, c - 1)
    if cfg.gate == "head":
        ch.g_row = gg.Split(r["g_row"][...], r["glo_row"][...]) if split else r["g_row"][...]
    if cfg.segments:
        ch.rel, ch.rel_row = r["rel"][...], r["rel_row"][...]
        ch.rel_last = _row(ch.rel, c - 1)
    return ch


def _pair_mask(cfg, ch: _Chunk):
    c = cfg.chunk
    mask = _iota((c, c), 1) <= _iota((c, c), 0)
    if cfg.segments:
        mask = mask & (ch.rel == ch.rel_row)
    return mask


def _inter_weight(cfg, ch: _Chunk, like):
    """scale * exp(G_i) (zero on rows past a segment start), broadcast like ``like``."""
    w = jnp.full(like.shape, cfg.scale, _F32)
    if cfg.gate != "none":
        w = w * jnp.exp(gg.value(ch.g))
    if cfg.segments:
        w = jnp.where(ch.rel == 0, w, 0.0)
    return w


def _state_weight(cfg, ch: _Chunk, like):
    """exp(G_L - G_j) restricted to keys of the last row's sequence, broadcast like ``like``."""
    w = jnp.ones(like.shape, _F32)
    if cfg.gate != "none":
        w = w * jnp.exp(ch.g_last - ch.g)
    if cfg.segments:
        w = jnp.where(ch.rel == ch.rel_last, w, 0.0)
    return w


def _state_decay(cfg, ch: _Chunk):
    """Row factor for S^T [V, K] across the chunk ([1, K] / [1, 1]) or None."""
    d = None
    if cfg.gate != "none":
        d = jnp.exp(gg.value(ch.g_last))
    if cfg.segments:
        keep = (ch.rel_last == 0).astype(_F32)
        d = keep if d is None else d * keep
    return d


def _fast_chunk(cfg, ch: _Chunk):
    """True where the chunk's per-key decay span allows the one-matmul form (see TpuConfig)."""
    c = cfg.chunk
    return jnp.max(_row(ch.g, 0) - _row(ch.g, c - 1)) <= cfg.fast_span


def _key_fast_factors(ch: _Chunk):
    g0 = _row(ch.g, 0)
    return jnp.exp(ch.g - g0), jnp.exp(g0 - ch.g)


def _scores(cfg, ch: _Chunk, dtype):
    """A [C, C] = scale * (q_i . k_j exp(G_i - G_j)) masked (stable scheme; see module doc)."""
    if cfg.gate != "key":
        s = _dot(ch.q, ch.k, dtype, _NT)
        if cfg.gate == "head":
            s = s * _exp_le0(ch.g - ch.g_row)
        return jnp.where(_pair_mask(cfg, ch), s * cfg.scale, 0.0)

    def fast():
        e_q, e_k = _key_fast_factors(ch)
        a = _dot(ch.q * e_q, ch.k * e_k, dtype, _NT)
        return jnp.where(_pair_mask(cfg, ch), a * cfg.scale, 0.0)

    if cfg.fast_span < 0:
        return _scores_key_exact(cfg, ch, dtype)
    return lax.cond(_fast_chunk(cfg, ch), fast, lambda: _scores_key_exact(cfg, ch, dtype))


def _scores_key_exact(cfg, ch: _Chunk, dtype):
    """Per-key gate A by sub-chunks: reference-row matmuls off the diagonal, exact diagonal."""
    c = cfg.chunk
    sc = SUB_CHUNK
    col = _iota((sc, c), 1)
    row = _iota((sc, 1), 0)
    blocks = []
    for m in range(c // sc):
        r0 = m * sc
        q_m, g_m = ch.q[r0 : r0 + sc], ch.g[r0 : r0 + sc]
        if m > 0:
            g_r = _row(ch.g, r0)
            k_r = ch.k * _exp_le0(g_r - ch.g)
            a = _dot(q_m * jnp.exp(g_m - g_r), k_r, dtype, _NT)
            a = jnp.where(col < r0, a, 0.0)
        else:
            a = jnp.zeros((sc, c), _F32)
        for jj in range(sc):
            j = r0 + jj
            a_col = jnp.sum(
                q_m * _row(ch.k, j) * _exp_le0(g_m - _row(ch.g, j)), axis=1, keepdims=True
            )
            a = jnp.where((col == j) & (row >= jj), a_col, a)
        blocks.append(a)
    a = jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
    if cfg.segments:
        a = jnp.where(ch.rel == ch.rel_row, a, 0.0)
    return a * cfg.scale


# ---------------------------------------------------------------------------------------------
# Specs.
# ---------------------------------------------------------------------------------------------


class _Specs:
    """BlockSpecs for grid (B*H, NC) over [B, H, T, D] arrays; ``reverse`` walks chunks back."""

    def __init__(self, nh: int, chunk: int, nc: int, reverse: bool = False):
        self.nh, self.c, self.nc, self.rev = nh, chunk, nc, reverse

    def _n(self, n):
        return self.nc - 1 - n if self.rev else n

    def rows(self, d):
        nh = self.nh
        return pl.BlockSpec((None, None, self.c, d), lambda i, n: (*_bh(i, nh), self._n(n), 0))

    def row_vec(self):  # [B, H, NC, 1, C] -> (1, C)
        nh = self.nh
        return pl.BlockSpec(
            (None, None, None, 1, self.c), lambda i, n: (*_bh(i, nh), self._n(n), 0, 0)
        )

    def rel(self):  # [B, T, 1] -> (C, 1)
        nh = self.nh
        return pl.BlockSpec((None, self.c, 1), lambda i, n: (_bh(i, nh)[0], self._n(n), 0))

    def rel_row(self):  # [B, NC, 1, C] -> (1, C)
        nh = self.nh
        return pl.BlockSpec((None, None, 1, self.c), lambda i, n: (_bh(i, nh)[0], self._n(n), 0, 0))

    def state(self, dv, dk):  # [B, H, V, K], same block for every chunk
        nh = self.nh
        return pl.BlockSpec((None, None, dv, dk), lambda i, n: (*_bh(i, nh), 0, 0))

    def chunk_state(self, dv, dk):  # [B, H, NC, V, K] at chunk n
        nh = self.nh
        return pl.BlockSpec(
            (None, None, None, dv, dk), lambda i, n: (*_bh(i, nh), self._n(n), 0, 0)
        )


def _gate_inputs(cfg, sp: _Specs, g, rel, dk):
    """(names, specs, args) for the gate and segment inputs in the [B, H, T, .] layout.

    ``g`` is G ``[B, H, T(, K)]`` or the pair (G_hi, G_lo) (then also named "glo").
    """
    names, specs, args = [], [], []
    if g is None:
        parts = []
    elif isinstance(g, tuple):
        parts = [("g", g[0]), ("glo", g[1])]
    else:
        parts = [("g", g)]
    for name, x in parts:
        if cfg.gate == "head":  # [B, H, T]
            b, nh, t = x.shape
            names += [name, name + "_row"]
            specs += [sp.rows(1), sp.row_vec()]
            args += [x.reshape(b, nh, t, 1), x.reshape(b, nh, t // cfg.chunk, 1, cfg.chunk)]
        else:
            names.append(name)
            specs.append(sp.rows(dk))
            args.append(x)
    if cfg.segments:  # rel: [B, T]
        bb, t = rel.shape
        names += ["rel", "rel_row"]
        specs += [sp.rel(), sp.rel_row()]
        args += [rel.reshape(bb, t, 1), rel.reshape(bb, t // cfg.chunk, 1, cfg.chunk)]
    return names, specs, args


def _named(names, refs):
    return dict(zip(names, refs, strict=True))


# ---------------------------------------------------------------------------------------------
# Forward (fused output + state recurrence).
# ---------------------------------------------------------------------------------------------


def _forward_kernel(*refs, cfg: TpuConfig, names, has_s0: bool):
    n_in = len(names)
    r = _named(names, refs[:n_in])
    o_ref, ht_ref, s_ref = refs[n_in:]
    n = pl.program_id(1)
    dtype = r["q"].dtype

    @pl.when(n == 0)
    def _():
        if has_s0:
            s_ref[...] = r["s0"][...]
        else:
            s_ref[...] = jnp.zeros(s_ref.shape, _F32)

    ch = _load(cfg, r)
    v = r["v"][...]
    s_t = s_ref[...]  # S^T [V, K]
    a = _scores(cfg, ch, dtype)
    o = _dot(ch.q * _inter_weight(cfg, ch, ch.q), s_t, dtype, _NT) + _dot(a, v, dtype)
    o_ref[...] = o.astype(o_ref.dtype)
    kd = ch.k * _state_weight(cfg, ch, ch.k)
    decay = _state_decay(cfg, ch)
    if decay is not None:
        s_t = s_t * decay
    s_t = s_t + _dot(v, kd, dtype, _TN)
    s_ref[...] = s_t

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        ht_ref[...] = s_t


def _to_bhtd(x):
    return None if x is None else jnp.swapaxes(x, 1, 2)


def forward(cfg: TpuConfig, q, k, v, g, rel, s0):
    """``(o [B, T, H, V], final state [B, H, K, V] f32)`` from ``[B, T, H, D]`` inputs."""
    b, t, nh, dk = q.shape
    dv = v.shape[-1]
    nc = t // cfg.chunk
    sp = _Specs(nh, cfg.chunk, nc)
    qt, kt, vt, gt = _to_bhtd(q), _to_bhtd(k), _to_bhtd(v), _to_bhtd(g)
    gnames, gspecs, gargs = _gate_inputs(cfg, sp, gt, rel, dk)
    names = ["q", "k", "v", *gnames]
    specs = [sp.rows(dk), sp.rows(dk), sp.rows(dv), *gspecs]
    args = [qt, kt, vt, *gargs]
    if s0 is not None:
        names.append("s0")
        specs.append(sp.state(dv, dk))
        args.append(jnp.swapaxes(s0, 2, 3))
    o, ht = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, names=tuple(names), has_s0=s0 is not None),
        grid=(b * nh, nc),
        in_specs=specs,
        out_specs=[sp.rows(dv), sp.state(dv, dk)],
        out_shape=[
            jax.ShapeDtypeStruct((b, nh, t, dv), v.dtype),
            jax.ShapeDtypeStruct((b, nh, dv, dk), _F32),
        ],
        scratch_shapes=[pltpu.VMEM((dv, dk), _F32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="gla_tpu_forward",
    )(*args)
    return jnp.swapaxes(o, 1, 2), jnp.swapaxes(ht, 2, 3)


# ---------------------------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------------------------


def _states_kernel(*refs, cfg: TpuConfig, names, has_s0: bool):
    n_in = len(names)
    r = _named(names, refs[:n_in])
    h_ref, s_ref = refs[n_in:]
    n = pl.program_id(1)
    dtype = r["k"].dtype

    @pl.when(n == 0)
    def _():
        if has_s0:
            s_ref[...] = r["s0"][...]
        else:
            s_ref[...] = jnp.zeros(s_ref.shape, _F32)

    ch = _load(cfg, r)
    s_t = s_ref[...]
    h_ref[...] = s_t.astype(h_ref.dtype)
    kd = ch.k * _state_weight(cfg, ch, ch.k)
    decay = _state_decay(cfg, ch)
    if decay is not None:
        s_t = s_t * decay
    s_ref[...] = s_t + _dot(r["v"][...], kd, dtype, _TN)


def _dq_dk_key(cfg, ch: _Chunk, p, pt, dtype):
    """Strictly-lower intra-chunk dq, dk for the per-key gate, by sub-chunks of 16 rows.

    ``p [C, C]`` (rows i, cols j) is the masked ``scale * do_i . v_j`` and ``pt`` its transpose
    (rows j, cols i), both without decay and with the diagonal. Columns are picked with masked
    lane reductions (no unaligned lane slices). Returns ``(dq, dk)`` ``[C, K]``.
    """
    c, sc = cfg.chunk, SUB_CHUNK
    nb = c // sc
    col = _iota((sc, c), 1)
    loc = _iota((sc, 1), 0)
    dqs, dks = [], []
    for m in range(nb):
        r0 = m * sc
        q_m, k_m, g_m = ch.q[r0 : r0 + sc], ch.k[r0 : r0 + sc], ch.g[r0 : r0 + sc]
        p_m, pt_m = p[r0 : r0 + sc], pt[r0 : r0 + sc]  # [sc, C]
        if m > 0:  # columns before the sub-chunk; reference = its first row
            g_r = _row(ch.g, r0)
            k_r = ch.k * _exp_le0(g_r - ch.g)
            dq_m = jnp.exp(g_m - g_r) * _dot(jnp.where(col < r0, p_m, 0.0), k_r, dtype)
        else:
            dq_m = jnp.zeros_like(q_m)
        if m < nb - 1:  # rows after the sub-chunk; reference = its last row
            g_r = _row(ch.g, r0 + sc - 1)
            q_r = ch.q * _exp_le0(ch.g - g_r)
            dk_m = jnp.exp(g_r - g_m) * _dot(jnp.where(col >= r0 + sc, pt_m, 0.0), q_r, dtype)
        else:
            dk_m = jnp.zeros_like(k_m)
        for tt in range(sc):
            j = r0 + tt
            g_j = _row(ch.g, j)
            p_col = jnp.sum(jnp.where((col == j) & (loc > tt), p_m, 0.0), axis=1, keepdims=True)
            dq_m = dq_m + p_col * _row(ch.k, j) * _exp_le0(g_m - g_j)
            pt_col = jnp.sum(jnp.where((col == j) & (loc < tt), pt_m, 0.0), axis=1, keepdims=True)
            dk_m = dk_m + pt_col * _row(ch.q, j) * _exp_le0(g_j - g_m)
        dqs.append(dq_m)
        dks.append(dk_m)
    if nb == 1:
        return dqs[0], dks[0]
    return jnp.concatenate(dqs, axis=0), jnp.concatenate(dks, axis=0)


def _backward_kernel(*refs, cfg: TpuConfig, names):
    n_in = len(names)
    r = _named(names, refs[:n_in])
    dq_ref, dk_ref, dv_ref = refs[n_in : n_in + 3]
    rest = refs[n_in + 3 :]
    if cfg.gate != "none":
        dg_ref, ds0_ref, ds_ref = rest
    else:
        dg_ref = None
        ds0_ref, ds_ref = rest
    n = pl.program_id(1)  # counts chunks from the end
    c = cfg.chunk
    dtype = r["q"].dtype

    @pl.when(n == 0)
    def _():
        ds_ref[...] = r["dht"][...]

    ch = _load(cfg, r)
    v, do = r["v"][...], r["do"][...]
    # [V, K]: the state before the chunk and the gradient of the state after it.
    h_t, dh_t = r["h"][...].astype(_F32), ds_ref[...]

    # dv = A^T do + k~ dS
    a = _scores(cfg, ch, dtype)
    w_k = _state_weight(cfg, ch, ch.k)
    dv = _dot(a, do, dtype, _TN) + _dot(ch.k * w_k, dh_t, dtype, _NT)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    # dq, dk. P[i, j] = scale * do_i . v_j (the diagonal's exp(0) = 1 is added exactly).
    mask = _pair_mask(cfg, ch)
    eye = _iota((c, c), 0) == _iota((c, c), 1)
    p = _dot(do, v, dtype, _NT) * cfg.scale
    p_diag = jnp.sum(jnp.where(eye, p, 0.0), axis=1, keepdims=True)  # [C, 1]
    if cfg.gate == "key":
        p = jnp.where(mask, p, 0.0)

        def exact():
            pt = _dot(v, do, dtype, _NT) * cfg.scale  # P^T
            pt = jnp.where(_iota((c, c), 1) >= _iota((c, c), 0), pt, 0.0)
            if cfg.segments:
                pt = jnp.where(ch.rel == ch.rel_row, pt, 0.0)
            return _dq_dk_key(cfg, ch, p, pt, dtype)

        def fast():
            e_q, e_k = _key_fast_factors(ch)
            ps = jnp.where(eye, 0.0, p)
            return (
                e_q * _dot(ps, ch.k * e_k, dtype),
                e_k * _dot(ps, ch.q * e_q, dtype, _TN),
            )

        if cfg.fast_span < 0:
            dq_intra, dk_intra = exact()
        else:
            dq_intra, dk_intra = lax.cond(_fast_chunk(cfg, ch), fast, exact)
    else:
        if cfg.gate == "head":
            p = p * _exp_le0(ch.g - ch.g_row)
        p = jnp.where(mask & ~eye, p, 0.0)
        dq_intra = _dot(p, ch.k, dtype)
        dk_intra = _dot(p, ch.q, dtype, _TN)
    dq = dq_intra + _dot(do, h_t, dtype) * _inter_weight(cfg, ch, ch.q)  # strictly lower
    dk_state = _dot(v, dh_t, dtype) * w_k
    dq_ref[...] = (dq + p_diag * ch.k).astype(dq_ref.dtype)
    dk_ref[...] = (dk_intra + dk_state + p_diag * ch.q).astype(dk_ref.dtype)

    decay = _state_decay(cfg, ch)
    if dg_ref is not None:
        row = _iota((c, 1), 0)
        dks = jnp.where(row == c - 1, 0.0, dk_state)
        dg = ch.q * dq - ch.k * (dk_intra + dks)  # [C, K]
        last = jnp.sum(ch.k * dks, axis=0, keepdims=True) + decay * jnp.sum(
            h_t * dh_t, axis=0, keepdims=True
        )  # [1, K]
        dg = dg + jnp.where(row == c - 1, last, 0.0)
        if cfg.gate == "head":
            dg = jnp.sum(dg, axis=1, keepdims=True)
        dg_ref[...] = dg

    if decay is not None:
        dh_t = dh_t * decay
    dh_t = dh_t + _dot(do, ch.q * _inter_weight(cfg, ch, ch.q), dtype, _TN)
    ds_ref[...] = dh_t

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        ds0_ref[...] = dh_t


def backward(cfg: TpuConfig, q, k, v, g, rel, s0, do, dht):
    """``(dq, dk, dv, dG, d initial_state)`` for the ``[B, T, H, D]`` inputs.

    ``g`` is the pair ``(G_hi, G_lo)`` of ``gla_gate.split_chunk_cumsum`` (or None).
    """
    b, t, nh, dk = q.shape
    dv = v.shape[-1]
    nc = t // cfg.chunk
    qt, kt, vt, dot_ = (_to_bhtd(x) for x in (q, k, v, do))
    gt = None if g is None else tuple(_to_bhtd(x) for x in g)  # (G_hi, G_lo)

    # (1) chunk-start states h[n] (transposed: [B, H, NC, V, K]).
    sp = _Specs(nh, cfg.chunk, nc)
    gsum = None if gt is None else gt[0] + gt[1]
    gnames, gspecs, gargs = _gate_inputs(cfg, sp, gsum, rel, dk)
    names = ["q", "k", "v", *gnames]
    specs = [sp.rows(dk), sp.rows(dk), sp.rows(dv), *gspecs]
    args = [qt, kt, vt, *gargs]
    if s0 is not None:
        names.append("s0")
        specs.append(sp.state(dv, dk))
        args.append(jnp.swapaxes(s0, 2, 3))
    h = pl.pallas_call(
        functools.partial(_states_kernel, cfg=cfg, names=tuple(names), has_s0=s0 is not None),
        grid=(b * nh, nc),
        in_specs=specs,
        out_specs=sp.chunk_state(dv, dk),
        out_shape=jax.ShapeDtypeStruct((b, nh, nc, dv, dk), k.dtype),
        scratch_shapes=[pltpu.VMEM((dv, dk), _F32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="gla_tpu_states",
    )(*args)

    # (2) reverse sweep.
    sr = _Specs(nh, cfg.chunk, nc, reverse=True)
    gnames, gspecs, gargs = _gate_inputs(cfg, sr, gt, rel, dk)
    names = ["q", "k", "v", *gnames, "do", "h", "dht"]
    specs = [
        sr.rows(dk),
        sr.rows(dk),
        sr.rows(dv),
        *gspecs,
        sr.rows(dv),
        sr.chunk_state(dv, dk),
        sr.state(dv, dk),
    ]
    args = [qt, kt, vt, *gargs, dot_, h, jnp.swapaxes(dht, 2, 3)]
    out_specs = [sr.rows(dk), sr.rows(dk), sr.rows(dv)]
    out_shape = [
        jax.ShapeDtypeStruct(qt.shape, q.dtype),
        jax.ShapeDtypeStruct(kt.shape, k.dtype),
        jax.ShapeDtypeStruct(vt.shape, v.dtype),
    ]
    if cfg.gate == "head":
        out_specs.append(sr.rows(1))
        out_shape.append(jax.ShapeDtypeStruct((b, nh, t, 1), _F32))
    elif cfg.gate == "key":
        out_specs.append(sr.rows(dk))
        out_shape.append(jax.ShapeDtypeStruct(qt.shape, _F32))
    out_specs.append(sr.state(dv, dk))
    out_shape.append(jax.ShapeDtypeStruct((b, nh, dv, dk), _F32))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg, names=tuple(names)),
        grid=(b * nh, nc),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dv, dk), _F32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="gla_tpu_backward",
    )(*args)
    dq, dk_, dv_ = (jnp.swapaxes(x, 1, 2) for x in outs[:3])
    dg = None
    if cfg.gate == "head":
        dg = jnp.swapaxes(outs[3][..., 0], 1, 2)
    elif cfg.gate == "key":
        dg = jnp.swapaxes(outs[3], 1, 2)
    ds0 = jnp.swapaxes(outs[-1], 2, 3)
    return dq, dk_, dv_, dg, ds0
