"""Pointwise activations, looked up by name.

    gelu       x Phi(x)                                   exact, with the Gaussian CDF (erf)
    gelu_tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    silu       x sigmoid(x)                               (= swish with beta = 1)
    swish      x sigmoid(beta x)                          beta a float or an array (learnable)
    relu       max(x, 0)
    relu2      max(x, 0)^2                                squared ReLU ("Primer")
    identity   x                                          (bilinear GLU)

Papers: "Gaussian Error Linear Units (GELUs)"; "Searching for Activation Functions" (Swish);
"Primer: Searching for Efficient Transformers for Language Modeling" (squared ReLU).
Every function computes in the input's dtype and keeps it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["NAMES", "get", "gelu", "gelu_tanh", "silu", "swish", "relu", "relu2", "identity"]


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)


def swish(x: jax.Array, beta: float | jax.Array = 1.0) -> jax.Array:
    """``x * sigmoid(beta * x)``; ``beta`` broadcasts against ``x`` (cast to ``x.dtype``)."""
    beta = jnp.asarray(beta, x.dtype)
    return x * jax.nn.sigmoid(beta * x)


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


def identity(x: jax.Array) -> jax.Array:
    return x


_FNS: dict[str, Callable[..., jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
    "swish": swish,
    "relu": relu,
    "relu2": relu2,
    "identity": identity,
}

NAMES: tuple[str, ...] = tuple(_FNS)


def get(name: str) -> Callable[..., jax.Array]:
    """The activation called ``name`` (one of :data:`NAMES`)."""
    try:
        return _FNS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {NAMES}; got {name!r}") from None
