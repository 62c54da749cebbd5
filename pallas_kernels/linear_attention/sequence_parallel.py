"""Sequence (context) parallel chunked linear attention, LASP-2 style, with ``jax.shard_map``.

Paper: "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid". The time
axis of ``q, k, v`` (and of the gates, ``beta``, ``segment_ids``) is split into ``n`` contiguous
blocks over the mesh axis ``axis_name``; shard ``s`` holds tokens ``[s T/n, (s+1) T/n)``.
Both ops are affine in the state that enters a shard::

    S_out(s) = M_s S_in(s) + L_s            (state after the shard)
    o_t      = o_loc_t + S_in(s)^T w_t      (outputs of the shard)

where ``L_s`` and ``o_loc`` come from the local chunked op started from a zero state, and
``M_s`` / ``w_t`` only depend on the shard's own ``q, k, g, beta``. Each shard therefore

1. runs the local chunked op (:func:`api.gated_linear_attention` / :func:`api.delta_rule`,
   whatever implementation is selected: Pallas kernels, chunked XLA, reference) from zero;
2. does **one** ``all_gather`` over ``axis_name`` of ``(L_s, M_s)``, whose size does not depend
   on ``T`` (plus, with ``segment_ids``, a ``[batch, 2]`` int32 all_gather of the first and last
   id of each shard);
3. runs the prefix ``S_in(0) = initial_state``, ``S_in(s+1) = M_s S_in(s) + L_s`` (a ``lax.scan``
   over the ``n`` gathered entries; every shard computes it redundantly — it is tiny — and picks
   its own ``S_in``; the last entry is the final state);
4. adds the correction ``S_in^T w_t`` to its local outputs.

Two entry points. :func:`gated_linear_attention_sp` / :func:`delta_rule_sp` take global arrays
and a mesh and run their own ``shard_map``. :func:`gated_linear_attention_shard` /
:func:`delta_rule_shard` are the per-shard bodies on *local* arrays, for use inside an existing
``shard_map`` (a whole model sharded over time): :func:`api.gated_linear_attention` and
:func:`api.delta_rule` call them when :func:`sequence_context.sequence_parallel_axis` is active,
so every layer built on the ops becomes sequence-parallel without changes.

Gated linear attention (``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``): ``M_s`` is diagonal,
``exp(sum of g over the shard)`` per key dim (broadcast from ``[b,t,h]`` gates; 1 without gate),
and ``w_t = exp(G_t) * scale q_t`` with ``G_t`` the inclusive cumulative gate *within the
shard*. The correction is applied in ``jnp`` (``O(T/n * h * k * v)`` per shard, one einsum; the
local op is not re-run). Exponents are ``<= 0`` for valid gates, so nothing overflows. The
all_gather carries ``[n, b, h, k, v + 1]`` float32 (state and diagonal packed together).

Delta rule (``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``): the
transition is not diagonal; ``M_s = prod_t exp(g_t)(I - beta_t k_t k_t^T)`` is ``k x k`` per head.
The state update acts on every value column separately, so the local op is run **once** with
value width ``v + k``: values ``[v, 0]`` and initial state ``[0, I_k]``. The first ``v`` columns
give ``o_loc`` and ``L_s``; the last ``k`` give ``w_t = P_t^T scale q_t`` (``P_t`` the product of
transitions up to ``t``) as outputs and ``M_s`` as the final state. This reuses the chunked op
(and its kernels and ``custom_vjp``) unchanged; the WY inverse is shared by both column groups,
so the cost is below two local runs (the state matmuls grow by ``(v + k) / v``). The all_gather
carries ``[n, b, h, k, v + k]`` float32 (exactly that final state), and the prefix costs
``n * b * h * k^2 * v`` flops, sequential over the ``n`` shards.

Packed sequences. The local op resets at ids changing *inside* a shard (it then zeroes its
own ``M_s`` and ``w_t`` after the reset: for GLA this is done here with the local run index).
A reset on a shard's first token (its first id differs from the previous shard's last id) is
found from the gathered ids and zeroes the incoming state of that shard in the prefix.
``initial_state`` reaches only the first segment of each row, as in the unsharded op.

Lengths. ``T`` is padded at the end to a multiple of ``n`` with ``q = k = v = 0``, ``g = 0``,
``beta = 0`` and the last segment id: padded steps leave the state unchanged, so the final
state is that after the last real token; padded outputs are dropped. Each shard's op pads its
``T/n`` tokens to a multiple of the chunk internally in the same way.

Gradients: plain autodiff through ``shard_map`` (the transpose of the all_gather is a
reduce-scatter of the same size) and the local op's own ``custom_vjp`` (or autodiff for
``"xla"``/``"reference"``). Mesh axes other than ``axis_name`` (and ``batch_axis``) see the
inputs replicated. ``batch_axis`` additionally splits the batch over a second mesh axis (data
parallel); heads are not split here.

Choices the paper leaves open. LASP-2 gathers the per-shard memory states and sums prefixes;
decays, the delta rule's non-diagonal transition and segment resets are handled as above.
Alternatives not taken: re-running the local op with ``initial_state = S_in`` (a second full
local pass that must wait for the all_gather; the correction here is one einsum) and, for the
delta rule, multiplying the per-chunk WY transitions out explicitly (``T / (n C)`` sequential
``k x k x k`` products per head, and a second code path beside the kernels).

Cost per shard, forward: the local op on ``T/n`` tokens (value width ``v + k`` for the delta
rule), one einsum ``[T/n, k] x [k, v]`` per head for the correction, the prefix (``n`` state
updates; ``k x k`` matmuls for the delta rule), and one all_gather of ``n b h k (v + 1)``
(GLA) or ``n b h k (v + k)`` (delta) float32 per device, independent of ``T``. The backward adds
the local op's backward and a reduce-scatter of the same size.

Precision: the local outputs come back from the op in ``v``'s dtype and the correction is added
in float32 before the final cast (for bf16 inputs one extra bf16 rounding of ``o_loc``, and for
the delta rule ``w_t`` is rounded to bf16 too). The delta prefix uses ``HIGHEST`` matmul
precision; the correction uses it for float32 inputs (``DEFAULT`` otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from .. import _platform
from . import api, sequence_context
from .reference import segment_runs

__all__ = [
    "gated_linear_attention_sp",
    "delta_rule_sp",
    "gated_linear_attention_shard",
    "delta_rule_shard",
]

F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# Validation and padding.
# ---------------------------------------------------------------------------------------------


def _check_mesh(mesh, axis_name, batch_axis, batch: int) -> int:
    """Validate the mesh arguments; return the number of sequence shards."""
    if not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or AbstractMesh; got {type(mesh).__name__}"
        )
    names = tuple(mesh.axis_names)
    if axis_name not in names:
        raise ValueError(f"axis_name must be one of the mesh axes {names}; got {axis_name!r}")
    if batch_axis is not None:
        if batch_axis not in names:
            raise ValueError(
                f"batch_axis must be None or one of the mesh axes {names}; got {batch_axis!r}"
            )
        if batch_axis == axis_name:
            raise ValueError(
                f"batch_axis must differ from axis_name={axis_name!r}; got {batch_axis!r}"
            )
        nb = mesh.shape[batch_axis]
        if batch % nb:
            raise ValueError(
                f"batch (q.shape[0]={batch}) must be divisible by the size {nb} of mesh axis "
                f"batch_axis={batch_axis!r}"
            )
    return mesh.shape[axis_name]


def _validate_like_unsharded(op, args, log_decay):
    """Run every argument check of the unsharded op on the global shapes.

    ``jax.eval_shape`` traces the op (nothing is computed); the value check on a concrete
    ``log_decay`` (which tracing skips) is done directly.
    """
    if log_decay is not None and not isinstance(log_decay, jax.core.Tracer):
        if jnp.issubdtype(log_decay.dtype, jnp.floating):
            api._check_nonpositive(log_decay)
    with sequence_context.suspended():  # the unsharded op on the global shapes
        jax.eval_shape(op, *args)


def _asarray(x):
    return None if x is None else jnp.asarray(x)


def _pad_time(x, tp, mode="constant"):
    if x is None or x.shape[1] == tp:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, tp - x.shape[1])
    return jnp.pad(x, pad, mode=mode)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


# ---------------------------------------------------------------------------------------------
# The cross-shard part, shared by both ops (runs inside shard_map).
# ---------------------------------------------------------------------------------------------


def _shard_start_resets(segment_ids, axis_name, n):
    """[n, b] bool: True where shard s's first id differs from shard s-1's last id (s >= 1)."""
    ends = jnp.stack([segment_ids[:, 0], segment_ids[:, -1]], axis=-1)  # [b, 2]
    ends = lax.all_gather(ends, axis_name)  # [n, b, 2]
    changed = ends[1:, :, 0] != ends[:-1, :, 1]
    return jnp.concatenate([jnp.zeros_like(changed[:1]), changed], axis=0)


def _prefix(apply_transition, local_states, transitions, resets, s0):
    """Incoming state of every shard and the final state.

    ``S_in(0) = s0``; ``S_in(s+1) = 0 if resets[s+1] else apply_transition(M_s, S_in(s)) + L_s``.
    Returns ``(s_in [n, ...], final)``.
    """
    n = local_states.shape[0]
    if resets is None:
        reset_next = jnp.zeros((n,) + local_states.shape[1:2], bool)
    else:
        reset_next = jnp.concatenate([resets[1:], jnp.zeros_like(resets[:1])], axis=0)

    def body(state, xs):
        loc, m, r = xs
        out = apply_transition(m, state) + loc
        nxt = jnp.where(r[:, None, None, None], jnp.zeros_like(out), out)
        return nxt, (state, out)

    _, (s_in, outs) = lax.scan(body, s0, (local_states, transitions, reset_next))
    return s_in, outs[-1]


def _run_sharded(body, mesh, axis_name, batch_axis, timed, s0):
    """shard_map ``body(timed, s0)`` over time; returns ``(o, final_state)``.

    ``timed`` maps names to the time-major inputs (``[batch, time, ...]``, padded; None entries
    are dropped and reach ``body`` as missing keys). Every shard computes the same final state
    from the same gathered data, so it is returned replicated over ``axis_name`` (no
    communication). ``check_vma=False``: the local ops start some scans from constant carries,
    which shard_map's varying-axes type check rejects; the specs here are exact, and autodiff
    of the replicated output is handled by shard_map either way.
    """
    timed = {name: x for name, x in timed.items() if x is not None}
    specs = {name: P(batch_axis, axis_name, *([None] * (x.ndim - 2))) for name, x in timed.items()}
    timed = {name: to_explicit_spec(x, mesh, specs[name]) for name, x in timed.items()}
    s0 = to_explicit_spec(s0, mesh, P(batch_axis))
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(specs, P(batch_axis)),
        out_specs=(P(batch_axis, axis_name), P(batch_axis)),
        check_vma=False,
    )
    return fn(timed, s0)


def to_explicit_spec(x, mesh, spec):
    """Reshard ``x`` to ``spec`` over the mesh's Explicit axes (``jax.make_mesh`` default).

    shard_map reshards inputs over Auto axes itself but requires inputs whose sharding over
    Explicit axes already matches ``in_specs``. Auto axes in ``spec`` are left to shard_map.
    """
    types = getattr(mesh, "axis_types", None)
    if types is None:
        return x
    explicit = {
        n
        for n, t in zip(mesh.axis_names, types, strict=True)
        if t == jax.sharding.AxisType.Explicit
    }
    if not explicit:
        return x
    parts = [a if a in explicit else None for a in tuple(spec) + (None,) * (x.ndim - len(spec))]
    return jax.reshard(x, jax.sharding.NamedSharding(mesh, P(*parts)))


def _unpad(o, t, mesh, batch_axis):
    """Drop the padded steps. Over an Explicit sequence axis a length that the shards do not
    divide cannot stay sharded: the output is then gathered over time first."""
    if o.shape[1] == t:
        return o
    return to_explicit_spec(o, mesh, P(batch_axis))[:, :t]


# ---------------------------------------------------------------------------------------------
# Gated linear attention.
# ---------------------------------------------------------------------------------------------


def gated_linear_attention_shard(
    q,
    k,
    v,
    log_decay=None,
    *,
    axis_name: str,
    scale: float,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
):
    """Per-shard body of :func:`gated_linear_attention_sp`, callable inside any ``shard_map``.

    Shapes are the *local* ones (``q [batch, T_loc, heads, key_dim]``, this shard's block of the
    time axis over ``axis_name``); ``scale`` is resolved (a number); ``initial_state`` (global,
    the same on every shard) enters at the start of shard 0. Returns ``o`` (local, v's dtype) or
    ``(o, final_state)`` with the float32 state after the last token of the last shard (the
    same on every shard). :func:`api.gated_linear_attention` calls this under
    :func:`sequence_context.sequence_parallel_axis`.
    """
    g, seg = log_decay, segment_ids
    b, tl, h, dk = q.shape
    dv = v.shape[-1]
    n = sequence_context.num_shards(axis_name)
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    with sequence_context.suspended():
        o_loc, s_loc = api.gated_linear_attention(
            q,
            k,
            v,
            g,
            scale=scale,
            initial_state=None,
            return_final_state=True,
            segment_ids=seg,
            chunk_size=chunk_size,
            implementation=implementation,
            interpret=interpret,
        )
    if g is None:
        w_gate = jnp.ones((b, tl, h, dk), F32)
        diag = jnp.ones((b, h, dk), F32)
    else:
        cum = jnp.cumsum(g.astype(F32), axis=1)  # [b, tl, h(, k)], <= 0
        if cum.ndim == 3:
            cum = cum[..., None]
        w_gate = jnp.exp(cum)
        diag = jnp.broadcast_to(jnp.exp(cum[:, -1]), (b, h, dk))
    resets = None
    if seg is not None:
        first_run = segment_runs(seg, b, tl) == 0  # [b, tl]: before any reset in this shard
        w_gate = jnp.where(first_run[:, :, None, None], w_gate, jnp.zeros_like(w_gate))
        diag = jnp.where(first_run[:, -1, None, None], diag, jnp.zeros_like(diag))
        resets = _shard_start_resets(seg, axis_name, n)

    packed = jnp.concatenate([s_loc, diag[..., None]], axis=-1)  # [b, h, k, v + 1]
    gathered = lax.all_gather(packed, axis_name)  # [n, b, h, k, v + 1]
    s_in_all, final = _prefix(
        lambda m, s: m[..., None] * s,
        gathered[..., :dv],
        gathered[..., dv],
        resets,
        s0,
    )
    s_in = s_in_all[lax.axis_index(axis_name)]
    qw = q.astype(F32) * scale * w_gate
    extra = jnp.einsum("bthk,bhkv->bthv", qw, s_in, precision=_precision(q.dtype))
    o = (o_loc.astype(F32) + extra).astype(v.dtype)
    return (o, final) if return_final_state else o


def _gla_local(xs, s0, *, axis_name, scale, op_kwargs):
    """Body of the shard_map of :func:`gated_linear_attention_sp` (local shapes)."""
    return gated_linear_attention_shard(
        xs["q"],
        xs["k"],
        xs["v"],
        xs.get("g"),
        axis_name=axis_name,
        scale=scale,
        initial_state=s0,
        return_final_state=True,
        segment_ids=xs.get("seg"),
        **op_kwargs,
    )


def gated_linear_attention_sp(
    q,
    k,
    v,
    log_decay=None,
    *,
    mesh,
    axis_name: str = "sequence",
    scale=None,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    batch_axis: str | None = None,
):
    """:func:`api.gated_linear_attention` with the time axis sharded over ``mesh[axis_name]``.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``; LASP-2 style
    (see the module docstring for the algorithm, its communication and its cost).

    Args:
      q, k, v, log_decay, scale, initial_state, return_final_state, segment_ids, chunk_size,
        implementation, interpret: as in :func:`api.gated_linear_attention`, with global
        shapes (``q [batch, time, heads, key_dim]``; ``time`` need not divide the shard count).
        ``chunk_size`` and ``implementation`` apply to each shard's local op.
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``) with an axis named ``axis_name``.
      axis_name: the mesh axis the sequence is split over.
      batch_axis: optional second mesh axis over which the batch is split.
    Returns:
      ``o [batch, time, heads, value_dim]`` in v's dtype, or ``(o, final_state)`` (float32
      ``[batch, heads, key_dim, value_dim]``), equal to the unsharded op.
    """
    _platform.check_implementation(implementation)
    q, k, v, log_decay, initial_state, segment_ids = (
        _asarray(x) for x in (q, k, v, log_decay, initial_state, segment_ids)
    )
    # Every argument check of the unsharded op, on the global shapes (trace only, no compute).
    _validate_like_unsharded(
        lambda q_, k_, v_, g_, s0_, seg_: api.gated_linear_attention(
            q_,
            k_,
            v_,
            g_,
            scale=scale,
            initial_state=s0_,
            segment_ids=seg_,
            chunk_size=chunk_size,
            implementation="reference",
        ),
        (q, k, v, log_decay, initial_state, segment_ids),
        log_decay,
    )
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = _check_mesh(mesh, axis_name, batch_axis, b)
    scale = dk**-0.5 if scale is None else scale
    tp = -(-t // n) * n
    g = None if log_decay is None else log_decay.astype(F32)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    timed = {name: _pad_time(x, tp) for name, x in dict(q=q, k=k, v=v, g=g).items()}
    timed["seg"] = _pad_time(seg, tp, mode="edge")
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)

    op_kwargs = dict(chunk_size=chunk_size, implementation=implementation, interpret=interpret)
    body = functools.partial(_gla_local, axis_name=axis_name, scale=scale, op_kwargs=op_kwargs)
    o, final = _run_sharded(body, mesh, axis_name, batch_axis, timed, s0)
    o = _unpad(o, t, mesh, batch_axis)
    return (o, final) if return_final_state else o


# ---------------------------------------------------------------------------------------------
# Delta rule.
# ---------------------------------------------------------------------------------------------


def delta_rule_shard(
    q,
    k,
    v,
    beta,
    log_decay=None,
    *,
    axis_name: str,
    scale: float,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
):
    """Per-shard body of :func:`delta_rule_sp`, callable inside any ``shard_map``.

    Local shapes and conventions as :func:`gated_linear_attention_shard`, plus
    ``beta [batch, T_loc, heads]``. :func:`api.delta_rule` calls this under
    :func:`sequence_context.sequence_parallel_axis`.
    """
    g, seg = log_decay, segment_ids
    b, tl, h, dk = q.shape
    dv = v.shape[-1]
    n = sequence_context.num_shards(axis_name)
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    v_aug = jnp.concatenate([v, jnp.zeros((b, tl, h, dk), v.dtype)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=F32), (b, h, dk, dk))
    s0_aug = jnp.concatenate([jnp.zeros((b, h, dk, dv), F32), eye], axis=-1)
    with sequence_context.suspended():
        o_aug, s_aug = api.delta_rule(
            q,
            k,
            v_aug,
            beta,
            g,
            scale=scale,
            initial_state=s0_aug,
            return_final_state=True,
            segment_ids=seg,
            chunk_size=chunk_size,
            implementation=implementation,
            interpret=interpret,
        )
    o_loc, w = o_aug[..., :dv], o_aug[..., dv:]  # w_t = P_t^T scale q_t  [b, tl, h, k]
    resets = None if seg is None else _shard_start_resets(seg, axis_name, n)

    prec = _precision(q.dtype)
    gathered = lax.all_gather(s_aug, axis_name)  # [n, b, h, k, v + k]: (L_s | M_s)
    s_in_all, final = _prefix(
        lambda m, s: jnp.einsum("bhij,bhjv->bhiv", m, s, precision=lax.Precision.HIGHEST),
        gathered[..., :dv],
        gathered[..., dv:],
        resets,
        s0,
    )
    s_in = s_in_all[lax.axis_index(axis_name)]
    extra = jnp.einsum("bthk,bhkv->bthv", w.astype(F32), s_in, precision=prec)
    o = (o_loc.astype(F32) + extra).astype(v.dtype)
    return (o, final) if return_final_state else o


def _delta_local(xs, s0, *, axis_name, scale, op_kwargs):
    """Body of the shard_map of :func:`delta_rule_sp` (local shapes)."""
    return delta_rule_shard(
        xs["q"],
        xs["k"],
        xs["v"],
        xs["beta"],
        xs.get("g"),
        axis_name=axis_name,
        scale=scale,
        initial_state=s0,
        return_final_state=True,
        segment_ids=xs.get("seg"),
        **op_kwargs,
    )


def delta_rule_sp(
    q,
    k,
    v,
    beta,
    log_decay=None,
    *,
    mesh,
    axis_name: str = "sequence",
    scale=None,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    batch_axis: str | None = None,
):
    """:func:`api.delta_rule` with the time axis sharded over ``mesh[axis_name]``.

    ``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T scale q_t``
    (DeltaNet; Gated DeltaNet with ``log_decay``). Each shard's affine state map
    ``S_out = M S_in + L`` is obtained from one local run with value width ``v + k`` (see the
    module docstring); one all_gather of ``[b, h, k, v + k]`` per shard, then a sequential prefix
    over the shards.

    Args: as :func:`gated_linear_attention_sp`, plus ``beta [batch, time, heads]``;
      ``log_decay`` is None or ``[batch, time, heads]``.
    Returns:
      ``o`` in v's dtype, or ``(o, final_state float32)``, equal to the unsharded op.
    """
    _platform.check_implementation(implementation)
    q, k, v, beta, log_decay, initial_state, segment_ids = (
        _asarray(x) for x in (q, k, v, beta, log_decay, initial_state, segment_ids)
    )
    _validate_like_unsharded(
        lambda q_, k_, v_, b_, g_, s0_, seg_: api.delta_rule(
            q_,
            k_,
            v_,
            b_,
            g_,
            scale=scale,
            initial_state=s0_,
            segment_ids=seg_,
            chunk_size=chunk_size,
            implementation="reference",
        ),
        (q, k, v, beta, log_decay, initial_state, segment_ids),
        log_decay,
    )
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = _check_mesh(mesh, axis_name, batch_axis, b)
    scale = dk**-0.5 if scale is None else scale
    tp = -(-t // n) * n
    g = None if log_decay is None else log_decay.astype(F32)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    timed = dict(q=q, k=k, v=v, beta=beta.astype(F32), g=g)
    timed = {name: _pad_time(x, tp) for name, x in timed.items()}
    timed["seg"] = _pad_time(seg, tp, mode="edge")
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)

    op_kwargs = dict(chunk_size=chunk_size, implementation=implementation, interpret=interpret)
    body = functools.partial(_delta_local, axis_name=axis_name, scale=scale, op_kwargs=op_kwargs)
    o, final = _run_sharded(body, mesh, axis_name, batch_axis, timed, s0)
    o = _unpad(o, t, mesh, batch_axis)
    return (o, final) if return_final_state else o
