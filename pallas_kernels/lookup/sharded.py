"""``gather_sum`` with the tables' rows sharded over a mesh axis.

    y[n] = sum_j weights[n, j] * tables[j, indices[n, j]]

``tables [j, r, d]`` is split by rows over the mesh axis ``axis_name`` (``P(None, axis_name,
None)``): shard ``s`` of ``m`` owns rows ``[s r/m, (s+1) r/m)``. Indices and weights are
replicated over that axis (or split over tokens with ``token_axis``). Each shard shifts the
indices by its first row and runs the ordinary :func:`gather_sum` on its rows; an index owned by
another shard is then out of the local range, which ``gather_sum`` defines as *dropped* (adds
nothing, gets no gradient). One ``psum`` over ``axis_name`` adds the partial outputs.

Communication: one all-reduce of ``y [n, d]`` in ``tables.dtype`` per call. The backward is a
custom VJP (see :func:`_sharded_call`): the output cotangent is already replicated, so it is
not reduced again; ``weights`` gets its gradient ``[n, j]`` summed over the row shards (only
the owner contributes a non-zero term), and with ``token_axis`` the tables' gradient is summed
over the token shards. No rows move: the tables' gradient is a scatter-add into the local rows
only, so it stays sharded like the tables.

Precision: each shard's partial sum is accumulated in float32 and cast to ``tables.dtype``
before the psum (for bfloat16 tables this is ``m`` roundings instead of one; float32 tables
match the unsharded op to rounding).

This is the layout for large memory layers (product-key memory, PEER, MemoryFormer tables) whose
tables do not fit one device; it is "model parallel over rows", the counterpart of a vocabulary-
parallel embedding.

:func:`row_sharded_sum` is the general form the memory layers use (``table_axis`` in their
configs): any per-token computation that reads only rows of row-sharded tables (PEER's
``act(<u_e, x>) v_e`` reads two tables) runs shard-locally, followed by the same single
``psum``. It takes the mesh from ``jax.set_mesh`` when none is given, and inside a
``jax.shard_map`` that already binds the row axis it runs the local computation directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ..linear_attention.sequence_parallel import to_explicit_spec
from . import api

__all__ = ["gather_sum_sharded", "row_sharded_sum", "check_axis_args"]

_MESH_TYPES = (jax.sharding.Mesh, jax.sharding.AbstractMesh)


def _token_axes(token_axis) -> tuple[str, ...]:
    if token_axis is None:
        return ()
    return (token_axis,) if isinstance(token_axis, str) else tuple(token_axis)


def check_axis_args(
    axis_name, token_axis, *, axis_arg: str = "axis_name", token_arg: str = "token_axis"
) -> None:
    """Type checks of a row axis name and an optional token axis (a name or tuple of names)."""
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"{axis_arg} must be a mesh axis name (non-empty str); got {axis_name!r}")
    if token_axis is None:
        return
    toks = (token_axis,) if isinstance(token_axis, str) else token_axis
    if (
        not isinstance(toks, tuple)
        or not toks
        or not all(isinstance(a, str) and a for a in toks)
        or len(set(toks)) != len(toks)
    ):
        raise ValueError(
            f"{token_arg} must be None, a mesh axis name or a tuple of distinct names; "
            f"got {token_axis!r}"
        )
    if axis_name in toks:
        raise ValueError(
            f"{token_arg} must differ from {axis_arg}={axis_name!r}; got {token_axis!r}"
        )


def _check_mesh(
    mesh,
    axis_name,
    token_axis,
    rows: int,
    tokens: int,
    *,
    axis_arg: str = "axis_name",
    token_arg: str = "token_axis",
    rows_desc: str | None = None,
    manual: frozenset = frozenset(),
) -> int:
    names = tuple(mesh.axis_names)
    if axis_name not in names:
        raise ValueError(f"{axis_arg} must be one of the mesh axes {names}; got {axis_name!r}")
    m = mesh.shape[axis_name]
    if rows % m:
        what = rows_desc or f"tables.shape[1] (rows, {rows})"
        raise ValueError(
            f"{what} must be divisible by the size {m} of mesh axis {axis_arg}={axis_name!r}; "
            f"pad the tables with unused rows"
        )
    toks = _token_axes(token_axis)
    for a in toks:
        if a not in names:
            raise ValueError(
                f"{token_arg} must be None or one of the mesh axes {names}; got {token_axis!r}"
            )
    if axis_name in toks:
        raise ValueError(
            f"{token_arg} must differ from {axis_arg}={axis_name!r}; got {token_axis!r}"
        )
    mt = math.prod(mesh.shape[a] for a in toks if a not in manual)
    if tokens % mt:
        raise ValueError(
            f"indices.shape[0] (tokens, {tokens}) must be divisible by the size {mt} of "
            f"mesh axis {token_arg}={token_axis!r}"
        )
    return m


def _manual_axes() -> frozenset:
    """Mesh axes bound by an enclosing ``jax.shard_map`` (Manual in the context mesh)."""
    ctx = jax.sharding.get_abstract_mesh()
    types = getattr(ctx, "axis_types", None) or ()
    return frozenset(
        n for n, t in zip(ctx.axis_names, types, strict=True) if t == jax.sharding.AxisType.Manual
    )


def row_sharded_sum(
    fn: Callable[..., jax.Array],
    token_args: Sequence[jax.Array],
    tables: Sequence[jax.Array],
    *,
    axis_name: str,
    mesh=None,
    token_axis: str | tuple[str, ...] | None = None,
    rows: int | None = None,
    axis_arg: str = "axis_name",
    token_arg: str = "token_axis",
    rows_desc: str | None = None,
) -> jax.Array:
    """``sum_s fn(first_s, *token_args, *tables_s)``: a per-token sum over row-sharded tables.

    Every table ``[j, r, d]`` (rows on dim 1, the same ``r`` for all) is split by rows over
    ``axis_name``; shard ``s`` calls ``fn(first_s, *token_args_s, *tables_s)`` with
    ``first_s = s r / m`` (int32, the global index of its first row) and its ``[j, r / m, d]``
    blocks, and must return the partial result ``[n_s, d_out]`` of the tokens it holds, taking
    only rows it owns into account (global row ``i`` is local row ``i - first_s``). The partial
    results are added by one ``psum`` over ``axis_name``.

    Args:
      fn: the shard-local computation (see above).
      token_args: arrays with the tokens on dim 0 (indices, weights, inputs); replicated over
        ``axis_name``, split over ``token_axis``.
      tables: the row-sharded tables (best passed already sharded ``P(None, axis_name, None)``).
      axis_name: the mesh axis the rows are split over.
      mesh: a ``Mesh`` / ``AbstractMesh``; None: the mesh set by ``jax.set_mesh`` (ValueError
        when none is set).
      token_axis: None, a mesh axis or a tuple of mesh axes the tokens are split over; the
        output is split the same way. Axes already bound by an enclosing ``shard_map`` are
        skipped (those tokens are already local).
      rows: the global row count (default: ``tables[0].shape[1]``).
      axis_arg, token_arg, rows_desc: how error messages name the arguments.

    Inside a ``jax.shard_map`` that binds ``axis_name`` (the axis is Manual), no new shard_map
    is opened: tables holding all ``rows`` rows (replicated params) are read directly with
    ``first = 0`` and no collective; tables holding ``rows / m`` rows are this shard's block
    (``first = axis_index * rows / m``) and the result is ``psum``-ed (gradients then follow
    the enclosing shard_map's rules).

    Differentiation: reverse mode only (the sharded call is a ``jax.custom_vjp``; ``jax.jvp``
    through it raises), and ``fn`` must not close over arrays that are differentiated (pass
    them as ``token_args`` or ``tables``). Not supported: an enclosing ``shard_map`` with
    ``check_vma=True`` that binds only the token axes (its cotangent type check rejects the
    unannotated result; the same holds for :func:`gather_sum_sharded`).
    """
    token_args, tables = tuple(token_args), tuple(tables)
    r_here = jnp.shape(tables[0])[1]
    rows = r_here if rows is None else int(rows)
    for t in tables:
        if jnp.ndim(t) != 3 or jnp.shape(t)[1] != r_here:
            raise ValueError(
                f"every table must have shape [j, r, d] with the same r={r_here}; "
                f"got shapes {[jnp.shape(x) for x in tables]}"
            )
    check_axis_args(axis_name, token_axis, axis_arg=axis_arg, token_arg=token_arg)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                f"{axis_arg}={axis_name!r} shards the tables over a mesh axis, but no mesh is "
                f"set: trace and run the function under `with jax.set_mesh(mesh):` with a mesh "
                f"that has an axis {axis_name!r} (the legacy `with mesh:` is not seen inside jit)"
            )
    elif not isinstance(mesh, _MESH_TYPES):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or AbstractMesh; got {type(mesh).__name__}"
        )
    manual = _manual_axes()
    tokens = jnp.shape(token_args[0])[0] if token_args else 0
    m = _check_mesh(
        mesh,
        axis_name,
        token_axis,
        rows,
        tokens,
        axis_arg=axis_arg,
        token_arg=token_arg,
        rows_desc=rows_desc,
        manual=manual,
    )

    if axis_name in manual:  # inside a shard_map over the row axis: no nested shard_map.
        if r_here == rows:
            return fn(jnp.int32(0), *token_args, *tables)
        if r_here * m != rows:
            raise ValueError(
                f"inside a shard_map over {axis_arg}={axis_name!r} the tables must hold all "
                f"{rows} rows or this shard's {rows // m}; got {r_here}"
            )
        first = (lax.axis_index(axis_name) * r_here).astype(jnp.int32)
        return lax.psum(fn(first, *token_args, *tables), axis_name)

    toks = tuple(a for a in _token_axes(token_axis) if a not in manual)
    call, specs = _sharded_call(fn, mesh, axis_name, rows // m, toks, len(token_args), len(tables))
    args = tuple(jnp.asarray(a) for a in token_args + tables)
    return call(*(to_explicit_spec(x, mesh, s) for x, s in zip(args, specs, strict=True)))


def _sharded_call(fn, mesh, axis_name: str, local_rows: int, toks: tuple, n_tok: int, n_tab: int):
    """The shard_map of ``fn`` + psum, with an explicit backward (``jax.custom_vjp``).

    Why not plain autodiff of the shard_map: the local ``gather_sum`` implementations need
    ``check_vma=False`` (their scans start from constant carries), and under it the transpose
    of ``psum`` is another ``psum``: the backward would all-reduce the (already replicated)
    output cotangent ``[n, d]`` once more. The explicit backward runs the local VJP on the
    replicated cotangent, all-reduces the cotangents of the token arguments (weights, inputs)
    over ``axis_name`` and those of the tables over the token axes only; the table cotangents
    stay row-sharded. The local forward is re-run inside the backward (only what its VJP needs
    survives XLA's dead-code elimination).
    """
    tok = P(toks[0] if len(toks) == 1 else (toks or None))
    specs = (tok,) * n_tok + (P(None, axis_name, None),) * n_tab

    def first():
        return (lax.axis_index(axis_name) * local_rows).astype(jnp.int32)

    def fwd_local(*args):
        return lax.psum(fn(first(), *args), axis_name)

    def differentiable(args) -> list[int]:
        return [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.inexact)]

    def bwd_local(ct, *args):
        diff = differentiable(args)

        def f(*d):
            full = list(args)
            for i, a in zip(diff, d, strict=True):
                full[i] = a
            return fn(first(), *full)

        _, vjp = jax.vjp(f, *(args[i] for i in diff))
        out = []
        for i, c in zip(diff, vjp(ct), strict=True):
            # Token arguments are replicated over the row axis: add the row shards' parts.
            # Tables are replicated over the token axes: add the token shards' parts.
            axes = (axis_name,) if i < n_tok else toks
            out.append(lax.psum(c, axes) if axes else c)
        return tuple(out)

    fwd_sm = jax.shard_map(fwd_local, mesh=mesh, in_specs=specs, out_specs=tok, check_vma=False)

    @jax.custom_vjp
    def call(*args):
        return fwd_sm(*args)

    def call_fwd(*args):
        return fwd_sm(*args), args

    def call_bwd(args, ct):
        diff = differentiable(args)
        bwd_sm = jax.shard_map(
            bwd_local,
            mesh=mesh,
            in_specs=(tok,) + specs,
            out_specs=tuple(specs[i] for i in diff),
            check_vma=False,
        )
        cts = dict(zip(diff, bwd_sm(to_explicit_spec(ct, mesh, tok), *args), strict=True))
        return tuple(cts.get(i) for i in range(len(args)))  # None: integer (index) inputs

    call.defvjp(call_fwd, call_bwd)
    return call, specs


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
      token_axis: optional second mesh axis (or tuple of axes) over which the tokens (``n``)
        are split; the output is then split the same way.
      implementation, interpret, check_indices: as in :func:`gather_sum` (``check_indices``
        applies to the global indices; each shard's local call does not check).
    Returns:
      ``y [n, d]`` in ``tables.dtype``, equal to ``gather_sum(indices, weights, tables)``.
    """
    if not isinstance(mesh, _MESH_TYPES):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or AbstractMesh; got {type(mesh).__name__}"
        )
    api._validate(indices, weights, tables)
    api._check_range(indices, jnp.shape(tables)[1], check_indices)

    def local(first, idx, w, tab):
        return api.gather_sum(
            idx - first,
            w,
            tab,
            implementation=implementation,
            interpret=interpret,
            check_indices=False,
        )

    return row_sharded_sum(
        local, (indices, weights), (tables,), mesh=mesh, axis_name=axis_name, token_axis=token_axis
    )
