"""Ground truth for the chunked linear attention family: token-by-token recurrences in float32.

Two ops, both with state ``S`` of shape ``[b, h, k, v]`` and output ``o_t = S_t^T (scale * q_t)``:

* gated linear attention (GLA; "Gated Linear Attention Transformers with Hardware-Efficient
  Training"; with a per-head scalar gate it is the RetNet / Lightning Attention / Mamba-2 form)::

      S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T

* the (gated) delta rule (DeltaNet, "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length"; Gated DeltaNet, "Gated Delta Networks: Improving Mamba2 with Delta Rule")::

      S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T

Shapes: ``q, k [b, t, h, k]``, ``v [b, t, h, v]``, ``beta [b, t, h]``, ``log_decay`` (``g``) absent,
``[b, t, h]`` (one decay per head and step) or, for GLA only, ``[b, t, h, k]`` (one per key
dimension). Every input is cast to float32 and every matmul runs at ``HIGHEST`` precision.

Packed sequences: ``segment_ids [b, t]`` (integers). At every position ``t > 0`` whose segment id
differs from that of ``t - 1`` the incoming state is replaced by zero *before* the token's decay
and update (so the token starts a fresh sequence). ``initial_state`` therefore only reaches the
first segment of each row. The final state is the state after the last token, i.e. the state of
the last segment.

These functions are deliberately simple (one ``lax.scan`` step per token); they are the oracle
that ``xla.py`` and the Pallas kernels are tested against, and are differentiable by autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "gated_linear_attention",
    "gated_linear_attention_dense",
    "gated_linear_attention_step",
    "delta_rule",
    "delta_rule_step",
    "segment_runs",
]

_HI = lax.Precision.HIGHEST


def _f32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)


def _zeros_state(q, v):
    b, _, h, dk = q.shape
    return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)


def _reset_flags(segment_ids, b, t):
    """[t, b] bool: True where the state must be zeroed before the token's update."""
    if segment_ids is None:
        return jnp.zeros((t, b), bool)
    seg = jnp.asarray(segment_ids)
    change = seg[:, 1:] != seg[:, :-1]
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), change], axis=1)
    return reset.T


def segment_runs(segment_ids, b, t):
    """[b, t] int32 run index: 0 for the first segment, +1 at every change of segment id.

    Two positions belong to the same sequence iff their run indices are equal (an id that
    reappears after a different one starts a new sequence).
    """
    if segment_ids is None:
        return jnp.zeros((b, t), jnp.int32)
    return jnp.cumsum(_reset_flags(segment_ids, b, t).T.astype(jnp.int32), axis=1)


def _decay_factor(log_decay_t, state):
    """exp(g) shaped to broadcast against a [b, h, k, v] state (None -> 1)."""
    if log_decay_t is None:
        return None
    g = jnp.exp(log_decay_t)
    if g.ndim == 2:  # [b, h]
        return g[:, :, None, None]
    return g[:, :, :, None]  # [b, h, k]


# ---------------------------------------------------------------------------------------------
# One-token steps (also used by the scans below).
# ---------------------------------------------------------------------------------------------


def gated_linear_attention_step(q_t, k_t, v_t, log_decay_t, state, *, scale):
    """One GLA step: ``S = diag(exp(g)) S + k v^T``; ``o = S^T (scale q)``.

    Args:
      q_t, k_t: ``[b, h, k]``; v_t: ``[b, h, v]``; log_decay_t: None, ``[b, h]`` or ``[b, h, k]``;
      state: ``[b, h, k, v]``.
    Returns:
      ``(o_t [b, h, v] float32, state [b, h, k, v] float32)``.
    """
    q_t, k_t, v_t, state = _f32(q_t), _f32(k_t), _f32(v_t), _f32(state)
    a = _decay_factor(_f32(log_decay_t), state)
    if a is not None:
        state = state * a
    state = state + k_t[..., :, None] * v_t[..., None, :]
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, state, precision=_HI)
    return o_t, state


def delta_rule_step(q_t, k_t, v_t, beta_t, log_decay_t, state, *, scale):
    """One (gated) delta-rule step.

    ``S = exp(g)(I - beta k k^T) S + beta k v^T``; ``o = S^T (scale q)``.

    Args:
      q_t, k_t: ``[b, h, k]``; v_t: ``[b, h, v]``; beta_t: ``[b, h]``; log_decay_t: None or
      ``[b, h]``; state: ``[b, h, k, v]``.
    Returns:
      ``(o_t [b, h, v] float32, state [b, h, k, v] float32)``.
    """
    q_t, k_t, v_t, beta_t, state = _f32(q_t), _f32(k_t), _f32(v_t), _f32(beta_t), _f32(state)
    a = _decay_factor(_f32(log_decay_t), state)
    if a is not None:
        state = state * a
    # (I - b k k^T) S + b k v^T = S + b k (v - S^T k)^T
    pred = jnp.einsum("bhk,bhkv->bhv", k_t, state, precision=_HI)
    state = state + (beta_t[..., None] * k_t)[..., :, None] * (v_t - pred)[..., None, :]
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, state, precision=_HI)
    return o_t, state


