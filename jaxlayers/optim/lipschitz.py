"""Lipschitz-constrained weights: cap the spectral norm of every 2-D weight after each update.

A Dense layer ``x -> x W`` is ``sigma_max(W)``-Lipschitz (in the l2 norm), so bounding the
largest singular value of every weight bounds the network's Lipschitz constant (the constraint
used by spectrally normalised / Lipschitz networks, e.g. "Spectral Normalization for Generative
Adversarial Networks"). :func:`spectral_norm_cap` is an optax transformation to chain *after*
the optimizer: it forms the new weight ``W' = W + update``, estimates ``sigma = sigma_max(W')``
by power iteration, and rescales

    W'' = W' * min(1, max_norm / sigma)          (returned as the update W'' - W)

Power iteration (``num_iters`` steps per update, warm-started from the previous left vector
``u``, which the state keeps): ``v = normalize(W^T u)``, ``u = normalize(W v)``,
``sigma = u^T W v``. ``sigma`` approaches ``sigma_max`` from below, so the cap holds up to the
iteration's error; the error shrinks each step because the weights change slowly (a few
iterations on the first step are advisable: ``num_iters`` applies to every step).

Only 2-D leaves are capped (wrap with ``optax.masked`` to choose which); others pass through.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlayers.optim import _optax

__all__ = ["SpectralCapState", "power_iteration", "spectral_norm_cap", "random_unit_vector"]

_HI = jax.lax.Precision.HIGHEST


class SpectralCapState(NamedTuple):
    u: Any  # per leaf: float32 [rows] left singular-vector estimate (2-D leaves), else [0]


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), 1e-30)


def random_unit_vector(key: jax.Array, n: int) -> jax.Array:
    return _normalize(jax.random.normal(key, (n,), jnp.float32))


def power_iteration(
    w: jax.Array, u: jax.Array, num_iters: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``num_iters`` power steps on ``w: [m, n]`` from ``u: [m]``: returns ``(sigma, u, v)``.

    ``sigma = u^T w v`` is differentiable in ``w`` (callers stop gradients through ``u, v``).
    """
    w32 = w.astype(jnp.float32)
    v = jnp.zeros((w.shape[1],), jnp.float32)
    for _ in range(max(num_iters, 1)):
        v = _normalize(jnp.matmul(u, w32, precision=_HI))
        u = _normalize(jnp.matmul(w32, v, precision=_HI))
    sigma = jnp.matmul(u, jnp.matmul(w32, v, precision=_HI), precision=_HI)
    return sigma, u, v


def spectral_norm_cap(max_norm: float, *, num_iters: int = 1, key: jax.Array | int = 0) -> Any:
    """An optax transformation capping ``sigma_max`` of every 2-D param at ``max_norm``.

    ``key`` seeds the initial power-iteration vectors. ``update`` must receive ``params``.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive; got max_norm={max_norm}")
    base = jax.random.key(key) if isinstance(key, int) else key

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        us = [
            random_unit_vector(jax.random.fold_in(base, i), p.shape[0])
            if jnp.ndim(p) == 2
            else jnp.zeros((0,), jnp.float32)
            for i, p in enumerate(leaves)
        ]
        return SpectralCapState(jax.tree.unflatten(treedef, us))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "params must be passed to update(updates, state, params): the cap acts on "
                "params + updates"
            )
        leaves, treedef = jax.tree.flatten(updates)
        outs = []
        for g, p, u in zip(
            leaves, treedef.flatten_up_to(params), treedef.flatten_up_to(state.u), strict=True
        ):
            if u.shape[0] == 0:
                outs.append((g, u))
                continue
            new_w = p.astype(jnp.float32) + g.astype(jnp.float32)
            sigma, u, _ = power_iteration(jax.lax.stop_gradient(new_w), u, num_iters)
            factor = jnp.minimum(1.0, max_norm / jnp.maximum(sigma, 1e-30))
            capped = new_w * factor
            outs.append(((capped - p.astype(jnp.float32)).astype(g.dtype), u))
        new_updates = jax.tree.unflatten(treedef, [o[0] for o in outs])
        return new_updates, SpectralCapState(jax.tree.unflatten(treedef, [o[1] for o in outs]))

    return _optax.transformation(init_fn, update_fn)
