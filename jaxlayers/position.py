"""Rotary position embedding (RoPE), from "RoFormer: Enhanced Transformer with Rotary Position
Embedding".

For a head vector ``x`` of rotated width ``r`` and position ``p``, with inverse frequencies
``w_i = theta^(-2i / r)`` (i = 0 .. r/2 - 1) and angles ``a_i = p * w_i``:

    y[i]         = x[i] cos(a_i) - x[i + r/2] sin(a_i)
    y[i + r/2]   = x[i + r/2] cos(a_i) + x[i] sin(a_i)

Convention (the paper leaves the pairing open): **rotate-half** — dimension ``i`` is paired with
``i + r/2`` (GPT-NeoX / Llama style), not the interleaved ``(2i, 2i+1)`` pairs of the paper's
equation; the two differ by a fixed permutation of the head dims, so a model trained with one
is equivalent to a model with permuted q/k weights under the other.

Partial rotary (``fraction < 1``): only the first ``r = 2 * floor(k * fraction / 2)`` dims of
each head are rotated, with frequencies computed over ``r`` (GPT-NeoX's ``rotary_pct``); the rest
pass through. The angles and the rotation are computed in float32; the output has ``x``'s dtype.

Because ``R(p)^T R(q) = R(q - p)``, the dot product of a rotated query at position ``p`` and a
rotated key at position ``q`` depends only on ``q - p``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers import core

__all__ = ["rope_frequencies", "rotary_dim", "apply_rope"]


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Inverse frequencies ``theta^(-2i/head_dim)`` for ``i < head_dim/2``: float32 ``[k/2]``."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number; got head_dim={head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return jnp.asarray(float(theta) ** (-exponents), jnp.float32)


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
    """Number of rotated dims: ``2 * floor(head_dim * fraction / 2)``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got fraction={fraction}")
    return 2 * int(head_dim * fraction // 2)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float = 10000.0,
    fraction: float = 1.0,
) -> jax.Array:
    """Rotate ``x: [b, t, h, k]`` by ``positions: int [b, t]`` (rotate-half convention)."""
    core.check_floating(x, "x")
    core.check_rank(x, 4, "x", "[batch, time, heads, head_dim]")
    b, t, _, k = x.shape
    core.check_rank(positions, 2, "positions", "[batch, time]")
    if tuple(positions.shape) != (b, t):
        raise ValueError(
            f"positions must have shape (batch, time) = {(b, t)}; got shape {positions.shape}"
        )
    r = rotary_dim(k, fraction)
    if r == 0:
        return x
    inv_freq = rope_frequencies(r, theta)  # [r/2]
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : r // 2], x32[..., r // 2 : r]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if r < k:
        rotated = jnp.concatenate([rotated, x32[..., r:]], axis=-1)
    return rotated.astype(x.dtype)
