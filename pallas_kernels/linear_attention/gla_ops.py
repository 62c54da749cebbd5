"""custom_vjp wiring of the gated-linear-attention Pallas kernels (GPU / Triton and TPU / Mosaic).

``gated_linear_attention_pallas`` is the entry point the public api calls. It

1. picks the backend (``backend=None``: from ``jax.default_backend()``; on CPU only with
   ``interpret=True``, then the GPU-structured kernels run in the Pallas interpreter),
2. pads ``T`` up to a multiple of the chunk *at the front* (padded tokens: ``q = k = v = 0``,
   ``g = 0``, same segment as the first real token, so the initial state passes through them
   unchanged). Front padding keeps the last row of the last chunk a real token; with padding at
   the end, ``dG`` would hold O(1) terms that cancel only after the reverse cumulative sum
   (harmless in exact arithmetic, but rounding noise that swamps ``dg`` under strong decay),
3. forms the per-chunk relative segment run index ``rel`` (see ``gla_kernel_gpu``),
4. calls a ``jax.custom_vjp`` core on the padded inputs and the raw padded log decay. The core
   forms the chunk-local cumulative gate ``G`` (``gla_gate``: two float32 parts so that
   differences are exact), runs the Pallas forward kernels, and in the backward recomputes the
   chunk states, runs the backward kernels and returns ``dg`` as the in-chunk reverse
   cumulative sum of the kernels' ``dG``.

Nothing per token or per chunk is kept between forward and backward except the inputs.
Unsupported cases raise ``NotImplementedError`` (the api then falls back to the ``xla`` path).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels.linear_attention import gla_gate as gg
from pallas_kernels.linear_attention import gla_kernel_gpu as kgpu
from pallas_kernels.linear_attention import gla_kernel_gpu_bwd as kgpu_bwd

__all__ = ["gated_linear_attention_pallas", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64
_MIN_CHUNK = 16
# Per-key gate: chunks whose total log decay span is at most this use the one-matmul form;
# stronger ones the exact sub-chunk form (see gla_kernel_gpu.GpuConfig.fast_span). Negative
# disables the one-matmul form (tests use that to run the exact form on mild decays).
KEY_GATE_FAST_SPAN = 60.0
# Field overrides for kgpu.GpuConfig (e.g. {"num_warps_parallel": 4, "block_k": 32}), applied to
# every GPU call; a hook for tuning on a real GPU without editing the defaults below.
GPU_TUNING: dict = {}


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _resolve_backend(backend: str | None, interpret: bool) -> str:
    if backend is None:
        backend = _platform.backend()
        if backend == "cpu":
            if not interpret:
                raise NotImplementedError(
                    "the gated_linear_attention Pallas kernels run on CPU only with interpret=True"
                )
            backend = "gpu"
    if backend in ("cuda", "rocm"):
        backend = "gpu"
    if backend not in ("gpu", "tpu"):
        raise NotImplementedError(
            f"gated_linear_attention Pallas kernels exist for backend 'gpu' and 'tpu'; "
            f"got {backend!r}"
        )
    return backend


def _resolve_chunk(chunk_size: int | None, t: int) -> int:
    if chunk_size is None:
        return max(_MIN_CHUNK, min(DEFAULT_CHUNK, _next_pow2(t)))
    if not _is_pow2(chunk_size) or chunk_size < _MIN_CHUNK or chunk_size > 256:
        raise NotImplementedError(
            f"the Pallas kernels need chunk_size a power of two in [16, 256]; got {chunk_size}"
        )
    return chunk_size


def _check_dims(backend: str, dk: int, dv: int) -> None:
    for name, d in (("key_dim", dk), ("value_dim", dv)):
        if backend == "gpu" and (not _is_pow2(d) or d < 16 or d > 256):
            raise NotImplementedError(
                f"the Triton kernels need {name} a power of two in [16, 256]; got {d}"
            )
        if backend == "tpu" and (d % 128 != 0 and (d < 16 or d % 16 != 0 or d > 128)):
            raise NotImplementedError(
                f"the Mosaic TPU kernels need {name} a multiple of 16 up to 128, or a multiple "
                f"of 128; got {d}"
            )


# ---------------------------------------------------------------------------------------------
# Preparation (plain jnp; differentiated by autodiff).
# ---------------------------------------------------------------------------------------------


def _pad_time(x, tp: int, mode: str = "constant"):
    """Pad the time axis at the *front* up to tp (see the module docstring)."""
    t = x.shape[1]
    if t == tp:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (tp - t, 0)
    return jnp.pad(x, pad, mode=mode)


def _relative_runs(segment_ids, chunk: int):
    """[B, T] int32: segment run index minus the run index of the token before the chunk."""
    b, t = segment_ids.shape
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    reset = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), change.astype(jnp.int32)], axis=1)
    runs = jnp.cumsum(reset, axis=1).reshape(b, t // chunk, chunk)
    resets = reset.reshape(b, t // chunk, chunk)
    before = runs[:, :, :1] - resets[:, :, :1]
    return (runs - before).reshape(b, t)


# ---------------------------------------------------------------------------------------------
# The custom_vjp core over padded, prepared inputs.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CoreConfig:
    backend: str
    chunk: int
    kernel: object  # a hashable backend config (kgpu.GpuConfig or the TPU one)


def _gates(cfg: _CoreConfig, g):
    """(G, (G_hi, G_lo)) from the padded raw log decay (None, None without a gate)."""
    if g is None:
        return None, None
    g_hi, g_lo = gg.split_chunk_cumsum(g, cfg.chunk)
    return g_hi + g_lo, (g_hi, g_lo)


def _fwd_impl(cfg: _CoreConfig, q, k, v, g, s0, rel):
    big_g, _ = _gates(cfg, g)
    if cfg.backend == "gpu":
        h, ht = kgpu.chunk_states(cfg.kernel, k, v, big_g, rel, s0)
        o = kgpu.chunk_output(cfg.kernel, q, k, v, big_g, rel, h)
        return o, ht
    from pallas_kernels.linear_attention import gla_kernel_tpu as ktpu

    return ktpu.forward(cfg.kernel, q, k, v, big_g, rel, s0)


def _bwd_impl(cfg: _CoreConfig, q, k, v, g, s0, rel, do, dht):
    big_g, split = _gates(cfg, g)
    if cfg.backend == "gpu":
        kc = cfg.kernel
        h, _ = kgpu.chunk_states(kc, k, v, big_g, rel, s0)
        dh, ds0 = kgpu_bwd.chunk_dstates(kc, q, big_g, rel, do, dht)
        dv = kgpu_bwd.chunk_dv(kc, q, k, v, big_g, rel, do, dh)
        dq, dk, d_big_g = kgpu_bwd.chunk_dqkg(kc, q, k, v, split, rel, do, h, dh)
    else:
        from pallas_kernels.linear_attention import gla_kernel_tpu as ktpu

        dq, dk, dv, d_big_g, ds0 = ktpu.backward(cfg.kernel, q, k, v, split, rel, s0, do, dht)
    dg = None if g is None else gg.chunk_reverse_cumsum(d_big_g, cfg.chunk)
    return dq, dk, dv, dg, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _CoreConfig, q, k, v, g, s0, rel):
    """(o, final state) from padded inputs; ``g`` is the raw (padded) log decay."""
    return _fwd_impl(cfg, q, k, v, g, s0, rel)


def _core_fwd(cfg, q, k, v, g, s0, rel):
    return _fwd_impl(cfg, q, k, v, g, s0, rel), (q, k, v, g, s0, rel)


def _core_bwd(cfg, res, cts):
    q, k, v, g, s0, rel = res
    do, dht = cts
    dq, dk, dv, dg, ds0 = _bwd_impl(cfg, q, k, v, g, s0, rel, do, dht.astype(jnp.float32))
    return dq, dk, dv, dg, None if s0 is None else ds0, None


_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------


def _kernel_config(backend, gate, chunk, scale, segments, dk, dv, interpret):
    if backend == "gpu":
        cfg = kgpu.GpuConfig(
            gate=gate,
            chunk=chunk,
            scale=float(scale),
            segments=segments,
            block_k=min(64, dk),
            block_v=min(64, dv),
            block_v_out=min(128, dv),
            block_k_dq=min(64, dk),
            num_warps=4,
            num_warps_parallel=8 if max(dk, dv) >= 128 else 4,
            num_stages=2,
            interpret=interpret,
            fast_span=KEY_GATE_FAST_SPAN,
        )
        return dataclasses.replace(cfg, **GPU_TUNING)
    from pallas_kernels.linear_attention import gla_kernel_tpu as ktpu

    return ktpu.TpuConfig(
        gate=gate,
        chunk=chunk,
        scale=float(scale),
        segments=segments,
        interpret=interpret,
        fast_span=KEY_GATE_FAST_SPAN,
    )


def gated_linear_attention_pallas(
    q,
    k,
    v,
    log_decay,
    initial_state,
    segment_ids,
    *,
    scale: float,
    chunk_size: int | None,
    interpret: bool,
    backend: str | None = None,
):
    """Chunked GLA with Pallas kernels. Returns ``(o [B,T,H,V] v.dtype, final [B,H,K,V] f32)``.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]`` (float32 or bfloat16), ``log_decay`` None,
    ``[B, T, H]`` or ``[B, T, H, K]`` (float32, <= 0), ``initial_state [B, H, K, V]`` or None,
    ``segment_ids [B, T]`` int or None. ``backend``: None (auto), "gpu" (Triton) or "tpu"
    (Mosaic). Raises ``NotImplementedError`` for cases the kernels do not cover.
    """
    backend = _resolve_backend(backend, interpret)
    b, t, nh, dk = q.shape
    dv = v.shape[-1]
    _check_dims(backend, dk, dv)
    if t == 0:
        raise NotImplementedError("the Pallas kernels need at least one time step")
    chunk = _resolve_chunk(chunk_size, t)
    tp = -(-t // chunk) * chunk
    dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise NotImplementedError(f"the Pallas kernels support float32 and bfloat16; got {dtype}")

    qp = _pad_time(q.astype(dtype), tp)
    kp = _pad_time(k.astype(dtype), tp)
    vp = _pad_time(v.astype(dtype), tp)
    gate = "none"
    g = None
    if log_decay is not None:
        gate = "head" if log_decay.ndim == 3 else "key"
        g = _pad_time(log_decay.astype(jnp.float32), tp)
    rel = None
    if segment_ids is not None:
        ids = _pad_time(segment_ids.astype(jnp.int32), tp, mode="edge")
        rel = _relative_runs(ids, chunk)
    s0 = None if initial_state is None else initial_state.astype(jnp.float32)

    cfg = _CoreConfig(
        backend,
        chunk,
        _kernel_config(backend, gate, chunk, scale, rel is not None, dk, dv, interpret),
    )
    o, final = _core(cfg, qp, kp, vp, g, s0, rel)
    return o[:, tp - t :].astype(v.dtype), final
