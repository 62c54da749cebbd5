"""sigma-Reparam: every linear weight used as ``W_hat = gamma / sigma(W) * W``.

From "Stabilizing Transformer Training by Preventing Attention Entropy Collapse". ``sigma(W)``
is the spectral norm of ``W``, estimated by one power-iteration step per training step from a
persistent vector (a non-trainable state); ``gamma`` is a learnable scalar per weight. The
reparameterisation bounds each layer's spectral norm by ``|gamma|``, which bounds the attention
logits and keeps attention entropy from collapsing.

This is a pure params transform, applied to the whole param tree before the model's ``apply``:

    gammas, state = init(params)                       # once
    w_params, state = apply(params, gammas, state)      # each step, inside the loss
    loss = model.apply(w_params, x, cfg)                # both params and gammas are trained

For a selected ``W: [in, out]`` (``y = x W``) with stored ``b: [out]``:

    a = normalize(W b),   b' = normalize(W^T a)          (stop-gradient; b' is the new state)
    sigma = a^T W b'                                     (differentiable in W)
    W_hat = gamma / sigma * W

Following the authors' code, ``b`` starts at the top right singular vector of the initial ``W``
(one SVD at init) and ``gamma`` at ``sigma_max(W)``, so at initialisation ``W_hat == W``.
``gammas`` and ``state`` are flat dicts keyed by the weight's path (``"blocks/0/mlp/up/kernel"``).
By default every 2-D leaf whose path ends in ``"kernel"`` is selected (the Dense kernels of this
project); pass ``include(path, leaf) -> bool`` to choose. With ``update_state=False`` (eval) the
stored vector is used as is and returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers.optim.lipschitz import power_iteration

__all__ = ["default_include", "init", "apply", "path_str"]


def path_str(path) -> str:
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            parts.append(p.name)
        else:
            parts.append(str(p))
    return "/".join(parts)


def default_include(path: str, leaf: jax.Array) -> bool:
    return jnp.ndim(leaf) == 2 and path.split("/")[-1] == "kernel"


def init(
    params: Any, include: Callable[[str, jax.Array], bool] | None = None
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(gammas, state)``: float32 ``gamma = sigma_max(W)`` and the top right singular vector
    ``[out]`` of every selected weight."""
    include = include or default_include
    gammas, state = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        if not include(name, leaf):
            continue
        if jnp.ndim(leaf) != 2:
            raise ValueError(f"sigma-Reparam weights must be 2-D; {name} has shape {leaf.shape}")
        _, s, vh = jnp.linalg.svd(leaf.astype(jnp.float32), full_matrices=False)
        gammas[name] = s[0]
        state[name] = vh[0]
    if not gammas:
        raise ValueError("include selected no weight; sigma-Reparam needs at least one 2-D leaf")
    return gammas, state


def apply(
    params: Any,
    gammas: dict[str, jax.Array],
    state: dict[str, jax.Array],
    *,
    update_state: bool = True,
) -> tuple[Any, dict[str, jax.Array]]:
    """Replace each selected ``W`` by ``gamma / sigma(W) * W``; returns ``(params, state)``."""
    missing = sorted(set(gammas) - set(state))
    if missing:
        raise ValueError(f"state has no vector for {missing}; build gammas and state with init")
    new_state = dict(state)
    hi = jax.lax.Precision.HIGHEST

    def one(path, leaf):
        name = path_str(path)
        if name not in gammas:
            return leaf
        w32 = leaf.astype(jnp.float32)
        # One power step on W^T (from the stored right vector b), without gradients.
        _, b, a = power_iteration(jax.lax.stop_gradient(w32).T, state[name], 1)
        sigma = jnp.matmul(a, jnp.matmul(w32, b, precision=hi), precision=hi)
        if update_state:
            new_state[name] = b
        scale = gammas[name].astype(jnp.float32) / sigma
        return (w32 * scale).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, params), new_state
