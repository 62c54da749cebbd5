"""Ground truth for gather_sum: the dense one-hot matmul form.

    y[n, :] = sum_j weights[n, j] * tables[j, indices[n, j], :]
            = sum_j sum_r (weights[n, j] * onehot(indices[n, j])[r]) * tables[j, r, :]

Shapes: ``indices [n, j]`` int32, ``weights [n, j]`` float, ``tables [j, r, d]`` float ->
``y [n, d]`` in ``tables.dtype``. ``tables`` may also be ``[1, r, d]``: one table shared by
every ``j`` (product-key memories, PEER). Everything is computed in float32 at HIGHEST precision.

Out-of-range indices (``< 0`` or ``>= r``) have an all-zero one-hot row, so their term is
*dropped*: it adds nothing to ``y`` and receives zero gradient. Every implementation follows
this rule (the public op can also reject such indices; see ``api.gather_sum``).

Differentiable by plain autodiff; memory is O(n * j * r), so it is for tests and tiny shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["gather_sum", "cost"]


def gather_sum(indices: jax.Array, weights: jax.Array, tables: jax.Array) -> jax.Array:
    """Dense one-hot reference of ``gather_sum`` (see module docstring)."""
    r = tables.shape[1]
    onehot = jax.nn.one_hot(indices, r, dtype=jnp.float32)  # [n, j, r]; OOB -> zeros
    coeff = weights.astype(jnp.float32)[..., None] * onehot  # [n, j, r]
    tab = tables.astype(jnp.float32)
    if tables.shape[0] == indices.shape[1]:
        y = jnp.einsum("njr,jrd->nd", coeff, tab, precision=lax.Precision.HIGHEST)
    else:  # one table shared by every j
        y = jnp.einsum("njr,rd->nd", coeff, tab[0], precision=lax.Precision.HIGHEST)
    return y.astype(tables.dtype)


def cost(n: int, j: int, d: int, *, table_itemsize: int, weight_itemsize: int) -> dict:
    """Analytic cost of the forward gather: flops and the bytes a kernel must move.

    Reads n*j indices (int32) and weights, n*j gathered rows of d elements, writes n*d.
    """
    return {
        "flops": 2 * n * j * d,
        "transcendentals": 0,
        "bytes_accessed": n * j * (4 + weight_itemsize)
        + n * j * d * table_itemsize
        + n * d * table_itemsize,
    }
