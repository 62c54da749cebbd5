"""The chunk-local cumulative gate in two float32 parts, for exact exponent differences.

Every decay in the chunked algorithm is ``exp(G_i - G_j)`` with ``G`` the cumulative sum of the
log decay ``g`` inside a chunk. In float32, ``G_i`` carries an absolute rounding error of about
``2^-24 |G_i|``; with strong decays (``g = -20`` per step, ``|G|`` up to 1280 over a 64-chunk)
the difference ``G_i - G_{i-1}`` -- which should be exactly ``g_i`` -- is off by ~1e-4, and the
gradient w.r.t. ``g`` (built from exactly those neighbouring terms, after the large diagonal
terms cancel) inherits a ~1e-4 relative error.

The fix: split ``g = g_hi + g_lo`` with ``g_hi`` rounded to a multiple of ``2^-10`` and
``|g_lo| <= 2^-11`` (both exact). The cumulative sum of ``g_hi`` is then *exact* in float32
while ``|G_hi| < 2^14`` (every partial sum is a multiple of ``2^-10`` with at most 24 significant
bits, whatever the summation order), and so is any difference ``G_hi_i - G_hi_j``; ``G_lo`` is
tiny (``<= C 2^-11``) so its rounding is negligible. Kernels that need precise differences
load both parts and form ``(G_hi_i - G_hi_j) + (G_lo_i - G_lo_j)``.
"""

from __future__ import annotations

import jax.numpy as jnp

_GRID = 1024.0  # 2^10


def split(g):
    """(g_hi, g_lo) with g_hi on the 2^-10 grid and g = g_hi + g_lo exactly (float32)."""
    g_hi = jnp.round(g * _GRID) / _GRID
    return g_hi, g - g_hi


def chunk_cumsum(g, chunk: int):
    """Inclusive cumulative sum of ``g [B, T, ...]`` inside each chunk of the time axis."""
    b, t = g.shape[:2]
    gc = g.reshape(b, t // chunk, chunk, *g.shape[2:])
    return jnp.cumsum(gc, axis=2).reshape(g.shape)


def chunk_reverse_cumsum(x, chunk: int):
    """sum_{s >= t in the same chunk} x_s: the transpose of ``chunk_cumsum``."""
    b, t = x.shape[:2]
    xc = x.reshape(b, t // chunk, chunk, *x.shape[2:])
    return jnp.flip(jnp.cumsum(jnp.flip(xc, 2), axis=2), 2).reshape(x.shape)


def split_chunk_cumsum(g, chunk: int):
    """(G_hi, G_lo): the chunk-local cumulative sums of the two parts of g."""
    g_hi, g_lo = split(g)
    return chunk_cumsum(g_hi, chunk), chunk_cumsum(g_lo, chunk)


class Split:
    """A cumulative gate value held as ``hi + lo``; subtraction returns the precise difference."""

    def __init__(self, hi, lo):
        self.hi, self.lo = hi, lo

    def __sub__(self, other):
        if isinstance(other, Split):
            return (self.hi - other.hi) + (self.lo - other.lo)
        return self.value - other

    def __rsub__(self, other):
        return other - self.value

    def __getitem__(self, idx):
        return Split(self.hi[idx], self.lo[idx])

    @property
    def value(self):
        return self.hi + self.lo

    @property
    def shape(self):
        return self.hi.shape


class SplitRef:
    """Two refs (hi, lo) read together: ``ref[idx]`` returns a :class:`Split`."""

    def __init__(self, hi_ref, lo_ref):
        self.hi_ref, self.lo_ref = hi_ref, lo_ref

    def __getitem__(self, idx):
        return Split(self.hi_ref[idx], self.lo_ref[idx])

    @property
    def shape(self):
        return self.hi_ref.shape


def value(g):
    """The float32 value of a gate that may be a :class:`Split`."""
    return g.value if isinstance(g, Split) else g
