"""Adam with low-rank gradient projection onto DCT basis vectors (no SVD).

From "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models" (GaLore-style
projection with a fixed orthogonal basis). For a 2-D gradient ``G: [M, N]`` with ``M >= N`` (a
``[M, N]`` with ``M < N`` is handled as ``G^T``, so the smaller side is always the projected
one) and the orthonormal DCT-II matrix ``D: [N, N]``,
``D[k, j] = c_j cos(pi (2k + 1) j / (2N))`` (``c_0 = sqrt(1/N)``, ``c_j = sqrt(2/N)``):

    every `update_gap` steps:  score_j = ||G D[:, j]||^2,   idx = top-r(score), sorted
    Q = D[:, idx]                                   [N, r]   (only idx is stored: int32 [r])
    R = G Q                                         [M, r]   the low-rank gradient
    m = b1 m + (1 - b1) R,   v = b2 v + (1 - b2) R^2          Adam moments in the low-rank space
    U = scale * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) Q^T          [M, N]

Other leaves (not 2-D, or rejected by ``project_if``) get plain Adam. The optimizer state of a
projected ``[M, N]`` leaf is ``2 M r`` floats plus ``r`` indices instead of ``2 M N``: memory
scales with ``r``. Like GaLore, the moments are kept as they are when the basis is re-selected
(the paper's choice); sorting ``idx`` keeps a column's moment slot stable while the column stays
selected.

**Full rank.** With ``r = N``, ``Q`` is the whole (orthogonal) DCT basis: the projection loses
nothing (``G Q Q^T = G``), and the update is *exactly* Adam run in DCT coordinates,
``adam(G D) D^T``. That is not plain Adam — Adam's elementwise second moment is not invariant to
a rotation — so ``basis="identity"`` (column *selection* by gradient norm, ``D = I``) is offered
too: at ``r = N`` it is plain Adam exactly. Both facts are tested.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlayers.optim import _optax

__all__ = ["DCTAdamState", "dct_matrix", "scale_by_dct_adam", "dct_adam"]

BASES = ("dct", "identity")
_HI = jax.lax.Precision.HIGHEST


class DCTAdamState(NamedTuple):
    count: jax.Array  # int32 []: steps taken
    mu: Any  # per leaf: float32 [max(M,N), r] if projected, else the leaf's shape
    nu: Any  # same as mu
    indices: Any  # per leaf: int32 [r] selected basis columns if projected, else int32 [0]


def dct_matrix(n: int, dtype=jnp.float32) -> jax.Array:
    """Orthonormal DCT-II basis ``[n, n]``; column ``j`` is frequency ``j``.

    The phase ``(2k + 1) j mod 4n`` is reduced in integers before the cosine, so the float32
    matrix stays orthogonal to ~1e-6 even for n in the thousands.
    """
    k = jnp.arange(n, dtype=jnp.int32)[:, None]
    j = jnp.arange(n, dtype=jnp.int32)[None, :]
    phase = ((2 * k + 1) * j) % (4 * n)
    d = jnp.cos(phase.astype(jnp.float32) * (jnp.pi / (2 * n)))
    scale = jnp.where(j == 0, jnp.sqrt(1.0 / n), jnp.sqrt(2.0 / n)).astype(jnp.float32)
    return (d * scale).astype(dtype)


def _default_project_if(leaf: jax.Array) -> bool:
    return jnp.ndim(leaf) == 2


def _oriented(g: jax.Array) -> tuple[jax.Array, bool]:
    """``g`` with rows >= columns (transposed if needed) and whether it was transposed."""
    return (g.T, True) if g.shape[0] < g.shape[1] else (g, False)


def scale_by_dct_adam(
    rank: int,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    update_gap: int = 200,
    scale: float = 1.0,
    basis: str = "dct",
    project_if: Callable[[jax.Array], bool] | None = None,
) -> Any:
    """The transformation above (no learning rate; see :func:`dct_adam`).

    Args:
      rank: ``r``, basis vectors kept per projected leaf (capped at its smaller side).
      update_gap: re-select the basis columns every ``update_gap`` steps (at step 0 first).
      scale: GaLore's ``alpha``, multiplies the projected-back update.
      basis: ``"dct"`` (the paper) or ``"identity"`` (column selection, see module doc).
      project_if: which leaves to project; default every 2-D leaf.
    """
    if rank < 1 or update_gap < 1:
        raise ValueError(f"rank and update_gap must be >= 1; got {rank=}, {update_gap=}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}; got {basis!r}")
    project_if = project_if or _default_project_if

    def _rank(leaf) -> int:
        return min(rank, min(leaf.shape))

    def init_fn(params):
        def one(p):
            if project_if(p):
                rows = max(p.shape)
                r = _rank(p)
                z = jnp.zeros((rows, r), jnp.float32)
                return z, z, jnp.arange(r, dtype=jnp.int32)
            z = jnp.zeros(p.shape, jnp.float32)
            return z, z, jnp.zeros((0,), jnp.int32)

        leaves, treedef = jax.tree.flatten(params)
        mus, nus, idxs = zip(*[one(p) for p in leaves], strict=True) if leaves else ((), (), ())
        unflat = lambda xs: jax.tree.unflatten(treedef, list(xs))  # noqa: E731
        return DCTAdamState(jnp.zeros((), jnp.int32), unflat(mus), unflat(nus), unflat(idxs))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        refresh = state.count % update_gap == 0
        leaves, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        idxs = treedef.flatten_up_to(state.indices)
        outs = []
        for g, mu, nu, idx in zip(leaves, mus, nus, idxs, strict=True):
            g32 = g.astype(jnp.float32)
            if idx.shape[0] == 0:  # plain Adam
                mu = b1 * mu + (1 - b1) * g32
                nu = b2 * nu + (1 - b2) * jnp.square(g32)
                u = (mu / c1) / (jnp.sqrt(nu / c2) + eps)
                outs.append((u.astype(g.dtype), mu, nu, idx))
                continue
            gw, transposed = _oriented(g32)
            n = gw.shape[1]
            d = dct_matrix(n) if basis == "dct" else jnp.eye(n, dtype=jnp.float32)

            def select(gw=gw, d=d, r=idx.shape[0]):
                proj = jnp.matmul(gw, d, precision=_HI)
                _, top = jax.lax.top_k(jnp.sum(jnp.square(proj), axis=0), r)
                return jnp.sort(top).astype(jnp.int32)

            idx = jax.lax.cond(refresh, select, lambda idx=idx: idx)
            q = jnp.take(d, idx, axis=1)  # [N, r]
            low = jnp.matmul(gw, q, precision=_HI)  # [M, r]
            mu = b1 * mu + (1 - b1) * low
            nu = b2 * nu + (1 - b2) * jnp.square(low)
            u_low = (mu / c1) / (jnp.sqrt(nu / c2) + eps)
            u = scale * jnp.matmul(u_low, q.T, precision=_HI)
            outs.append(((u.T if transposed else u).astype(g.dtype), mu, nu, idx))
        unflat = lambda i: jax.tree.unflatten(treedef, [o[i] for o in outs])  # noqa: E731
        return unflat(0), DCTAdamState(count, unflat(1), unflat(2), unflat(3))

    return _optax.transformation(init_fn, update_fn)


def dct_adam(learning_rate: Any, rank: int, **kwargs: Any) -> Any:
    """:func:`scale_by_dct_adam` followed by ``-learning_rate`` (float or optax schedule)."""
    return _optax.with_learning_rate(scale_by_dct_adam(rank, **kwargs), learning_rate)
