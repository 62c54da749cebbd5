"""optax, imported on first use.

``jaxlayers.registry`` imports every ``jaxlayers`` submodule (this package included), and
``import jaxlayers.registry`` must not pull in optax (a training dependency). So the modules of
``jaxlayers.optim`` import optax inside the factories that build transformations, through these
helpers, never at module level.
"""

from __future__ import annotations

from typing import Any


def optax() -> Any:
    import optax as _optax

    return _optax


def transformation(init, update) -> Any:
    """``optax.GradientTransformation(init, update)``."""
    return optax().GradientTransformation(init, update)


def with_learning_rate(inner: Any, learning_rate: Any) -> Any:
    """``chain(inner, scale_by_learning_rate(learning_rate))`` (a float or an optax schedule)."""
    o = optax()
    return o.chain(inner, o.scale_by_learning_rate(learning_rate))
