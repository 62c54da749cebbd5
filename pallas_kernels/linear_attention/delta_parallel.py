"""The parts of the chunked delta rule that are parallel over chunks, in plain ``jnp`` (float32).

Used by :mod:`delta_ops` around the Pallas state kernels:

- :func:`prepare` builds, per chunk, the WY / UT-transform factors ``W`` and ``Ut`` (a batched
  unit-lower-triangular solve, parallel over chunks);
- :func:`chunk_outputs` maps chunk-start states (taken as constants) to the outputs and the
  chunk-end states. Its ``jax.vjp``, fed with the state cotangents that the reverse Pallas kernel
  produces, gives every input gradient of the parallel part.

``precision`` is that of the float32 einsums: the ops pass "highest" for float32 inputs and
"default" (TF32 on GPU) for bf16 / f16 inputs, whose tolerance is far looser.

Arrays are ``[batch, time, heads, dim]`` padded to a multiple of the chunk; ``g`` is the
per-token log decay ``[batch, time, heads]`` (float32) or None, ``R`` the within-chunk reset
count ``[batch, time]`` (int32) or None. See :mod:`delta_ops` for the equations.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

F32 = jnp.float32


def _chunked(x, chunk):
    """``[B, T, H, D] -> [B, NC, H, C, D]`` in float32."""
    B, T, H, D = x.shape
    return x.astype(F32).reshape(B, T // chunk, chunk, H, D).transpose(0, 1, 3, 2, 4)


def _unchunked(x):
    """``[B, NC, H, C, D] -> [B, T, H, D]``."""
    B, NC, H, C, D = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(B, NC * C, H, D)


def decays(g, R, chunk: int, shape: tuple[int, int, int]):
    """Masked decay factors ``D [B,NC,H,C,C]`` (inclusive causal), ``a``, ``e [B,NC,H,C]`` and
    ``gC [B,NC,H]`` from the per-token log decay ``g [B,T,H]`` (or None) and resets ``R``.

    Exponents are built as segment sums ``sum_{j < m <= i} g_m`` (a masked cumulative sum, the
    Mamba-2 "segsum") rather than as differences ``G_i - G_j`` of cumulative sums: the values are
    the same, but differentiating a difference sends ``+x`` and ``-x`` to gate gradients that
    must cancel, and with strong decays the rounding left by that cancellation is far larger
    than the true gradient (``~exp(g)``). Every exponent is <= 0, and exponents that are empty
    sums are constants.
    """
    B, T, H = shape
    nc = T // chunk
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    if g is not None:
        gc = g.astype(F32).reshape(B, nc, chunk, H).transpose(0, 1, 3, 2)  # [B,NC,H,C]
        below = jnp.tril(jnp.ones((chunk, chunk), bool), -1)  # [m, j]: j < m
        x = jnp.where(below[None, None, None], gc[..., :, None], 0.0)
        seg = jnp.cumsum(x, axis=-2)  # [i, j] = sum_{j < m <= i} g_m
        mask = jnp.broadcast_to(causal, seg.shape)
    else:
        mask = jnp.broadcast_to(causal, (B, nc, H, chunk, chunk))
    if R is not None:
        Rc = jnp.broadcast_to(R.reshape(B, nc, 1, chunk), mask.shape[:-1])
        mask = mask & (Rc[..., :, None] == Rc[..., None, :])
    if g is not None:
        D = jnp.where(mask, jnp.exp(jnp.where(mask, seg, 0.0)), 0.0)
        a = jnp.exp(jnp.cumsum(gc, axis=-1))
        e = jnp.exp(seg[..., -1, :])
    else:
        D = mask.astype(F32)
        a = jnp.ones(mask.shape[:-1], F32)
        e = a
    if R is not None:
        a = jnp.where(Rc == 0, a, 0.0)
        e = jnp.where(Rc == Rc[..., -1:], e, 0.0)
    return D, a, e, a[..., -1]


def prepare(k, v, beta, g, R, *, chunk: int, out_dtype, precision="highest"):
    """``W = T (beta a K)``, ``Ut = T (beta V)`` with ``T = (I + A)^-1`` and
    ``A = strict_lower(beta_i k_i.k_j D_ij)``. Returns both as ``[B,T,H,*]`` in ``out_dtype``."""
    B, T, H, Kd = k.shape
    kc, vc = _chunked(k, chunk), _chunked(v, chunk)
    bc = beta.astype(F32).reshape(B, T // chunk, chunk, H).transpose(0, 1, 3, 2)
    D, a, _, _ = decays(g, R, chunk, (B, T, H))
    strict = jnp.tril(jnp.ones((1, 1, 1, chunk, chunk), F32), -1)
    kk = jnp.einsum("bnhik,bnhjk->bnhij", kc, kc, precision=precision)
    A = bc[..., :, None] * kk * D * strict
    rhs = jnp.concatenate([(bc * a)[..., None] * kc, bc[..., None] * vc], axis=-1)
    eye = jnp.eye(chunk, dtype=F32)[None, None, None]
    x = solve_triangular(eye + A, rhs, lower=True, unit_diagonal=True)
    w, ut = x[..., :Kd], x[..., Kd:]
    return _unchunked(w).astype(out_dtype), _unchunked(ut).astype(out_dtype)


def chunk_outputs(
    q, k, g, R, w, ut, states, *, chunk: int, scale: float, out_dtype, precision="highest"
):
    """Outputs and chunk-end states given the chunk-start ``states [B,H,NC,K,V]``.

    ``U = Ut - W S``; ``O = scale (a Q S + (Q K^T * D) U)``; ``S_end = gC S + (e K)^T U``.
    Returns ``(O [B,T,H,V] in out_dtype, S_end [B,H,NC,K,V] float32)``.
    """
    B, T, H, _ = q.shape
    qc, kc, wc, utc = (_chunked(x, chunk) for x in (q, k, w, ut))
    s = states.astype(F32).transpose(0, 2, 1, 3, 4)
    D, a, e, g_c = decays(g, R, chunk, (B, T, H))
    u = utc - jnp.einsum("bnhck,bnhkv->bnhcv", wc, s, precision=precision)
    inter = a[..., None] * jnp.einsum("bnhck,bnhkv->bnhcv", qc, s, precision=precision)
    p = jnp.einsum("bnhik,bnhjk->bnhij", qc, kc, precision=precision) * D
    intra = jnp.einsum("bnhij,bnhjv->bnhiv", p, u, precision=precision)
    o = scale * (inter + intra)
    s_end = g_c[..., None, None] * s + jnp.einsum(
        "bnhck,bnhcv->bnhkv", e[..., None] * kc, u, precision=precision
    )
    return _unchunked(o).astype(out_dtype), s_end.transpose(0, 2, 1, 3, 4)
