"""Chunked delta rule (DeltaNet / Gated DeltaNet) on Pallas kernels, wired with ``custom_vjp``.

Recurrence (Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length"; Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule")::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ;   o_t = S_t^T (scale q_t)

Rewritten with the per-token "new value" ``u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)`` it reads
``S_t = exp(g_t) S_{t-1} + k_t u_t^T``. Inside a chunk of ``C`` tokens starting from state ``S``,
with ``G`` the within-chunk cumulative sum of ``g`` (float32) and the decay factors
``D_ij = exp(G_i - G_j)`` (j <= i), ``a_i = exp(G_i)``, ``e_j = exp(G_C - G_j)``,
``gC = exp(G_C)`` (every exponent a difference <= 0: nothing overflows for strong decays)::

    (I + A) U = beta V - beta a K S,   A = strict_lower(beta_i (k_i . k_j) D_ij)
    T = (I + A)^-1 ;  W = T (beta a K) ;  Ut = T (beta V) ;  U = Ut - W S     (UT transform)
    O     = scale (a Q S + ((Q K^T) * D) U)
    S_end = gC S + (e K)^T U

Packed sequences (``segment_ids``) multiply every factor that crosses a reset by zero: with ``R``
the within-chunk count of resets, ``D_ij`` needs ``R_i == R_j``, ``a_i`` needs ``R_i == 0``, ``e_j``
needs ``R_j == R_C``. The initial state applies to the first segment of each row only.

Split of the work:

1. The UT transform, parallel over chunks: ``A``, ``T = (I + A)^-1``, ``W`` and ``Ut``. On GPU a
   Pallas kernel (``delta_kernel_gpu_prep``: 16 x 16 diagonal blocks inverted by row-wise forward
   substitution, then block forward substitution; no powers of ``A``, which grow at C = 64). On
   TPU ``delta_parallel.prepare`` in jnp (a batched ``solve_triangular``).
2. Pallas, sequential over chunks (one program per (batch*head, value block), state in
   registers / VMEM): ``U`` and the chunk-start states, and the final state.
3. Pallas, parallel: the outputs.

Backward (recomputes everything, saves only the inputs):

1. step 1 in jnp (``delta_parallel.prepare`` under ``jax.vjp``) and step 2 again for the
   chunk-start states;
2. Pallas, reverse-sequential: the cotangent of every chunk-end state,
   ``dS <- gC dS + scale (a Q)^T dO - W^T (P^T dO + (e K) dS)`` with ``P = scale (Q K^T) * D``,
   and the initial-state gradient;
3. jnp, parallel over chunks: ``jax.vjp`` of ``delta_parallel.chunk_outputs`` (chunk-start
   states held constant) and of ``prepare`` with those state cotangents, giving the gradients of
   q, k, v, beta and log_decay. (This part is plain jnp by design for now; it is parallel over
   chunks, so XLA batches it well. Moving it into kernels is future work.) Its decay exponents
   are segment sums, not differences of cumulative sums, so log_decay gradients stay accurate
   for strong decays (see ``delta_parallel.decays``); its einsums run at HIGHEST precision for
   float32 inputs and DEFAULT (TF32 on GPU) for bf16 / f16 inputs.

Padding: T is padded to the chunk multiple with k = v = 0, beta = 0, g = 0 (identity
transitions); head dims are padded to the kernel's tile (zeros are exact).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels.linear_attention import delta_parallel

F32 = jnp.float32
DEFAULT_CHUNK = 64
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class _Config:
    backend: str  # "gpu" | "tpu"
    chunk: int
    heads: int
    scale: float
    block_v_state: int
    block_v_out: int
    interpret: bool
    state_warps: int = 4  # GPU only: warps of the sequential kernels

    def state_kwargs(self) -> dict:
        return {"num_warps": self.state_warps} if self.backend == "gpu" else {}


def _kernels(backend: str):
    if backend == "tpu":
        from pallas_kernels.linear_attention import delta_kernel_tpu as mod
    else:
        from pallas_kernels.linear_attention import delta_kernel_gpu as mod
    return mod


def _cumsum_chunks(g, chunk):
    """``g [B,T,H] -> G [B,H,T]``: cumulative sum within each chunk, float32."""
    B, T, H = g.shape
    G = jnp.cumsum(g.reshape(B, T // chunk, chunk, H), axis=2)
    return G.reshape(B, T, H).transpose(0, 2, 1)


def _prepare(cfg: _Config, k, v, beta, g, G, R):
    """``(W, Ut)``: the GPU prep kernel, or the batched jnp solve on TPU."""
    if cfg.backend == "gpu":
        from pallas_kernels.linear_attention import delta_kernel_gpu_prep

        return delta_kernel_gpu_prep.prepare(
            k,
            v,
            beta.transpose(0, 2, 1),
            G,
            R,
            chunk=cfg.chunk,
            heads=cfg.heads,
            interpret=cfg.interpret,
        )
    return delta_parallel.prepare(k, v, beta, g, R, chunk=cfg.chunk, out_dtype=k.dtype)


def _states(cfg: _Config, w, ut, k, G, R, s0):
    return _kernels(cfg.backend).state_forward(
        w,
        ut,
        k,
        G,
        R,
        s0,
        chunk=cfg.chunk,
        heads=cfg.heads,
        block_v=cfg.block_v_state,
        state_dtype=k.dtype,
        interpret=cfg.interpret,
        **cfg.state_kwargs(),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta_core(cfg: _Config, q, k, v, beta, g, s0, R):
    return _delta_core_fwd(cfg, q, k, v, beta, g, s0, R)[0]


def _delta_core_fwd(cfg, q, k, v, beta, g, s0, R):
    G = None if g is None else _cumsum_chunks(g, cfg.chunk)
    w, ut = _prepare(cfg, k, v, beta, g, G, R)
    u, states, s_fin = _states(cfg, w, ut, k, G, R, s0)
    o = _kernels(cfg.backend).output(
        q,
        k,
        u,
        states,
        G,
        R,
        chunk=cfg.chunk,
        heads=cfg.heads,
        scale=cfg.scale,
        block_v=cfg.block_v_out,
        out_dtype=v.dtype,
        interpret=cfg.interpret,
    )
    return (o, s_fin), (q, k, v, beta, g, s0, R)


def _delta_core_bwd(cfg, res, cts):
    q, k, v, beta, g, s0, R = res
    do, ds_fin = cts
    cd = q.dtype
    chunk = cfg.chunk
    prec = "highest" if cd == jnp.dtype(F32) else "default"
    G = None if g is None else _cumsum_chunks(g, chunk)

    def prep(k_, v_, beta_, g_):
        return delta_parallel.prepare(
            k_, v_, beta_, g_, R, chunk=chunk, out_dtype=cd, precision=prec
        )

    (w, ut), prep_vjp = jax.vjp(prep, k, v, beta, g)
    _, states, _ = _states(cfg, w, ut, k, G, R, s0)
    d_ends, ds0 = _kernels(cfg.backend).state_backward(
        q,
        k,
        w,
        do.astype(cd),
        G,
        R,
        ds_fin,
        chunk=chunk,
        heads=cfg.heads,
        scale=cfg.scale,
        block_v=cfg.block_v_state,
        state_dtype=F32,
        interpret=cfg.interpret,
        **cfg.state_kwargs(),
    )

    def post(q_, k_, g_, w_, ut_):
        return delta_parallel.chunk_outputs(
            q_,
            k_,
            g_,
            R,
            w_,
            ut_,
            states,
            chunk=chunk,
            scale=cfg.scale,
            out_dtype=F32,
            precision=prec,
        )

    _, post_vjp = jax.vjp(post, q, k, g, w, ut)
    dq, dk1, dg1, dw, dut = post_vjp((do.astype(F32), d_ends))
    dk2, dv, dbeta, dg2 = prep_vjp((dw, dut))
    dg = None if g is None else dg1 + dg2
    dk = (dk1.astype(F32) + dk2.astype(F32)).astype(k.dtype)
    return dq, dk, dv, dbeta, dg, (None if s0 is None else ds0), None


_delta_core.defvjp(_delta_core_fwd, _delta_core_bwd)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _resolve_backend(backend: str | None, interpret: bool) -> str:
    if backend is None:
        backend = _platform.backend()
        if backend == "cpu":
            if not interpret:
                raise NotImplementedError(
                    "delta_rule Pallas kernels run on CPU only with interpret=True"
                )
            backend = "gpu"
    if backend not in ("gpu", "tpu"):
        raise NotImplementedError(f"delta_rule Pallas kernels: unsupported backend {backend!r}")
    return backend


def _padded_dim(d: int, backend: str) -> int:
    if backend == "gpu":
        return max(16, _next_pow2(d))  # Triton tiles: powers of two, dots need >= 16
    return max(8, -(-d // 8) * 8)


def delta_rule_pallas(
    q,
    k,
    v,
    beta,
    log_decay,
    initial_state,
    segment_ids,
    *,
    scale: float,
    chunk_size: int | None,
    interpret: bool,
    backend: str | None = None,
):
    """Delta rule on Pallas kernels; returns ``(o [B,T,H,V] in v.dtype, final_state
    [B,H,K,V] float32)``. Shapes: q, k ``[B,T,H,K]``; v ``[B,T,H,V]``; beta ``[B,T,H]``;
    log_decay None or ``[B,T,H]``; initial_state None or ``[B,H,K,V]``; segment_ids None or
    ``[B,T]`` int. Inputs are assumed validated by the api; unsupported cases raise
    ``NotImplementedError`` so that the caller can fall back to another implementation.
    """
    backend = _resolve_backend(backend, interpret)
    B, T, H, Kd = q.shape
    Vd = v.shape[-1]
    chunk = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk < 16 or chunk & (chunk - 1):
        raise NotImplementedError(
            f"delta_rule Pallas kernels need chunk_size a power of two >= 16; got {chunk}"
        )
    max_dim = 256
    if Kd > max_dim or Vd > max_dim:
        raise NotImplementedError(
            f"delta_rule Pallas kernels support head dims up to {max_dim}; got key_dim={Kd}, "
            f"value_dim={Vd}"
        )
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if not dtypes <= set(_SUPPORTED_DTYPES):
        raise NotImplementedError(
            f"delta_rule Pallas kernels support float32/bfloat16/float16 q, k, v; got {dtypes}"
        )
    cd = jnp.dtype(F32) if len(dtypes) > 1 else dtypes.pop()
    out_dtype = v.dtype

    Kp, Vp = _padded_dim(Kd, backend), _padded_dim(Vd, backend)
    Tp = -(-T // chunk) * chunk
    pt = Tp - T
    q = jnp.pad(q.astype(cd), ((0, 0), (0, pt), (0, 0), (0, Kp - Kd)))
    k = jnp.pad(k.astype(cd), ((0, 0), (0, pt), (0, 0), (0, Kp - Kd)))
    v = jnp.pad(v.astype(cd), ((0, 0), (0, pt), (0, 0), (0, Vp - Vd)))
    beta = jnp.pad(beta.astype(F32), ((0, 0), (0, pt), (0, 0)))
    g = None if log_decay is None else jnp.pad(log_decay.astype(F32), ((0, 0), (0, pt), (0, 0)))
    s0 = None
    if initial_state is not None:
        s0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, Kp - Kd), (0, Vp - Vd)))
    R = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        reset = jnp.concatenate(
            [jnp.zeros((B, 1), jnp.int32), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], axis=1
        )
        reset = jnp.pad(reset, ((0, 0), (0, pt)))
        R = jnp.cumsum(reset.reshape(B, Tp // chunk, chunk), axis=2).reshape(B, Tp)
        R = jax.lax.stop_gradient(R)

    if backend == "gpu":
        bvs, bvo = min(Vp, 64), min(Vp, 64)
    else:
        bvs = bvo = Vp if Vp % 128 else min(Vp, 128)
    cfg = _Config(
        backend=backend,
        chunk=chunk,
        heads=H,
        scale=float(scale),
        block_v_state=bvs,
        block_v_out=bvo,
        interpret=bool(interpret),
        # A [K, 64] float32 state per program: 8 warps keep K = 256 out of register spills.
        state_warps=4 if Kp <= 128 else 8,
    )
    o, s_fin = _delta_core(cfg, q, k, v, beta, g, s0, R)
    return o[:, :T, :, :Vd].astype(out_dtype), s_fin[:, :, :Kd, :Vd]
