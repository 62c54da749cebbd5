"""``gather_sum`` with the tables' rows sharded over a mesh axis.

    y[n] = sum_j weights[n, j] * tables[j, indices[n, j]]

``tables [j, r, d]`` is split by rows over the mesh axis ``axis_name`` (``P(None, axis_name,
None)``): shard ``s`` of ``m`` owns rows ``[s r/m, (s+1) r/m)``. Indices and weights are
replicated over that axis (or split over tokens with ``token_axis``). Each shard shifts the
indices by its first row and runs the ordinary :func:`gather_sum` on its rows; an index owned by
another shard is then out of the local range, which ``gather_sum`` defines as *dropped* (adds
nothing, gets no gradient). One ``psum`` over ``axis_name`` adds the partial outputs.

Communication: one all-reduce of ``y [n, d]`` in ``tables.dtype`` per call (its transpose in the
backward is free: the cotangent is already replicated). No rows move: the tables' gradient is a
scatter-add into the local rows only, so it stays sharded like the tables. ``weights`` gets its
gradient summed over the shards (only the owner contributes a non-zero term).

Precision: each shard's partial sum is accumulated in float32 and cast to ``tables.dtype``
before the psum (for bfloat16 tables this is ``m`` roundings instead of one; float32 tables
match the unsharded op to rounding).

This is the layout for large memory layers (product-key memory, PEER, MemoryFormer tables) whose
tables do not fit one device; it is "model parallel over rows", the counterpart of a vocabulary-
parallel embedding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ..linear_attention.sequence_parallel import to_explicit_spec
from . import api

__all__ = ["gather_sum_sharded"]


def _check_mesh(mesh, axis_name, token_axis, rows: int, tokens: int) -> int:
    if not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or AbstractMesh; got {type(mesh).__name__}"
        )
    names = tuple(mesh.axis_names)
    if axis_name not in names:
        raise ValueError(f"axis_name must be one of the mesh axes {names}; got {axis_name!r}")
    m = mesh.shape[axis_name]
    if rows % m:
        raise ValueError(
            f"tables.shape[1] (rows, {rows}) must be divisible by the size {m} of mesh axis "
            f"{axis_name!r}; pad the tables with unused rows"
        )
    if token_axis is not None:
        if token_axis not in names:
            raise ValueError(
                f"token_axis must be None or one of the mesh axes {names}; got {token_axis!r}"
            )
        if token_axis == axis_name:
            raise ValueError(
                f"token_axis must differ from axis_name={axis_name!r}; got {token_axis!r}"
            )
        mt = mesh.shape[token_axis]
        if tokens % mt:
            raise ValueError(
                f"indices.shape[0] (tokens, {tokens}) must be divisible by the size {mt} of "
                f"mesh axis token_axis={token_axis!r}"
            )
    return m


def gather_sum_sharded(
    indices: jax.Array,
    weights: jax.Array,
    tables: jax.Array,
    *,
    mesh,
    axis_name: str,
    token_axis: str | None = None,
    implementation: str | None = None,
    interpret: Any = False,
    check_indices: bool | str = True,
) -> jax.Array:
    """:func:`gather_sum` with ``tables`` row-sharded over ``mesh[axis_name]``.

    Args:
      indices: ``[n, j]`` int32 global row indices (in ``[0, r)``).
      weights: ``[n, j]`` float.
      tables: ``[j, r, d]`` (or ``[1, r, d]``: one table shared by every ``j``); ``r`` must be
        divisible by the size of ``axis_name``. Best passed already sharded
        ``P(None, axis_name, None)``; otherwise it is resharded on entry.
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``).
      axis_name: the mesh axis the rows are split over.
      token_axis: optional second mesh axis over which the tokens (``n``) are split; the output
        is then split the same way.
      implementation, interpret, check_indices: as in :func:`gather_sum` (``check_indices``
        applies to the global indices; each shard's local call does not check).
    Returns:
      ``y [n, d]`` in ``tables.dtype``, equal to ``gather_sum(indices, weights, tables)``.
    """
    api._validate(indices, weights, tables)
    _, r, _ = jnp.shape(tables)
    api._check_range(indices, r, check_indices)
    m = _check_mesh(mesh, axis_name, token_axis, r, jnp.shape(indices)[0])
    rows = r // m

    def local(idx, w, tab):
        first = lax.axis_index(axis_name) * rows
        y = api.gather_sum(
            idx - first,
            w,
            tab,
            implementation=implementation,
            interpret=interpret,
            check_indices=False,
        )
        return lax.psum(y, axis_name)

    tok = P(token_axis, None)
    specs = (tok, tok, P(None, axis_name, None))
    # check_vma=False: the local gather_sum scans from constant carries, which shard_map's
    # varying-axes type check rejects; the specs are exact and psum makes y replicated.
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tok, check_vma=False)
    args = (jnp.asarray(indices), jnp.asarray(weights), jnp.asarray(tables))
    return fn(*(to_explicit_spec(x, mesh, s) for x, s in zip(args, specs, strict=True)))
