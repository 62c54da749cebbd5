"""jaxlayers: efficient layers from recent research as pure JAX functions.

Every layer is a module with a frozen ``Config``, ``init(key, cfg)`` and ``apply(params, x, cfg)``
(see :mod:`jaxlayers.core`). Submodules load on first access (``jaxlayers.dense``,
``jaxlayers.attention``, ``jaxlayers.models``, ``jaxlayers.nnx``, ...), so ``import jaxlayers``
is cheap and pulls in neither Flax, optax nor orbax. ``jaxlayers.registry`` imports every layer.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxlayers.core import (
    Example,
    LayerConfig,
    ParamSpec,
    abstract_params,
    apply,
    count_params,
    init,
    init_state,
    layer_fns,
    logical_axes,
    param_specs,
    register_layer,
    registered_layers,
    step,
)

__version__ = "0.1.0"

__all__ = [
    "Example",
    "LayerConfig",
    "ParamSpec",
    "abstract_params",
    "apply",
    "count_params",
    "init",
    "init_state",
    "layer_fns",
    "logical_axes",
    "param_specs",
    "register_layer",
    "registered_layers",
    "step",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # PEP 562: `jaxlayers.dense`, `jaxlayers.nnx`, ... import the submodule on first access.
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"jaxlayers.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"jaxlayers.{name}":
            raise
        raise AttributeError(f"module 'jaxlayers' has no attribute {name!r}") from None
