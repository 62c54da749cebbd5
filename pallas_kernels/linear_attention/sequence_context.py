"""A trace-time switch that makes the sequence ops sequence-parallel inside ``jax.shard_map``.

Usage: inside the body of a ``jax.shard_map`` whose time-major inputs are split along time over
the mesh axis ``"sequence"`` (shard ``s`` holds tokens ``[s T_loc, (s + 1) T_loc)``)::

    with sequence_parallel_axis("sequence"):
        o = api.gated_linear_attention(q_loc, k_loc, v_loc, g_loc, segment_ids=seg_loc)

While the context is active:

* :func:`api.gated_linear_attention` and :func:`api.delta_rule` treat their time-major arguments
  as this shard's block of a longer sequence and compute the cross-shard state pass (LASP-2
  style, :mod:`pallas_kernels.linear_attention.sequence_parallel`): the outputs equal the slice
  of the unsharded op's outputs; ``initial_state`` enters at the start of shard 0 and the
  returned final state is the one after the last token of the last shard, the same on every
  shard.
* other sequence layers that know the context (softmax attention in ``jaxlayers.attention``,
  the causal short convolution in ``jaxlayers.linear_attention.short_conv``) gather keys /
  exchange halos over the axis and use global positions (:func:`time_offset`).

Every shard must hold the same number of tokens ``T_loc`` (``shard_map`` guarantees it); pad the
global sequence at the end to a multiple of the shard count first. ``length`` (optional) is the
unpadded global length; only layers that look at future tokens (non-causal attention) need it.

The context is a ``contextvars.ContextVar`` read while tracing, so it costs nothing at run time
and never leaks into other traces; :func:`suspended` switches it off (the sequence-parallel ops
use it to run their per-shard local op).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "SequenceShard",
    "sequence_parallel_axis",
    "suspended",
    "current",
    "shard_index",
    "num_shards",
    "time_offset",
    "halo_exchange",
    "from_last_shard",
]


@dataclasses.dataclass(frozen=True)
class SequenceShard:
    """The active sequence-parallel setting.

    Attributes:
      axis_name: the mesh axis the time axis is split over (bound by the enclosing shard_map).
      length: the unpadded global number of tokens, or None (no padding, or nothing needs it).
    """

    axis_name: str
    length: int | None = None


_CURRENT: contextvars.ContextVar[SequenceShard | None] = contextvars.ContextVar(
    "jaxlayers_sequence_shard", default=None
)


@contextlib.contextmanager
def sequence_parallel_axis(axis_name: str, *, length: int | None = None):
    """Activate sequence parallelism over ``axis_name`` while tracing a shard_map body.

    Args:
      axis_name: a mesh axis name bound by the enclosing ``jax.shard_map``.
      length: the unpadded global sequence length (optional; see the module docstring).
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name must be a non-empty mesh axis name (str); got {axis_name!r}")
    if length is not None and int(length) <= 0:
        raise ValueError(f"length must be None or a positive int; got {length!r}")
    token = _CURRENT.set(SequenceShard(axis_name, None if length is None else int(length)))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def suspended():
    """Deactivate the context (the per-shard local computation of a sequence-parallel op)."""
    token = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> SequenceShard | None:
    """The active :class:`SequenceShard`, or None outside :func:`sequence_parallel_axis`."""
    return _CURRENT.get()


def _axis(ctx: SequenceShard | None) -> str:
    ctx = current() if ctx is None else ctx
    if ctx is None:
        raise RuntimeError("no sequence-parallel context is active (use sequence_parallel_axis)")
    return ctx.axis_name


def _bound(axis_name: str, what):
    try:
        return what()
    except NameError as e:
        raise ValueError(
            f"sequence_parallel_axis({axis_name!r}) is active but no enclosing jax.shard_map "
            f"binds the mesh axis {axis_name!r}; trace the layer inside "
            f"jax.shard_map(..., mesh=...) over a mesh with that axis ({e})"
        ) from None


def num_shards(ctx: SequenceShard | str | None = None) -> int:
    """Static number of sequence shards (the size of the context's mesh axis, or of the axis
    named by ``ctx`` when it is a string); a clear ``ValueError`` when no shard_map binds it."""
    name = ctx if isinstance(ctx, str) else _axis(ctx)
    return int(_bound(name, lambda: lax.axis_size(name)))


def shard_index(ctx: SequenceShard | None = None) -> jax.Array:
    """This shard's index along the sequence axis (int32 scalar, traced)."""
    name = _axis(ctx)
    return _bound(name, lambda: lax.axis_index(name))


def time_offset(local_length: int, ctx: SequenceShard | None = None) -> jax.Array:
    """Global index of this shard's first token: ``shard_index * local_length`` (int32)."""
    return (shard_index(ctx) * local_length).astype("int32")


# ---------------------------------------------------------------------------------------------
# Helpers for layers with a short causal window (halo exchange).
# ---------------------------------------------------------------------------------------------


def halo_exchange(x: jax.Array, width: int, *, initial=None, segment_ids=None, ctx=None):
    """The ``width`` tokens before this shard: ``[b, width, ...]`` from ``x [b, T_loc, ...]``.

    Shard ``s > 0`` receives the last ``width`` entries of shard ``s - 1`` (one ``ppermute`` to
    the next shard), zeroed where they belong to an earlier sequence than that shard's last one
    and entirely when shard ``s`` starts a new sequence (``segment_ids [b, T_loc]``). Shard 0
    gets ``initial`` (zeros when None). This is the cache a causal window of ``width + 1`` taps
    (e.g. a short convolution) needs to continue across the shard boundary. Needs
    ``T_loc >= width`` (``NotImplementedError`` otherwise). The result has ``initial``'s dtype
    when given, else ``x``'s.
    """
    ctx = current() if ctx is None else ctx
    b, t = x.shape[:2]
    dtype = x.dtype if initial is None else initial.dtype
    zeros = jnp.zeros((b, width) + x.shape[2:], dtype)
    first = zeros if initial is None else initial
    if width == 0:
        return first
    if t < width:
        raise NotImplementedError(
            f"a causal window of {width + 1} taps needs at least {width} tokens per sequence "
            f"shard over {ctx.axis_name!r}; got {t} (use fewer shards or a longer sequence)"
        )
    n = num_shards(ctx)
    tail = x[:, t - width :].astype(dtype)
    if segment_ids is not None:
        last = segment_ids[:, t - 1 :]
        keep = (segment_ids[:, t - width :] == last).reshape((b, width) + (1,) * (x.ndim - 2))
        tail = jnp.where(keep, tail, jnp.zeros((), dtype))
    perm = [(i, i + 1) for i in range(n - 1)]
    halo = lax.ppermute(tail, ctx.axis_name, perm)  # shard 0 receives zeros
    if segment_ids is not None:
        prev_last = lax.ppermute(segment_ids[:, t - 1], ctx.axis_name, perm)
        same = (segment_ids[:, 0] == prev_last).reshape((b,) + (1,) * (x.ndim - 1))
        halo = jnp.where(same, halo, jnp.zeros((), dtype))
    return jnp.where(shard_index(ctx) == 0, first, halo)


def from_last_shard(value: jax.Array, ctx=None) -> jax.Array:
    """``value`` as computed on the last sequence shard, on every shard (an all_gather)."""
    ctx = current() if ctx is None else ctx
    return lax.all_gather(value, ctx.axis_name)[num_shards(ctx) - 1]