# ---------------------------------------------------------------------------------------------
# Full-sequence recurrences.
# ---------------------------------------------------------------------------------------------


def _scan(step, xs, q, v, initial_state, segment_ids):
    b, t = q.shape[:2]
    s0 = _zeros_state(q, v) if initial_state is None else _f32(initial_state)
    reset = _reset_flags(segment_ids, b, t)

    def body(state, inp):
        r, x = inp
        state = jnp.where(r[:, None, None, None], jnp.zeros_like(state), state)
        o_t, state = step(state, x)
        return state, o_t

    time_major = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)
    final, o = lax.scan(body, s0, (reset, time_major))
    return jnp.moveaxis(o, 0, 1), final


def gated_linear_attention(q, k, v, log_decay=None, *, scale, initial_state=None, segment_ids=None):
    """GLA by a token-by-token scan. Returns ``(o [b,t,h,v] f32, final_state [b,h,k,v] f32)``."""
    xs = {"q": _f32(q), "k": _f32(k), "v": _f32(v)}
    if log_decay is not None:
        xs["g"] = _f32(log_decay)

    def step(state, x):
        return gated_linear_attention_step(x["q"], x["k"], x["v"], x.get("g"), state, scale=scale)

    return _scan(step, xs, q, v, initial_state, segment_ids)


def delta_rule(q, k, v, beta, log_decay=None, *, scale, initial_state=None, segment_ids=None):
    """Delta rule by a token-by-token scan. Returns ``(o [b,t,h,v] f32, final [b,h,k,v] f32)``."""
    xs = {"q": _f32(q), "k": _f32(k), "v": _f32(v), "beta": _f32(beta)}
    if log_decay is not None:
        xs["g"] = _f32(log_decay)

    def step(state, x):
        return delta_rule_step(x["q"], x["k"], x["v"], x["beta"], x.get("g"), state, scale=scale)

    return _scan(step, xs, q, v, initial_state, segment_ids)


# ---------------------------------------------------------------------------------------------
# Dense (quadratic) form of GLA: a second, independent oracle for small t.
# ---------------------------------------------------------------------------------------------


def gated_linear_attention_dense(
    q, k, v, log_decay=None, *, scale, initial_state=None, segment_ids=None
):
    """GLA as masked quadratic attention, O(t^2 k) memory; for small t in tests.

    With ``G_t = sum_{s<=t} g_s`` (inclusive cumulative sum)::

        o_i = sum_{j<=i, same segment} (scale q_i * exp(G_i - G_j)) . k_j  v_j
              + [i in the first segment] (scale q_i * exp(G_i))^T S_0
        S_T = sum_{j in last segment} (exp(G_T - G_j) * k_j) v_j^T
              + [row has one segment] diag(exp(G_T)) S_0
    """
    q, k, v = _f32(q), _f32(k), _f32(v)
    b, t, h, dk = q.shape
    if log_decay is None:
        g = jnp.zeros((b, t, h, dk), jnp.float32)
    else:
        g = _f32(log_decay)
        if g.ndim == 3:
            g = jnp.broadcast_to(g[..., None], (b, t, h, dk))
    big_g = jnp.cumsum(g, axis=1)  # [b, t, h, k]
    seg = segment_runs(segment_ids, b, t)
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = seg[:, :, None] == seg[:, None, :]
    mask = causal[None] & same  # [b, i, j]
    diff = big_g[:, :, None] - big_g[:, None, :]  # [b, i, j, h, k]
    m = mask[:, :, :, None, None]
    decay = jnp.exp(jnp.where(m, diff, -jnp.inf))
    scores = jnp.einsum("bihk,bijhk,bjhk->bhij", q * scale, decay, k, precision=_HI)
    o = jnp.einsum("bhij,bjhv->bihv", scores, v, precision=_HI)

    # Positions still in the first segment (no boundary at or before them) see S_0.
    first = seg == 0  # [b, t]
    last = seg == seg[:, -1:]

    g_end = big_g[:, -1]  # [b, h, k]
    w = jnp.exp(jnp.where(last[:, :, None, None], g_end[:, None] - big_g, -jnp.inf))
    final = jnp.einsum("bjhk,bjhv->bhkv", w * k, v, precision=_HI)
    if initial_state is not None:
        s0 = _f32(initial_state)
        qg = jnp.where(first[:, :, None, None], q * scale * jnp.exp(big_g), 0.0)
        o = o + jnp.einsum("bihk,bhkv->bihv", qg, s0, precision=_HI)
        whole = first[:, -1]  # the row is a single segment
        carry = jnp.exp(g_end)[..., None] * s0
        final = final + jnp.where(whole[:, None, None, None], carry, 0.0)
    return o, final
