"""Public chunked linear attention ops: validation, ``implementation=`` dispatch, block sizes.

Layout ``[batch, time, heads, dim]``; state ``[batch, heads, key_dim, value_dim]`` (float32).

* :func:`gated_linear_attention`: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,
  ``o_t = S_t^T (scale q_t)`` — plain linear attention (no gate), one decay per head and step
  (RetNet / Lightning Attention / Mamba-2 style) or per key dim (GLA, "Gated Linear Attention
  Transformers with Hardware-Efficient Training").
* :func:`delta_rule`: ``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` —
  DeltaNet ("Parallelizing Linear Transformers with the Delta Rule over Sequence Length") and,
  with ``log_decay``, Gated DeltaNet ("Gated Delta Networks").
* :func:`gated_linear_attention_step`, :func:`delta_rule_step`: one token, for decoding.

Implementations (all compute the same function): ``"reference"`` (token-by-token scan),
``"xla"`` (chunked jnp) and ``"pallas"`` (kernels; ``interpret=True`` runs them on CPU).
``None`` picks Pallas on GPU/TPU and falls back to ``"xla"`` where the kernel raises
``NotImplementedError``; on CPU it picks ``"xla"``.

Sequence parallelism: inside a ``jax.shard_map`` body traced under
:func:`sequence_context.sequence_parallel_axis`, the full-sequence ops take their time-major
arguments as one shard of a sequence split over that mesh axis and pass states between shards
(:mod:`.sequence_parallel`, LASP-2 style); the result equals the unsharded op's.

Decays must satisfy ``log_decay <= 0``. When ``log_decay`` is a concrete array (eager call, not
under ``jit``/``grad`` tracing) a positive entry raises ``ValueError``; under tracing it cannot
be checked, and the result of the chunked paths (``"xla"``, ``"pallas"``) for positive entries
is undefined (their exponents are only guaranteed non-positive for ``g <= 0``; they may
overflow). ``"reference"`` computes the recurrence literally for any ``g``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _platform
from . import reference, sequence_context, xla
from .block_sizes import BlockSizes, check_chunk_size

__all__ = [
    "gated_linear_attention",
    "delta_rule",
    "gated_linear_attention_step",
    "delta_rule_step",
]


# ---------------------------------------------------------------------------------------------
# Validation (trace time).
# ---------------------------------------------------------------------------------------------


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} must have a floating dtype (float32, bfloat16, ...); got {x.dtype}"
        )


def _check_shape(name, x, expected, meaning):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}; got {x.shape}")


def _check_qkv(q, k, v):
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 [batch, time, heads, key_dim]; got shape {q.shape}")
    if k.ndim != 4:
        raise ValueError(f"k must have rank 4 [batch, time, heads, key_dim]; got shape {k.shape}")
    if v.ndim != 4:
        raise ValueError(f"v must have rank 4 [batch, time, heads, value_dim]; got shape {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(
            f"k must have the shape of q [batch, time, heads, key_dim] = {q.shape}; got {k.shape}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must match q in [batch, time, heads] = {q.shape[:3]}; got shape {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k and v must have the same dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if q.shape[1] < 1:
        raise ValueError(f"q must have at least one time step; got shape {q.shape}")


def _check_common(q, v, initial_state, segment_ids, chunk_size, scale):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        _check_shape(
            "initial_state", initial_state, (b, h, dk, dv), "[batch, heads, key_dim, value_dim]"
        )
    if segment_ids is not None:
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must have an integer dtype; got {segment_ids.dtype}")
        _check_shape("segment_ids", segment_ids, (b, t), "[batch, time]")
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    if scale is not None and np.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar; got shape {np.shape(scale)}")


def _check_nonpositive(log_decay):
    """Raise if a concrete log_decay has a positive entry (tracers cannot be checked)."""
    if isinstance(log_decay, jax.core.Tracer):
        return
    if float(jnp.max(log_decay)) > 0:
        raise ValueError(
            "log_decay must be <= 0 everywhere (decay exp(log_decay) in (0, 1]); "
            f"got a maximum of {float(jnp.max(log_decay))}"
        )


def _asarray(x):
    return None if x is None else jnp.asarray(x)


def _f32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)


def _resolve(q, v, scale, chunk_size, per_key_gate=False):
    dk = q.shape[-1]
    if scale is None:
        scale = dk**-0.5
    if chunk_size is None:
        chunk_size = BlockSizes.get(
            _platform.backend(), dk, v.shape[-1], q.dtype, per_key_gate=per_key_gate
        ).chunk_size
    return scale, chunk_size


def _pallas_thunk(module_name, fn_name, implementation, args, kwargs):
    def thunk():
        try:
            if module_name == "gla_ops":
                from . import gla_ops as mod
            else:
                from . import delta_ops as mod
        except ImportError as e:
            if implementation is None:
                raise NotImplementedError(f"Pallas module {module_name} unavailable: {e}") from e
            raise
        return getattr(mod, fn_name)(*args, **kwargs)

    return thunk


def _finish(o, final, v, return_final_state):
    o = o.astype(v.dtype)
    if return_final_state:
        return o, final.astype(jnp.float32)
    return o


# ---------------------------------------------------------------------------------------------
# Full-sequence ops.
# ---------------------------------------------------------------------------------------------


def gated_linear_attention(
    q,
    k,
    v,
    log_decay=None,
    *,
    scale=None,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
):
    """Gated linear attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``.

    Args:
      q, k: ``[batch, time, heads, key_dim]``, floating (all of q, k, v the same dtype).
      v: ``[batch, time, heads, value_dim]``.
      log_decay: ``g``, None (plain causal linear attention), ``[batch, time, heads]`` (one decay
        per head and step) or ``[batch, time, heads, key_dim]`` (per key dim). Must be <= 0
        (see the module docstring). Computed in float32.
      scale: multiplies q; default ``key_dim ** -0.5``.
      initial_state: ``[batch, heads, key_dim, value_dim]`` or None (zeros); applies to the first
        segment of each row.
      return_final_state: also return the float32 state after the last token.
      segment_ids: ``[batch, time]`` int; the state resets to zero wherever the id differs from
        the previous position's (packed sequences).
      chunk_size: power of two >= 16; default from :class:`BlockSizes` (64).
      implementation: None (auto), "pallas", "xla" or "reference".
      interpret: run Pallas kernels in interpret mode (CPU).
    Returns:
      ``o [batch, time, heads, value_dim]`` in v's dtype, or ``(o, final_state)`` with
      ``final_state [batch, heads, key_dim, value_dim]`` float32.
    """
    _platform.check_implementation(implementation)
    q, k, v = _asarray(q), _asarray(k), _asarray(v)
    log_decay, initial_state, segment_ids = (
        _asarray(log_decay),
        _asarray(initial_state),
        _asarray(segment_ids),
    )
    _check_qkv(q, k, v)
    _check_common(q, v, initial_state, segment_ids, chunk_size, scale)
    if log_decay is not None:
        _check_float("log_decay", log_decay)
        b, t, h, dk = q.shape
        if log_decay.ndim not in (3, 4):
            raise ValueError(
                "log_decay must have rank 3 [batch, time, heads] or rank 4 "
                f"[batch, time, heads, key_dim]; got shape {log_decay.shape}"
            )
        expected = (b, t, h) if log_decay.ndim == 3 else (b, t, h, dk)
        meaning = "[batch, time, heads]" if log_decay.ndim == 3 else "[batch, time, heads, key_dim]"
        _check_shape("log_decay", log_decay, expected, meaning)
        _check_nonpositive(log_decay)
    per_key = log_decay is not None and log_decay.ndim == 4
    scale, chunk_size = _resolve(q, v, scale, chunk_size, per_key_gate=per_key)
    g, s0 = _f32(log_decay), _f32(initial_state)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    if (shard := sequence_context.current()) is not None:  # time axis split over a mesh axis
        from .sequence_parallel import gated_linear_attention_shard

        return gated_linear_attention_shard(
            q,
            k,
            v,
            g,
            axis_name=shard.axis_name,
            scale=scale,
            initial_state=s0,
            return_final_state=return_final_state,
            segment_ids=seg,
            chunk_size=chunk_size,
            implementation=implementation,
            interpret=interpret,
        )

    candidates = {
        "reference": lambda: reference.gated_linear_attention(
            q, k, v, g, scale=scale, initial_state=s0, segment_ids=seg
        ),
        "xla": lambda: xla.gated_linear_attention(
            q, k, v, g, scale=scale, initial_state=s0, segment_ids=seg, chunk_size=chunk_size
        ),
        "pallas": _pallas_thunk(
            "gla_ops",
            "gated_linear_attention_pallas",
            implementation,
            (q, k, v, g, s0, seg),
            dict(scale=scale, chunk_size=chunk_size, interpret=interpret, backend=None),
        ),
    }
    o, final = _platform.dispatch(implementation, candidates)
    return _finish(o, final, v, return_final_state)


def delta_rule(
    q,
    k,
    v,
    beta,
    log_decay=None,
    *,
    scale=None,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
):
    """(Gated) delta rule: ``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``.

    Args:
      q, k: ``[batch, time, heads, key_dim]`` (keys are usually L2-normalised by the caller:
        the recurrence is contractive only when ``beta_t |k_t|^2 <= 2``).
      v: ``[batch, time, heads, value_dim]``.
      beta: ``[batch, time, heads]`` writing strength, usually in (0, 1); float32 compute.
      log_decay: None (DeltaNet) or ``[batch, time, heads]`` (Gated DeltaNet), <= 0.
      scale, initial_state, return_final_state, segment_ids, chunk_size, implementation,
      interpret: as in :func:`gated_linear_attention`.
    Returns:
      ``o`` in v's dtype, or ``(o, final_state float32)``.
    """
    _platform.check_implementation(implementation)
    q, k, v, beta = _asarray(q), _asarray(k), _asarray(v), _asarray(beta)
    log_decay, initial_state, segment_ids = (
        _asarray(log_decay),
        _asarray(initial_state),
        _asarray(segment_ids),
    )
    _check_qkv(q, k, v)
    _check_common(q, v, initial_state, segment_ids, chunk_size, scale)
    b, t, h, _ = q.shape
    _check_float("beta", beta)
    _check_shape("beta", beta, (b, t, h), "[batch, time, heads]")
    if log_decay is not None:
        _check_float("log_decay", log_decay)
        if log_decay.ndim != 3:
            raise ValueError(
                "log_decay for the delta rule must have rank 3 [batch, time, heads] (one decay "
                f"per head and step); got shape {log_decay.shape}"
            )
        _check_shape("log_decay", log_decay, (b, t, h), "[batch, time, heads]")
        _check_nonpositive(log_decay)
    scale, chunk_size = _resolve(q, v, scale, chunk_size)
    bt, g, s0 = _f32(beta), _f32(log_decay), _f32(initial_state)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    if (shard := sequence_context.current()) is not None:  # time axis split over a mesh axis
        from .sequence_parallel import delta_rule_shard

        return delta_rule_shard(
            q,
            k,
            v,
            bt,
            g,
            axis_name=shard.axis_name,
            scale=scale,
            initial_state=s0,
            return_final_state=return_final_state,
            segment_ids=seg,
            chunk_size=chunk_size,
            implementation=implementation,
            interpret=interpret,
        )

    candidates = {
        "reference": lambda: reference.delta_rule(
            q, k, v, bt, g, scale=scale, initial_state=s0, segment_ids=seg
        ),
        "xla": lambda: xla.delta_rule(
            q, k, v, bt, g, scale=scale, initial_state=s0, segment_ids=seg, chunk_size=chunk_size
        ),
        "pallas": _pallas_thunk(
            "delta_ops",
            "delta_rule_pallas",
            implementation,
            (q, k, v, bt, g, s0, seg),
            dict(scale=scale, chunk_size=chunk_size, interpret=interpret, backend=None),
        ),
    }
    o, final = _platform.dispatch(implementation, candidates)
    return _finish(o, final, v, return_final_state)


# ---------------------------------------------------------------------------------------------
# One-token steps for decoding.
# ---------------------------------------------------------------------------------------------


def _check_step(q_t, k_t, v_t, state):
    if q_t.ndim != 3:
        raise ValueError(f"q_t must have rank 3 [batch, heads, key_dim]; got shape {q_t.shape}")
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("state", state)):
        _check_float(name, x)
    _check_shape("k_t", k_t, q_t.shape, "[batch, heads, key_dim]")
    if v_t.ndim != 3 or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(
            f"v_t must have shape [batch, heads, value_dim] with [batch, heads] = "
            f"{q_t.shape[:2]}; got {v_t.shape}"
        )
    b, h, dk = q_t.shape
    _check_shape("state", state, (b, h, dk, v_t.shape[-1]), "[batch, heads, key_dim, value_dim]")


def gated_linear_attention_step(q_t, k_t, v_t, log_decay_t=None, *, state, scale=None):
    """One decoding step of :func:`gated_linear_attention`.

    Args:
      q_t, k_t: ``[batch, heads, key_dim]``; v_t: ``[batch, heads, value_dim]``;
      log_decay_t: None, ``[batch, heads]`` or ``[batch, heads, key_dim]``;
      state: ``[batch, heads, key_dim, value_dim]`` (zeros for a fresh sequence, or the
        ``final_state`` of a prefill); scale: default ``key_dim ** -0.5``.
    Returns:
      ``(o_t [batch, heads, value_dim] in v_t's dtype, new_state float32)``.
    """
    q_t, k_t, v_t, state = (_asarray(x) for x in (q_t, k_t, v_t, state))
    log_decay_t = _asarray(log_decay_t)
    _check_step(q_t, k_t, v_t, state)
    if log_decay_t is not None:
        _check_float("log_decay_t", log_decay_t)
        if log_decay_t.shape not in (q_t.shape[:2], q_t.shape):
            raise ValueError(
                "log_decay_t must have shape [batch, heads] = "
                f"{q_t.shape[:2]} or [batch, heads, key_dim] = {q_t.shape}; "
                f"got {log_decay_t.shape}"
            )
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    o, s = reference.gated_linear_attention_step(
        q_t, k_t, v_t, _f32(log_decay_t), _f32(state), scale=scale
    )
    return o.astype(v_t.dtype), s


def delta_rule_step(q_t, k_t, v_t, beta_t, log_decay_t=None, *, state, scale=None):
    """One decoding step of :func:`delta_rule`.

    Args:
      q_t, k_t: ``[batch, heads, key_dim]``; v_t: ``[batch, heads, value_dim]``;
      beta_t: ``[batch, heads]``; log_decay_t: None or ``[batch, heads]``;
      state: ``[batch, heads, key_dim, value_dim]``; scale: default ``key_dim ** -0.5``.
    Returns:
      ``(o_t [batch, heads, value_dim] in v_t's dtype, new_state float32)``.
    """
    q_t, k_t, v_t, beta_t, state = (_asarray(x) for x in (q_t, k_t, v_t, beta_t, state))
    log_decay_t = _asarray(log_decay_t)
    _check_step(q_t, k_t, v_t, state)
    _check_float("beta_t", beta_t)
    _check_shape("beta_t", beta_t, q_t.shape[:2], "[batch, heads]")
    if log_decay_t is not None:
        _check_float("log_decay_t", log_decay_t)
        _check_shape("log_decay_t", log_decay_t, q_t.shape[:2], "[batch, heads]")
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    o, s = reference.delta_rule_step(
        q_t, k_t, v_t, _f32(beta_t), _f32(log_decay_t), _f32(state), scale=scale
    )
    return o.astype(v_t.dtype), s
