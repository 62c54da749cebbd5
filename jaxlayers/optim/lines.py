"""LiNeS: depth-scaled fine-tuning updates (post-training layer scaling).

From "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging". The
fine-tuning update ``tau = theta_ft - theta_pre`` (or a merged multi-task vector) is scaled per
layer, linearly in depth, so shallow layers stay close to the pre-trained model (their general
features are kept, against forgetting) and deep layers keep their task-specific change:

    lambda(l) = alpha + beta * l / (L - 1),          l = 0 .. L-1 (0 = the shallowest)
    theta(l)  = theta_pre(l) + lambda(l) * tau(l)

(the paper indexes layers from 1 with ``(l - 1) / (L - 1)``). ``alpha = 1, beta = 0`` returns
the fine-tuned model; the paper's single-task setting uses e.g. ``alpha = 0, beta = 1`` or a
small ``alpha``; for merging, ``tau`` is the merged task vector (sum or mean of several).

Which layer a param belongs to is a function ``layer_index(path, leaf)`` returning an ``int``
(its depth), ``"stacked"`` (a leaf whose leading axis *is* the layer axis, as with
``scan_layers=True``: scaled row by row), or ``None`` (not part of the layer stack; its update is
kept unscaled, as the paper keeps the task head). :func:`lm_layer_index` does this for
:mod:`jaxlayers.models.lm` trees: ``"embed"`` is depth 0, ``"blocks/i"`` depth ``i``, stacked
blocks row by row, and the final norm / untied unembedding are the head (``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers.optim.sigma_reparam import path_str

__all__ = ["lines_scales", "lines_apply", "lines_merge", "task_vector", "lm_layer_index"]

LayerIndex = Callable[[str, jax.Array], "int | str | None"]


def lines_scales(num_layers: int, alpha: float, beta: float) -> np.ndarray:
    """``lambda(l)`` for ``l = 0 .. L-1`` (float64 ``[L]``); one layer gets ``alpha + beta``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1; got num_layers={num_layers}")
    if num_layers == 1:
        return np.asarray([alpha + beta])
    return alpha + beta * np.arange(num_layers) / (num_layers - 1)


def lm_layer_index(num_layers: int) -> LayerIndex:
    """Layer map for :mod:`jaxlayers.models.lm` params (see module docstring)."""

    def index(path: str, leaf: jax.Array):
        parts = path.split("/")
        if parts[0] == "embed":
            return 0
        if parts[0] == "blocks":
            if len(parts) > 1 and parts[1].isdigit():
                return int(parts[1])
            if jnp.ndim(leaf) >= 1 and leaf.shape[0] == num_layers:
                return "stacked"
        return None

    return index


def task_vector(pretrained: Any, finetuned: Any) -> Any:
    """``finetuned - pretrained`` leaf by leaf (float32)."""
    return jax.tree.map(
        lambda p, f: f.astype(jnp.float32) - p.astype(jnp.float32), pretrained, finetuned
    )


def lines_apply(
    pretrained: Any,
    delta: Any,
    *,
    alpha: float,
    beta: float,
    num_layers: int,
    layer_index: LayerIndex | None = None,
) -> Any:
    """``theta_pre + lambda(layer) * delta`` leaf by leaf (in the pre-trained params' dtypes)."""
    scales = lines_scales(num_layers, alpha, beta)
    layer_index = layer_index or lm_layer_index(num_layers)

    def one(path, p, d):
        where = layer_index(path_str(path), p)
        d32 = d.astype(jnp.float32)
        if where is None:
            lam = jnp.float32(1.0)
        elif where == "stacked":
            if p.shape[0] != num_layers:
                raise ValueError(
                    f"stacked leaf {path_str(path)} must have leading axis num_layers="
                    f"{num_layers}; got shape {p.shape}"
                )
            lam = jnp.asarray(scales, jnp.float32).reshape((num_layers,) + (1,) * (p.ndim - 1))
        else:
            if not 0 <= int(where) < num_layers:
                raise ValueError(
                    f"layer_index must return a depth in [0, {num_layers}); got {where} for "
                    f"{path_str(path)}"
                )
            lam = jnp.float32(scales[int(where)])
        return (p.astype(jnp.float32) + lam * d32).astype(p.dtype)

    return jax.tree_util.tree_map_with_path(one, pretrained, delta)


def lines_merge(
    pretrained: Any,
    finetuned: Any,
    *,
    alpha: float,
    beta: float,
    num_layers: int,
    layer_index: LayerIndex | None = None,
) -> Any:
    """LiNeS on one fine-tuned model: :func:`lines_apply` of ``finetuned - pretrained``."""
    return lines_apply(
        pretrained,
        task_vector(pretrained, finetuned),
        alpha=alpha,
        beta=beta,
        num_layers=num_layers,
        layer_index=layer_index,
    )
