"""Public gather_sum: validation, implementation dispatch and block sizes.

    y[n, :] = sum_j weights[n, j] * tables[j, indices[n, j], :]

an "embedding bag" over ``j`` tables, the core of MemoryFormer hashing layers, product-key
memories and PEER.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from .. import _platform
from . import ops, reference, xla
from .block_sizes import BlockSizes, default_block_sizes

__all__ = ["gather_sum"]

_CHECK_MODES = (True, False, "checkify")


def _validate(indices, weights, tables) -> None:
    if jnp.ndim(indices) != 2:
        raise ValueError(
            f"indices must have rank 2 [n, j] (tokens, tables); got shape {jnp.shape(indices)}"
        )
    if jnp.ndim(weights) != 2:
        raise ValueError(
            f"weights must have rank 2 [n, j] (tokens, tables); got shape {jnp.shape(weights)}"
        )
    if jnp.ndim(tables) != 3:
        raise ValueError(
            f"tables must have rank 3 [j, r, d] (tables, rows, features); "
            f"got shape {jnp.shape(tables)}"
        )
    if jnp.shape(weights) != jnp.shape(indices):
        raise ValueError(
            f"weights must have the shape of indices {jnp.shape(indices)}; got {jnp.shape(weights)}"
        )
    j, r, _ = jnp.shape(tables)
    if jnp.shape(indices)[1] != j and j != 1:
        raise ValueError(
            f"indices.shape[1] (number of tables) must equal tables.shape[0]={j} "
            f"(or tables.shape[0] must be 1: one shared table); "
            f"got indices shape {jnp.shape(indices)}"
        )
    if j < 1 or r < 1:
        raise ValueError(
            f"tables must have at least one table and one row; got shape {jnp.shape(tables)}"
        )
    idt = jnp.result_type(indices)
    if idt != jnp.int32:
        raise TypeError(f"indices must have dtype int32; got {idt}")
    for name, arr in (("weights", weights), ("tables", tables)):
        dt = jnp.result_type(arr)
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...); got {dt}")


def _check_range(indices, rows: int, mode) -> None:
    if mode not in _CHECK_MODES:
        raise ValueError(f"check_indices must be one of {_CHECK_MODES}; got {mode!r}")
    if mode is False:
        return
    if mode == "checkify":
        ok = jnp.all((indices >= 0) & (indices < rows))
        checkify.check(ok, f"indices must lie in [0, {rows}) (tables.shape[1])")
        return
    try:
        idx = np.asarray(indices)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # not knowable at trace time: out-of-range entries are dropped (documented)
    if idx.size == 0:
        return
    bad = (idx < 0) | (idx >= rows)
    if bad.any():
        n, j = np.argwhere(bad)[0]
        raise ValueError(
            f"indices must lie in [0, {rows}) (tables.shape[1]); got {int(idx[n, j])} at "
            f"[{n}, {j}] ({int(bad.sum())} out-of-range entries; min {idx.min()}, "
            f"max {idx.max()})"
        )


def gather_sum(
    indices: jax.Array,
    weights: jax.Array,
    tables: jax.Array,
    *,
    implementation: str | None = None,
    interpret: Any = False,
    check_indices: bool | str = True,
    block_sizes: BlockSizes | None = None,
    kernel_platform: str | None = None,
) -> jax.Array:
    """Weighted sum of one row from each of ``j`` tables: ``y[n] = sum_j w[n,j] T[j, idx[n,j]]``.

    Args:
      indices: ``[n, j]`` int32, the row chosen in each table for each token.
      weights: ``[n, j]`` float, the weight of each chosen row.
      tables: ``[j, r, d]`` float, ``j`` tables of ``r`` rows of width ``d``; or ``[1, r, d]``,
        one table shared by every ``j`` (product-key memory, PEER: ``y[n] = sum_j w[n, j]
        T[idx[n, j]]``).
      implementation: ``None`` (Pallas on TPU/GPU, ``"xla"`` on CPU), ``"pallas"``, ``"xla"``
        (take + weighted sum, with a scatter-add backward) or ``"reference"`` (dense one-hot
        matmul; O(n*j*r) memory, for tests).
      interpret: run the Pallas kernels in interpret mode (needed on CPU); ``True`` or a
        ``pltpu.InterpretParams``.
      check_indices: ``True`` (default): when ``indices`` is a concrete array (not traced),
        raise ``ValueError`` if any index is outside ``[0, r)``. Under ``jit`` the values are
        unknown and nothing is checked. ``"checkify"``: emit a ``checkify.check`` (the caller
        must wrap the function in ``jax.experimental.checkify.checkify`` and ``throw``).
        ``False``: no check.
        Unchecked out-of-range (or negative) indices are **dropped** by every implementation:
        the term adds nothing to ``y`` and its weight gets zero gradient.
      block_sizes: Pallas block sizes (default: ``block_sizes.default_block_sizes``).
      kernel_platform: which Pallas kernels, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic); default:
        the current backend, and the GPU kernels when interpreting on CPU.

    Returns:
      ``y [n, d]`` in ``tables.dtype``; accumulation is in float32 in every implementation.

    Gradients: ``d_weights[n, j] = <dy[n], T[j, idx[n, j]]>`` (in ``weights.dtype``) and
    ``d_tables`` a scatter-add of ``w[n, j] dy[n]`` into the touched rows, duplicates summed (in
    ``tables.dtype``); ``indices`` get none.
    """
    _validate(indices, weights, tables)
    _, r, d = jnp.shape(tables)
    _check_range(indices, r, check_indices)
    if kernel_platform not in (None, "gpu", "tpu"):
        raise ValueError(f"kernel_platform must be None, 'gpu' or 'tpu'; got {kernel_platform!r}")

    def run_pallas():
        platform = kernel_platform or _platform.backend()
        if platform == "cpu":
            if not interpret:
                raise NotImplementedError("Pallas on CPU needs interpret=True")
            platform = "gpu"
        if jnp.shape(indices)[0] == 0:
            raise NotImplementedError("Pallas kernels need at least one token")
        itemsize = jnp.dtype(tables.dtype).itemsize
        bs = block_sizes or default_block_sizes(
            platform, n=jnp.shape(indices)[0], d=d, itemsize=itemsize
        )
        bs.validate_for(platform, d)
        return ops.gather_sum(
            indices, weights, tables, platform=platform, block_sizes=bs, interpret=interpret
        )

    return _platform.dispatch(
        implementation,
        {
            "pallas": run_pallas,
            "xla": lambda: xla.gather_sum(indices, weights, tables),
            "reference": lambda: reference.gather_sum(indices, weights, tables),
        },
    )
